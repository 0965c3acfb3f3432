"""What every experiment config shares.

* ``base_config()``: every top-level key, so that ``--config.lr=...`` works the
  same way in every experiment.
* ``parse_arg('model=resnet18,noise=optimal_q,runlocal', **defaults)``: the
  ``key=value,flag`` argument string after the config file name, typed by the
  defaults.
* ``apply_runlocal(config)``: shrinks any experiment to a few steps on tiny
  batches, for tests and laptops.
"""
from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from noisy_flax.input_pipeline import default_input_config
from noisy_flax.noise import noise_config


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``key=value,flag,...``; values take the type of their default.

    A bare ``flag`` sets a boolean default to True. Unknown keys and values
    that do not parse raise ValueError naming the key and what was expected.
    """
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, has_value, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config argument {key!r}{hint}; this config takes "
                             f"{', '.join(sorted(defaults))}")
        default = defaults[key]
        if not has_value:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value: write {key}=VALUE")
            result[key] = True
            continue
        result[key] = _typed(key, raw.strip(), default)
    return result


def _typed(key: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"config argument {key}={raw!r} does not parse as "
                         f"{type(default).__name__}; write e.g. {key}={default!r}") from None
    return raw


def base_config() -> ml_collections.ConfigDict:
    """Every key an experiment may set, with neutral defaults."""
    c = ml_collections.ConfigDict()
    # Data.
    c.dataset = "fashion_mnist"
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.download = False
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = 28
    c.input = default_input_config()
    # Model.
    c.model = "vit_nano_patch4_28"
    c.num_classes = 10
    c.model_kwargs = ml_collections.ConfigDict()  # e.g. dropout_rate, drop_path_rate, width
    c.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params stay float32)
    c.remat = False
    c.cpu_ynnpack = "reductions"  # XLA:CPU: YNNPACK for reductions, Eigen for dots (noisy_flax.cpu_tuning)
    c.noise = noise_config()
    # Optimisation.
    c.batch_size = 128
    c.eval_batch_size = 256
    # > 0: the eval batch is this many per device, eval_batch_size is left unset
    # and set from the device count at start-up (a config must not start JAX:
    # on a pod, jax.distributed has to start first).
    c.eval_batch_per_device = 0
    c.optimizer = "adamw"
    c.lr = 1e-3
    c.end_lr = 0.0
    c.warmup_init_lr = 0.0
    c.schedule = "cosine"
    c.warmup_steps = 0  # the warm-up in steps or in epochs (0 = not given, never both)
    c.warmup_epochs = 0.0
    c.schedule_unit = "step"  # or 'epoch': the rate changes at epoch starts only (timm)
    # True: the decay starts after the warm-up (optax, big_vision). False: it
    # spans the whole run and the warm-up replaces its start (timm's default).
    c.warmup_prefix = True
    c.weight_decay = 1e-4
    c.wd_mask = "kernels"  # 'kernels' (no decay on biases, norms, embeddings) or 'all'
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.momentum = 0.9
    c.nesterov = False
    c.grad_clip_norm = 0.0  # 0 = off
    c.label_smoothing = 0.0
    c.grad_accum_steps = 1
    # Length in steps or in epochs (0 = not given; never both).
    c.total_steps = 0
    c.num_epochs = 1.0
    # Start and placement.
    c.init_from = ml_collections.config_dict.placeholder(str)
    c.init_dont_load = ()  # regexes of parameters kept at their init value
    c.init_required = False  # a fine-tuning recipe: refuse to start without init_from
    c.seed = 0
    c.mesh = (("data", -1), ("fsdp", 1))  # a tuple: ml_collections overrides tuples, not lists
    c.sharding = "replicate"  # or 'fsdp'
    # Evaluation, logging and checkpoints.
    c.eval_every = 0  # steps; 0 = at the end only
    c.eval_every_epochs = 0.0  # or in epochs (the published runs: 1.0); never both
    c.eval_max_examples = 0  # 0 = the whole split; else rounded up to whole eval batches
    c.eval_order = "dataset"  # batch order at evaluation; see noisy_flax.batch_order
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    # Saves run in the background while training goes on. Tests that mock
    # tfds's file system turn this off: the mock would catch the writes.
    c.async_checkpoints = True
    c.save_best = False  # also keep the best checkpoint by eval top-1
    c.plot = True
    c.runlocal = False
    # Resume a workdir whose config.json differs in what matters (model,
    # data, batch, noise, optimizer, ...): refused unless this is True.
    c.allow_config_change = False
    return c


def small_data_args(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """The arguments every small-image experiment takes (model, noise, ...)."""
    shared = dict(noise="optimal_q", site="", layer=-1, noise_train=True, noise_eval=True,
                  runlocal=False)
    return parse_arg(arg, **{**shared, **defaults})


def set_model_and_noise(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> None:
    """Model and noise from small_data_args; by default the published sites:
    the attention input of the last ViT block, the input of the last block
    of ResNet stage 4."""
    c.model = a.model
    c.noise.type = a.noise
    c.noise.site = a.site or ("block_input" if a.model.startswith("resnet") else "attn_input")
    c.noise.layer = a.layer
    c.noise.train, c.noise.eval = a.noise_train, a.noise_eval


def apply_runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A few steps on tiny batches: the same code path, seconds to run."""
    c.runlocal = True
    c.total_steps = 2
    c.num_epochs = 0.0
    c.batch_size = 16
    if not c.eval_batch_per_device:
        c.eval_batch_size = 16
    c.warmup_steps = 1
    c.warmup_epochs = 0.0
    c.log_every = 1
    c.eval_every = 2
    c.eval_every_epochs = 0.0
    c.checkpoint_every = 2
    c.input.shuffle_buffer = 64
    c.eval_max_examples = 40
    c.init_required = False  # a smoke run of a fine-tuning recipe needs no weights
    return c


def finalize(c: ml_collections.ConfigDict, runlocal: bool) -> ml_collections.ConfigDict:
    if runlocal:
        apply_runlocal(c)
    # Lock the key set: a typo in --config.x=... is then an error, not a new key.
    c.lock()
    return c
