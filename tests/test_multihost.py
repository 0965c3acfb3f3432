"""Multi-host on one machine: 2 processes x 4 fake CPU devices (gloo
collectives) against 1 process x 8 devices fed the same global batches.

The two workers (tests/multihost_worker.py) train for 3 steps through
``train.train_and_evaluate`` with a shared workdir and FSDP parameters;
meanwhile this process trains on the global batches the two processes'
slices make up and must land on the same losses and parameters. Children run
under a hard deadline and are killed at once when either fails.
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

import multihost_worker as worker
from noisy_flax import input_pipeline, sharding, train

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

    def __init__(self, setup_path: str, log_dir: str):
        self.logs = [os.path.join(log_dir, f"worker_{i}.log") for i in range(NUM_PROCESSES)]
        script = os.path.join(REPO, "tests", "multihost_worker.py")
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, script, setup_path, str(i)], cwd=REPO, env=child_env(),
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def wait(self, deadline: float) -> None:
        """Returns when all succeeded; fails (killing all) once one fails or time is up."""
        try:
            while any(p.poll() is None for p in self.procs):
                if any(p.poll() not in (None, 0) for p in self.procs):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            self.kill()
        codes = [p.returncode for p in self.procs]
        if codes != [0] * NUM_PROCESSES:
            tails = "\n".join(f"--- worker {i} (exit {code}) ---\n{_tail(log)}"
                              for i, (code, log) in enumerate(zip(codes, self.logs)))
            pytest.fail(f"multi-process workers failed or ran past the deadline:\n{tails}")

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
def runs(tmp_path_factory):
    """Both runs, finished: the two workers, and meanwhile the 1-process reference."""
    root = tmp_path_factory.mktemp("multihost")
    setup = {"port": free_port(), "num_processes": NUM_PROCESSES,
             "idx_dir": str(root / "idx"), "data_dir": str(root / "tfds"),
             "workdir": str(root / "workdir"), "out_dir": str(root / "out")}
    for key in ("data_dir", "workdir", "out_dir"):
        os.makedirs(setup[key])
    worker.write_fake_fashion_mnist(setup["idx_dir"])
    config = worker.tiny_config(setup["data_dir"], setup["idx_dir"])
    # Prepare the tfds copy once here, so the workers do not race to build it.
    input_pipeline.get_builder(config)
    setup_path = str(root / "setup.json")
    with open(setup_path, "w") as f:
        json.dump(setup, f)

    deadline = time.monotonic() + DEADLINE_S
    workers = Workers(setup_path, str(root))
    try:  # the reference trains while the workers run
        reference = train_reference(config, expected_global_batches(config),
                                    str(tmp_path_factory.mktemp("reference")))
    except BaseException:
        workers.kill()
        raise
    workers.wait(deadline)
    facts = []
    for i in range(NUM_PROCESSES):
        with open(os.path.join(setup["out_dir"], f"facts_{i}.json")) as f:
            facts.append(json.load(f))
    return {"setup": setup, "facts": facts, "out": setup["out_dir"], "reference": reference}


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


def test_eval_counts_every_example_exactly_once(run):
    for facts in run["facts"]:
        assert facts["summary"]["eval_count"] == worker.TEST_EXAMPLES


def test_only_process_zero_writes_logs(run):
    workdir = run["setup"]["workdir"]
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    # One writer: each step once (two writers would double every line).
    assert [(r["split"], r["step"]) for r in records] == \
        [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    events = [name for name in os.listdir(workdir) if name.startswith("events.out.tfevents")]
    assert len(events) == 1


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
DISTRIBUTED_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "NOISY_FLAX_COORDINATOR",
                   "NOISY_FLAX_NUM_PROCESSES", "NOISY_FLAX_PROCESS_ID")


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
    main.initialize_distributed()
    assert calls == []


@pytest.mark.parametrize("name,value", [("SLURM_NTASKS", "4"),
                                        ("TPU_WORKER_HOSTNAMES", "w-0,w-1,w-2,w-3")])
def test_slurm_and_tpu_pods_let_jax_detect_the_cluster(initialize_calls, monkeypatch, name, value):
    main, calls = initialize_calls
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
