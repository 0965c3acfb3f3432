"""launch/ scripts, run against fake gcloud / sbatch / srun that record their argv.

Remote command strings are executed for real with bash in a sandbox whose
programs are fakes too, so quoting is checked by what the remote side would
actually receive, not by looking at the string.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU_SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "kill.sh", "delete.sh"]
SCRIPTS = [LAUNCH / "tpu" / s for s in TPU_SCRIPTS] + [LAUNCH / "gpu" / "submit.sh"]
TARGET = ["--name", "my-tpu", "--zone", "us-central2-b"]
CONFIG = "configs/noisyvit_imagenet.py:variant=B/16,res=224"
WORKDIR = "gs://my-bucket/runs/vit-b16"
DATA_DIR = "gs://my-bucket/tensorflow_datasets"
# Config values a remote shell must not interpret.
PAYLOADS = [
    "--config.note=x; rm -rf /",
    "--config.a=$(touch pwned)",
    "--config.b=`touch pwned`",
    "--config.c=a'b\"c\\d",
    "--config.d=* ~ && touch pwned || touch pwned",
    "--config.e=line1\nline2; touch pwned",
    "--config.f=",
]

# One fake for every program: records argv (and a little context) as a JSON line.
FAKE = r"""#!{python} -S
import json, os, shutil, sys
exe, argv = sys.argv[0], sys.argv[1:]
name = os.path.basename(exe)
rec = dict(prog=name, exe=exe, argv=argv, cwd=os.getcwd(),
           env={{k: os.environ.get(k) for k in
                ("TFDS_DATA_DIR", "XLA_FLAGS", "NOISY_FLAX_DISTRIBUTED", "PYTHONUNBUFFERED")}})
with open(os.environ["FAKE_RECORD"], "a") as f:
    f.write(json.dumps(rec) + "\n")
if name == "gcloud" and os.environ.get("FAKE_FAIL") and any(
        os.environ["FAKE_FAIL"] in a for a in argv):  # a worker refused this command
    sys.exit(1)
if name == "gcloud" and "describe" in argv:
    print(os.environ.get("FAKE_STATE", "ACTIVE") if "queued-resources" in argv else "2")
if name == "gcloud" and "scp" in argv:  # keep what would be uploaded
    for a in argv:
        if os.path.isfile(a):
            shutil.copy(a, os.environ["FAKE_COPIES"])
if name == "sbatch":
    print("4711")
if name == "pgrep":
    print("4242")
if name == "sudo" and argv[:1] == ["lsof"]:
    print("4243\n4242")
if name == "sudo" and argv[:2] == ["kill", "-0"]:  # alive: the pids in FAKE_ALIVE
    sys.exit(0 if set(argv[2:]) <= set(os.environ.get("FAKE_ALIVE", "").split()) else 1)
if name.startswith("python") and argv == ["-c", "import ensurepip, venv"] and os.environ.get(
        "FAKE_NO_VENV"):
    sys.exit(1)  # an image without python3.X-venv: ensurepip is missing
if name.startswith("python") and argv[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(argv[2], "bin"))
    for tool in ("python", "pip"):
        shutil.copy(exe, os.path.join(argv[2], "bin", tool))
"""


class Fakes:
    """A bin directory of recording fakes and the record they write to."""

    def __init__(self, root: Path, names):
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.record = root / "record.jsonl"
        self.copies = root / "copies"
        self.copies.mkdir()
        for name in names:
            self.add(self.bin / name)

    def add(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(0o755)

    def env(self, path_tail=os.environ["PATH"], **extra):
        env = {
            "PATH": f"{self.bin}:{path_tail}",
            "FAKE_RECORD": str(self.record),
            "FAKE_COPIES": str(self.copies),
            "HOME": os.environ.get("HOME", "/tmp"),
            "TMPDIR": str(self.bin.parent),
            "LC_ALL": "C.UTF-8",
        }
        env.update(extra)
        return env

    def records(self):
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def clear(self):
        self.record.unlink(missing_ok=True)


@pytest.fixture
def local(tmp_path):
    """The launching machine: fake gcloud, sbatch, srun first on PATH."""
    return Fakes(tmp_path / "local", ["gcloud", "sbatch", "srun"])


@pytest.fixture
def remote(tmp_path):
    """A worker: a home directory and fakes for everything that would act."""
    fakes = Fakes(tmp_path / "remote", [
        "python", "python3", "python3.11", "rm", "touch", "sudo", "pgrep", "git", "apt-get"])
    fakes.home = tmp_path / "remote" / "home"
    fakes.home.mkdir()
    return fakes


def launch(fakes, script, *args, cwd=ROOT, **env):
    path = script if isinstance(script, Path) else LAUNCH / "tpu" / script
    return subprocess.run([str(path), *args], cwd=cwd, env=fakes.env(**env),
                          capture_output=True, text=True, timeout=30)


def gcloud_calls(fakes):
    recs = fakes.records()
    assert all(r["prog"] == "gcloud" for r in recs), recs
    return [r["argv"] for r in recs]


def remote_command(argv):
    """The --command=... string of a recorded `gcloud ... ssh`."""
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd[len("--command="):]


def run_remotely(remote, command, cwd=None, wait_for=0, **env):
    """Run a remote command string as the worker's login shell would: bash -c."""
    # Only the fakes and the basic tools: python, rm, touch etc. are the fakes.
    proc = subprocess.run(["bash", "-c", command], cwd=cwd or remote.home,
                          env=remote.env(path_tail="/usr/bin:/bin", HOME=str(remote.home), **env),
                          capture_output=True, text=True, timeout=30)
    deadline = time.time() + 10  # run.sh starts python in the background
    while len(remote.records()) < wait_for and time.time() < deadline:
        time.sleep(0.02)
    return proc


def assert_usage_error(proc, script, fragment):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert proc.stdout == ""


# -- every script ----------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_runs_nothing(local, script):
    proc = launch(local, script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: launch/")
    assert "--dry-run" in proc.stdout
    assert local.records() == []


def test_shellcheck_passes_on_every_script():
    # CI installs shellcheck (.ci/run); without it this must fail, not skip.
    assert shutil.which("shellcheck"), "shellcheck is not installed (apt-get install shellcheck)"
    files = [str(p.relative_to(ROOT)) for p in SCRIPTS] + ["launch/lib.sh"]
    # One shellcheck per file, in parallel: together they take seconds.
    procs = {f: subprocess.Popen(["shellcheck", "-x", f], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for f in files}
    for f, proc in procs.items():
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
    for p in SCRIPTS:
        assert os.access(p, os.X_OK), p
        assert "set -euo pipefail" in p.read_text(), p


# -- create / delete -------------------------------------------------------

def test_create_tpu_vm(local):
    proc = launch(local, "create.sh", *TARGET, "--accelerator-type=v4-32", "--spot",
                  "--project", "my-project-1")
    assert proc.returncode == 0, proc.stderr
    assert gcloud_calls(local) == [[
        "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-central2-b",
        "--project=my-project-1", "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base", "--spot"]]


def test_create_queued_resource_and_wait(local):
    proc = launch(local, "create.sh", *TARGET, "--accelerator-type", "v5litepod-16",
                  "--queued", "--reserved", "--wait")
    assert proc.returncode == 0, proc.stderr
    create, describe = gcloud_calls(local)
    assert create == [
        "compute", "tpus", "queued-resources", "create", "my-tpu", "--zone=us-central2-b",
        "--node-id=my-tpu", "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite", "--reserved"]
    assert describe[:5] == ["compute", "tpus", "queued-resources", "describe", "my-tpu"]
    assert "ACTIVE" in proc.stderr


def test_create_best_effort_is_an_alpha_queued_resource(local):
    proc = launch(local, "create.sh", *TARGET, "--accelerator-type", "v4-32",
                  "--best-effort", "--version", "tpu-ubuntu2204-base")
    assert proc.returncode == 0, proc.stderr
    (argv,) = gcloud_calls(local)
    assert argv[:5] == ["alpha", "compute", "tpus", "queued-resources", "create"]
    assert argv[-1] == "--best-effort"


# The runtime images Cloud TPU documents for JAX, per generation (README).
@pytest.mark.parametrize("accel, version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_create_picks_the_runtime_of_each_generation(local, accel, version):
    proc = launch(local, "create.sh", *TARGET, "--accelerator-type", accel)
    assert proc.returncode == 0, proc.stderr
    (argv,) = gcloud_calls(local)
    assert f"--version={version}" in argv


def test_create_wait_fails_when_the_queued_resource_fails(local):
    proc = launch(local, "create.sh", *TARGET, "--accelerator-type", "v4-32", "--queued",
                  "--wait", FAKE_STATE="FAILED", NOISY_FLAX_POLL_SECONDS="0")
    assert proc.returncode == 1, proc.stderr
    assert "queued resource my-tpu is FAILED" in proc.stderr


@pytest.mark.parametrize("queued, expected", [
    ([], ["compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-central2-b", "--quiet"]),
    (["--queued"], ["compute", "tpus", "queued-resources", "delete", "my-tpu",
                    "--zone=us-central2-b", "--force", "--quiet"]),
])
def test_delete(local, queued, expected):
    proc = launch(local, "delete.sh", *TARGET, "--yes", *queued)
    assert proc.returncode == 0, proc.stderr
    assert gcloud_calls(local) == [expected]


# -- setup -----------------------------------------------------------------

def test_setup_copies_head_and_installs_on_all_workers(local, remote):
    proc = launch(local, "setup.sh", *TARGET)
    assert proc.returncode == 0, proc.stderr
    scp, ssh = gcloud_calls(local)
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:] == ["my-tpu:noisy_flax-src.tar.gz", "--zone=us-central2-b", "--worker=all"]
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in ssh
    # The archive's temporary directory is gone afterwards.
    assert not Path(scp[4]).exists()

    # Now be the worker: the uploaded archive is in the home directory.
    shutil.copy(local.copies / "noisy_flax-src.tar.gz", remote.home)
    proc = run_remotely(remote, remote_command(ssh))
    assert proc.returncode == 0, proc.stderr
    code = remote.home / "noisy_flax"
    assert (code / "setup.cfg").is_file()
    steps = [(Path(r["exe"]).name if r["exe"].startswith("/") else r["exe"], r["argv"])
             for r in remote.records()]
    # python3.11 is there already, so no sudo apt-get.
    assert steps == [
        ("rm", ["-f", "noisy_flax-src.tar.gz"]),
        ("python3.11", ["-c", "import ensurepip, venv"]),
        ("python3.11", ["-m", "venv", ".venv"]),
        (".venv/bin/pip", ["install", "-q", "--upgrade", "pip"]),
        (".venv/bin/pip", ["install", "-q", "-e", ".[tpu]"]),
        (".venv/bin/python", ["-c", steps[-1][1][1]]),
    ]
    # The last step is the smoke check: the installed package imports with jax.
    assert steps[-1][1][1].startswith("import jax, noisy_flax;")
    assert [r["cwd"] for r in remote.records()] == [str(remote.home)] + [str(code)] * 5

    # A rerun updates in place: the venv that is there is kept, not made again.
    remote.clear()
    shutil.copy(local.copies / "noisy_flax-src.tar.gz", remote.home)
    proc = run_remotely(remote, remote_command(ssh))
    assert proc.returncode == 0, proc.stderr
    assert not [r for r in remote.records() if r["argv"][:2] == ["-m", "venv"]]


def test_setup_installs_python_and_its_venv_module_when_the_image_lacks_them(local, remote):
    proc = launch(local, "setup.sh", *TARGET, "--worker", "0,1")
    assert proc.returncode == 0, proc.stderr
    scp, ssh = gcloud_calls(local)
    assert "--worker=0,1" in scp and "--worker=0,1" in ssh
    shutil.copy(local.copies / "noisy_flax-src.tar.gz", remote.home)
    proc = run_remotely(remote, remote_command(ssh), FAKE_NO_VENV="1")
    assert proc.returncode == 0, proc.stderr
    sudo = [r["argv"] for r in remote.records() if r["prog"] == "sudo"]
    # On Debian / Ubuntu the venv module (and ensurepip) is its own package.
    assert sudo == [["apt-get", "update", "-qq"],
                    ["DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq",
                     "python3.11", "python3.11-venv"]]


def test_setup_from_git_url_passes_url_and_ref_literally(local, remote):
    url = "https://example.com/x.git#$(touch${IFS}pwned);touch${IFS}pwned"
    proc = launch(local, "setup.sh", *TARGET, "--repo", url, "--ref", "v1.2", "--worker", "0,1")
    assert proc.returncode == 0, proc.stderr
    (ssh,) = gcloud_calls(local)
    assert "--worker=0,1" in ssh
    proc = run_remotely(remote, remote_command(ssh))
    assert proc.returncode == 0, proc.stderr
    git = [r["argv"] for r in remote.records() if r["prog"] == "git"]
    # A fresh worker has no repository yet; the fetched commit is FETCH_HEAD.
    assert git == [["-C", "noisy_flax", "init", "-q"],
                   ["-C", "noisy_flax", "fetch", "-q", "--depth=1", url, "v1.2"],
                   ["-C", "noisy_flax", "checkout", "-q", "-f", "--detach", "FETCH_HEAD"]]
    assert not [r for r in remote.records() if r["prog"] in ("touch", "rm")]


# -- run / logs / kill -----------------------------------------------------

def test_run_starts_main_on_all_workers_with_literal_arguments(local, remote):
    extra = ["--", "--extra", "y && touch pwned", "--seed=1"]
    proc = launch(local, "run.sh", *TARGET, "--config", CONFIG, "--workdir", WORKDIR,
                  "--data-dir", DATA_DIR, "--env", "XLA_FLAGS=--a=1 --b", *PAYLOADS, *extra)
    assert proc.returncode == 0, proc.stderr
    check, ssh = gcloud_calls(local)
    for call in (check, ssh):
        assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
        assert "--worker=all" in call and "--zone=us-central2-b" in call
    assert "still going" in remote_command(check) and "nohup" not in remote_command(check)
    command = remote_command(ssh)
    assert "noisy_flax.main" in command and "nohup" in command

    # The worker's shell runs it: python must get each value as one argument.
    (remote.home / "noisy_flax/.venv/bin").mkdir(parents=True)
    remote.add(remote.home / "noisy_flax/.venv/bin/python")
    proc = run_remotely(remote, command, wait_for=1)
    assert proc.returncode == 0, proc.stderr
    assert "started pid" in proc.stdout
    (rec,) = remote.records()  # python, and nothing else ran
    assert rec["exe"] == ".venv/bin/python"
    assert rec["argv"] == ["-m", "noisy_flax.main", "--config", CONFIG, "--workdir", WORKDIR,
                           *PAYLOADS, *extra[1:]]
    # NOISY_FLAX_DISTRIBUTED: a gcloud TPU VM names its workers only through
    # the metadata server, so main.py must be told to start JAX's runtime.
    assert rec["env"] == {"TFDS_DATA_DIR": DATA_DIR, "XLA_FLAGS": "--a=1 --b",
                          "NOISY_FLAX_DISTRIBUTED": "1", "PYTHONUNBUFFERED": "1"}
    assert not list(remote.home.rglob("pwned*"))
    logs = remote.home / "noisy_flax/logs"
    assert (logs / "latest.log").is_symlink() and (logs / "latest.log").exists()
    assert (logs / "latest.pid").read_text().strip().isdigit()

    # A second start while the first is alive (here: this test's pid) is refused,
    # by the check that runs first on every worker and by the start itself.
    remote.clear()
    (logs / "latest.pid").write_text(f"{os.getpid()}\n")
    for each in (remote_command(check), command):
        proc = run_remotely(remote, each)
        assert proc.returncode == 1 and "still going" in proc.stderr
    assert remote.records() == []
    (logs / "latest.pid").write_text("999999999\n")  # a finished run: the check passes
    assert run_remotely(remote, remote_command(check)).returncode == 0
    # Where there is no checkout (here: a directory without noisy_flax/), nothing runs.
    assert run_remotely(remote, remote_command(check), cwd=logs).returncode == 0


def test_run_starts_nothing_when_any_worker_still_runs(local):
    """gcloud's --worker=all fails when one worker's command fails: then no
    worker may start, or the others would wait for it in jax.distributed."""
    proc = launch(local, "run.sh", *TARGET, "--config", CONFIG, "--workdir", WORKDIR,
                  "--data-dir", DATA_DIR, FAKE_FAIL="still going")
    assert proc.returncode == 1
    assert "a run is still going on some worker (above); nothing was started" in proc.stderr
    (check,) = gcloud_calls(local)  # the start was never sent
    assert "nohup" not in remote_command(check)


def test_run_env_can_turn_distributed_start_off(local, remote):
    proc = launch(local, "run.sh", *TARGET, "--config", CONFIG, "--workdir", WORKDIR,
                  "--data-dir", DATA_DIR, "--env", "NOISY_FLAX_DISTRIBUTED=0")
    assert proc.returncode == 0, proc.stderr
    _, ssh = gcloud_calls(local)
    (remote.home / "noisy_flax/.venv/bin").mkdir(parents=True)
    remote.add(remote.home / "noisy_flax/.venv/bin/python")
    proc = run_remotely(remote, remote_command(ssh), wait_for=1)
    assert proc.returncode == 0, proc.stderr
    (rec,) = remote.records()
    assert rec["env"]["NOISY_FLAX_DISTRIBUTED"] == "0"


def test_run_follow_streams_worker_0(local):
    proc = launch(local, "run.sh", *TARGET, "--config", CONFIG, "--workdir", WORKDIR,
                  "--data-dir", DATA_DIR, "--follow")
    assert proc.returncode == 0, proc.stderr
    _, _, follow = gcloud_calls(local)
    assert "--worker=0" in follow
    assert remote_command(follow) == "tail -n 100 -F noisy_flax/logs/latest.log"


def test_run_follow_keeps_the_remote_dir_and_project(local):
    proc = launch(local, "run.sh", *TARGET, "--project", "my-project-1", "--remote-dir", "nf2",
                  "--config", CONFIG, "--workdir", WORKDIR, "--data-dir", DATA_DIR, "--follow")
    assert proc.returncode == 0, proc.stderr
    _, _, follow = gcloud_calls(local)
    assert "--project=my-project-1" in follow and "--worker=0" in follow
    assert remote_command(follow) == "tail -n 100 -F nf2/logs/latest.log"


@pytest.mark.parametrize("worker", ["all", "0,3"])
def test_logs_from_several_workers_are_labelled(local, remote, worker):
    proc = launch(local, "logs.sh", *TARGET, "--worker", worker, "--lines", "5")
    assert proc.returncode == 0, proc.stderr
    (ssh,) = gcloud_calls(local)
    assert f"--worker={worker}" in ssh
    (remote.home / "noisy_flax/logs").mkdir(parents=True)
    (remote.home / "noisy_flax/logs/latest.log").write_text("step 1\nstep 2\n")
    proc = run_remotely(remote, remote_command(ssh))
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert proc.stdout.splitlines() == [f"[{host}] step 1", f"[{host}] step 2"]


def test_logs_collect_copies_each_worker(local, tmp_path):
    dest = tmp_path / "collected"
    proc = launch(local, "logs.sh", *TARGET, "--collect", str(dest))
    assert proc.returncode == 0, proc.stderr
    describe, *scps = gcloud_calls(local)
    assert describe[:4] == ["compute", "tpus", "tpu-vm", "describe"]
    assert scps == [["compute", "tpus", "tpu-vm", "scp", "my-tpu:noisy_flax/logs/latest.log",
                     f"{dest}/worker-{i}.log", "--zone=us-central2-b", f"--worker={i}"]
                    for i in range(2)]  # the fake describe says 2 workers


def test_kill_waits_for_every_process_and_keeps_the_lock_of_a_live_one(local, remote):
    """One process exits at once, the other ignores the signal: kill must say
    so and leave the TPU's lock file, not stop at the first one gone."""
    proc = launch(local, "kill.sh", *TARGET, "--signal", "TERM", "--timeout", "1")
    assert proc.returncode == 0, proc.stderr
    (ssh,) = gcloud_calls(local)
    command = remote_command(ssh)
    result = subprocess.run(["bash", "-c", command], cwd=remote.home, capture_output=True,
                            text=True, timeout=30, env=remote.env(
                                path_tail="/usr/bin:/bin", HOME=str(remote.home),
                                FAKE_ALIVE="4243"))
    assert result.returncode == 1
    assert result.stderr.strip().endswith("still running after 1s: 4243")
    sudo = [r["argv"] for r in remote.records() if r["prog"] == "sudo"]
    assert ["rm", "-f", "/tmp/libtpu_lockfile"] not in sudo


def test_kill_frees_the_tpu_on_all_workers(local, remote):
    proc = launch(local, "kill.sh", *TARGET)
    assert proc.returncode == 0, proc.stderr
    (ssh,) = gcloud_calls(local)
    assert "--worker=all" in ssh
    command = remote_command(ssh)
    assert "lsof" in command and "/dev/accel" in command
    proc = run_remotely(remote, command)
    assert proc.returncode == 0, proc.stderr
    sudo = [r["argv"] for r in remote.records() if r["prog"] == "sudo"]
    # v4 holds /dev/accel*, v5e and later /dev/vfio/<n>.
    (lsof,) = [a for a in sudo if a[0] == "lsof"]
    assert any(a.startswith("/dev/accel") for a in lsof)
    assert any(a.startswith("/dev/vfio/") for a in lsof)
    assert ["kill", "-s", "KILL", "4242", "4243"] in sudo
    assert ["rm", "-f", "/tmp/libtpu_lockfile"] in sudo


# -- dry runs --------------------------------------------------------------

REPLAYABLE = [
    ("setup.sh", [*TARGET, "--worker", "0,1", "--python", "python3.10"]),
    ("create.sh", [*TARGET, "--accelerator-type", "v4-32", "--project", "my-project-1"]),
    ("create.sh", [*TARGET, "--accelerator-type", "v5litepod-16", "--queued", "--spot", "--wait"]),
    ("run.sh", [*TARGET, "--config", CONFIG, "--workdir", WORKDIR, "--data-dir", DATA_DIR,
                *PAYLOADS, "--follow"]),
    ("logs.sh", [*TARGET, "--collect", "/tmp/x", "--num-workers", "3"]),
    ("logs.sh", [*TARGET, "--follow", "--worker", "all"]),
    ("kill.sh", [*TARGET, "--signal", "TERM", "--timeout", "5"]),
    ("delete.sh", [*TARGET, "--queued"]),
]


@pytest.mark.parametrize("script, args", REPLAYABLE,
                         ids=[f"{s}-{i}" for i, (s, _) in enumerate(REPLAYABLE)])
def test_dry_run_prints_exactly_the_commands_it_would_run(local, tmp_path, script, args):
    proc = launch(local, script, *args, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert local.records() == []
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert lines and all(line.startswith(("gcloud ", *LOCAL_STEPS.get(script, ())))
                         for line in lines), proc.stdout
    # Pasting the printed lines into bash runs the same argv as the real thing.
    printed = tmp_path / "printed.sh"
    printed.write_text(proc.stdout)
    subprocess.run(["bash", "-e", str(printed)], env=local.env(), check=True, timeout=30)
    replayed = same_tmp_dir(gcloud_calls(local), local)
    local.clear()
    proc = launch(local, script, *args)
    assert proc.returncode == 0, proc.stderr
    assert same_tmp_dir(gcloud_calls(local), local) == replayed


# Lines besides gcloud that a dry run prints: setup.sh packs the code locally,
# in a directory that mktemp names only when it runs.
LOCAL_STEPS = {"setup.sh": ("tmp=$(mktemp -d)", "git -C ", 'rm -rf "$tmp"')}
ARCHIVE = "noisy_flax-src.tar.gz"


def same_tmp_dir(calls, fakes):
    """The calls with the mktemp directory of an uploaded archive as <tmp>,
    after checking that it was a fresh one under TMPDIR, that the archive was
    there to upload, and that the directory is gone."""
    out = []
    for argv in calls:
        for i, arg in enumerate(argv):
            if arg.endswith("/" + ARCHIVE):
                tmp = Path(arg).parent
                assert tmp.parent == fakes.bin.parent and tmp.name.startswith("tmp."), arg
                assert not tmp.exists(), arg
                assert (fakes.copies / ARCHIVE).is_file()  # it existed when scp ran
                (fakes.copies / ARCHIVE).unlink()
                argv = [*argv[:i], f"<tmp>/{ARCHIVE}", *argv[i + 1:]]
        out.append(argv)
    return out


def test_setup_dry_run_creates_and_records_nothing(local, tmp_path):
    before = sorted(p.name for p in (tmp_path / "local").iterdir())  # TMPDIR
    proc = launch(local, "setup.sh", *TARGET, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert local.records() == []
    lines = proc.stdout.splitlines()
    assert lines[0] == "tmp=$(mktemp -d)"
    assert lines[1] == f'git -C {ROOT} archive --format=tar.gz -o "$tmp"/{ARCHIVE} HEAD'
    assert lines[2].startswith(f'gcloud compute tpus tpu-vm scp "$tmp"/{ARCHIVE} my-tpu:')
    assert lines[3].startswith("gcloud compute tpus tpu-vm ssh my-tpu ")
    assert lines[4:] == ['rm -rf "$tmp"']
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == before


# -- bad arguments ---------------------------------------------------------

BAD = [
    ("create.sh", ["--name", "my-tpu", "--accelerator-type", "v4-32"], "--zone is required"),
    ("create.sh", [*TARGET, "--accelerator-type", "v4_32"], "--accelerator-type"),
    ("create.sh", [*TARGET, "--accelerator-type", "v4-32", "--spot", "--reserved"], "exclude"),
    ("create.sh", [*TARGET, "--accelerator-type", "v4-32", "--wait"], "--wait"),
    ("create.sh", [*TARGET, "--frobnicate"], "unknown argument"),
    ("create.sh", ["--name", "a;reboot", "--zone", "us-central2-b"], "--name"),
    ("create.sh", ["--zone", "us-central2-b", "--name"], "--name needs a value"),
    ("create.sh", ["--name", "--zone", "us-central2-b"], "--name needs a value"),
    ("create.sh", [*TARGET, "--zone=$(reboot)"], "--zone"),
    ("setup.sh", [*TARGET, "--repo", "ext::sh -c reboot"], "--repo"),
    ("setup.sh", [*TARGET, "--ref", "main;reboot"], "--ref"),
    ("setup.sh", [*TARGET, "--ref", "no-such-ref-xyz"], "not a commit"),
    ("setup.sh", [*TARGET, "--python", "python3; reboot"], "--python"),
    ("setup.sh", [*TARGET, "--remote-dir", "~/x y"], "--remote-dir"),
    ("run.sh", [*TARGET, "--workdir", WORKDIR, "--data-dir", DATA_DIR], "--config is required"),
    ("run.sh", [*TARGET, "--config", "configs/x.txt", "--workdir", WORKDIR,
                "--data-dir", DATA_DIR], "--config"),
    ("run.sh", [*TARGET, "--config", CONFIG, "--workdir", "/tmp/w", "--data-dir", DATA_DIR],
     "gs://"),
    ("run.sh", [*TARGET, "--config", CONFIG, "--workdir", "gs://BUCKET/runs", "--data-dir",
                DATA_DIR], "bucket names are lowercase"),
    ("run.sh", [*TARGET, "--config", CONFIG, "--workdir", WORKDIR], "--data-dir is required"),
    ("run.sh", [*TARGET, "--config", CONFIG, "--workdir", WORKDIR, "--data-dir", DATA_DIR,
                "--env", "BAD KEY=1"], "--env"),
    ("run.sh", [*TARGET, "--config", CONFIG, "--workdir", WORKDIR, "--data-dir", DATA_DIR,
                "--worker", "all;reboot"], "--worker"),
    ("run.sh", [*TARGET, "--config", CONFIG, "--workdir", WORKDIR, "--data-dir", DATA_DIR,
                "note=x"], "unknown argument"),
    ("logs.sh", [*TARGET, "--follow", "--collect", "/tmp/x"], "exclude"),
    ("logs.sh", [*TARGET, "--lines", "ten"], "--lines"),
    ("logs.sh", [*TARGET, "--worker", "0,,3"], "--worker"),
    ("kill.sh", [*TARGET, "--signal", "HUP;reboot"], "--signal"),
    ("delete.sh", ["--zone", "us-central2-b"], "--name is required"),
    (LAUNCH / "gpu/submit.sh", ["--nodes", "0", "--config", CONFIG, "--workdir", "/w"], "--nodes"),
    (LAUNCH / "gpu/submit.sh", ["--config", CONFIG, "--workdir", "w"], "--workdir"),
    (LAUNCH / "gpu/submit.sh", ["--config", CONFIG, "--workdir", "/w", "--job-name", "a b"],
     "--job-name"),
    (LAUNCH / "gpu/submit.sh", ["--config", CONFIG, "--workdir", "/w",
                                "--sbatch-arg", "--qos=x\n#SBATCH --nodes=99"], "--sbatch-arg"),
    (LAUNCH / "gpu/submit.sh", ["--config", CONFIG, "--workdir", "/w", "--time", "2 days"],
     "--time"),
]


@pytest.mark.parametrize("script, args, fragment", BAD,
                         ids=[f"{Path(s).name}-{i}" for i, (s, _, _) in enumerate(BAD)])
def test_bad_arguments_exit_2_with_one_line(local, script, args, fragment):
    proc = launch(local, script, *args)
    assert_usage_error(proc, Path(script).name, fragment)
    assert local.records() == []


# -- SLURM -----------------------------------------------------------------

def gpu_args(tmp_path):
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    return code, ["--nodes", "2", "--gpus-per-node", "8", "--config", CONFIG,
                  "--workdir", "/shared/runs/vit", "--data-dir", "/shared/tfds",
                  "--partition", "gpu", "--time", "2-00:00:00", "--sbatch-arg=--exclusive",
                  "--sbatch-arg", "--qos=high", "--account", "proj1", "--job-name", "vit",
                  "--cpus-per-gpu", "6",
                  "--code-dir", str(code), "--log-dir", str(tmp_path / "slurm-logs"),
                  "--script-out", str(tmp_path / "job.sbatch"), *PAYLOADS]


def test_slurm_submit_one_task_per_gpu(local, remote, tmp_path):
    code, args = gpu_args(tmp_path)
    proc = launch(local, LAUNCH / "gpu/submit.sh", *args)
    assert proc.returncode == 0, proc.stderr
    (rec,) = local.records()
    assert rec["prog"] == "sbatch"
    assert rec["argv"] == ["--parsable", str(tmp_path / "job.sbatch")]
    assert "submitted job 4711" in proc.stderr
    script = (tmp_path / "job.sbatch").read_text()
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2-00:00:00", "#SBATCH --exclusive",
                 "#SBATCH --qos=high", "#SBATCH --account=proj1", "#SBATCH --job-name=vit",
                 "#SBATCH --cpus-per-task=6",
                 f"#SBATCH --output={tmp_path}/slurm-logs/%x-%j.out"]:
        assert line in script.splitlines()
    assert script.startswith("#!/bin/bash\n")
    assert "--gpus-per-task" not in script  # would break JAX's per-task GPU choice
    assert (tmp_path / "slurm-logs").is_dir()  # sbatch does not create it

    # What srun gets when SLURM runs the script.
    srun_fake = Fakes(tmp_path / "node", ["srun", "rm", "touch"])
    proc = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=srun_fake.env(
        path_tail="/usr/bin:/bin", SLURM_JOB_ID="4711", SLURM_JOB_NODELIST="gpu[01-02]"),
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    (srun,) = srun_fake.records()
    assert srun["prog"] == "srun" and srun["cwd"] == str(code)
    assert srun["argv"] == [
        "--ntasks-per-node=8", "--cpus-per-task=6", "--kill-on-bad-exit=1", "--label",
        f"{code}/.venv/bin/python",
        "-m", "noisy_flax.main", "--config", CONFIG, "--workdir", "/shared/runs/vit", *PAYLOADS]
    assert srun["env"]["TFDS_DATA_DIR"] == "/shared/tfds"
    assert srun["env"]["PYTHONUNBUFFERED"] == "1"  # the job log shows progress as it happens

    proc = subprocess.run(["shellcheck", "-s", "bash", str(tmp_path / "job.sbatch")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_slurm_defaults(local, tmp_path):
    # README: 8 GPUs = tasks per node, 8 CPUs per GPU, job noisy_flax, log in
    # <code-dir>/workdirs/slurm-logs/noisy_flax-<jobid>.out.
    code = tmp_path / "code"
    proc = launch(local, LAUNCH / "gpu/submit.sh", "--config", CONFIG, "--workdir", "/w",
                  "--code-dir", str(code), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for line in ["#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --job-name=noisy_flax",
                 f"#SBATCH --output={code}/workdirs/slurm-logs/%x-%j.out"]:
        assert line in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun.startswith(f"srun --ntasks-per-node=8 --cpus-per-task=8 --kill-on-bad-exit=1 "
                           f"--label {code}/.venv/bin/python -m noisy_flax.main ")


def test_slurm_dry_run_prints_script_and_sbatch_only(local, tmp_path):
    _, args = gpu_args(tmp_path)
    proc = launch(local, LAUNCH / "gpu/submit.sh", *args, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert local.records() == []
    assert not (tmp_path / "job.sbatch").exists() and not (tmp_path / "slurm-logs").exists()
    lines = proc.stdout.splitlines()
    assert lines[0] == f"# ---- {tmp_path}/job.sbatch ----"
    assert lines[1] == "#!/bin/bash"
    assert any(line.startswith("srun --ntasks-per-node=8 ") for line in lines)
    assert lines[-2] == "# ---- end ----"
    assert lines[-1] == f"sbatch --parsable {tmp_path}/job.sbatch"
