"""Evaluation under test-batch orders, with the eval noise on and off.

    python -m noisy_flax.evaluate --config configs/fashion_mnist.py \
        --workdir workdirs/fm [--orders class_sorted,shuffled] [--batch_size 10]

loads the latest checkpoint in ``workdir/checkpoints`` and, for every order
of ``noisy_flax.batch_order``, reports top-1 / top-5 as correct / total over
the whole split next to the published metric, the running average of
per-batch top-1 (``batch_mean_top1``). Writes ``eval_orders.json`` and
``eval_orders.md`` to the workdir and prints the table. With ``--entropy``
(or via ``python -m noisy_flax.entropy --config ... --workdir ...``) it adds
H(Y|Z) estimates on features at the noise site and at the pre-logits.

The split is held in memory (preprocessed), so that any order can index it;
that suits Fashion-MNIST or CIFAR, and a split above ``MAX_IN_MEMORY_BYTES``
is refused with a message (ImageNet needs a streaming route by index, which
this module does not have).

Every batch is padded to one size that the device count divides; padded rows
are masked, and the noise functions mix real rows only, so padding never
leaks. With ``noise.scope='device'`` each device mixes its own shard of the
batch (as the published code did per GPU); with 'global' the whole batch.
``--batch_size`` is the global test batch: on D devices with device scope,
``--batch_size 10`` mixes about 10 / D examples per device, and the
published setting (10 per GPU) is ``--batch_size`` 10 x D.

A setting whose predictions cannot depend on the batch (noise off, or a
deterministic per-example noise such as ``within_image``) is run once in
large batches and each order's metrics are computed from those logits:
exact, since in eval mode the rows of such a model never interact.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before heavy imports: see noisy_flax.cpu_tuning
    from noisy_flax import cpu_tuning
    cpu_tuning.reexec_with_fast_malloc()

import dataclasses
import json
import math
import os
import sys
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from noisy_flax import batch_order, entropy, features, input_pipeline, sharding
from noisy_flax import workdir as workdir_lib

MAX_IN_MEMORY_BYTES = 4 * 2 ** 30
ORDER_INDEPENDENT_NOISES = ("none", "within_image")  # per-example and deterministic
SHARED_PASS_BATCH = 512


# ---------------------------------------------------------------------------
# The eval split in memory
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class EvalData:
    images: np.ndarray  # (n, H, W, C) float32, preprocessed
    labels: np.ndarray  # (n,) int32
    num_classes: int


def load_eval_data(config: ml_collections.ConfigDict, *, split: Optional[str] = None,
                   per_class: int = 0, max_examples: int = 0) -> EvalData:
    """The preprocessed split as arrays (every process holds all of it).

    ``per_class`` keeps the first that many examples of each class (a
    stratified subset, in split order); ``max_examples`` the first n.
    """
    if per_class < 0 or max_examples < 0:
        raise ValueError(f"per_class={per_class} and max_examples={max_examples} must be >= 0 "
                         "(0: every example)")
    from noisy_flax import train
    # A config may size its eval batch per device (eval_batch_per_device);
    # the batch only groups the reads here, so resolve it on a copy.
    config = config.copy_and_resolve_references()
    train.resolve_eval_batch_size(config)
    split = split or config.eval_split
    n = input_pipeline.num_eval_examples(config, split)
    bytes_needed = n * config.image_size ** 2 * config.input.channels * 4
    if bytes_needed > MAX_IN_MEMORY_BYTES:
        raise ValueError(
            f"ordered evaluation holds the split in memory, and {split!r} of {config.dataset} "
            f"needs {bytes_needed / 2 ** 30:.1f} GiB > {MAX_IN_MEMORY_BYTES / 2 ** 30:.0f} GiB; "
            "evaluate a slice (e.g. --split 'validation[:10000]'), or evaluate one order "
            "during training with config.eval_order (streamed by index)")
    images, labels = [], []
    for batch in input_pipeline.eval_batches(config, split=split):
        real = batch["mask"] > 0
        images.append(batch["image"][real])
        labels.append(batch["label"][real])
    images, labels = np.concatenate(images), np.concatenate(labels).astype(np.int32)
    keep = np.arange(len(labels))
    if per_class:
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class]
                                       for c in np.unique(labels)]))
    if max_examples:
        keep = keep[:max_examples]
    return EvalData(images[keep], labels[keep], int(config.num_classes))


# ---------------------------------------------------------------------------
# Ordered batches streamed from the split (train.py's evaluation)
# ---------------------------------------------------------------------------
def split_labels(config: ml_collections.ConfigDict, split: Optional[str] = None) -> np.ndarray:
    """Every label of the split in storage order (images are not decoded)."""
    builder = input_pipeline.get_builder(config)
    ds = input_pipeline._read(builder, split or config.eval_split).map(lambda ex: ex["label"])
    return np.fromiter(ds.as_numpy_iterator(), np.int64)


def ordered_eval_batches(config: ml_collections.ConfigDict, *, split: Optional[str] = None,
                         process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """One pass in ``config.eval_order``: local numpy batches {'image', 'label',
    'mask'}, each ordered batch padded to ``config.eval_batch_size`` rows.

    Streams by index, so any split size works: one pass reads the labels and
    fixes the batches; a second reads the encoded records in storage order
    and holds each until its batch is complete, then decodes that batch.
    Memory is the encoded records of incomplete batches (for class-sorted
    ImageNet validation about a fifth of the split; for 'shuffled' it can
    approach the whole encoded split). Batches come out in the order they
    complete; no metric depends on that sequence.
    """
    split = split or config.eval_split
    labels = split_labels(config, split)
    batch_size = 1 if config.eval_order == "single" else config.eval_batch_size
    batches = batch_order.batch_indices(labels, config.eval_order, batch_size,
                                        seed=config.seed, num_classes=config.num_classes)
    size = config.eval_batch_size
    if size % process_count:
        raise ValueError(f"eval_batch_size={size} is not divisible by {process_count} processes")
    local = size // process_count
    mine = slice(process_index * local, (process_index + 1) * local)
    builder = input_pipeline.get_builder(config)
    preprocess = tf.function(input_pipeline.make_eval_preprocess(
        config, input_pipeline._stored_channels(builder)))
    batch_of = np.empty(len(labels), np.int64)
    slot = np.empty(len(labels), np.int64)
    for b, index in enumerate(batches):
        batch_of[index], slot[index] = b, np.arange(len(index))
    waiting: dict[int, dict[int, Any]] = {}
    records = input_pipeline._read(builder, split).as_numpy_iterator()
    for position, record in enumerate(records):
        b = batch_of[position]
        waiting.setdefault(b, {})[int(slot[position])] = record
        if len(waiting[b]) == len(batches[b]):
            done = waiting.pop(b)
            examples = [preprocess({k: tf.constant(v) for k, v in done[j].items()})
                        for j in range(len(done))]
            images = np.stack([e["image"].numpy() for e in examples])
            batch = {"image": np.zeros((size,) + images.shape[1:], np.float32),
                     "label": np.zeros(size, np.int32), "mask": np.zeros(size, np.float32)}
            batch["image"][:len(images)] = images
            batch["label"][:len(images)] = [int(e["label"]) for e in examples]
            batch["mask"][:len(images)] = 1.0
            yield {k: v[mine] for k, v in batch.items()}


# ---------------------------------------------------------------------------
# Running one setting under many orders
# ---------------------------------------------------------------------------
def padded_size(batches: Sequence[np.ndarray], mesh) -> int:
    """The one batch size every batch is padded to: a multiple of the devices."""
    largest = max(len(b) for b in batches)
    return math.ceil(largest / mesh.size) * mesh.size


def run_batches(forward, variables: dict, data: EvalData, batches: Sequence[np.ndarray],
                mesh, *, seed: int = 0, grouped=None, group_examples: int = 512
                ) -> dict[str, np.ndarray]:
    """Outputs of ``forward`` per example, put back in split order.

    Batch ``i`` gets the noise key fold_in(PRNGKey(seed), i). Each process
    feeds its rows of the padded global batch. On one device, ``grouped``
    (``jax.vmap`` of the same forward over a leading batch axis) runs many
    batches per call: each vmapped slice is still one test batch, so the
    noise mixes exactly as in the loop, with far fewer dispatches.
    """
    if grouped is not None and mesh.size == 1 and jax.process_count() == 1:
        return _run_grouped(grouped, variables, data, batches, seed, group_examples)
    size = padded_size(batches, mesh)
    process, processes = jax.process_index(), jax.process_count()
    local = size // processes
    base_key = jax.random.PRNGKey(seed)
    outputs: dict[str, np.ndarray] = {}
    seen = np.zeros(len(data.labels), np.int64)
    pending = []
    for i, index in enumerate(batches):
        rows = np.full(size, -1, np.int64)
        rows[:len(index)] = index
        take = np.maximum(rows, 0)
        mine = slice(process * local, (process + 1) * local)
        batch = {"image": data.images[take][mine],
                 "mask": (rows >= 0)[mine]}
        batch = sharding.global_batch(batch, mesh)
        out = forward(variables["params"], variables["batch_stats"], batch["image"],
                      batch["mask"], jax.random.fold_in(base_key, i))
        pending.append((rows, out))
        if len(pending) >= 64:  # bound the device memory held by results
            _collect(pending, outputs, seen)
    _collect(pending, outputs, seen)
    _require_each_once(seen)
    return outputs


def _run_grouped(grouped, variables, data, batches, seed, group_examples):
    size = max(len(b) for b in batches)
    group = max(1, group_examples // size)
    base_key = jax.random.PRNGKey(seed)
    outputs: dict[str, np.ndarray] = {}
    seen = np.zeros(len(data.labels), np.int64)
    pending = []
    for start in range(0, len(batches), group):
        # Always `group` batches per call (fully masked fillers) so that one
        # compiled shape serves the whole order.
        rows = np.full((group, size), -1, np.int64)
        for j, index in enumerate(batches[start:start + group]):
            rows[j, :len(index)] = index
        keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(
            np.arange(start, start + group))
        out = grouped(variables["params"], variables["batch_stats"],
                      data.images[np.maximum(rows, 0)], rows >= 0, keys)
        flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)
        pending.append((rows.reshape(-1), flat))
    _collect(pending, outputs, seen)
    _require_each_once(seen)
    return outputs


def _collect(pending: list, outputs: dict, seen: np.ndarray) -> None:
    """Puts the pending results in split order; ``seen`` counts each row."""
    for rows, out in pending:
        host = _to_host(out)
        real = rows >= 0
        np.add.at(seen, rows[real], 1)
        for name, value in host.items():
            if name not in outputs:
                outputs[name] = np.zeros((len(seen),) + value.shape[1:], value.dtype)
            outputs[name][rows[real]] = value[real]
    pending.clear()


def _require_each_once(seen: np.ndarray) -> None:
    """An example never run would be scored on zero logits (class 0)."""
    missing, repeated = int(np.sum(seen == 0)), int(np.sum(seen > 1))
    if missing or repeated:
        raise ValueError(f"the batches must hold every example exactly once: {missing} "
                         f"never evaluated, {repeated} evaluated more than once")


def _to_host(tree):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def order_metrics(logits: np.ndarray, labels: np.ndarray,
                  batches: Sequence[np.ndarray]) -> dict[str, float]:
    """correct/total top-1 and top-5, mean loss, and the published running
    average of per-batch top-1 over ``batches``."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    correct = np.argmax(logits, axis=1) == labels
    k = min(5, logits.shape[1])
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    correct_k = np.any(top_k == labels[:, None], axis=1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels]
    batch_acc = [float(np.mean(correct[b])) for b in batches if len(b)]
    return {"top1": float(correct.mean()), "top5": float(correct_k.mean()),
            "correct_top1": int(correct.sum()), "correct_top5": int(correct_k.sum()),
            "count": int(len(labels)), "loss": float(loss.mean()),
            "batch_mean_top1": float(np.mean(batch_acc)), "num_batches": len(batch_acc)}


def order_independent(noise_config, on: bool) -> bool:
    return (not on) or noise_config.type in ORDER_INDEPENDENT_NOISES


def evaluate_setting(model, variables: dict, data: EvalData, noise_config, *, on: bool,
                     orders: Sequence[str], batch_size: int, mesh, seed: int = 0,
                     with_features: bool = False, forward_cache: Optional[dict] = None
                     ) -> dict[str, dict[str, Any]]:
    """{order: {'metrics': {...}, 'features': {site: (n, d)} (if asked)}}.

    ``model`` is any registry model; its noise is replaced by the one this
    setting asks for (``noise_config`` on, or the identity at its site).
    """
    noise = features.eval_noise(noise_config, on=on, mesh=mesh)
    # Every 'off' setting at one site is the same identity model: one compile.
    setting_key = noise_config_key(noise_config) if on else \
        ("identity", noise_config.site, noise_config.layer, noise_config.stage)
    forward, grouped = _forward(model.clone(noise=noise), with_features, forward_cache,
                                (setting_key, with_features))
    order_batches = {order: batch_order.batch_indices(
        data.labels, order, batch_size, seed=seed, num_classes=data.num_classes)
        for order in orders}
    results = {}
    if order_independent(noise_config, on):
        everything = batch_order.batch_indices(data.labels, "class_sorted",
                                               SHARED_PASS_BATCH)
        shared = run_batches(forward, variables, data, everything, mesh, seed=seed,
                             grouped=grouped)
    for order, batches in order_batches.items():
        if order_independent(noise_config, on):
            outputs, how = shared, "shared_pass"
        else:
            outputs = run_batches(forward, variables, data, batches, mesh, seed=seed,
                                  grouped=grouped)
            how = "direct"
        metrics = order_metrics(outputs["logits"], data.labels, batches)
        metrics.update(pass_=how, batch_size=batch_size if order != "single" else 1)
        results[order] = {"metrics": metrics,
                          "features": {k: outputs[k] for k in features.FEATURE_SITES
                                       if k in outputs}}
    return results


def _forward(model, with_features, cache, key):
    if cache is not None and key in cache:
        return cache[key]
    raw = features.make_forward(model, with_features=with_features)
    fns = (jax.jit(raw), jax.jit(jax.vmap(raw, in_axes=(None, None, 0, 0, 0))))
    if cache is not None:
        cache[key] = fns
    return fns


def noise_config_key(noise_config) -> str:
    d = noise_config.to_dict() if hasattr(noise_config, "to_dict") else dict(noise_config)
    return json.dumps(d, sort_keys=True, default=str)


# ---------------------------------------------------------------------------
# Entropy estimates on the features of one setting
# ---------------------------------------------------------------------------
_SPLIT_STREAM = 0x5EED_5917  # any constant: keeps the split's draws apart from the orders'


def stratified_halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) index arrays: each class split in two, seeded; an odd
    member goes to the fit half, so every held-out class was seen in fitting.

    The split draws from a stream of its own: with ``default_rng(seed)``, the
    stream batch_order uses for the same seed, the halves would be the first
    and the last batches of each class in the same-class and distinct-class
    orders, and the probe would be scored on batches it never saw mixed.
    """
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    fit, held = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        half = (len(members) + 1) // 2
        fit.append(members[:half])
        held.append(members[half:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def entropy_estimates(feats: dict[str, np.ndarray], labels: np.ndarray, num_classes: int, *,
                      split_seed: int = 0, probe_steps: int = 500) -> dict[str, dict]:
    """{site: {'probe': EntropyEstimate dict, 'gaussian': ...}} in nats; the
    estimators fit on one stratified half of the eval examples and score the
    other."""
    fit, held = stratified_halves(labels, split_seed)
    out = {}
    for site, z in feats.items():
        z = np.asarray(z, np.float64)
        args = (z[fit], labels[fit], z[held], labels[held], num_classes)
        out[site] = {
            "probe": entropy.probe_conditional_entropy(*args, steps=probe_steps).as_dict(),
            "gaussian": entropy.gaussian_class_conditional_entropy(*args).as_dict()}
    return out


# ---------------------------------------------------------------------------
# A checkpoint under every order, noise on and off
# ---------------------------------------------------------------------------
def evaluate_checkpoint_orders(model, variables: dict, data: EvalData, noise_config, *,
                               orders: Sequence[str], batch_size: int, mesh, seed: int = 0,
                               with_entropy: bool = False, probe_steps: int = 500
                               ) -> dict[str, Any]:
    """Rows of {order, noise ('on'/'off'), metrics..., entropy (optional)}."""
    rows = []
    for on in (True, False):
        setting = evaluate_setting(model, variables, data, noise_config, on=on, orders=orders,
                                   batch_size=batch_size, mesh=mesh, seed=seed,
                                   with_features=with_entropy)
        shared_entropy = None  # orders that share one pass share its features
        for order in orders:
            row = {"order": order, "noise": "on" if on else "off",
                   **setting[order]["metrics"]}
            if with_entropy:
                if row["pass_"] != "shared_pass" or shared_entropy is None:
                    estimate = entropy_estimates(setting[order]["features"], data.labels,
                                                 data.num_classes, probe_steps=probe_steps)
                    if row["pass_"] == "shared_pass":
                        shared_entropy = estimate
                row["entropy"] = shared_entropy if row["pass_"] == "shared_pass" else estimate
            rows.append(row)
    return {"noise": noise_config.to_dict() if hasattr(noise_config, "to_dict")
            else dict(noise_config), "batch_size": batch_size, "seed": seed,
            "examples": int(len(data.labels)), "rows": rows}


def markdown_table(result: dict[str, Any]) -> str:
    """One line per (order, noise on/off)."""
    has_entropy = any("entropy" in r for r in result["rows"])
    header = ["order", "noise", "batches", "top-1", "top-5", "batch-mean top-1 (published)"]
    if has_entropy:
        # An unescaped '|' would split the cell and unmake the table.
        header += ["H(Y\\|Z) probe, site", "H(Y\\|Z) probe, pre-logits",
                   "H(Y\\|Z) gauss, site", "H(Y\\|Z) gauss, pre-logits"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        cells = [r["order"], r["noise"], str(r["num_batches"]),
                 f"{100 * r['top1']:.2f}% ({r['correct_top1']}/{r['count']})",
                 f"{100 * r['top5']:.2f}% ({r['correct_top5']}/{r['count']})",
                 f"{100 * r['batch_mean_top1']:.2f}%"]
        if has_entropy:
            e = r["entropy"]
            cells += [f"{e[s][m]['value']:.3f} ± {e[s][m]['stderr']:.3f}"
                      for m in ("probe", "gaussian") for s in ("noise_site", "pre_logits")]
        lines.append("| " + " | ".join(cells) + " |")
    if has_entropy:
        any_e = result["rows"][0]["entropy"]["pre_logits"]["probe"]
        lines.append(f"\nH(Y|Z) in nats (± standard error), fit on {any_e['n_train']} and "
                     f"scored on {any_e['n_test']} eval examples; H(Y) = "
                     f"{any_e['label_entropy']:.3f} nats.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Loading a checkpoint and the command line
# ---------------------------------------------------------------------------
def restore_variables(config: ml_collections.ConfigDict, workdir: str, mesh):
    """(model, {'params', 'batch_stats'}, step) from workdir/checkpoints."""
    from noisy_flax import checkpointing, optim, train

    model = train.build_model(config, mesh)
    info = input_pipeline.dataset_info(config)
    _, total_steps, warmup_steps = train.schedule_lengths(config, info.num_train_examples)
    tx, _ = optim.make_optimizer(config, total_steps, warmup_steps)
    state, shardings = train.create_train_state(config, model, tx, mesh)
    directory = os.path.join(workdir, "checkpoints")
    restored = None
    if checkpointing.has_checkpoints(directory):  # else create nothing where no run is
        ckpt = checkpointing.Checkpointer(directory)
        try:
            step, restored = ckpt.restore_latest(  # training may be writing here
                checkpointing.abstract_with_shardings(state, shardings), read_only=True)
        finally:
            ckpt.close()
    if restored is None:
        raise checkpointing.CheckpointError(
            f"no checkpoint in {directory}; train first with "
            "python -m noisy_flax.main --config ... --workdir ...")
    return model, {"params": restored.params, "batch_stats": restored.batch_stats}, step


def run(config: ml_collections.ConfigDict, workdir: str, *, orders: Sequence[str],
        batch_size: int, seed: int = 0, split: Optional[str] = None, per_class: int = 0,
        max_examples: int = 0, with_entropy: bool = False, probe_steps: int = 500,
        name: Optional[str] = None) -> dict[str, Any]:
    """Evaluates the latest checkpoint of ``workdir``; writes ``<name>.json`` and
    ``<name>.md`` (default name: entropy_orders with entropy, else eval_orders)."""
    name = name or ("entropy_orders" if with_entropy else "eval_orders")
    for order in orders:  # every cheap check before the restore
        batch_order.check_order(order)
    if batch_size < 1:
        raise ValueError(f"--batch_size={batch_size} must be >= 1")
    mesh = sharding.create_mesh(config.mesh)
    data = load_eval_data(config, split=split, per_class=per_class, max_examples=max_examples)
    for order in orders:  # an impossible order fails here, not after the others ran
        batch_order.check_batches(data.labels, order, batch_size, data.num_classes)
    model, variables, step = restore_variables(config, workdir, mesh)
    result = evaluate_checkpoint_orders(model, variables, data, config.noise, orders=orders,
                                        batch_size=batch_size, mesh=mesh, seed=seed,
                                        with_entropy=with_entropy, probe_steps=probe_steps)
    result.update(step=int(step), model=config.model, split=split or config.eval_split,
                  devices=mesh.size)
    table = markdown_table(result)
    if jax.process_index() == 0:
        with workdir_lib.open_file(os.path.join(workdir, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=2)
        with workdir_lib.open_file(os.path.join(workdir, f"{name}.md"), "w") as f:
            f.write(f"# {config.model}, checkpoint step {step}: {config.noise.type} noise at "
                    f"{config.noise.site}, scope {config.noise.scope}\n\n{table}\n")
        print(table, flush=True)
    return result


def main_with_flags(argv, *, entropy_default: bool = False) -> None:
    """absl entry shared with ``python -m noisy_flax.entropy --config ... --workdir ...``."""
    from absl import app, flags
    from ml_collections import config_flags

    from noisy_flax import cli
    from noisy_flax.checkpointing import CheckpointError  # a user-fixable state

    cli.add_config_roots(sys.argv)  # configs/ lives in the repository root
    config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    workdir = flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.")
    orders = flags.DEFINE_list("orders", list(batch_order.ORDERS), "Batch orders to run.")
    batch_size = flags.DEFINE_integer(
        "batch_size", 10, "Test batch size over all devices. The published run mixed 10 on its "
        "one GPU: with noise.scope='device', pass 10 x the device count.", lower_bound=1)
    seed = flags.DEFINE_integer("seed", 0, "Seed of the shuffled orders and the noise keys.",
                                lower_bound=0)
    split = flags.DEFINE_string("split", None, "Eval split (default config.eval_split).")
    per_class = flags.DEFINE_integer("per_class", 0, "Keep the first N examples per class "
                                     "(0: all).", lower_bound=0)
    with_entropy = flags.DEFINE_bool("entropy", entropy_default, "Add H(Y|Z) estimates.")
    probe_steps = flags.DEFINE_integer("probe_steps", 500, "L-BFGS steps of the probe.",
                                       lower_bound=1)
    flags.mark_flags_as_required(["config", "workdir"])

    def main(args):
        cli.start(args)
        try:
            run(cli.config_value(config_flag), workdir.value, orders=orders.value,
                batch_size=batch_size.value, seed=seed.value, split=split.value,
                per_class=per_class.value, with_entropy=with_entropy.value,
                probe_steps=probe_steps.value)
        except (ValueError, FileNotFoundError, CheckpointError) as error:
            cli.fail(cli.first_line(error))

    app.run(main, argv=argv, flags_parser=cli.flags_parser(config_flag))


if __name__ == "__main__":
    main_with_flags(sys.argv)
