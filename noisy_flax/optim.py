"""optax optimizer and learning-rate schedule from a config."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
# How often the learning rate changes: every step (optax's, big_vision's
# way) or at epoch starts only (timm's schedulers stepped per epoch, as in
# the published NoisyViT run: there epoch 0 trains at the warm-up's start).
SCHEDULE_UNITS = ("step", "epoch")
WD_MASKS = ("all", "kernels")


def learning_rate_schedule(config, total_steps: int, warmup_steps: int,
                           steps_per_epoch: int = 1) -> optax.Schedule:
    """Linear warm-up from ``config.warmup_init_lr`` (0 in the published ViT
    run), then cosine / linear decay to ``config.end_lr``, or constant. With
    ``config.schedule_unit='epoch'`` the rate is held through each epoch at
    its value at the epoch's first step."""
    if config.lr <= 0:
        raise ValueError(f"config.lr={config.lr} must be positive (e.g. 1e-3)")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown config.schedule {config.schedule!r}; use one of {SCHEDULES}")
    unit = config.get("schedule_unit", "step")
    if unit not in SCHEDULE_UNITS:
        raise ValueError(f"unknown config.schedule_unit {unit!r}; use one of {SCHEDULE_UNITS}")
    schedule = _schedule_per_step(config, total_steps, warmup_steps)
    if unit == "step" or steps_per_epoch <= 1:
        return schedule
    return lambda count: schedule(count // steps_per_epoch * steps_per_epoch)


def _schedule_per_step(config, total_steps: int, warmup_steps: int) -> optax.Schedule:
    # warmup_prefix (optax's join, big_vision): the decay starts after the
    # warm-up and spans the steps left. Without it (timm's schedulers, by
    # default), the decay spans the whole run from step 0 and the warm-up
    # replaces its first part, so the rate after the warm-up is already below lr.
    prefix = config.get("warmup_prefix", True)
    decay_steps = max(total_steps - warmup_steps if prefix else total_steps, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=config.end_lr / config.lr)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(config.lr, config.end_lr, decay_steps)
    else:
        decay = optax.constant_schedule(config.lr)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(config.warmup_init_lr, config.lr, warmup_steps)
    if prefix:
        return optax.join_schedules([warmup, decay], [warmup_steps])
    return lambda count: jnp.where(count < warmup_steps, warmup(count), decay(count))


def decay_mask(params):
    """True for the kernels of dense and conv layers; False for biases, norms,
    the class token and position embeddings. By name, not by rank: the
    attention's query / key / value biases are (heads, head_dim)."""
    def keep(path, leaf):
        return str(getattr(path[-1], "key", path[-1])) == "kernel"
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config, total_steps: int, warmup_steps: int, steps_per_epoch: int = 1
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(config, total_steps, warmup_steps, steps_per_epoch)
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown config.optimizer {config.optimizer!r}; use one of {OPTIMIZERS}")
    if config.wd_mask not in WD_MASKS:
        raise ValueError(f"unknown config.wd_mask {config.wd_mask!r}; use one of {WD_MASKS}")
    mask = decay_mask if config.wd_mask == "kernels" else None
    if config.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                          weight_decay=config.weight_decay, mask=mask)
    else:
        opt = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=mask),
                          optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
    if config.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
    return opt, schedule
