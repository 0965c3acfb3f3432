"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

Read top to bottom: set-up (mesh, data, model, optimizer, state), the jitted
train and eval steps, then the loop with logging, evaluation, checkpoints
and preemption handling.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import time
from typing import Any, Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from noisy_flax import checkpointing, cpu_tuning, optim, sharding
from noisy_flax.models import create_model, uses_batch_stats

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class EvaluationStopped(Exception):
    """A stop (SIGTERM) arrived between evaluation batches."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key: noise and dropout keys are folded from it


# ---------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------
def build_model(config: ml_collections.ConfigDict, mesh: Optional[Mesh] = None):
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown config.dtype {config.dtype!r}; use one of {tuple(DTYPES)}")
    kwargs = dict(config.model_kwargs)
    if config.remat:
        kwargs["remat"] = True
    return create_model(config.model, num_classes=config.num_classes, noise=config.noise,
                        mesh=mesh, dtype=DTYPES[config.dtype], **kwargs)


def schedule_lengths(config, num_train_examples: int) -> tuple[int, int, int]:
    """(steps_per_epoch, total_steps, warmup_steps) from steps or epochs."""
    _check_one_unit(config, "total_steps", "num_epochs", "training length")
    _check_one_unit(config, "warmup_steps", "warmup_epochs", "warm-up")
    steps_per_epoch = max(num_train_examples // config.batch_size, 1)
    total = config.total_steps if config.total_steps > 0 else \
        math.ceil(config.num_epochs * steps_per_epoch)
    if total <= 0:
        raise ValueError("set config.total_steps or config.num_epochs to a positive value")
    warmup = config.warmup_steps or int(round(config.warmup_epochs * steps_per_epoch))
    return steps_per_epoch, total, min(warmup, total)


def eval_interval(config, steps_per_epoch: int) -> int:
    """Steps between evaluations (0: at the end only), from config.eval_every
    (steps) or config.eval_every_epochs; never both."""
    _check_one_unit(config, "eval_every", "eval_every_epochs", "evaluation interval")
    every_epochs = config.get("eval_every_epochs", 0.0)
    if every_epochs > 0:
        return max(1, int(round(every_epochs * steps_per_epoch)))
    return config.eval_every


def _check_one_unit(config, steps: str, epochs: str, what: str) -> None:
    """A quantity is given in steps or in epochs, never both (0 = not given):
    with both, one of them would be ignored without a word."""
    if config.get(steps, 0) > 0 and config.get(epochs, 0) > 0:
        raise ValueError(
            f"config.{steps}={config[steps]} and config.{epochs}={config[epochs]} both give "
            f"the {what}; keep one and set the other to 0 (e.g. --config.{epochs}=0)")


def resolve_eval_batch_size(config) -> None:
    """Sets ``config.eval_batch_size`` from ``config.eval_batch_per_device``.

    A config file must not ask JAX for the device count: that starts the
    backend, after which ``jax.distributed`` can no longer start on a pod (and
    before it, the count would be this host's alone). So a per-device eval
    batch is a key, turned into the global batch here, once JAX is up.
    """
    per_device = config.get("eval_batch_per_device", 0)
    if not per_device:
        if config.eval_batch_size is None:
            raise ValueError("config.eval_batch_size is unset; set it, or "
                             "config.eval_batch_per_device for a batch per device")
        return
    size = per_device * jax.device_count()
    if config.eval_batch_size not in (None, size):
        raise ValueError(
            f"config.eval_batch_size={config.eval_batch_size} and config.eval_batch_per_device="
            f"{per_device} ({size} on {jax.device_count()} devices) disagree; set one of them "
            "(eval_batch_per_device=0 turns it off)")
    config.eval_batch_size = size


def input_shape(config) -> tuple[int, int, int, int]:
    return (1, config.image_size, config.image_size, config.input.channels)


def create_train_state(config, model, tx, mesh: Mesh) -> tuple[TrainState, Any]:
    """Initialises the state directly in its sharded layout.

    ``jax.eval_shape`` gives the shapes, the rules give the shardings, and
    the jitted init writes each device's part only: a large model is never
    materialised whole on one device.
    """
    # Parameters do not depend on the noise: initialise without it, so a
    # batch-mixing noise never sees the one-image init batch.
    plain = model.clone(noise=None)

    def init(seed_key):
        params_key, state_key = jax.random.split(seed_key)
        variables = plain.init({"params": params_key}, jnp.zeros(input_shape(config)), train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(params), rng=jax.random.key_data(state_key))

    seed_key = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init, seed_key)
    shardings = sharding.param_shardings(abstract, mesh, config.sharding)
    state = jax.jit(init, out_shardings=shardings)(seed_key)
    return state, shardings


def load_initial_weights(config, model, state: TrainState, shardings) -> TrainState:
    """Replaces params (and batch statistics) with the weights named by init_from."""
    from noisy_flax import pretrained  # torch-free, imported only when needed

    dont_load = tuple(config.init_dont_load)
    if not _resets_head(dont_load):
        check_head_classes(pretrained, config, model)
    variables = pretrained.load_variables(
        config.init_from, model, num_classes=config.num_classes,
        dont_load=dont_load, image_size=config.image_size, channels=config.input.channels)
    params = jax.device_put(variables["params"], shardings.params)
    batch_stats = jax.device_put(variables.get("batch_stats", {}), shardings.batch_stats)
    return state.replace(params=params, batch_stats=batch_stats)


def _resets_head(dont_load) -> bool:
    return any(re.fullmatch(p, name) for p in dont_load for name in ("head/kernel", "fc/kernel"))


def check_head_classes(pretrained, config, model) -> None:
    """A head for another class count is replaced only when asked for:
    fine-tuning must say so (init_dont_load), a mistyped num_classes must not
    silently throw the trained head away."""
    converted, _ = pretrained.to_flax_names(pretrained.read_checkpoint(config.init_from), model)
    classes = pretrained.checkpoint_classes(converted)
    if classes is not None and classes != config.num_classes:
        raise ValueError(
            f"config.init_from has a head for {classes} classes but config.num_classes="
            f"{config.num_classes}; set --config.num_classes={classes}, or reset the head with "
            "--config.init_dont_load='(\"head/.*\",)' (ResNet: 'fc/.*') to fine-tune")


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------
def cross_entropy(logits, labels, num_classes: int, smoothing: float = 0.0):
    targets = jax.nn.one_hot(labels, num_classes)
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def make_train_step(model, tx, schedule, config) -> Callable:
    has_batch_stats = uses_batch_stats(model)
    accum = config.grad_accum_steps

    def loss_fn(params, batch_stats, images, labels, rngs):
        variables = {"params": params}
        if has_batch_stats:
            variables["batch_stats"] = batch_stats
            logits, updated = model.apply(variables, images, train=True, rngs=rngs,
                                          mutable=["batch_stats"])
            batch_stats = updated["batch_stats"]
        else:
            logits = model.apply(variables, images, train=True, rngs=rngs)
        loss = cross_entropy(logits, labels, config.num_classes, config.label_smoothing).mean()
        correct = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, (correct, batch_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_step(carry, micro):
        grads_sum, loss_sum, correct_sum, batch_stats, index = carry
        key = jax.random.fold_in(micro["key"], index)
        rngs = dict(zip(("dropout", "noise"), jax.random.split(key)))
        (loss, (correct, batch_stats)), grads = grad_fn(
            micro["params"], batch_stats, micro["image"], micro["label"], rngs)
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, loss_sum + loss, correct_sum + correct, batch_stats, index + 1), None

    def train_step(state: TrainState, batch):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if accum == 1:
            rngs = dict(zip(("dropout", "noise"), jax.random.split(step_key)))
            (loss, (accuracy, batch_stats)), grads = grad_fn(
                state.params, state.batch_stats, batch["image"], batch["label"], rngs)
        else:
            # Micro-batch j takes rows j, j+accum, ...: every device keeps its
            # own rows, so splitting the batch moves no data between devices.
            def split(x):
                x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
                return jnp.moveaxis(x, 1, 0)
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            carry = (zeros, 0.0, 0.0, state.batch_stats, 0)
            for j in range(accum):  # unrolled: accum is small and static
                micro = {"image": split(batch["image"])[j], "label": split(batch["label"])[j],
                         "params": state.params, "key": step_key}
                carry, _ = micro_step(carry, micro)
            grads_sum, loss_sum, correct_sum, batch_stats, _ = carry
            grads = jax.tree.map(lambda g: g / accum, grads_sum)
            loss, accuracy = loss_sum / accum, correct_sum / accum
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(params), "lr": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step


def jit_train_step(model, tx, schedule, config, state_shardings, mesh: Mesh) -> Callable:
    """The train step as every loop runs it: sharded over ``mesh``, the state
    donated, compiled with the backend's options (noisy_flax.cpu_tuning)."""
    return jax.jit(make_train_step(model, tx, schedule, config),
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,), compiler_options=cpu_tuning.compiler_options(config))


def make_eval_step(model, config) -> Callable:
    """Per-batch sums (never means), so padded batches count correctly."""
    has_batch_stats = uses_batch_stats(model)
    top_k = min(5, config.num_classes)

    def eval_step(params, batch_stats, batch, key):
        variables = {"params": params}
        if has_batch_stats:
            variables["batch_stats"] = batch_stats
        mask = batch["mask"].astype(bool)
        logits = model.apply(variables, batch["image"], train=False, mask=mask,
                             rngs={"noise": key})
        labels = batch["label"]
        real = mask.astype(jnp.float32)
        top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        in_top_k = jnp.any(jax.lax.top_k(logits, top_k)[1] == labels[:, None], axis=-1)
        loss = cross_entropy(logits, labels, config.num_classes)
        return {"correct_top1": jnp.sum(top1 * real), "correct_top5": jnp.sum(in_top_k * real),
                "loss_sum": jnp.sum(loss * real), "count": jnp.sum(real)}

    return eval_step


def evaluate(eval_step, state: TrainState, batches: Iterator[dict], mesh: Mesh,
             seed: int = 0, max_batches: int = 0,
             stop_requested: Callable[[], bool] = lambda: False) -> dict[str, float]:
    """Top-1 / top-5 as correct / total over every real example, and the
    running average of per-batch accuracy that the published code reports.
    Raises EvaluationStopped when ``stop_requested()`` turns true."""
    per_batch = []
    base_key = jax.random.PRNGKey(seed + 1)
    for index, local in enumerate(batches):
        if max_batches and index >= max_batches:
            break
        if stop_requested():  # a long evaluation must not outlast a preemption's grace period
            raise EvaluationStopped
        batch = sharding.global_batch(local, mesh)
        per_batch.append(eval_step(state.params, state.batch_stats, batch,
                                   jax.random.fold_in(base_key, index)))
    per_batch = jax.device_get(per_batch)
    return summarize_eval(per_batch)


def summarize_eval(per_batch: list[dict]) -> dict[str, float]:
    total = {k: float(sum(b[k] for b in per_batch)) for k in per_batch[0]} if per_batch else {}
    count = total.get("count", 0.0)
    if count == 0:
        raise TrainingError("the evaluation saw no examples; check config.eval_split")
    batch_accuracies = [b["correct_top1"] / b["count"] for b in per_batch if b["count"] > 0]
    return {"top1": total["correct_top1"] / count, "top5": total["correct_top5"] / count,
            "loss": total["loss_sum"] / count, "count": count,
            "batch_mean_top1": float(np.mean(batch_accuracies))}


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
class _StopSignal:
    """SIGTERM (what a preemption sends) asks for a checkpoint and a clean exit.

    In one process only. With several, the preemption sync service that
    jax.distributed starts catches SIGTERM and has every process stop at the
    same step (CheckpointManager.reached_preemption); a Python handler would
    replace its notifier, and the signalled process would save and leave
    alone while the others wait for it in a collective.
    """

    def __init__(self):
        self.received = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_finite(metrics: dict, step: int, last_saved: Optional[int]) -> None:
    # The parameter norm too: a finite loss can still come with an update
    # that overflowed, and such a state must never be checkpointed.
    watched = ("loss", "grad_norm", "param_norm")
    if not all(math.isfinite(metrics[name]) for name in watched if name in metrics):
        kept = f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None \
            else "no checkpoint was written"
        values = ", ".join(f"{name} {metrics[name]}" for name in watched if name in metrics)
        raise TrainingError(
            f"training diverged at step {step} ({values}); {kept}. "
            "Lower config.lr or set config.grad_clip_norm")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains, evaluates and checkpoints; returns the final metrics."""
    # Imported here, not at the top: both pull in TensorFlow, which the steps
    # (and noisy_flax.benchmark on an accelerator-only machine) must not need.
    from noisy_flax import input_pipeline, reporting, validation, workdir as workdir_lib
    is_main = jax.process_index() == 0
    resolve_eval_batch_size(config)

    # --- Checks. Everything that can refuse the run does so here, before
    # anything is written: a refused run leaves the workdir as it was.
    info = validation.validate_config(config)
    workdir_lib.check_workdir(workdir)
    workdir_lib.check_config_unchanged(workdir, config)
    mesh = sharding.create_mesh(config.mesh)
    steps_per_epoch, total_steps, warmup_steps = schedule_lengths(config, info.num_train_examples)
    eval_every = eval_interval(config, steps_per_epoch)

    # --- Model, optimizer, state.
    model = build_model(config, mesh)
    tx, schedule = optim.make_optimizer(config, total_steps, warmup_steps, steps_per_epoch)
    state, state_shardings = create_train_state(config, model, tx, mesh)

    # A fresh run loads init_from now: a file that does not fit fails before
    # the workdir is touched.
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    initialised = bool(config.init_from) and not checkpointing.has_checkpoints(checkpoint_dir)
    if initialised:
        state = load_initial_weights(config, model, state, state_shardings)
    workdir_lib.prepare_workdir(workdir)

    # --- Checkpoints: resume if there is one.
    ckpt = checkpointing.Checkpointer(checkpoint_dir,
                                      keep=config.keep_checkpoints,
                                      save_every=config.checkpoint_every,
                                      async_save=config.async_checkpoints)
    abstract = checkpointing.abstract_with_shardings(state, state_shardings)
    # Saved with every step: resuming on other devices regroups device-scoped noise.
    saved_with = {"batch_devices": mesh.size}
    restored_step, restored = ckpt.restore_latest(abstract)
    if restored is not None:
        try:
            if restored_step < total_steps:  # steps left to train
                _check_same_noise_groups(config, ckpt.meta(restored_step), mesh)
        except ValueError:
            ckpt.close()
            raise
        state = restored
        reporting.echo(f"Resumed from {ckpt.directory / str(restored_step)}")
    elif config.init_from:
        if not initialised:  # every checkpoint was damaged: start over from init_from
            state = load_initial_weights(config, model, state, state_shardings)
        reporting.echo(f"Initialised from {config.init_from}")
    start_step = int(jax.device_get(state.step))

    # --- Steps.
    train_step = jit_train_step(model, tx, schedule, config, state_shardings, mesh)
    eval_step = jax.jit(make_eval_step(model, config),
                        compiler_options=cpu_tuning.compiler_options(config))

    def run_eval(step: int) -> dict[str, float]:
        max_batches = math.ceil(config.eval_max_examples / config.eval_batch_size) \
            if config.eval_max_examples else 0
        if config.get("eval_order", "dataset") == "dataset":
            batches = input_pipeline.eval_batches(config, process_index=jax.process_index(),
                                                  process_count=jax.process_count())
        else:  # test-batch order matters for batch-mixing noise (noisy_flax.batch_order)
            from noisy_flax import evaluate as ordered  # imports train lazily: no cycle
            batches = ordered.ordered_eval_batches(config, process_index=jax.process_index(),
                                                   process_count=jax.process_count())
        result = evaluate(eval_step, state, batches, mesh, config.seed, max_batches,
                          stop_requested=lambda: stop.received)
        reporter.write(step, "eval", result)
        reporting.echo(f"eval at step {step}: top-1 {100 * result['top1']:.2f}% "
                       f"top-5 {100 * result['top5']:.2f}% loss {result['loss']:.4f} "
                       f"({int(result['count'])} examples)")
        return result

    # --- Reporting.
    summary_path = os.path.join(workdir, "summary.json")
    finished = _read_summary(summary_path)
    if finished is not None and finished.get("steps") != total_steps:
        finished = None  # a stopped run's summary, or one of fewer steps: not this run's end
    # The last step was saved, but its evaluation or summary never finished.
    reevaluate = start_step >= total_steps and finished is None
    reporter = reporting.MetricsReporter(workdir, start_step, reevaluating=reevaluate)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    if is_main:
        workdir_lib.write_config(workdir, config)
        reporting.write_parameter_overview(workdir, state.params)
    reporting.echo(f"{config.model}: {n_params:,} parameters | {config.dataset} "
                   f"({info.num_train_examples:,} train) | {mesh.size} device(s) {dict(mesh.shape)} | "
                   f"noise {config.noise.type} at {config.noise.site} "
                   f"(train={config.noise.train}, eval={config.noise.eval}) | "
                   f"{total_steps} steps, batch {config.batch_size}")

    # --- Loop.
    local_batches = input_pipeline.train_iterator(config, process_index=jax.process_index(),
                                                  process_count=jax.process_count(),
                                                  start_step=start_step)
    # Copies to the devices start two steps ahead; islice: never read past the last step.
    train_iter = sharding.prefetch_to_device(
        itertools.islice(local_batches, max(total_steps - start_step, 0)), mesh)
    progress = reporting.Progress(total_steps, config.batch_size, start_step)
    stop = _StopSignal()
    last_saved = restored_step
    eval_result, metrics = None, None
    eval_stopped = False
    best_top1 = _best_top1_so_far(workdir) if config.save_best else -1.0
    started = time.perf_counter()
    try:
        if reevaluate:
            try:
                eval_result = run_eval(start_step)
            except EvaluationStopped:
                eval_stopped = True
                reporting.echo(f"Stop requested during the evaluation of step {start_step}; "
                               "rerun the same command to evaluate it")
        if eval_result is not None:
            if config.save_best and eval_result["top1"] > best_top1:
                _save_best(workdir, start_step, state, eval_result["top1"])
        for step in range(start_step + 1, total_steps + 1):
            batch = next(train_iter)
            state, metrics = train_step(state, batch)
            is_last = step == total_steps
            preempted = stop.received or ckpt.manager.reached_preemption(step)
            must_save = is_last or preempted or ckpt.manager.should_save(step)
            if step % config.log_every == 0 or must_save:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(host, step, last_saved)
                if step % config.log_every == 0 or is_last:
                    reporter.write(step, "train", host)
                    progress.update(step, host)
            # The checkpoint first: an evaluation that fails (out of memory,
            # say) must not cost the steps since the last one.
            if must_save:
                ckpt.save(step, state, force=is_last or preempted, meta=saved_with)
                last_saved = step
                if is_last:  # committed before the last evaluation, which may fail or be killed
                    ckpt.wait()
            # A preempted run saves and leaves: the grace period is short, and
            # the resumed run evaluates at its next eval step.
            if ((eval_every and step % eval_every == 0) or is_last) and not (
                    preempted and not is_last):
                try:
                    eval_result = run_eval(step)
                except EvaluationStopped:  # save this step now, within the grace period
                    eval_stopped, preempted, eval_result = True, True, None
                    if last_saved != step:
                        ckpt.save(step, state, force=True, meta=saved_with)
                        last_saved = step
                if eval_result is not None and config.save_best and \
                        eval_result["top1"] > best_top1:
                    best_top1 = eval_result["top1"]
                    _save_best(workdir, step, state, best_top1)
            if preempted and (not is_last or eval_stopped):
                ckpt.wait()  # said only once the save is committed
                during = " during its evaluation" if eval_stopped else ""
                reporting.echo(f"Stop requested{during}: checkpoint saved at step {step}; "
                               "rerun the same command to resume")
                break
            if step == start_step + 1:  # compiling is done: time the rate from here
                jax.block_until_ready(state)
                progress.restart(step)
    finally:
        ckpt.close()  # waits for a save in flight while SIGTERM is still caught
        stop.restore()
        reporter.close()

    elapsed = time.perf_counter() - started
    steps_run = int(jax.device_get(state.step)) - start_step
    if steps_run == 0 and finished is not None:  # a finished run's rerun: keep its summary
        reporting.echo(f"Already trained to step {start_step}; summary kept in {summary_path}")
        return finished
    summary = {"model": config.model, "steps": int(jax.device_get(state.step))}
    if steps_run:  # an evaluation-only rerun trained nothing to time
        summary.update(train_seconds=round(elapsed, 1), images_per_second=round(
            steps_run * config.batch_size / max(elapsed, 1e-9), 1))
    if metrics is not None:
        summary["final_train_loss"] = float(jax.device_get(metrics["loss"]))
    elif reporter.last_train is not None:  # the run that trained logged it
        summary["final_train_loss"] = reporter.last_train["loss"]
    if eval_result is not None:
        summary.update({f"eval_{k}": v for k, v in eval_result.items()})
    # A stop during an evaluation leaves that evaluation owed: a summary
    # would make the rerun take the run for finished.
    if is_main and not eval_stopped:
        reporting.echo(reporting.summary_table(summary))
        workdir_lib.replace_file(summary_path, json.dumps(summary, indent=2))
        if config.plot and workdir_lib.file_exists(reporter.jsonl_path):
            from noisy_flax import plotting  # here: the benchmark imports this module without matplotlib
            plotting.plot_curves(reporter.jsonl_path, os.path.join(workdir, "curves.png"),
                                 title=f"{config.model} on {config.dataset}")
    return summary


def _check_same_noise_groups(config, saved_meta: dict, mesh: Mesh) -> None:
    """Device-scoped batch noise mixes each device's share of the batch, so
    a resume on another number of devices would train something else. The
    mesh is a harmless key otherwise (it is not in the config comparison)."""
    from noisy_flax import noise as noise_lib
    saved = saved_meta.get("batch_devices")  # absent in older checkpoints
    n = config.noise
    if (saved is None or saved == mesh.size or config.get("allow_config_change", False)
            or not (n.train and n.scope == "device" and n.type in noise_lib.BATCH_DEPENDENT)):
        return
    raise ValueError(
        f"this run trained with {n.type} noise over each device's "
        f"{config.batch_size // saved} examples ({saved} devices), and would now use "
        f"{config.batch_size // mesh.size} ({mesh.size} devices); resume on {saved} devices, "
        "or pass --config.allow_config_change=True to continue with the new grouping")


def _read_summary(path: str) -> Optional[dict]:
    """A finished run's summary.json; None when there is none, or when a crash
    left it unreadable (the final evaluation then runs again and rewrites it)."""
    from noisy_flax import reporting, workdir as workdir_lib
    if not workdir_lib.file_exists(path):
        return None
    try:
        with workdir_lib.open_file(path) as f:
            return json.load(f)
    except json.JSONDecodeError:
        reporting.echo(f"{path} is not JSON; evaluating the last checkpoint again")
        return None


def _best_checkpointer(workdir: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(os.path.join(workdir, "best"), keep=1, save_every=1,
                                      async_save=False)


def _save_best(workdir: str, step: int, state: TrainState, top1: float) -> None:
    """Keeps the variables of the best evaluation so far (published protocol),
    with its score, so that a resumed run only replaces them with better ones."""
    best = _best_checkpointer(workdir)
    try:
        # A step already kept: this step rerun after a crash, from the same state.
        if step not in best.all_steps():
            best.save(step, {"params": state.params, "batch_stats": state.batch_stats},
                      force=True, meta={"top1": float(top1)})
    finally:
        best.close()


def _best_top1_so_far(workdir: str) -> float:
    """The score of the kept best checkpoint (-1 when there is none)."""
    if not checkpointing.has_checkpoints(os.path.join(workdir, "best")):
        return -1.0
    best = _best_checkpointer(workdir)
    try:
        meta = best.latest_meta()
    except Exception as error:  # damaged: set aside, as a damaged training checkpoint is
        best.set_aside_step(best.latest_step(),
                            f"its score cannot be read ({checkpointing.describe(error)}); "
                            "the next evaluation keeps a new best")
        return -1.0
    finally:
        best.close()
    return float(meta.get("top1", -1.0)) if meta else -1.0
