"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3).

A 3x3 convolution with stride 1 computes each 4x4 block of its output from
the 6x6 block of input around it. Winograd's algorithm (Lavin and Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016) moves both blocks
into a basis where the convolution is an element-wise product: per position
of the 6x6 block, one matmul over channels. That is 36 multiplications per
4x4 outputs and channel pair instead of 144, so 4x less matmul work; the
transforms are additions with small constants. It gives the same
convolution up to float32 rounding (relative error of a few 1e-6 against
the direct form's 1e-7, both measured against float64).

``"auto"`` takes it where it made the whole ResNet-18 train step faster on
XLA:CPU (BENCHMARKS.md): float32 maps of at least 7 px with at least 128
input channels, and at least 128 4x4 tiles in the batch, that is the
second, third and fourth stages of ResNet-18 at 224 px and batch 32. The
kernel's transforms cost the same at any batch, so with fewer tiles
(ResNet-50's fourth stage at batch 16) they ate the products' gain. With
64 channels the transforms' memory traffic and Eigen's slow 64 x 64
kernel-gradient products ate the gain inside the step although the layer
alone ran as fast. On every other backend cuDNN's and the TPU's
convolutions are fast, and half precision would not carry the transforms'
constants, so ``"auto"`` keeps the direct form there.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CONV_ALGORITHMS = ("auto", "direct", "winograd")
TILE = 4                     # output block side, m in F(m x m, 3x3)
AUTO_MIN_SIDE = 7            # "auto" on the CPU: the smallest map side,
AUTO_MIN_CHANNELS = 128      # the fewest input channels,
AUTO_MIN_ROWS = 128          # and the fewest tiles (rows of each product) that gained

# Interpolation points 0, 1, -1, 2, -2 and infinity.
_INPUT_T = np.array([[4, 0, -5, 0, 1, 0],      # B^T: 6x6 input block to the product basis
                     [0, -4, -4, 1, 1, 0],
                     [0, 4, -4, -1, 1, 0],
                     [0, -2, -1, 2, 1, 0],
                     [0, 2, -1, -2, 1, 0],
                     [0, 4, 0, -5, 0, 1]], np.float32)
_KERNEL = np.array([[1 / 4, 0, 0],              # G: 3x3 kernel to the product basis
                    [-1 / 6, -1 / 6, -1 / 6],
                    [-1 / 6, 1 / 6, -1 / 6],
                    [1 / 24, 1 / 12, 1 / 6],
                    [1 / 24, -1 / 12, 1 / 6],
                    [0, 0, 1]], np.float32)
_OUTPUT_T = np.array([[1, 1, 1, 1, 1, 0],      # A^T: product basis to the 4x4 output block
                      [0, 1, -1, 2, -2, 0],
                      [0, 1, 1, 4, 4, 0],
                      [0, 1, -1, 8, -8, 1]], np.float32)


def _tiles(side: int) -> int:
    """How many 4-wide output blocks cover ``side``."""
    return -(-side // TILE)


def uses_winograd(choice: str, *, kernel_size: int, stride: int, input_shape: Sequence[int],
                  dtype: Any) -> bool:
    """Whether a convolution with these settings, on an NHWC input of
    ``input_shape``, runs as Winograd's F(4x4, 3x3). The shape is the one
    the model is traced with: under jit over several devices, the global
    batch."""
    if choice not in CONV_ALGORITHMS:
        raise ValueError(f"unknown conv_algorithm {choice!r}; use one of {CONV_ALGORITHMS}")
    if choice == "direct" or kernel_size != 3 or stride != 1:
        return False
    if choice == "winograd":
        if jnp.dtype(dtype) != jnp.float32:
            raise ValueError(f"conv_algorithm='winograd' needs float32, got {jnp.dtype(dtype).name}; "
                             "use conv_algorithm='auto' or 'direct' for half precision")
        return True
    batch, height, width, channels = input_shape
    rows = batch * _tiles(height) * _tiles(width)
    return (jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32
            and min(height, width) >= AUTO_MIN_SIDE and channels >= AUTO_MIN_CHANNELS
            and rows >= AUTO_MIN_ROWS)


def _combine(matrix: np.ndarray, parts: Sequence[jax.Array]) -> jax.Array:
    """``stack([sum_j matrix[i, j] * parts[j] for i])``, skipping zeros and
    multiplying by +-1 as additions."""
    rows = []
    for row in matrix:
        total = None
        for coefficient, part in zip(row.tolist(), parts):
            if coefficient == 0:
                continue
            term = part if coefficient == 1 else -part if coefficient == -1 else coefficient * part
            total = term if total is None else total + term
        rows.append(total)
    return jnp.stack(rows)


def _transform_blocks(x: jax.Array, axis: int, tiles: int) -> jax.Array:
    """B^T applied to every 6-wide window of ``axis`` at stride 4: a new
    leading axis of 6, and ``axis`` shortened to ``tiles``."""
    size = _INPUT_T.shape[0]
    windows = [jax.lax.slice_in_dim(x, offset, offset + TILE * (tiles - 1) + 1, TILE, axis)
               for offset in range(size)]
    return _combine(_INPUT_T, windows)


def _transform_kernel(kernel: jax.Array) -> jax.Array:
    """G g G^T for every channel pair of an HWIO kernel: (6 column, 6 row, I, O),
    the order of the input blocks. Written as scaled sums of kernel rows, it
    is one pass over memory; as an einsum XLA:CPU lowered it to matmuls with
    3-long contractions and strided copies: 33 ms of one 512-channel layer's
    forward and backward at 7 px and batch 32, more than its products."""
    rows = _combine(_KERNEL, [kernel[i] for i in range(3)])          # (6 row, 3 col, I, O)
    return _combine(_KERNEL, [rows[:, j] for j in range(3)])         # (6 col, 6 row, I, O)


def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 3x3, stride-1 convolution with padding 1 of an NHWC map by an HWIO
    kernel: ``lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`` up to float32 rounding."""
    if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.ndim != 4:
        raise ValueError(f"winograd_conv3x3 takes an NHWC map and a 3x3 HWIO kernel, got "
                         f"shapes {x.shape} and {kernel.shape}")
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"the map has {x.shape[-1]} channels, the kernel takes {kernel.shape[2]}")
    batch, height, width, _ = x.shape
    in_channels, out_channels = kernel.shape[2:]
    size = _INPUT_T.shape[0]
    tiles_h, tiles_w = _tiles(height), _tiles(width)
    # Padding 1 on the top and left, and on the bottom and right up to whole tiles.
    padded = jnp.pad(x, ((0, 0), (1, TILE * tiles_h + 1 - height),
                         (1, TILE * tiles_w + 1 - width), (0, 0)))
    rows = _transform_blocks(padded, 1, tiles_h)           # (6 row, B, th, W, C)
    blocks = _transform_blocks(rows, 3, tiles_w)            # (6 col, 6 row, B, th, tw, C)
    blocks = blocks.reshape(size * size, batch * tiles_h * tiles_w, in_channels)
    weights = _transform_kernel(kernel).reshape(size * size, in_channels, out_channels)
    products = jax.lax.dot_general(blocks, weights, (((2,), (1,)), ((0,), (0,))))
    products = products.reshape(size, size, batch, tiles_h, tiles_w, out_channels)
    columns = _combine(_OUTPUT_T, [products[s] for s in range(size)])     # (4 col, 6 row, ...)
    out = _combine(_OUTPUT_T, [columns[:, r] for r in range(size)])       # (4 row, 4 col, ...)
    out = out.transpose(2, 3, 0, 4, 1, 5).reshape(batch, TILE * tiles_h, TILE * tiles_w,
                                                  out_channels)
    return out[:, :height, :width]


class WinogradConv3x3(nn.Module):
    """``nn.Conv(features, (3, 3), padding=1, use_bias=False)`` computed by
    ``winograd_conv3x3``; the same parameter ("kernel", HWIO), so checkpoints
    and converted weights load into either."""
    features: int
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                            jnp.float32)
        return winograd_conv3x3(x.astype(self.dtype), kernel.astype(self.dtype))
