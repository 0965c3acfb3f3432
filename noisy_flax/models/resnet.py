"""ResNet in torchvision's layout, with NoisyNN noise sites.

Module names mirror torchvision's state dict (``conv1``, ``bn1``,
``layer{s}_{b}/{conv1,bn1,...,downsample_conv,downsample_bn}``, ``fc``) so
that converting a torchvision checkpoint is a renaming, not a search. The
stride sits on the 3x3 convolution (ResNet v1.5), padding is symmetric like
PyTorch's, and BatchNorm uses PyTorch's epsilon and momentum. One
difference stays: in training, Flax updates the running variance with the
batch's biased variance, PyTorch with the unbiased one (n / (n - 1) larger:
0.004% at ImageNet's batch 512 x 7 x 7 in stage 4, more on tiny batches).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from noisy_flax.models.activations import relu
from noisy_flax.models.common import apply_noise, check_nhwc, noise_is_here, resolve_index
from noisy_flax.models.pooling import max_pool
from noisy_flax.models.winograd import WinogradConv3x3, uses_winograd
from noisy_flax.noise import Noise

Dtype = Any

RESNET_SITES = ("image", "block_input")
STEMS = ("imagenet", "small")


def _conv(features: int, kernel: int, stride: int, dtype, name: str,
          algorithm: str = "direct", input_shape: Sequence[int] = (0, 0, 0, 0)) -> nn.Module:
    """A convolution without bias; ``algorithm`` (see ``models.winograd``)
    may compute a 3x3, stride-1 one by Winograd's F(4x4, 3x3) instead."""
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    if uses_winograd(algorithm, kernel_size=kernel, stride=stride, input_shape=input_shape,
                     dtype=dtype):
        return WinogradConv3x3(features, dtype=dtype, kernel_init=init, name=name)
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                   kernel_init=init, name=name)


def _norm(train: bool, dtype, name: str) -> nn.BatchNorm:
    # PyTorch: eps 1e-5, running stats updated with momentum 0.1 (Flax: 0.9).
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, name=name)


class BasicBlock(nn.Module):
    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    conv_algorithm: str = "direct"
    expansion = 1

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = _conv(self.features, 3, self.stride, self.dtype, "conv1",
                  self.conv_algorithm, x.shape)(x)
        y = relu(_norm(train, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, 1, self.dtype, "conv2", self.conv_algorithm, y.shape)(y)
        y = _norm(train, self.dtype, "bn2")(y)
        return relu(y + _shortcut(self, x, train))


class Bottleneck(nn.Module):
    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    conv_algorithm: str = "direct"
    expansion = 4

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = _conv(self.features, 1, 1, self.dtype, "conv1")(x)
        y = relu(_norm(train, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, self.stride, self.dtype, "conv2",
                  self.conv_algorithm, y.shape)(y)
        y = relu(_norm(train, self.dtype, "bn2")(y))
        y = _conv(self.features * 4, 1, 1, self.dtype, "conv3")(y)
        y = _norm(train, self.dtype, "bn3")(y)
        return relu(y + _shortcut(self, x, train))


def _shortcut(block, x, train: bool):
    """Identity, or a strided 1x1 projection when the shape changes."""
    out_features = block.features * block.expansion
    if block.stride == 1 and x.shape[-1] == out_features:
        return x
    x = nn.Conv(out_features, (1, 1), strides=(block.stride,) * 2, use_bias=False,
                dtype=block.dtype, name="downsample_conv",
                kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))(x)
    return _norm(train, block.dtype, "downsample_bn")(x)


class ResNet(nn.Module):
    """``__call__(images NHWC, train, mask=None) -> logits``.

    ``conv_algorithm``: how the blocks' 3x3, stride-1 convolutions are
    computed, one of ``models.winograd.CONV_ALGORITHMS``. ``"auto"`` (the
    default) takes Winograd's F(4x4, 3x3) on a CPU in float32 for maps of
    7 px and more with 128 channels and more and at least 128 4x4 tiles
    in the batch, the direct convolution otherwise; the parameters are the
    same either way."""
    stage_sizes: Sequence[int]
    block_cls: type
    num_classes: int
    width: int = 64
    stem: str = "imagenet"  # 'imagenet': 7x7/2 + max-pool; 'small': 3x3/1 for 28-32 px
    dtype: Dtype = jnp.float32
    noise: Optional[Noise] = None
    conv_algorithm: str = "auto"

    @nn.compact
    def __call__(self, images, *, train: bool = False, mask=None):
        self._check(images)
        x = images.astype(self.dtype)
        if noise_is_here(self.noise, "image", train):
            x = apply_noise(self, self.noise, x, mask)
        if self.stem == "imagenet":
            x = _conv(self.width, 7, 2, self.dtype, "conv1")(x)
            x = relu(_norm(train, self.dtype, "bn1")(x))
            x = max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = _conv(self.width, 3, 1, self.dtype, "conv1")(x)
            x = relu(_norm(train, self.dtype, "bn1")(x))
        noisy_stage, noisy_block = self._noisy_block()
        for s, blocks in enumerate(self.stage_sizes):
            for b in range(blocks):
                if (s, b) == (noisy_stage, noisy_block) and noise_is_here(self.noise, "block_input", train):
                    x = apply_noise(self, self.noise, x, mask)
                x = self.block_cls(self.width * 2 ** s, stride=2 if s > 0 and b == 0 else 1,
                                   dtype=self.dtype, conv_algorithm=self.conv_algorithm,
                                   name=f"layer{s + 1}_{b}")(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)

    def _check(self, images):
        check_nhwc(images)
        if self.stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {self.stem!r}; use one of {STEMS}")
        if self.noise is not None and self.noise.site not in RESNET_SITES:
            raise ValueError(f"noise site {self.noise.site!r} is a ViT site; a ResNet takes "
                             f"noise at {RESNET_SITES} (block_input of noise.stage, noise.layer)")

    def _noisy_block(self) -> tuple[int, int]:
        if self.noise is None or self.noise.site != "block_input":
            return -1, -1
        stages = len(self.stage_sizes)
        if not 1 <= self.noise.stage <= stages:
            raise ValueError(f"noise stage {self.noise.stage} is out of range; this ResNet has "
                             f"stages 1..{stages}")
        stage = self.noise.stage - 1
        return stage, resolve_index(self.noise.layer, self.stage_sizes[stage], "block")


DEPTHS = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), Bottleneck),
    101: ((3, 4, 23, 3), Bottleneck),
    152: ((3, 8, 36, 3), Bottleneck),
}


def resnet(depth: int, *, num_classes: int, **overrides) -> ResNet:
    if depth not in DEPTHS:
        raise ValueError(f"unknown ResNet depth {depth}; choose one of {sorted(DEPTHS)}")
    stage_sizes, block_cls = DEPTHS[depth]
    return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, num_classes=num_classes, **overrides)
