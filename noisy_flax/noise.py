"""NoisyNN noise as pure functions of arrays.

Every noise function has the signature ``fn(x, *, key=None, mask=None) -> x``:

* ``x`` has the batch on axis 0. Spatial noise (``within_image``) expects rows
  on axis 1, i.e. ``(batch, rows, cols, features)``; the models hand ViT patch
  tokens over as a ``(batch, grid, grid, dim)`` grid for that reason.
* ``key`` is a PRNG key, needed by the random noises only.
* ``mask`` (optional, ``(batch,)`` booleans) marks real examples in a padded
  evaluation batch: batch-mixing noise then mixes real examples only, so that
  padding never leaks into a prediction.

The functions hold no state and need no Flax: they work under ``jit``,
``grad`` and ``vmap``. ``make_noise(config)`` builds one from an
``ml_collections.ConfigDict`` together with where and when a model applies it.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from noisy_flax import batch_axis

Array = jax.Array
NoiseFn = Callable[..., Array]

NOISE_TYPES = ("none", "optimal_q", "circulant", "within_image", "gaussian", "salt_pepper")
SITES = ("image", "embedding", "block_input", "attn_input")
SCOPES = ("device", "global")
# Noises that mix the samples of a batch: their result depends on the batch.
BATCH_MIXING = ("optimal_q", "circulant")
# Noises whose result depends on which batch they see, so scope='device' runs
# them per shard; salt-and-pepper takes its extremes over the batch. The
# others act per sample and run on the global array whatever the scope.
BATCH_DEPENDENT = BATCH_MIXING + ("salt_pepper",)


# ---------------------------------------------------------------------------
# Quality matrices
# ---------------------------------------------------------------------------
def optimal_q(k: int) -> np.ndarray:
    """The paper's optimal Q* = (ones(k, k) - k I) / (k + 1) (eq. 19)."""
    _check_size(k)
    return (np.ones((k, k)) - k * np.eye(k)) / (k + 1)


def circulant_q(k: int, alpha: float) -> np.ndarray:
    """Q = alpha (P - I), P the cyclic shift: row b of (I+Q)x is
    (1 - alpha) x_b + alpha x_{(b+1) mod k} (eq. 17)."""
    _check_size(k)
    check_circulant(k, alpha)
    shift = np.roll(np.eye(k), 1, axis=1)
    return alpha * (shift - np.eye(k))


def check_circulant(k: int, alpha: float, *, padded: bool = False) -> None:
    """Rejects circulant settings that destroy the input.

    det(I+Q) = (1-alpha)^k - (-alpha)^k vanishes exactly for alpha = 0.5 with
    even k. alpha = 1 is invertible (I+Q is the shift itself) but keeps none
    of the sample, so it is not noise on the sample any more. ``padded``: the
    k rows may hold any number of real samples (a masked evaluation batch),
    so alpha = 0.5 is singular whenever that number is even. A traced alpha
    (under ``jit``) cannot be checked here.
    """
    if isinstance(alpha, jax.core.Tracer):
        return
    if not 0.0 <= alpha < 1.0:
        raise ValueError(
            f"circulant alpha={alpha} is outside [0, 1): alpha=1 replaces every sample by its "
            "neighbour; use 0 <= alpha < 1 (the paper uses 0.3 and 0.4)")
    if alpha == 0.5 and padded and k >= 2:
        raise ValueError(
            f"circulant alpha=0.5 with padded batches of k={k} rows makes I+Q singular whenever "
            "an even number of them are real (det = 0.5^n - 0.5^n = 0); use another alpha")
    if alpha == 0.5 and k % 2 == 0:
        raise ValueError(
            f"circulant alpha=0.5 with an even batch k={k} makes I+Q singular "
            "(det = 0.5^k - 0.5^k = 0); use another alpha or an odd batch size")


def _require_float(x: Array, name: str) -> None:
    """Mixing and adding noise need real numbers: integer images would be
    truncated (Q* has entries below 1) or change type."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} noise needs a floating-point input, got {jnp.result_type(x)}; "
                         "convert it first, e.g. x.astype(jnp.float32) / 255")


def _check_size(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"the mixing size k must be a positive integer, got {k!r}")


# ---------------------------------------------------------------------------
# Linear-transform noise: x' = (I + Q) x along one axis
# ---------------------------------------------------------------------------
def linear_transform_noise(x: Array, q: Array, *, axis: int = 0, key=None, mask=None) -> Array:
    """(I + Q) x along ``axis`` for any k x k matrix Q (k = x.shape[axis])."""
    del key
    _require_float(x, "linear-transform")
    if mask is not None:
        raise ValueError("a general Q cannot skip padded rows; evaluate with full batches "
                         "or use optimal_q / circulant noise, which honour the mask")
    k = x.shape[axis]
    q = jnp.asarray(q, x.dtype)
    if q.shape != (k, k):
        raise ValueError(f"Q has shape {q.shape} but axis {axis} of x has size {k}; "
                         f"build Q with k={k}")
    moved = jnp.moveaxis(x, axis, 0)
    # HIGHEST: by default TPUs (and GPUs, through TF32) multiply float32 in
    # bfloat16-sized pieces, which would round the mixed samples.
    mixed = moved + jnp.tensordot(q, moved, axes=1, precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(mixed, 0, axis)


def optimal_q_noise(x: Array, *, key=None, mask=None) -> Array:
    """(I + Q*) x over the batch; k is the number of (real) samples.

    Uses the closed form (x_b + sum_j x_j) / (k + 1), which needs O(k) work
    instead of a k x k matrix product.
    """
    del key
    _require_float(x, "optimal_q")
    def divide(summed, count):
        # In float32: bfloat16 holds integers exactly only up to 256, and a
        # rounded k + 1 would scale every row by the same wrong factor.
        return (summed / count).astype(x.dtype)

    if mask is None:
        return divide(x.astype(jnp.float32) + _batch_total(x), x.shape[0] + 1)
    real = _batch_mask(mask, x)
    k = jnp.sum(mask.astype(jnp.float32))
    total = _batch_total(jnp.where(real, x, 0))
    return jnp.where(real, divide(x.astype(jnp.float32) + total, k + 1), x)


def _batch_total(x: Array) -> Array:
    """sum_j x_j over axis 0, in float32, repeated on every row (x's shape);
    as products (noisy_flax.batch_axis: XLA:CPU's sum is 50x slower)."""
    return batch_axis.repeat_over_batch(batch_axis.sum_over_batch(x, jnp.float32), x.shape[0])


def circulant_noise(x: Array, *, alpha: float, stop_gradient: bool = False,
                    key=None, mask=None) -> Array:
    """(1 - alpha) x_b + alpha x_{(b+1) mod k}, over the batch.

    With ``stop_gradient`` the added term Qx carries no gradient, as in the
    published CNN code. Masked rows neither give nor receive.
    """
    del key
    _require_float(x, "circulant")
    check_circulant(x.shape[0], alpha, padded=mask is not None)
    if mask is not None:
        _check_mask(mask, x)
    neighbour = jnp.take(x, _next_real_index(x.shape[0], mask), axis=0)
    added = alpha * (neighbour - x)
    if stop_gradient:
        added = jax.lax.stop_gradient(added)
    out = x + added
    if mask is not None:
        out = jnp.where(_batch_mask(mask, x), out, x)
    return out


def _next_real_index(k: int, mask) -> Array:
    """Index of the next real row, cyclically among real rows."""
    if mask is None:
        return (jnp.arange(k) + 1) % k
    mask = mask.astype(bool)
    n_real = jnp.maximum(jnp.sum(mask), 1)
    rank = jnp.cumsum(mask) - 1                      # rank of each real row
    real_first = jnp.argsort(~mask, stable=True)    # real rows in order, then padding
    return real_first[(rank + 1) % n_real]


def within_image_noise(x: Array, *, q: str = "optimal", alpha: float = 0.4,
                       key=None, mask=None) -> Array:
    """Mixes the rows (axis 1) of each sample with a rows x rows (I + Q).

    A leak-free control: no sample ever sees another. ``q`` is ``optimal``
    (Q* of size rows) or ``circulant`` (with ``alpha``).
    """
    del key, mask
    if x.ndim < 3:
        raise ValueError(f"within_image noise needs (batch, rows, cols, ...) input, got shape {x.shape}")
    if q not in ("optimal", "circulant"):
        raise ValueError(f"within_image q={q!r} is unknown; use 'optimal' or 'circulant'")
    rows = x.shape[1]
    if q == "circulant" and not isinstance(alpha, jax.core.Tracer) and alpha == 0.5 \
            and rows % 2 == 0:
        raise ValueError(
            f"within_image circulant alpha=0.5 with an even number of rows ({rows}, the grid or "
            "feature-map height at the noise site) makes I+Q singular; use another alpha or "
            "q='optimal'")
    matrix = optimal_q(rows) if q == "optimal" else circulant_q(rows, alpha)
    return linear_transform_noise(x, matrix, axis=1)


# ---------------------------------------------------------------------------
# Random noise
# ---------------------------------------------------------------------------
def gaussian_noise(x: Array, *, key, strength: float = 0.1, mean: float = 0.0,
                   std: float = 1.0, mask=None) -> Array:
    """x + strength * N(mean, std^2); std is a standard deviation."""
    del mask
    _require_key(key, "gaussian")
    _require_float(x, "gaussian")
    for name, value in (("strength", strength), ("mean", mean), ("std", std)):
        if not isinstance(value, jax.core.Tracer) and not math.isfinite(float(value)):
            raise ValueError(f"gaussian {name}={value} must be a finite number")
    if not isinstance(std, jax.core.Tracer) and float(std) < 0:
        raise ValueError(f"gaussian std={std} is a standard deviation; use a value >= 0")
    draw = mean + std * jax.random.normal(key, x.shape, jnp.float32)
    return x + (strength * draw).astype(x.dtype)


def salt_pepper_noise(x: Array, *, key, prob: float, mask=None) -> Array:
    """Each element becomes the batch maximum with prob/2, the minimum with prob/2.

    The extremes are taken over the whole (real part of the) batch tensor and
    carry no gradient; replaced elements carry none either.
    """
    _require_key(key, "salt_pepper")
    if not isinstance(prob, jax.core.Tracer) and not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"salt_pepper prob={prob} is not a probability; use a value in [0, 1]")
    if mask is None:
        high, low = jnp.max(x), jnp.min(x)
    else:
        real = _batch_mask(mask, x)
        high = jnp.max(jnp.where(real, x, -jnp.inf))
        low = jnp.min(jnp.where(real, x, jnp.inf))
    high, low = jax.lax.stop_gradient(high), jax.lax.stop_gradient(low)
    u = jax.random.uniform(key, x.shape)
    out = jnp.where(u < prob / 2, high, jnp.where(u < prob, low, x))
    if mask is not None:  # padding stays as it was (an all-padding shard has no extremes)
        out = jnp.where(_batch_mask(mask, x), out, x)
    return out.astype(x.dtype)


def _require_key(key, name: str) -> None:
    if key is None:
        raise ValueError(f"{name} noise is random: pass key=jax.random.key(...) "
                         "(in a model, give apply() an rngs={'noise': key})")


def _batch_mask(mask, x: Array) -> Array:
    _check_mask(mask, x)
    return mask.astype(bool).reshape((-1,) + (1,) * (x.ndim - 1))


def _check_mask(mask, x: Array) -> None:
    if jnp.shape(mask) != (x.shape[0],):
        raise ValueError(f"mask has shape {jnp.shape(mask)} for a batch of {x.shape[0]}; give one "
                         "flag per example, shape (batch,)")


# ---------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------
def keep_leading_tokens(fn: NoiseFn, n: int = 1) -> NoiseFn:
    """Applies ``fn`` to tokens ``n:`` of a (batch, tokens, dim) array only,
    leaving e.g. the class token untouched."""
    if int(n) != n or n < 0:
        raise ValueError(f"keep_leading_tokens n={n!r} must be an integer >= 0")

    @functools.wraps(fn)
    def wrapped(x, **kwargs):
        if n >= x.shape[1]:
            raise ValueError(f"keep_leading_tokens n={n} leaves none of the {x.shape[1]} tokens "
                             "for the noise; use n below the token count")
        return jnp.concatenate([x[:, :n], fn(x[:, n:], **kwargs)], axis=1)
    return wrapped


def per_device(fn: NoiseFn, mesh: Mesh, batch_axes: Sequence[str] | None = None) -> NoiseFn:
    """Runs ``fn`` on each device's shard of the batch separately.

    This is the published behaviour (each GPU mixed its own batch). The key is
    folded with the shard index so that devices draw different noise.
    """
    axes = tuple(batch_axes or mesh.axis_names)
    spec = PartitionSpec(axes)

    def local(x, key, mask):
        if key is not None:
            key = jax.random.fold_in(key, _flat_axis_index(axes, mesh))
        return fn(x, key=key, mask=mask)

    shards = math.prod(mesh.shape[name] for name in axes)

    def wrapped(x, *, key=None, mask=None):
        if x.shape[0] % shards:
            raise ValueError(
                f"noise scope='device' splits the batch over {shards} devices, but the batch "
                f"has {x.shape[0]} examples; use a batch divisible by {shards}, or "
                "noise.scope='global'")
        in_specs = (spec, PartitionSpec(), spec if mask is not None else None)
        mapped = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec,
                               check_vma=False)
        return mapped(x, key, mask)
    return wrapped


def _flat_axis_index(axes: Sequence[str], mesh: Mesh) -> Array:
    index = jnp.asarray(0, jnp.int32)
    for name in axes:
        index = index * mesh.shape[name] + jax.lax.axis_index(name)
    return index


# ---------------------------------------------------------------------------
# Placement and the config factory
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Noise:
    """A noise function plus where and when a model applies it.

    ``site``: ``image``, ``embedding``, ``block_input`` or ``attn_input`` (ViT);
    ``image`` or ``block_input`` (ResNet). ``layer``: the ViT block, or the
    block inside ResNet ``stage`` (1-based like torchvision's layer1..layer4);
    negative values count from the end. ``train`` / ``eval``: whether the
    noise is on in that mode. Hashable, so it can be a Flax module attribute.
    """
    fn: NoiseFn
    site: str = "attn_input"
    layer: int = -1
    stage: int = 4
    train: bool = True
    eval: bool = True
    needs_key: bool = False
    name: str = "custom"

    def __post_init__(self):
        if self.site not in SITES:
            raise ValueError(f"unknown noise site {self.site!r}; choose one of {SITES}")

    def active(self, train: bool) -> bool:
        return self.train if train else self.eval


def noise_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The noise ConfigDict with every field and its default."""
    cfg = ml_collections.ConfigDict(dict(
        type="none",          # one of NOISE_TYPES
        strength=0.1,         # gaussian: x + strength * N(mean, std); published ViT 0.1, CNN 1.0
        mean=0.0,
        std=1.0,
        alpha=0.4,            # circulant (and within_image q='circulant'): CNN script 0.4, appendix 0.3
        stop_gradient=False,  # circulant: no gradient through Qx (published CNN)
        q="optimal",          # within_image: 'optimal' or 'circulant'
        prob=0.05,            # salt_pepper: not a published value; the published CNN run used 1.0
        site="attn_input",    # see Noise
        layer=-1,
        stage=4,
        # On in both modes, as in the published CNN; the published ViT trained
        # with noise off (train=False, configs/noisyvit_imagenet.py).
        train=True,
        eval=True,
        scope="device",       # batch-dependent noise per device shard (published) or 'global'
    ))
    _check_fields(overrides, cfg)
    cfg.update(overrides)
    return cfg


def make_noise(config: Mapping[str, Any] | None, *, mesh: Optional[Mesh] = None,
               batch_axes: Sequence[str] | None = None) -> Optional[Noise]:
    """Builds a Noise from a (partial) noise config; None for type 'none'.

    ``mesh`` is needed for ``scope='device'`` when more than one device holds
    the batch: batch-dependent noise (``BATCH_DEPENDENT``) then runs on each
    device's shard separately.
    """
    if config is None:
        return None
    given = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
    cfg = noise_config(**given)
    _validate(cfg)
    if cfg.type == "none":
        return None
    fn, needs_key = _base_function(cfg)
    if cfg.scope == "device" and cfg.type in BATCH_DEPENDENT:
        if mesh is not None and mesh.size > 1:
            fn = per_device(fn, mesh, batch_axes)
        elif mesh is None and jax.device_count() > 1:
            fn = _ambient_mesh_per_device(fn, batch_axes)
    return Noise(fn=fn, site=cfg.site, layer=cfg.layer, stage=cfg.stage, train=cfg.train,
                 eval=cfg.eval, needs_key=needs_key, name=cfg.type)


def _ambient_mesh_per_device(fn: NoiseFn, batch_axes) -> NoiseFn:
    """scope='device' without an explicit mesh: use the mesh set with
    jax.set_mesh, and refuse to guess when there is none."""
    def wrapped(x, *, key=None, mask=None):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(
                "noise scope='device' on several devices needs the mesh: pass mesh= to "
                "make_noise or call the model under jax.set_mesh(mesh); or use scope='global'")
        return per_device(fn, mesh, batch_axes)(x, key=key, mask=mask)
    return wrapped


def _base_function(cfg) -> tuple[NoiseFn, bool]:
    if cfg.type == "optimal_q":
        return optimal_q_noise, False
    if cfg.type == "circulant":
        return functools.partial(circulant_noise, alpha=cfg.alpha,
                                 stop_gradient=cfg.stop_gradient), False
    if cfg.type == "within_image":
        return functools.partial(within_image_noise, q=cfg.q, alpha=cfg.alpha), False
    if cfg.type == "gaussian":
        return functools.partial(gaussian_noise, strength=cfg.strength, mean=cfg.mean,
                                 std=cfg.std), True
    return functools.partial(salt_pepper_noise, prob=cfg.prob), True


def _validate(cfg) -> None:
    _check_choice("noise.type", cfg.type, NOISE_TYPES)
    _check_choice("noise.site", cfg.site, SITES)
    _check_choice("noise.scope", cfg.scope, SCOPES)
    _check_choice("noise.q", cfg.q, ("optimal", "circulant"))
    for name in ("strength", "mean", "std", "alpha", "prob"):
        if not math.isfinite(cfg[name]):
            raise ValueError(f"noise.{name}={cfg[name]} is not a finite number; give a finite value")
    if cfg.type == "circulant" or (cfg.type == "within_image" and cfg.q == "circulant"):
        check_circulant(1, cfg.alpha)
    if not 0.0 <= cfg.prob <= 1.0:
        raise ValueError(f"noise.prob={cfg.prob} is not a probability; use a value in [0, 1]")
    if cfg.std < 0:
        raise ValueError(f"noise.std={cfg.std} is negative; it is a standard deviation, use >= 0")
    if cfg.stage < 1:
        raise ValueError(f"noise.stage={cfg.stage}: ResNet stages are numbered from 1 (layer1) to 4 (layer4)")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {name} {value!r}{hint}; choose one of {', '.join(choices)}")


def _check_fields(given: Mapping[str, Any], defaults) -> None:
    for name in given:
        if name not in defaults:
            close = difflib.get_close_matches(name, list(defaults), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown noise field {name!r}{hint}; valid fields: "
                             f"{', '.join(sorted(defaults))}")
