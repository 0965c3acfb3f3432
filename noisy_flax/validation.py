"""``validate_config(config)``: every check that can run before training
touches the workdir, in one place.

It reuses the checks that live with their subject (noise factory, mesh and
batch placement, optimizer, model tracing, dataset lookup) by calling them
on the config, instead of restating their rules here.
"""
from __future__ import annotations

import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from noisy_flax import batch_order, cpu_tuning, noise, optim, sharding
from noisy_flax.train import build_model, eval_interval, input_shape, schedule_lengths

# Batch orders the evaluation knows (config.eval_order): the dataset's own,
# or one that noisy_flax.batch_order builds.
EVAL_ORDERS = ("dataset",) + tuple(batch_order.ORDERS)


def validate_config(config: ml_collections.ConfigDict):
    """Raises ValueError (one line naming the problem and the fix) for a bad
    config; returns the dataset facts it had to read (input_pipeline.DatasetSummary)."""
    check_choices(config)
    check_numbers(config)
    mesh = sharding.create_mesh(config.mesh)
    check_batch_sizes(config, mesh)
    noise.make_noise(config.noise, mesh=mesh)
    check_circulant_batches(config, mesh)
    optim.make_optimizer(config, total_steps=1, warmup_steps=0)  # lr, schedule, optimizer
    check_model_traces(config, mesh)
    info = check_dataset(config)
    check_init_from(config)
    return info


# (key, lowest allowed value): counts and rates whose wrong sign or zero
# would divide by zero, keep no checkpoint or train on nonsense.
AT_LEAST = (("log_every", 1), ("checkpoint_every", 1), ("keep_checkpoints", 1),
            ("eval_every", 0), ("eval_every_epochs", 0), ("eval_max_examples", 0),
            ("warmup_steps", 0),
            ("warmup_epochs", 0), ("total_steps", 0), ("num_epochs", 0), ("weight_decay", 0),
            ("image_size", 1), ("eps", 0), ("momentum", 0),
            ("grad_clip_norm", 0), ("label_smoothing", 0),
            # Rates below zero would climb the loss: end_lr is where the
            # schedule ends, warmup_init_lr where the warm-up starts.
            ("end_lr", 0), ("warmup_init_lr", 0))


def check_numbers(config) -> None:
    for key, lowest in AT_LEAST:
        value = config.get(key, lowest)
        if not (math.isfinite(value) and value >= lowest):
            raise ValueError(f"config.{key}={value} must be >= {lowest}")
    if not config.label_smoothing < 1:
        raise ValueError(f"config.label_smoothing={config.label_smoothing} must be below 1, "
                         "e.g. 0.1")
    for key in ("lr", "end_lr", "warmup_init_lr"):
        if not math.isfinite(config.get(key, 0.0)):
            raise ValueError(f"config.{key}={config[key]} must be a finite number")
    # Rates in [0, 1): a moment's decay of 1 or more never forgets (or grows),
    # a dropout rate of 1 drops everything.
    below_one = [(f"config.{k}", config.get(k, 0.0)) for k in ("b1", "b2", "momentum")]
    below_one += [(f"config.model_kwargs.{k}", v) for k, v in config.model_kwargs.items()
                  if k.endswith(("dropout_rate", "drop_path_rate"))]
    for name, value in below_one:
        if not 0 <= value < 1:
            raise ValueError(f"{name}={value} must be in [0, 1), e.g. 0.9 for a moment's decay "
                             "or 0.1 for a dropout rate")
    # numpy's generators refuse negative seeds, and evaluation keys use seed + 1.
    if not 0 <= config.seed < 2 ** 63 - 1:
        raise ValueError(f"config.seed={config.seed} must be in [0, 2**63 - 1), e.g. 0")


def check_choices(config) -> None:
    cpu_tuning.cpu_ynnpack_choice(config)
    if config.get("eval_order", "dataset") not in EVAL_ORDERS:
        raise ValueError(f"unknown config.eval_order {config.eval_order!r}; "
                         f"use one of {', '.join(EVAL_ORDERS)}")
    if config.get("eval_order") == "distinct_class" and config.eval_batch_size > config.num_classes:
        raise ValueError(f"config.eval_order='distinct_class' needs eval_batch_size <= "
                         f"num_classes ({config.num_classes}), got {config.eval_batch_size}; "
                         "lower config.eval_batch_size")
    # An ordered evaluation fills its batches while reading the split in storage
    # order, so a cap would keep the batches that fill first: a biased subset.
    # A runlocal smoke run only checks that the path runs.
    if (config.get("eval_order", "dataset") != "dataset" and config.get("eval_max_examples")
            and not config.get("runlocal", False)):
        raise ValueError(f"config.eval_max_examples={config.eval_max_examples} with "
                         f"eval_order={config.eval_order!r} would score the batches that fill "
                         "first in storage order, a biased subset; set "
                         "config.eval_max_examples=0 or eval_order='dataset'")


def check_batch_sizes(config, mesh: Mesh) -> None:
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
    if config.grad_accum_steps < 1:
        raise ValueError(f"config.grad_accum_steps={config.grad_accum_steps} must be >= 1")
    if config.batch_size % (mesh.size * config.grad_accum_steps):
        raise ValueError(f"config.batch_size={config.batch_size} must be divisible by devices x "
                         f"grad_accum_steps = {mesh.size * config.grad_accum_steps}")


def check_circulant_batches(config, mesh: Mesh) -> None:
    """Circulant noise mixes the k samples of a (per-device) batch; some
    alpha make I+Q singular for that k, which only the batch sizes reveal."""
    cfg = config.noise
    if cfg.type != "circulant":
        return
    per = mesh.size if cfg.scope == "device" else 1
    sizes = {"train": config.batch_size // config.grad_accum_steps // per,
             "eval": config.eval_batch_size // per}
    for mode, k in sizes.items():
        if cfg.get(mode, True):  # evaluation batches are padded and masked
            noise.check_circulant(k, cfg.alpha, padded=mode == "eval")


def check_model_traces(config, mesh: Mesh) -> None:
    """Builds the model and traces a noisy training forward pass, and an
    evaluation one when noise is on in evaluation (shapes only, no compute):
    the model's own checks (noise site and layer, image size against the
    patch size, noise settings the site's shape rules out, ...) run here
    rather than mid-run."""
    model = build_model(config, mesh)
    images = jax.ShapeDtypeStruct((mesh.size,) + input_shape(config)[1:], jnp.float32)
    key = jax.random.PRNGKey(0)
    rngs = {"params": key, "dropout": key, "noise": key}
    modes = [True] + ([False] if config.noise.type != "none" and config.noise.eval else [])
    for train in modes:
        jax.eval_shape(lambda x, train=train: model.init(rngs, x, train=train), images)


def check_dataset(config):
    """The dataset exists, is prepared (no download unless config.download),
    has config.num_classes classes and gives a positive step count."""
    from noisy_flax import input_pipeline  # TensorFlow: only when training

    input_pipeline.check_input_config(config)
    builder = input_pipeline.get_builder(config)
    info = input_pipeline.dataset_info(config, builder)
    input_pipeline.check_train_crop(config, builder)
    if info.num_classes != config.num_classes:
        raise ValueError(f"{config.dataset} has {info.num_classes} classes but config.num_classes="
                         f"{config.num_classes}; set --config.num_classes={info.num_classes}")
    steps_per_epoch, _, _ = schedule_lengths(config, info.num_train_examples)
    eval_interval(config, steps_per_epoch)
    return info


def check_init_from(config) -> None:
    path = config.get("init_from")
    for pattern in config.get("init_dont_load", ()):
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"config.init_dont_load has {pattern!r}, not a regular expression "
                             f"({error}); give patterns such as 'head/.*'") from None
    if not path and config.get("init_required", False):
        raise ValueError("this config fine-tunes pretrained weights but config.init_from is not "
                         "set; pass --config.init_from=<.npz, .safetensors, .pth or converted "
                         "checkpoint> (README: Pretrained weights), or "
                         "--config.init_required=False to train from scratch")
    if path and "://" not in path and not os.path.exists(path):
        raise ValueError(f"config.init_from={path} does not exist; give the path of an .npz, "
                         ".safetensors, .pth or converted orbax checkpoint")
