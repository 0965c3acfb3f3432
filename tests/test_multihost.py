"""Multi-host on one machine: 2 processes x 4 fake CPU devices (gloo
collectives) against 1 process x 8 devices fed the same global batches.

The two workers (tests/multihost_worker.py) train for 3 steps through
``train.train_and_evaluate`` with a shared workdir and FSDP parameters;
meanwhile this process trains on the global batches the two processes'
slices make up and must land on the same losses and parameters. A second
pair trains until one of them alone gets SIGTERM, as a preemption sends it,
and both must save the same step and exit. Children run under a hard
deadline and are killed at once when either fails.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

import multihost_worker as worker
from noisy_flax import checkpointing, input_pipeline, sharding, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 4
# A hang guard, not a speed target: the run takes ~35 s of CPU, but this
# machine is shared; a hung collective or a dead peer ends here at the latest.
DEADLINE_S = 240


# ---------------------------------------------------------------------------
# Launching the children
# ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    """This environment with 4 fake devices instead of conftest's 8."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")


class Workers:
    """The two worker processes, each in its own session so it can be killed whole."""

    def __init__(self, setup_path: str, log_dir: str, mode: str = "train"):
        self.logs = [os.path.join(log_dir, f"worker_{i}.log") for i in range(NUM_PROCESSES)]
        script = os.path.join(REPO, "tests", "multihost_worker.py")
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, script, setup_path, str(i), mode], cwd=REPO,
                    env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True))

    def failed(self) -> bool:
        return any(p.poll() not in (None, 0) for p in self.procs)

    def wait(self, deadline: float) -> None:
        """Returns when all succeeded; fails (killing all) once one fails or time is up."""
        try:
            while any(p.poll() is None for p in self.procs):
                if self.failed() or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            self.kill()
        codes = [p.returncode for p in self.procs]
        if codes != [0] * NUM_PROCESSES:
            self.fail(f"multi-process workers failed or ran past the deadline "
                      f"(exit codes {codes})")

    def fail(self, message: str) -> None:
        self.kill()
        tails = "\n".join(f"--- worker {i} (exit {p.returncode}) ---\n{_tail(log)}"
                          for i, (p, log) in enumerate(zip(self.procs, self.logs)))
        pytest.fail(f"{message}:\n{tails}")

    def output(self, index: int) -> str:
        with open(self.logs[index]) as f:
            return f.read()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _tail(path: str, lines: int = 30) -> str:
    with open(path) as f:
        return "".join(f.readlines()[-lines:])


def expected_global_batches(config) -> list[dict[str, np.ndarray]]:
    """Process p's local batch fills rows [p * 8, (p + 1) * 8) of the global one."""
    streams = [input_pipeline.train_iterator(config, process_index=p, process_count=NUM_PROCESSES)
               for p in range(NUM_PROCESSES)]
    return [{key: np.concatenate([local[key] for local in locals_])
             for key in ("image", "label")}
            for locals_ in (tuple(next(s) for s in streams) for _ in range(worker.TOTAL_STEPS))]


def train_reference(config, batches, workdir: str) -> dict:
    """1 process x 8 devices through the same train_and_evaluate, on ``batches``."""
    saved = {}
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)  # as in the workers: fast compiles
    try:
        with worker.replaying_train_batches(batches), worker.capturing_saved_states(saved):
            summary = train.train_and_evaluate(config, workdir)
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    return {"summary": summary, "workdir": workdir, "config": config, "batches": batches,
            "params": worker.flat(jax.device_get(saved[worker.TOTAL_STEPS].params))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The tiny Fashion-MNIST, prepared once here, so no two workers race to build it."""
    root = tmp_path_factory.mktemp("dataset")
    dirs = {"idx_dir": str(root / "idx"), "data_dir": str(root / "tfds")}
    os.makedirs(dirs["data_dir"])
    worker.write_fake_fashion_mnist(dirs["idx_dir"])
    input_pipeline.get_builder(worker.tiny_config(dirs["data_dir"], dirs["idx_dir"]))
    return dirs


def write_setup(root, dataset) -> tuple[dict, str]:
    """The workers' setup.json: a fresh port, workdir and out_dir under ``root``."""
    setup = {"port": free_port(), "num_processes": NUM_PROCESSES, **dataset,
             "workdir": str(root / "workdir"), "out_dir": str(root / "out")}
    for key in ("workdir", "out_dir"):
        os.makedirs(setup[key])
    setup_path = str(root / "setup.json")
    with open(setup_path, "w") as f:
        json.dump(setup, f)
    return setup, setup_path


def read_facts(setup: dict) -> list[dict]:
    facts = []
    for i in range(NUM_PROCESSES):
        with open(os.path.join(setup["out_dir"], f"facts_{i}.json")) as f:
            facts.append(json.load(f))
    return facts


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):
    """Both runs, finished: the two workers, and meanwhile the 1-process reference."""
    root = tmp_path_factory.mktemp("multihost")
    setup, setup_path = write_setup(root, dataset)
    config = worker.tiny_config(setup["data_dir"], setup["idx_dir"])

    deadline = time.monotonic() + DEADLINE_S
    workers = Workers(setup_path, str(root))
    try:  # the reference trains while the workers run
        reference = train_reference(config, expected_global_batches(config),
                                    str(tmp_path_factory.mktemp("reference")))
    except BaseException:
        workers.kill()
        raise
    workers.wait(deadline)
    return {"setup": setup, "facts": read_facts(setup), "out": setup["out_dir"],
            "reference": reference}


@pytest.fixture(scope="module")
def run(runs):
    return runs


@pytest.fixture(scope="module")
def reference(runs):
    return runs["reference"]


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------
# The two-process run itself
# ---------------------------------------------------------------------------
def test_workers_formed_one_runtime_of_two_processes(run):
    for i, facts in enumerate(run["facts"]):
        assert (facts["process_index"], facts["process_count"]) == (i, NUM_PROCESSES)
        assert (facts["local_devices"], facts["devices"]) == (DEVICES_PER_PROCESS, 8)


def test_global_batches_are_the_processes_slices_in_order(run, reference):
    batches = worker.load_batches(os.path.join(run["out"], "batches.npz"))
    assert len(batches) == worker.TOTAL_STEPS
    # So the reference really trained on what the workers trained on.
    for got, expected in zip(batches, reference["batches"]):
        assert got["image"].shape == (16, 28, 28, 1)
        for key in ("image", "label"):
            np.testing.assert_array_equal(got[key], expected[key])
        # Each process read its own half of the split: no example twice.
        assert len({row.tobytes() for row in got["image"]}) == 16


def example_rows(batches) -> list[tuple[bytes, int]]:
    """(image bytes, label) of every real (mask 1) row of eval batches."""
    return [(image.tobytes(), int(label)) for batch in batches
            for image, label, mask in zip(batch["image"], batch["label"], batch["mask"])
            if mask == 1]


def test_eval_counts_every_example_exactly_once(run, reference):
    for facts in run["facts"]:
        assert facts["summary"]["eval_count"] == worker.TEST_EXAMPLES
    # Which examples: the real rows of the global batches the two processes
    # evaluated are the test split, each once (a count alone would pass one
    # example twice and another never). The split as one process reads it:
    split = example_rows(input_pipeline.eval_batches(reference["config"]))
    index = {row: i for i, row in enumerate(split)}
    assert len(index) == worker.TEST_EXAMPLES  # the fake images all differ
    evaluated = example_rows(worker.load_batches(os.path.join(run["out"], "eval_batches.npz")))
    # -1: a row that is no example of the split
    assert sorted(index.get(row, -1) for row in evaluated) == list(range(worker.TEST_EXAMPLES))


def test_only_process_zero_writes_logs(run):
    workdir = run["setup"]["workdir"]
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    # One writer: each step once (two writers would double every line).
    assert [(r["split"], r["step"]) for r in records] == \
        [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    events = [name for name in os.listdir(workdir) if name.startswith("events.out.tfevents")]
    assert len(events) == 1
    # The files each process wrote in the workdir, by any means (checkpoints
    # are written by all, through orbax): the run's record by process 0 alone.
    written = [[path for path in facts["written"] if not path.startswith("checkpoints")]
               for facts in run["facts"]]
    assert written == [["config.json", "metrics.jsonl", "parameters.txt", "summary.json"], []]
    for name in written[0]:
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name


def test_fsdp_split_the_parameters_across_the_processes(run):
    # So each process held (and checkpointed) only part of those kernels.
    for facts in run["facts"]:
        assert facts["sharded_params"] >= 2  # the two MLP kernels
        assert facts["local_param_bytes"] < facts["param_bytes"]


def test_checkpoint_restored_by_both_processes(run):
    assert [facts["restored_step"] for facts in run["facts"]] == [worker.TOTAL_STEPS] * 2
    trained = np.load(os.path.join(run["out"], "params.npz"))
    restored = np.load(os.path.join(run["out"], "restored_params.npz"))
    assert sorted(trained.files) == sorted(restored.files)
    for name in trained.files:
        np.testing.assert_array_equal(restored[name], trained[name], err_msg=name)


# ---------------------------------------------------------------------------
# Against one process with 8 devices
# ---------------------------------------------------------------------------
def test_same_losses_as_one_process(run, reference):
    two = [r for r in read_jsonl(os.path.join(run["setup"]["workdir"], "metrics.jsonl"))]
    one = read_jsonl(os.path.join(reference["workdir"], "metrics.jsonl"))
    assert [(r["split"], r["step"]) for r in two] == [(r["split"], r["step"]) for r in one]
    for a, b in zip(two, one):
        np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-5, err_msg=str(a))
    # Same parameters and same examples: the eval sums agree, though the
    # batches were cut differently.
    for key in ("eval_count", "eval_top1", "eval_loss"):
        np.testing.assert_allclose(run["facts"][0]["summary"][key],
                                   reference["summary"][key], atol=1e-5, err_msg=key)


def test_same_parameters_as_one_process(run, reference):
    two = np.load(os.path.join(run["out"], "params.npz"))
    assert sorted(two.files) == sorted(reference["params"])
    for name, value in reference["params"].items():
        np.testing.assert_allclose(two[name], value, atol=1e-5, err_msg=name)


def test_two_process_checkpoint_restores_in_one_process(run, reference):
    config = reference["config"]
    step, state = worker.restore_final_state(config, run["setup"]["workdir"])
    assert step == worker.TOTAL_STEPS and int(state.step) == worker.TOTAL_STEPS
    mesh = sharding.create_mesh(config.mesh)
    assert jax.tree.leaves(state.params)[0].sharding.mesh.size == mesh.size == 8
    trained = np.load(os.path.join(run["out"], "params.npz"))
    for name, value in worker.flat(jax.device_get(state.params)).items():
        np.testing.assert_array_equal(value, trained[name], err_msg=name)


# ---------------------------------------------------------------------------
# SIGTERM to one process only, as a preemption notice may arrive
# ---------------------------------------------------------------------------
# A hang guard: the run takes ~25 s here; a process that stopped alone leaves
# the other waiting in a collective until this kills both.
PREEMPTED_DEADLINE_S = 150
SIGNAL_AFTER_STEP = 3


def wait_for_train_step(workers: Workers, metrics_path: str, step: int, deadline: float) -> int:
    """Waits until process 0 has logged train step >= ``step``; returns that step."""
    while time.monotonic() < deadline and not workers.failed():
        if os.path.exists(metrics_path):
            steps = [r["step"] for r in read_jsonl_lines(metrics_path) if r["split"] == "train"]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.1)
    workers.fail(f"the workers never reached train step {step}")


def read_jsonl_lines(path: str) -> list[dict]:
    """Like read_jsonl, but skips a last line that is still being written."""
    with open(path) as f:
        lines = f.read().split("\n")[:-1]
    return [json.loads(line) for line in lines]


def test_sigterm_to_one_process_saves_one_step_on_both_and_exits(tmp_path, dataset):
    setup, setup_path = write_setup(tmp_path, dataset)
    deadline = time.monotonic() + PREEMPTED_DEADLINE_S
    workers = Workers(setup_path, str(tmp_path), mode="preempted")
    try:
        metrics = os.path.join(setup["workdir"], "metrics.jsonl")
        signalled_at = wait_for_train_step(workers, metrics, SIGNAL_AFTER_STEP, deadline)
        os.kill(workers.procs[1].pid, signal.SIGTERM)  # process 1 only
    except BaseException:
        workers.kill()
        raise
    workers.wait(deadline)  # both exit 0 (fails on a hang, after the deadline)

    summaries = [facts["summary"] for facts in read_facts(setup)]
    stopped = summaries[0]["steps"]
    assert [s["steps"] for s in summaries] == [stopped] * NUM_PROCESSES
    assert signalled_at <= stopped < worker.PREEMPTED_TOTAL_STEPS
    # Process 0, which got no signal, says where the run stopped (only
    # process 0 prints), once the save is committed.
    assert f"Stop requested: checkpoint saved at step {stopped}; rerun the same command " \
        "to resume" in workers.output(0)
    for i in range(NUM_PROCESSES):
        assert "Traceback" not in workers.output(i), workers.output(i)
    # One finished checkpoint, of that step, and nothing half-written.
    checkpoints = os.path.join(setup["workdir"], "checkpoints")
    assert os.listdir(checkpoints) == [str(stopped)]
    assert checkpointing.missing_commit_markers(epath.Path(checkpoints) / str(stopped)) == []
    config = worker.preempted_config(setup["data_dir"], setup["idx_dir"])
    step, state = worker.restore_final_state(config, setup["workdir"])
    assert step == int(state.step) == stopped


def _largest_file(directory: str) -> str:
    files = [os.path.join(directory, name) for name in os.listdir(directory)]
    return max(files, key=os.path.getsize)


def test_a_checkpoint_one_process_cannot_read_is_skipped_by_both(tmp_path, dataset):
    """Each process reads only its own shards, so damage to process 1's part
    fails process 1 alone: both must still skip the same steps. Step 3's part
    is truncated (process 1's read fails), step 2's has a flipped byte (it
    reads, to other values, which only the checksums see): both processes
    must resume from step 1."""
    setup, setup_path = write_setup(tmp_path, dataset)
    deadline = time.monotonic() + DEADLINE_S
    checkpoints = os.path.join(setup["workdir"], "checkpoints")
    workers = Workers(setup_path, str(tmp_path), mode="damaged")
    try:
        while not os.path.exists(os.path.join(setup["out_dir"], "damage_ready")):
            if workers.failed() or time.monotonic() > deadline:
                workers.fail("the workers did not save their checkpoints")
            time.sleep(0.2)
        truncated = _largest_file(os.path.join(checkpoints, "3", "state", "ocdbt.process_1", "d"))
        with open(truncated, "r+b") as f:
            f.truncate(os.path.getsize(truncated) // 2)
        flipped = _largest_file(os.path.join(checkpoints, "2", "state", "ocdbt.process_1", "d"))
        with open(flipped, "r+b") as f:
            f.seek(os.path.getsize(flipped) // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x10]))
        open(os.path.join(setup["out_dir"], "damaged"), "w").close()
    except BaseException:
        workers.kill()
        raise
    workers.wait(deadline)

    expected_rows = np.arange(np.prod(worker.DAMAGED_SHAPE)).reshape(worker.DAMAGED_SHAPE)
    for facts in read_facts(setup):
        assert facts["restored_step"] == 1
        assert np.array_equal(facts["rows"], expected_rows) and facts["whole"] == [1.0] * 3
    # Process 0 read its own part of step 3 and skipped it on process 1's word.
    assert "checkpoints/3 is skipped because it cannot be restored (process 1 could not " \
        "read its part of it)" in workers.output(0)
    assert "checkpoints/2 is skipped because it cannot be restored (the values of rows " \
        "differ from the checksums saved with them)" in workers.output(0)
    assert os.listdir(checkpoints) == ["1"]
    assert sorted(name.split("-")[0] for name in os.listdir(checkpoints + ".damaged")) == \
        ["2", "3"]


# ---------------------------------------------------------------------------
# Batch-mixing noise across processes, against numpy on the gathered batch
# ---------------------------------------------------------------------------
def numpy_optimal_q(x):
    k = len(x)
    return (np.ones((k, k)) - k * np.eye(k)) / (k + 1) @ x + x


def numpy_circulant(x, alpha):
    return (1 - alpha) * x + alpha * np.roll(x, -1, axis=0)


@pytest.fixture(scope="module")
def mixed(run):
    return np.load(os.path.join(run["out"], "noise.npz"))


def test_cross_process_batch_is_both_processes_rows(mixed):
    expected = np.concatenate([worker.noise_input(p) for p in range(NUM_PROCESSES)])
    np.testing.assert_array_equal(mixed["input"], expected)


@pytest.mark.parametrize("kind,reference_fn", [
    ("optimal_q", numpy_optimal_q), ("circulant", lambda x: numpy_circulant(x, 0.3))])
def test_device_scope_mixes_each_device_shard(mixed, kind, reference_fn):
    shards = np.split(mixed["input"], NUM_PROCESSES * DEVICES_PER_PROCESS)
    expected = np.concatenate([reference_fn(s) for s in shards])
    np.testing.assert_allclose(mixed[f"{kind}_device"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,reference_fn", [
    ("optimal_q", numpy_optimal_q), ("circulant", lambda x: numpy_circulant(x, 0.3))])
def test_global_scope_mixes_across_processes(mixed, kind, reference_fn):
    np.testing.assert_allclose(mixed[f"{kind}_global"], reference_fn(mixed["input"]),
                               rtol=1e-5, atol=1e-6)
    # The last row of process 0 really took from process 1's rows.
    half = worker.NOISE_ROWS_PER_PROCESS
    assert not np.allclose(mixed[f"{kind}_global"][:half],
                           reference_fn(mixed["input"][:half]), atol=1e-3)


# ---------------------------------------------------------------------------
# When main.py starts the distributed runtime
# ---------------------------------------------------------------------------
DISTRIBUTED_ENV = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID",
                   "SLURM_STEP_NUM_TASKS", "TPU_WORKER_HOSTNAMES", "NOISY_FLAX_DISTRIBUTED",
                   "NOISY_FLAX_COORDINATOR", "NOISY_FLAX_NUM_PROCESSES", "NOISY_FLAX_PROCESS_ID")


@pytest.fixture
def initialize_calls(monkeypatch):
    """Calls main.initialize_distributed makes to jax.distributed.initialize."""
    from absl import flags
    from absl.testing import flagsaver

    from noisy_flax import main

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # flag defaults, as on a command line without them
    with flagsaver.flagsaver():
        yield main, calls


def test_plain_single_host_run_never_initializes_distributed(initialize_calls, monkeypatch):
    main, calls = initialize_calls
    main.initialize_distributed()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "only-worker")
    monkeypatch.setenv("NOISY_FLAX_DISTRIBUTED", "0")
    main.initialize_distributed()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "only-worker,")  # one name, a stray comma
    main.initialize_distributed()
    assert calls == []


def test_blank_process_count_and_id_in_the_environment_count_as_unset(initialize_calls,
                                                                     monkeypatch):
    main, calls = initialize_calls
    monkeypatch.setenv("NOISY_FLAX_NUM_PROCESSES", " ")  # e.g. an empty template value
    monkeypatch.setenv("NOISY_FLAX_PROCESS_ID", "")
    main.initialize_distributed()
    assert calls == []


@pytest.mark.parametrize("env", [
    # salloc -n4 shell, or python straight from an sbatch script of 4 tasks:
    # one process; JAX would wait for 3 peers that never come.
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"},
    # srun -n1 inside such an allocation
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0",
     "SLURM_STEP_NUM_TASKS": "1"},
], ids=["allocation without srun", "one-task srun step"])
def test_slurm_allocation_outside_a_multitask_step_is_one_process(
        initialize_calls, monkeypatch, env):
    main, calls = initialize_calls
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    main.initialize_distributed()
    assert calls == []


@pytest.mark.parametrize("env", [
    # what srun sets in each task of the step launch/gpu/submit.sh runs
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0",
     "SLURM_STEP_NUM_TASKS": "16"},
    {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"},  # GKE
    {"NOISY_FLAX_DISTRIBUTED": "1"},  # launch/tpu/run.sh, on a Cloud TPU VM
], ids=["srun step", "GKE TPU slice", "NOISY_FLAX_DISTRIBUTED"])
def test_clusters_jax_detects_itself(initialize_calls, monkeypatch, env):
    main, calls = initialize_calls
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    main.initialize_distributed()
    assert calls == [{}]


def test_explicit_coordinator_from_flags(initialize_calls):
    main, calls = initialize_calls
    from absl import flags
    flags.FLAGS.coordinator_address = "10.0.0.1:1234"
    flags.FLAGS.num_processes = 2
    flags.FLAGS.process_id = 1
    main.initialize_distributed()
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                      "process_id": 1}]


def test_explicit_coordinator_from_environment(initialize_calls, monkeypatch):
    main, calls = initialize_calls
    monkeypatch.setenv("NOISY_FLAX_COORDINATOR", "head:9999")
    monkeypatch.setenv("NOISY_FLAX_NUM_PROCESSES", "3")
    monkeypatch.setenv("NOISY_FLAX_PROCESS_ID", "0")
    main.initialize_distributed()
    assert calls == [{"coordinator_address": "head:9999", "num_processes": 3, "process_id": 0}]


BAD_CLUSTER = {
    "coordinator without process count": (
        {"coordinator_address": "10.0.0.1:1234"}, {},
        r"--coordinator_address needs --num_processes N and --process_id I"),
    "coordinator without process id": (
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 2}, {},
        r"--coordinator_address needs --num_processes N and --process_id I"),
    "coordinator without port": (
        {"coordinator_address": "10.0.0.1", "num_processes": 2, "process_id": 0}, {},
        r"--coordinator_address '10.0.0.1' must be HOST:PORT"),
    "coordinator without host": (
        {"coordinator_address": ":1234", "num_processes": 2, "process_id": 0}, {},
        r"--coordinator_address ':1234' must be HOST:PORT"),
    "process id out of range": (
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 2}, {},
        r"--process_id 2 must be from 0 to 1"),
    "negative process id": (
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": -1}, {},
        r"--process_id -1 must be from 0 to 1"),
    "no processes": (
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 0, "process_id": 0}, {},
        r"--num_processes 0 must be at least 1"),
    "process count without coordinator": (
        {"num_processes": 2, "process_id": 0}, {},
        r"--num_processes and --process_id need --coordinator_address"),
    "process count not a number": (
        {}, {"NOISY_FLAX_COORDINATOR": "head:9999", "NOISY_FLAX_NUM_PROCESSES": "abc",
             "NOISY_FLAX_PROCESS_ID": "0"},
        r"NOISY_FLAX_NUM_PROCESSES='abc' must be a whole number"),
    "process id not a number": (
        {}, {"NOISY_FLAX_COORDINATOR": "head:9999", "NOISY_FLAX_NUM_PROCESSES": "2",
             "NOISY_FLAX_PROCESS_ID": "one"},
        r"NOISY_FLAX_PROCESS_ID='one' must be a whole number"),
    "unknown NOISY_FLAX_DISTRIBUTED": (
        {}, {"NOISY_FLAX_DISTRIBUTED": "yes"}, r"NOISY_FLAX_DISTRIBUTED='yes' must be 1"),
}


@pytest.mark.parametrize("flag_values, env, pattern", BAD_CLUSTER.values(), ids=BAD_CLUSTER)
def test_bad_cluster_settings_are_one_line_before_jax_is_called(
        initialize_calls, monkeypatch, capsys, flag_values, env, pattern):
    main, calls = initialize_calls
    from absl import flags
    for name, value in flag_values.items():
        setattr(flags.FLAGS, name, value)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        main.initialize_distributed()
    assert exited.value.code == main.EXIT_USER_ERROR
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"error: .*", line) and re.search(pattern, line), line
    assert calls == []


def test_no_cluster_found_by_jax_is_one_line(initialize_calls, monkeypatch, capsys):
    main, _ = initialize_calls

    def initialize(**kwargs):  # what JAX says when it detects no cluster
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setenv("NOISY_FLAX_DISTRIBUTED", "1")
    with pytest.raises(SystemExit) as exited:
        main.initialize_distributed()
    assert exited.value.code == main.EXIT_USER_ERROR
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: JAX's distributed runtime could not find the other processes")


@pytest.mark.parametrize("args, env, pattern", [
    (["--coordinator_address=127.0.0.1:12345"], {}, r"needs --num_processes N"),
    ([], {"NOISY_FLAX_COORDINATOR": "127.0.0.1:12345", "NOISY_FLAX_NUM_PROCESSES": "abc",
          "NOISY_FLAX_PROCESS_ID": "0"}, r"NOISY_FLAX_NUM_PROCESSES='abc' must be"),
], ids=["coordinator alone", "process count not a number"])
def test_bad_cluster_settings_on_the_command_line(tmp_path, args, env, pattern):
    """The real entry point: one error line, exit 2, no traceback, no workdir."""
    workdir = tmp_path / "wd"
    result = subprocess.run(
        [sys.executable, "-m", "noisy_flax.main", "--config", "configs/fashion_mnist.py:runlocal",
         "--workdir", str(workdir), *args],
        cwd=REPO, env={**child_env(), **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()
