"""What the ViT and the ResNet share: the input check and applying a Noise at one site."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from noisy_flax.noise import Noise


def check_nhwc(images) -> None:
    """Images are (batch, height, width, channels); a channels-first batch
    (PyTorch's layout) is named as such rather than failing deeper in."""
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (batch, height, width, channels), got shape {images.shape}")
    if images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        raise ValueError(f"images of shape {images.shape} look channels-first (NCHW); the models "
                         "take NHWC: pass images.transpose(0, 2, 3, 1)")


def resolve_index(index: int, size: int, what: str) -> int:
    """A Python-style index (negative counts from the end), checked."""
    if not -size <= index < size:
        raise ValueError(f"noise {what} {index} is out of range for a model with {size} "
                         f"{what}s; use {-size}..{size - 1} (negative counts from the end)")
    return index % size


def noise_is_here(noise: Optional[Noise], site: str, train: bool) -> bool:
    return noise is not None and noise.site == site and noise.active(train)


def _sow_site(module: nn.Module, before: jax.Array, after: jax.Array) -> None:
    # Studies read the features at the noise site through
    # model.apply(..., mutable=['intermediates']); free otherwise.
    module.sow("intermediates", "noise_input", before)
    module.sow("intermediates", "noise_output", after)


def _call(module: nn.Module, noise: Noise, x: jax.Array, mask) -> jax.Array:
    """Calls the noise function with a key from the module's 'noise' stream."""
    key = None
    if noise.needs_key:
        if not module.has_rng("noise"):
            raise ValueError(f"{noise.name} noise is random: pass rngs={{'noise': key}} to "
                             "model.apply (or switch the noise off for this mode)")
        key = module.make_rng("noise")
    return noise.fn(x, key=key, mask=mask).astype(x.dtype)


def apply_noise(module: nn.Module, noise: Noise, x: jax.Array, mask=None) -> jax.Array:
    """Noise on a whole (batch, height, width, channels) map."""
    out = _call(module, noise, x, mask)
    _sow_site(module, x, out)
    return out


def apply_noise_to_patch_tokens(module: nn.Module, noise: Noise, tokens: jax.Array,
                                grid: tuple[int, int], num_prefix: int = 1,
                                mask=None) -> jax.Array:
    """Noise on the patch tokens, laid out as an image grid; the class token
    (the first ``num_prefix`` tokens) is never modified."""
    prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
    batch, count, dim = patches.shape
    grid_tokens = patches.reshape(batch, grid[0], grid[1], dim)
    noisy = _call(module, noise, grid_tokens, mask).reshape(batch, count, dim)
    out = jnp.concatenate([prefix, noisy], axis=1)
    _sow_site(module, tokens, out)
    return out
