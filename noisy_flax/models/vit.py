"""Vision Transformer with NoisyNN noise sites.

Parameter names follow the vit_jax / augreg checkpoints (after
``convert_pre_linen``): ``embedding``, ``cls``,
``Transformer/posembed_input/pos_embedding``,
``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
LayerNorm_2, MlpBlock_3}``, ``Transformer/encoder_norm``, ``pre_logits``,
``head``; those ``.npz`` files load without renaming.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from noisy_flax.batch_axis import repeat_over_batch
from noisy_flax.models.activations import gelu
from noisy_flax.models.common import (apply_noise, apply_noise_to_patch_tokens, check_nhwc,
                                      noise_is_here, resolve_index)
from noisy_flax.models.matmul import flat_dot_general
from noisy_flax.noise import Noise

Dtype = Any

# width, depth, mlp width, heads (the ViT paper's and timm's sizes).
VARIANTS = {
    "Nano": (64, 6, 128, 4),   # for 28-32 px data on a CPU
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
# All lie before the last block's attention, which lets that block compute the
# class token alone (VisionTransformer); a site after it would need every token.
VIT_SITES = ("image", "embedding", "block_input", "attn_input")
# How attention is computed. "auto": the explicit softmax on a CPU; on a GPU,
# cuDNN's fused attention for self-attention in bf16 / fp16 where cuDNN takes
# the shapes, else XLA's (jax.nn.dot_product_attention picks XLA unless asked).
ATTENTION_IMPLEMENTATIONS = ("auto", "softmax", "xla", "cudnn")


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with vit_jax's parameter layout (query/key/value/out).

    With ``query_tokens=n`` only the first n tokens attend (to all of them),
    and only their outputs are computed. ``implementation``: one of
    ``ATTENTION_IMPLEMENTATIONS``; attention dropout always takes the
    explicit softmax, which has the probabilities to drop.
    """
    num_heads: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    query_tokens: Optional[int] = None
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        dim = x.shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"width {dim} is not divisible by {self.num_heads} heads")
        head_dim = dim // self.num_heads
        dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                             kernel_init=nn.initializers.xavier_uniform(),
                                             dot_general=flat_dot_general, name=name)
        queries = x if self.query_tokens is None else x[:, :self.query_tokens]
        q, k, v = dense("query")(queries), dense("key")(x), dense("value")(x)
        attended = self._attend(q, k, v, dropout=self.dropout_rate > 0 and not deterministic)
        return nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype,
                               kernel_init=nn.initializers.xavier_uniform(),
                               dot_general=flat_dot_general, name="out")(attended)

    def _attend(self, q, k, v, dropout: bool):
        choice = check_attention_implementation(self.implementation)
        backend = jax.default_backend()
        if dropout or choice == "softmax" or (choice == "auto" and backend == "cpu"):
            return self._softmax_attention(q, k, v, dropout)
        if choice == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        # Self-attention only: the class-token-only last block (one query row)
        # is cheap either way, and keeps to the shapes cuDNN is known to take.
        if (choice == "auto" and backend == "gpu"
                and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[1] == k.shape[1]):
            try:  # jax checks cuDNN's limits (head dim, version) while tracing
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except (NotImplementedError, ValueError, RuntimeError):
                pass  # shapes cuDNN does not take, or no cuDNN: XLA's below
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    def _softmax_attention(self, q, k, v, dropout: bool):
        """Attention with heads folded into the batch axis. On XLA:CPU the
        whole ViT-Ti/16 train step runs 1.1x faster this way than through
        ``jax.nn.dot_product_attention``, whose backward pass there re-reads
        the 197 x 197 probabilities several times (BENCHMARKS.md)."""
        batch, length, heads, head_dim = q.shape
        to_batch_major = lambda t: t.transpose(0, 2, 1, 3).reshape(batch * heads, -1, head_dim)
        q, k, v = to_batch_major(q * head_dim ** -0.5), to_batch_major(k), to_batch_major(v)
        logits = jnp.matmul(q, k.transpose(0, 2, 1))
        # jax's own softmax derivative from the output, y (dy - sum(y dy)), off
        # by default: the quotient rule's backward made XLA:CPU write the row
        # sums out over all the probabilities and read them back (BENCHMARKS.md).
        with jax.softmax_custom_jvp(True):
            weights = nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)
        if dropout:
            weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
        out = jnp.matmul(weights, v).reshape(batch, heads, length, head_dim)
        return out.transpose(0, 2, 1, 3)


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        dim = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.normal(1e-6), dot_general=flat_dot_general)(x)
        x = gelu(x)  # exact, in PyTorch's erf form: faster on XLA:CPU than erfc
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = nn.Dense(dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.normal(1e-6), dot_general=flat_dot_general)(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
    """Pre-norm transformer block; optionally noisy at its input or attention input.

    ``class_token_only``: return the class token alone (batch, 1, width). Its
    attention still reads every token, but the other tokens' queries, attention
    outputs and MLP are never computed: what the last block needs when only
    the class token is classified.
    """
    mlp_dim: int
    num_heads: int
    grid: tuple[int, int]
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    noise: Optional[Noise] = None  # set only on the block that carries it
    class_token_only: bool = False
    attention_implementation: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool, mask=None):  # positional: nn.remat needs train static
        deterministic = not train
        if noise_is_here(self.noise, "block_input", train):
            x = apply_noise_to_patch_tokens(self, self.noise, x, self.grid, mask=mask)
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(x)
        if noise_is_here(self.noise, "attn_input", train):
            # The published NoisyViT site: LayerNorm-1 output, before qkv.
            y = apply_noise_to_patch_tokens(self, self.noise, y, self.grid, mask=mask)
        query_tokens = 1 if self.class_token_only else None
        y = MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype,
                                         dropout_rate=self.attention_dropout_rate,
                                         query_tokens=query_tokens,
                                         implementation=self.attention_implementation,
                                         name="MultiHeadDotProductAttention_1")(
                                             y, deterministic=deterministic)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        x = x[:, :query_tokens] + self._drop_path(y, deterministic)
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, dtype=self.dtype, dropout_rate=self.dropout_rate,
                     name="MlpBlock_3")(y, deterministic=deterministic)
        return x + self._drop_path(y, deterministic)

    def _drop_path(self, y, deterministic: bool):
        """Stochastic depth: drops the whole residual branch per sample."""
        if self.drop_path_rate == 0 or deterministic:
            return y
        keep = 1.0 - self.drop_path_rate
        shape = (y.shape[0],) + (1,) * (y.ndim - 1)
        kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(kept, y / keep, 0).astype(y.dtype)


class PositionEmbedding(nn.Module):
    """Learned position embedding that covers the class token too."""

    @nn.compact
    def __call__(self, x):
        # Checked before self.param, which would refuse the shape first with
        # a ScopeParamShapeError that does not say what to do.
        if self.has_variable("params", "pos_embedding"):
            positions = self.get_variable("params", "pos_embedding").shape[1]
            if positions != x.shape[1]:
                raise ValueError(
                    f"the position embedding has {positions} positions but the input has "
                    f"{x.shape[1]} tokens: the image size differs from the one the weights were "
                    "made for; resize the images or resample with "
                    "noisy_flax.pretrained.resample_posemb")
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                         (1, x.shape[1], x.shape[2]))
        # a product, so that the gradient's sum over the batch is one (batch_axis)
        return x + repeat_over_batch(pos.astype(x.dtype), x.shape[0])


class Encoder(nn.Module):
    """Position embedding, the blocks and the final norm (vit_jax's 'Transformer').

    Unless ``last_block_all_tokens``, the last block computes the class token
    alone and the output is (batch, 1, width); see ``VisionTransformer``.
    """
    num_layers: int
    mlp_dim: int
    num_heads: int
    grid: tuple[int, int]
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: bool = False
    noise: Optional[Noise] = None
    last_block_all_tokens: bool = False
    attention_implementation: str = "auto"

    @nn.compact
    def __call__(self, x, *, train: bool, mask=None):
        x = PositionEmbedding(name="posembed_input")(x)
        if noise_is_here(self.noise, "embedding", train):
            x = apply_noise_to_patch_tokens(self, self.noise, x, self.grid, mask=mask)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        noisy_block = None
        if self.noise is not None and self.noise.site in ("block_input", "attn_input"):
            noisy_block = resolve_index(self.noise.layer, self.num_layers, "layer")
        block_cls = nn.remat(Encoder1DBlock, static_argnums=(2,)) if self.remat else Encoder1DBlock
        for i in range(self.num_layers):
            x = block_cls(
                mlp_dim=self.mlp_dim, num_heads=self.num_heads, grid=self.grid, dtype=self.dtype,
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                # Stochastic depth grows linearly with depth, as in timm.
                drop_path_rate=self.drop_path_rate * i / max(self.num_layers - 1, 1),
                noise=self.noise if i == noisy_block else None,
                class_token_only=i == self.num_layers - 1 and not self.last_block_all_tokens,
                attention_implementation=self.attention_implementation,
                name=f"encoderblock_{i}")(x, train, mask)
        return nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)


class VisionTransformer(nn.Module):
    """ViT classifier; ``__call__(images NHWC, train, mask=None) -> logits``.

    The logits read the class token alone, and no noise site lies after the
    last block's attention, so by default that block computes the class
    token's query, attention output and MLP only (its keys and values still
    come from every token). Same logits and gradients as computing every
    token, as timm and vit_jax do, with most of one block's work less (6.9%
    of ViT-Ti/16's FLOPs; tests/test_models.py). ``last_block_all_tokens=True``
    computes them all, e.g. to read the last block's patch tokens.
    ``attention_implementation``: see ``ATTENTION_IMPLEMENTATIONS``.
    """
    num_classes: int
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    image_size: int = 224  # the size the model is built for (posemb length)
    representation_size: Optional[int] = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    remat: bool = False
    noise: Optional[Noise] = None
    last_block_all_tokens: bool = False
    attention_implementation: str = "auto"

    def setup_check(self):
        if self.noise is not None and self.noise.site not in VIT_SITES:
            raise ValueError(f"noise site {self.noise.site!r} is not a ViT site; use one of {VIT_SITES}")

    @nn.compact
    def __call__(self, images, *, train: bool = False, mask=None):
        self.setup_check()
        _check_images(images, self.patch_size)
        images = images.astype(self.dtype)
        if noise_is_here(self.noise, "image", train):
            images = apply_noise(self, self.noise, images, mask)
        x = nn.Conv(self.hidden_size, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                    padding="VALID", dtype=self.dtype, name="embedding")(images)
        batch, gh, gw, dim = x.shape
        x = x.reshape(batch, gh * gw, dim)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, dim))
        x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)
        x = Encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                    grid=(gh, gw), dtype=self.dtype, dropout_rate=self.dropout_rate,
                    attention_dropout_rate=self.attention_dropout_rate,
                    drop_path_rate=self.drop_path_rate, remat=self.remat, noise=self.noise,
                    last_block_all_tokens=self.last_block_all_tokens,
                    attention_implementation=self.attention_implementation,
                    name="Transformer")(x, train=train, mask=mask)
        x = x[:, 0]
        if self.representation_size is not None:
            x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")(x))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                          name="head")(x)
        return logits.astype(jnp.float32)


def check_attention_implementation(name: str) -> str:
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention_implementation {name!r}; use one of "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    return name


def _check_images(images, patch_size: int) -> None:
    check_nhwc(images)
    height, width = images.shape[1:3]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size "
                         f"{patch_size}; resize the images (config.image_size) to a multiple of it")


def vit(variant: str, patch_size: int, *, num_classes: int, image_size: int = 224,
        **overrides) -> VisionTransformer:
    """A ViT of a named size ('Ti', 'S', 'B', 'L', 'H', 'Nano')."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    width, depth, mlp, heads = VARIANTS[variant]
    fields = dict(hidden_size=width, num_layers=depth, mlp_dim=mlp, num_heads=heads,
                  patch_size=patch_size, image_size=image_size, num_classes=num_classes)
    fields.update(overrides)
    return VisionTransformer(**fields)
