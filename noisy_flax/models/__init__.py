"""Model registry with timm's names: ``create_model('vit_base_patch16_224', num_classes=1000)``.

ViTs: ``vit_{nano,tiny,small,base,large,huge}_patch{P}_{RES}`` for any patch
size and resolution (e.g. ``vit_base_patch16_384``, ``vit_nano_patch4_28``).
ResNets: ``resnet{18,34,50,101,152}``, and ``resnet{D}_small`` with the 3x3
stem for 28-32 px images.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Mapping, Optional

import flax.linen as nn

from noisy_flax.models.resnet import DEPTHS, ResNet, resnet
from noisy_flax.models.vit import VisionTransformer, vit
from noisy_flax.noise import Noise, make_noise

VIT_SIZES = {"nano": "Nano", "tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}
_VIT_NAME = re.compile(r"vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)_(?P<res>\d+)$")
_RESNET_NAME = re.compile(r"resnet(?P<depth>\d+)(?P<small>_small)?$")
EXAMPLE_NAMES = (
    "vit_nano_patch4_28", "vit_nano_patch4_32", "vit_tiny_patch16_224", "vit_small_patch16_224",
    "vit_base_patch16_224", "vit_base_patch16_384", "vit_base_patch32_224",
    "vit_large_patch16_224", "vit_huge_patch14_224",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet18_small",
)


# Overrides that count something (layers, heads, channels): 0 or less builds nonsense.
_SIZES = ("num_layers", "num_heads", "hidden_size", "mlp_dim", "width", "patch_size",
          "representation_size")


def create_model(name: str, *, num_classes: int, noise: Noise | Mapping[str, Any] | None = None,
                 mesh=None, **overrides) -> nn.Module:
    """Builds a registry model; ``noise`` is a Noise or a noise config."""
    sizes = {"num_classes": num_classes,
             **{k: v for k, v in overrides.items() if k in _SIZES and v is not None}}
    for key, value in sizes.items():
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{key}={value!r} must be a positive integer")
    if noise is not None and not isinstance(noise, Noise):
        noise = make_noise(noise, mesh=mesh)
    if (match := _VIT_NAME.match(name)) and match["size"] in VIT_SIZES:
        return vit(VIT_SIZES[match["size"]], int(match["patch"]), num_classes=num_classes,
                   image_size=int(match["res"]), noise=noise, **overrides)
    if (match := _RESNET_NAME.match(name)) and int(match["depth"]) in DEPTHS:
        if match["small"]:
            overrides.setdefault("stem", "small")
        return resnet(int(match["depth"]), num_classes=num_classes, noise=noise, **overrides)
    close = difflib.get_close_matches(name, EXAMPLE_NAMES, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}; names look like vit_base_patch16_224, "
                     "vit_nano_patch4_28, resnet50 or resnet18_small")


def uses_batch_stats(model: nn.Module) -> bool:
    """Whether the model keeps BatchNorm statistics (a 'batch_stats' collection)."""
    return isinstance(model, ResNet)


def input_size(model: nn.Module) -> int:
    """The image side a model is built for (ViT: its posemb; ResNet: its stem)."""
    if isinstance(model, VisionTransformer):
        return model.image_size
    return 32 if model.stem == "small" else 224


__all__ = ["create_model", "input_size", "uses_batch_stats", "VisionTransformer", "ResNet"]
