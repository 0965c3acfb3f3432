"""Logits plus features at the noise site and at the pre-logits, per example.

The evaluation and the entropy estimates need the same model under two
settings: its noise on, and its noise off. "Off" here is an identity noise at
the same site, which gives the same logits as ``config.noise.eval=False``
(tested) but still sows the site's features, so "with" and "without noise"
features come from the same place.

Feature choices (documented in the report):

* **noise site**: the ``noise_output`` the model sows, averaged over the patch
  tokens for a ViT (the class token is excluded: the noise never touches it)
  and over the spatial positions for a ResNet or an image-site noise;
* **pre-logits**: what the classifier head reads: the ViT class token after
  the final LayerNorm (and the tanh representation layer if the model has
  one), the ResNet's globally pooled last block.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from noisy_flax import noise as noise_lib
from noisy_flax.models import ResNet, VisionTransformer, uses_batch_stats

FEATURE_SITES = ("noise_site", "pre_logits")


def _identity(x, *, key=None, mask=None):
    del key, mask
    return x


def eval_noise(noise_config: ml_collections.ConfigDict, *, on: bool,
               mesh=None) -> noise_lib.Noise:
    """The Noise a model evaluates with: the configured one when ``on`` (and
    its type is not 'none'), otherwise an identity at the same site."""
    cfg = noise_lib.noise_config(**dict(noise_config.to_dict() if hasattr(noise_config, "to_dict")
                                        else noise_config))
    real = noise_lib.make_noise(cfg, mesh=mesh) if on else None
    if real is not None:
        return dataclasses.replace(real, eval=True)
    return noise_lib.Noise(fn=_identity, site=cfg.site, layer=cfg.layer, stage=cfg.stage,
                           train=False, eval=True, needs_key=False, name="identity")


def make_forward(model, *, with_features: bool = True) -> Callable:
    """``forward(params, batch_stats, images, mask, key) -> {'logits', features...}``."""
    has_batch_stats = uses_batch_stats(model)

    def forward(params, batch_stats, images, mask, key):
        variables = {"params": params}
        if has_batch_stats:
            variables["batch_stats"] = batch_stats
        logits, state = model.apply(variables, images, train=False, mask=mask,
                                    rngs={"noise": key}, mutable=["intermediates"],
                                    capture_intermediates=with_features)
        out = {"logits": logits}
        if with_features:
            inter = state["intermediates"]
            out["noise_site"] = pool_site(model, find_sown(inter, "noise_output"))
            out["pre_logits"] = pre_logits(model, inter)
        return out

    return forward


def find_sown(tree: Any, name: str) -> jax.Array:
    """The one value sown under ``name`` anywhere in an intermediates tree."""
    found = []

    def walk(node):
        if isinstance(node, dict) or hasattr(node, "items"):
            for key, value in node.items():
                if key == name:
                    found.append(value[0] if isinstance(value, tuple) else value)
                else:
                    walk(value)

    walk(tree)
    if len(found) != 1:
        raise ValueError(f"expected one sown {name!r}, found {len(found)}; is a noise (or the "
                         "identity from features.eval_noise) set on the model?")
    return found[0]


def pool_site(model, x: jax.Array) -> jax.Array:
    """(batch, features): patch-token mean (ViT tokens) or spatial mean (maps)."""
    if x.ndim == 3 and isinstance(model, VisionTransformer):
        return jnp.mean(x[:, 1:], axis=1)
    if x.ndim == 4:
        return jnp.mean(x, axis=(1, 2))
    return x.reshape(x.shape[0], -1)


def pre_logits(model, inter: Any) -> jax.Array:
    """The input of the classifier head, from captured module outputs."""
    if isinstance(model, VisionTransformer):
        if model.representation_size is not None:
            return jnp.tanh(inter["pre_logits"]["__call__"][0])
        return inter["Transformer"]["encoder_norm"]["__call__"][0][:, 0]
    if isinstance(model, ResNet):
        last = f"layer{len(model.stage_sizes)}_{model.stage_sizes[-1] - 1}"
        return jnp.mean(inter[last]["__call__"][0], axis=(1, 2))
    raise ValueError(f"no pre-logits rule for {type(model).__name__}")


def model_with_noise(model, noise: Optional[noise_lib.Noise]):
    return model.clone(noise=noise)
