"""One process of the two-process test in tests/test_multihost.py, and the
pieces that the test's one-process reference run shares with it.

    python tests/multihost_worker.py SETUP_JSON PROCESS_ID

SETUP_JSON names the coordinator port, the tiny dataset and the shared
workdir. The worker trains the tiny config for 3 steps with
``train.train_and_evaluate`` (so the real loop, eval, reporting and
checkpoints run multi-process), records the global batches it trained on
and the final parameters, checks batch-mixing noise on a cross-process
array, restores the checkpoint on both processes, and (process 0) saves
everything to ``out_dir`` for the test to compare.
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
def recording_train_batches(records: list):
    """Appends every global *train* batch (gathered to numpy) to ``records``."""
    from noisy_flax import sharding

    original = sharding.global_batch

    def global_batch(local, mesh):
        batch = original(local, mesh)
        if "mask" not in batch:  # eval batches carry a mask
            records.append(gathered(batch))
        return batch

    with patched(sharding, "global_batch", global_batch):
        yield records


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
    from noisy_flax.sharding import _key_name

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(_key_name(k) for k in path): np.asarray(leaf) for path, leaf in leaves}


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


def run_worker(setup: dict, process_id: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_disable_most_optimizations", True)  # compile in seconds
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{setup['port']}",
                               num_processes=setup["num_processes"], process_id=process_id,
                               initialization_timeout=60, heartbeat_timeout_seconds=20)
    log("distributed runtime up")
    from noisy_flax import sharding, train

    config = tiny_config(setup["data_dir"], setup["idx_dir"])
    batches, saved = [], {}
    with recording_train_batches(batches), capturing_saved_states(saved):
        summary = train.train_and_evaluate(config, setup["workdir"])
    log("trained")
    final_params = gathered(saved[TOTAL_STEPS].params)
    noise_out = mixed_by_noise(sharding.create_mesh(config.mesh))
    log("noise checked")
    restored_step, restored = restore_final_state(config, setup["workdir"])
    restored_params = gathered(restored.params)
    log("restored")

    out_dir = setup["out_dir"]
    facts = {"process_index": jax.process_index(), "process_count": jax.process_count(),
             "local_devices": jax.local_device_count(), "devices": jax.device_count(),
             "restored_step": restored_step, "summary": summary,
             **param_placement(saved[TOTAL_STEPS].params)}
    with open(os.path.join(out_dir, f"facts_{process_id}.json"), "w") as f:
        json.dump(facts, f)
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "batches.npz"),
                 **{f"{k}_{i}": v for i, b in enumerate(batches) for k, v in b.items()})
        np.savez(os.path.join(out_dir, "params.npz"), **flat(final_params))
        np.savez(os.path.join(out_dir, "restored_params.npz"), **flat(restored_params))
        np.savez(os.path.join(out_dir, "noise.npz"), **noise_out)
    jax.distributed.shutdown()


def load_batches(path: str) -> list[dict[str, np.ndarray]]:
    """Inverse of the worker's batches.npz."""
    data = np.load(path)
    return [{"image": data[f"image_{i}"], "label": data[f"label_{i}"]}
            for i in range(len(data.files) // 2)]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run_worker(json.load(f), int(sys.argv[2]))
