"""A 32-bit checksum per array, computed where the array lives.

orbax stores arrays without a checksum of their values: a flipped bit in a
saved file restores silently as a wrong weight (zstd's frames carry no
checksum as tensorstore writes them). A checkpoint therefore records these
checksums beside the state, and a restore compares them.

The checksum of an array is the sum, wrapping modulo 2**32, of its elements'
bit patterns, each multiplied by ``2 * position + 1`` (its row-major index).
An odd weight times a nonzero difference is nonzero modulo 2**32, so any
change to a single element of up to 4 bytes changes the checksum. 8-byte
elements (under ``JAX_ENABLE_X64``) count as two words with their own
weights; there some changes of both words cancel, as 64 bits cannot all map
one to one into 32. Integer sums wrap the same
way in any order, so the result does not depend on how the array is sharded
or on the backend; it runs as one jitted reduction over the sharded arrays,
with no copy to the host.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from noisy_flax.sharding import path_name

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _bits(x: jax.Array) -> jax.Array:
    """The element bit patterns as uint32 (8-byte elements as two words)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize])
    return bits.astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    bits = _bits(x)
    position = jnp.zeros(bits.shape, jnp.uint32)
    for axis, size in enumerate(bits.shape):  # row-major index, without a reshape
        position = position * np.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
    return jnp.sum(bits * (position * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list) -> list:
    return [_checksum(jnp.asarray(leaf)) for leaf in leaves]


def checksums(tree: Any) -> dict[str, int]:
    """``{path: checksum}`` for every array leaf of ``tree``; the path names
    dict keys, dataclass fields and sequence positions joined by "/"."""
    paths_and_leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [path_name(path) for path, _ in paths_and_leaves]
    values = jax.device_get(_checksums([leaf for _, leaf in paths_and_leaves]))
    return {name: int(value) for name, value in zip(names, values)}


def mismatches(expected: dict[str, int], tree: Any) -> list[str]:
    """Names whose checksum in ``tree`` differs from ``expected`` (or that
    only one side has)."""
    actual = checksums(tree)
    return sorted(name for name in expected.keys() | actual.keys()
                  if expected.get(name) != actual.get(name))
