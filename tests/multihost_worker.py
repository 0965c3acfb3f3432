"""One process of the two-process test in tests/test_multihost.py, and the
pieces that the test's one-process reference run shares with it.

    python tests/multihost_worker.py SETUP_JSON PROCESS_ID [preempted]

SETUP_JSON names the coordinator port, the tiny dataset and the shared
workdir. The worker trains the tiny config for 3 steps with
``train.train_and_evaluate`` (so the real loop, eval, reporting and
checkpoints run multi-process), records the global batches it trained and
evaluated on, the files it wrote and the final parameters, checks
batch-mixing noise on a cross-process array, restores the checkpoint on both
processes, and (process 0) saves everything to ``out_dir`` for the test to
compare.

With ``preempted`` it only trains, for many steps, until the test sends
SIGTERM to one of the processes, and records the summary it returns.

With ``damaged`` it trains nothing: both processes save three steps of a
state split between them, the test's hook damages what process 1 saved, and
both restore.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # configs/ and noisy_flax/ when run as a script

TRAIN_EXAMPLES, TEST_EXAMPLES = 64, 11  # 11: odd, so eval pads unevenly
TOTAL_STEPS = 3
NOISE_ROWS_PER_PROCESS = 8
# The preempted run: far more steps than it gets to before the test's SIGTERM.
PREEMPTED_TOTAL_STEPS = 400


# ---------------------------------------------------------------------------
# Tiny dataset and config (shared with the test's reference run)
# ---------------------------------------------------------------------------
def write_fake_fashion_mnist(idx_dir: str, seed: int = 0) -> None:
    """Random 28x28 images and labels in the idx layout of Fashion-MNIST."""
    from noisy_flax.datasets import fashion_mnist_local

    rng = np.random.default_rng(seed)
    os.makedirs(idx_dir, exist_ok=True)
    for split, n in (("train", TRAIN_EXAMPLES), ("test", TEST_EXAMPLES)):
        images_name, labels_name = fashion_mnist_local.IDX_FILES[split]
        _write_idx(os.path.join(idx_dir, images_name + ".gz"),
                   rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(os.path.join(idx_dir, labels_name + ".gz"),
                   rng.integers(0, 10, (n,), dtype=np.uint8))


def _write_idx(path: str, array: np.ndarray) -> None:
    """idx by its spec: 0, 0, type 0x08 (uint8), ndim, big-endian dims, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def tiny_config(data_dir: str, idx_dir: str):
    """One-block ViT with FSDP, device-scope optimal-Q noise in training, 3 steps."""
    import ml_collections
    from configs import fashion_mnist

    config = fashion_mnist.get_config("runlocal")
    config.data_dir = data_dir
    config.input.local_dir = idx_dir
    config.input.shuffle_buffer = 16
    # FSDP with MLP kernels of 128 x 512 = 2**16 (fsdp_spec's threshold): they
    # are split over all 8 devices, so across the two processes.
    config.model_kwargs = ml_collections.ConfigDict(
        {"num_layers": 1, "hidden_size": 128, "mlp_dim": 512})
    config.sharding = "fsdp"
    config.noise.type = "optimal_q"
    config.noise.scope = "device"
    # Eval batches differ between 1 and 2 processes; without eval noise the
    # eval sums must agree anyway.
    config.noise.eval = False
    config.total_steps = TOTAL_STEPS
    config.warmup_steps = 0  # learn from step 1 on: every step changes the loss
    # Adam's eps well above rounding: a near-zero gradient element then moves
    # its weight by ~lr * g / eps, not by +-lr depending on how it was summed.
    config.eps = 1e-3
    config.batch_size = 16  # 8 per process, 2 per device
    config.eval_batch_size = 8
    config.eval_max_examples = 0
    config.eval_every = 0
    config.log_every = 1
    config.checkpoint_every = TOTAL_STEPS
    config.plot = False
    return config


# ---------------------------------------------------------------------------
# Hooks into the training loop
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def patched(owner, name: str, replacement):
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield original
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def recording_batches(train_records: list, eval_records: list):
    """Appends every global train and eval batch, gathered to numpy."""
    from noisy_flax import sharding

    original = sharding.global_batch

    def global_batch(local, mesh):
        batch = original(local, mesh)
        # Eval batches carry a mask. Gathering is collective: every process
        # makes the same global batches in the same order, so all take part.
        (eval_records if "mask" in batch else train_records).append(gathered(batch))
        return batch

    with patched(sharding, "global_batch", global_batch):
        yield


_WRITES = {"workdir": None, "paths": set()}


def _in_workdir(path):
    """``path`` relative to the recorded workdir; None when outside it."""
    if _WRITES["workdir"] is None or not isinstance(path, (str, bytes, os.PathLike)):
        return None
    relative = os.path.relpath(os.path.abspath(os.fsdecode(path)), _WRITES["workdir"])
    return None if relative.startswith("..") else relative


def _record_write(path) -> None:
    relative = _in_workdir(path)
    if relative is not None:
        _WRITES["paths"].add(relative)


def _record_rename(source, target) -> None:
    """A file written under a temporary name and moved into place counts as
    the file it became."""
    if _in_workdir(source) in _WRITES["paths"]:
        _WRITES["paths"].discard(_in_workdir(source))
        _record_write(target)


def _audit(event: str, args) -> None:
    if _WRITES["workdir"] is None:
        return
    if event == "open":
        path, mode, flags = args
        if any(c in mode for c in "wax+") if isinstance(mode, str) else \
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            _record_write(path)
    elif event in ("os.rename", "os.replace"):
        _record_rename(args[0], args[1])


@contextlib.contextmanager
def recording_writes(workdir: str):
    """Yields the set of files under ``workdir`` this process writes: through
    Python's open (an audit hook sees builtins.open, os.open, pathlib and
    os.rename) or TensorFlow's gfile (a C++ file system, so wrapped by hand)."""
    import tensorflow as tf
    from tensorflow.python.lib.io import file_io

    if not getattr(_audit, "installed", False):
        sys.addaudithook(_audit)  # cannot be removed; off outside this block
        _audit.installed = True
    original_init, original_rename = file_io.FileIO.__init__, tf.io.gfile.rename

    def init(self, name, mode, *args, **kwargs):
        if any(c in mode for c in "wa+"):
            _record_write(name)
        original_init(self, name, mode, *args, **kwargs)

    def rename(source, target, *args, **kwargs):
        original_rename(source, target, *args, **kwargs)
        _record_rename(source, target)

    _WRITES.update(workdir=os.path.abspath(workdir), paths=set())
    try:
        with patched(file_io.FileIO, "__init__", init), patched(tf.io.gfile, "rename", rename):
            yield _WRITES["paths"]
    finally:
        _WRITES["workdir"] = None


@contextlib.contextmanager
def replaying_train_batches(batches: list):
    """The train stream becomes exactly ``batches`` (one process only)."""
    from noisy_flax import input_pipeline

    def train_iterator(config, **unused):
        return iter(batches)

    with patched(input_pipeline, "train_iterator", train_iterator):
        yield


@contextlib.contextmanager
def capturing_saved_states(saved: dict):
    """``saved[step]`` = the state the loop checkpoints at that step."""
    from noisy_flax import checkpointing

    original = checkpointing.Checkpointer.save

    def save(self, step, state, **kwargs):
        saved[int(step)] = state
        return original(self, step, state, **kwargs)

    with patched(checkpointing.Checkpointer, "save", save):
        yield saved


def gathered(tree):
    """Global arrays -> numpy on every process.

    One jitted copy to a replicated layout for the whole tree: one compile,
    where gathering leaf by leaf would compile once per shape.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.tree.leaves(tree)[0].sharding.mesh
    copy = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, PartitionSpec()))(tree)
    return jax.tree.map(lambda leaf: np.asarray(leaf.addressable_data(0)), copy)


def flat(tree) -> dict[str, np.ndarray]:
    """{'a/b/kernel': array} for np.savez and comparisons."""
    import jax
    from noisy_flax.sharding import path_name

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {path_name(path): np.asarray(leaf) for path, leaf in leaves}


def restore_final_state(config, workdir: str):
    """The state of the last checkpoint in ``workdir``, placed on this run's mesh."""
    import jax
    from noisy_flax import checkpointing, optim, sharding, train

    mesh = sharding.create_mesh(config.mesh)
    model = train.build_model(config, mesh)
    tx, _ = optim.make_optimizer(config, config.total_steps, config.warmup_steps)
    # Shapes only (nothing initialised), placed by the same rules as training.
    shapes = jax.eval_shape(lambda: train.create_train_state(config, model, tx, mesh)[0])
    shardings = sharding.param_shardings(shapes, mesh, config.sharding)
    abstract = checkpointing.abstract_with_shardings(shapes, shardings)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.restore_latest(abstract)
    finally:
        ckpt.close()


def noise_input(process_index: int) -> np.ndarray:
    """This process's rows of the cross-process noise check."""
    rng = np.random.default_rng(100 + process_index)
    return rng.normal(size=(NOISE_ROWS_PER_PROCESS, 3)).astype(np.float32)


# ---------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------
def mixed_by_noise(mesh) -> dict[str, np.ndarray]:
    """Device- and global-scope batch mixing of a batch spread over processes."""
    import jax
    from noisy_flax import noise, sharding

    x = sharding.global_batch({"x": noise_input(jax.process_index())}, mesh)["x"]
    out = {"input": x}
    for scope in ("device", "global"):
        for kind, extra in (("optimal_q", {}), ("circulant", {"alpha": 0.3})):
            fn = noise.make_noise({"type": kind, "scope": scope, **extra}, mesh=mesh).fn
            out[f"{kind}_{scope}"] = jax.jit(fn)(x)
    return gathered(out)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def param_placement(params) -> dict[str, int]:
    """How many parameter arrays are split, and this process's share of the bytes."""
    import jax
    from jax.sharding import PartitionSpec

    leaves = jax.tree.leaves(params)
    return {"sharded_params": sum(leaf.sharding.spec != PartitionSpec() for leaf in leaves),
            "param_bytes": sum(leaf.nbytes for leaf in leaves),
            "local_param_bytes": sum(leaf.addressable_shards[0].data.nbytes for leaf in leaves)}


def start_runtime(setup: dict, process_id: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_disable_most_optimizations", True)  # compile in seconds
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{setup['port']}",
                               num_processes=setup["num_processes"], process_id=process_id,
                               initialization_timeout=60, heartbeat_timeout_seconds=20)
    log("distributed runtime up")


def write_facts(out_dir: str, process_id: int, facts: dict) -> None:
    with open(os.path.join(out_dir, f"facts_{process_id}.json"), "w") as f:
        json.dump(facts, f)


def run_worker(setup: dict, process_id: int) -> None:
    import jax

    start_runtime(setup, process_id)
    from noisy_flax import sharding, train

    config = tiny_config(setup["data_dir"], setup["idx_dir"])
    batches, eval_batches, saved = [], [], {}
    with recording_batches(batches, eval_batches), capturing_saved_states(saved), \
            recording_writes(setup["workdir"]) as written:
        summary = train.train_and_evaluate(config, setup["workdir"])
    log("trained")
    final_params = gathered(saved[TOTAL_STEPS].params)
    noise_out = mixed_by_noise(sharding.create_mesh(config.mesh))
    log("noise checked")
    restored_step, restored = restore_final_state(config, setup["workdir"])
    restored_params = gathered(restored.params)
    log("restored")

    out_dir = setup["out_dir"]
    write_facts(out_dir, process_id, {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(), "devices": jax.device_count(),
        "restored_step": restored_step, "summary": summary,
        "written": sorted(written), **param_placement(saved[TOTAL_STEPS].params)})
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "batches.npz"),
                 **{f"{k}_{i}": v for i, b in enumerate(batches) for k, v in b.items()})
        np.savez(os.path.join(out_dir, "eval_batches.npz"),
                 **{f"{k}_{i}": v for i, b in enumerate(eval_batches) for k, v in b.items()})
        np.savez(os.path.join(out_dir, "params.npz"), **flat(final_params))
        np.savez(os.path.join(out_dir, "restored_params.npz"), **flat(restored_params))
        np.savez(os.path.join(out_dir, "noise.npz"), **noise_out)
    jax.distributed.shutdown()


def preempted_config(data_dir: str, idx_dir: str):
    """The tiny config, long enough to be stopped midway, with no scheduled
    checkpoint or eval: whatever is saved is the preemption's save."""
    config = tiny_config(data_dir, idx_dir)
    config.total_steps = PREEMPTED_TOTAL_STEPS
    config.checkpoint_every = PREEMPTED_TOTAL_STEPS
    return config


def run_preempted_worker(setup: dict, process_id: int) -> None:
    """Trains until the test's SIGTERM (to one process) stops every process.

    No Python SIGTERM handler here: in a multi-process run the signal must
    reach JAX's preemption notifier, which jax.distributed.initialize set up.
    """
    import jax

    start_runtime(setup, process_id)
    from noisy_flax import train

    summary = train.train_and_evaluate(preempted_config(setup["data_dir"], setup["idx_dir"]),
                                       setup["workdir"])
    log(f"stopped after step {summary['steps']}")
    write_facts(setup["out_dir"], process_id, {"summary": summary})
    jax.distributed.shutdown()


DAMAGED_SHAPE = (8, 512)  # rows split over the 8 devices, so over both processes


def damaged_state(step: int, mesh) -> dict:
    """A state whose rows are split between the processes; values from ``step``."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    values = {"rows": np.arange(np.prod(DAMAGED_SHAPE), dtype=np.float32).reshape(DAMAGED_SHAPE)
              * step, "whole": np.full((3,), step, np.float32)}
    shardings = {"rows": NamedSharding(mesh, PartitionSpec("data")),
                 "whole": NamedSharding(mesh, PartitionSpec())}
    return {name: jax.make_array_from_callback(values[name].shape, shardings[name],
                                               lambda index, name=name: values[name][index])
            for name in values}


def run_damaged_checkpoint_worker(setup: dict, process_id: int) -> None:
    """Saves steps 1-3, waits while the test damages process 1's part of
    them (``damage_ready`` / ``damaged`` files in ``out_dir``), restores."""
    import jax
    from jax.experimental import multihost_utils

    start_runtime(setup, process_id)
    from noisy_flax import checkpointing

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    directory = os.path.join(setup["workdir"], "checkpoints")
    saver = checkpointing.Checkpointer(directory, keep=5, save_every=1)
    for step in (1, 2, 3):
        saver.save(step, damaged_state(step, mesh))
    saver.close()
    multihost_utils.sync_global_devices("saved")
    if process_id == 0:
        open(os.path.join(setup["out_dir"], "damage_ready"), "w").close()
    while not os.path.exists(os.path.join(setup["out_dir"], "damaged")):
        time.sleep(0.1)
    multihost_utils.sync_global_devices("damaged")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            damaged_state(1, mesh))
    restorer = checkpointing.Checkpointer(directory, keep=5, save_every=1)
    step, state = restorer.restore_latest(abstract)
    restorer.close()
    log(f"restored step {step}")
    values = gathered(state)
    write_facts(setup["out_dir"], process_id, {
        "restored_step": step, **{name: values[name].tolist() for name in values}})
    jax.distributed.shutdown()


def load_batches(path: str) -> list[dict[str, np.ndarray]]:
    """Inverse of the worker's batches.npz and eval_batches.npz."""
    data = np.load(path)
    keys = sorted({name.rsplit("_", 1)[0] for name in data.files})
    return [{key: data[f"{key}_{i}"] for key in keys}
            for i in range(len(data.files) // len(keys))]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        worker_setup = json.load(f)
    mode = sys.argv[3] if len(sys.argv) > 3 else "train"
    {"train": run_worker, "preempted": run_preempted_worker,
     "damaged": run_damaged_checkpoint_worker}[mode](worker_setup, int(sys.argv[2]))
