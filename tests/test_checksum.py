"""The checkpoint checksum against a numpy reference of its definition."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from noisy_flax import checksum

WORDS = 2**32


def numpy_checksum(array) -> int:
    """sum_i bits_i * (2 i + 1) mod 2**32, over the row-major elements."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    bits = array.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[array.dtype.itemsize])
    bits = bits.astype(np.uint64).ravel()
    weights = (2 * np.arange(bits.size, dtype=np.uint64) + 1) % WORDS
    return int(((bits * weights) % WORDS).sum() % WORDS)


def random_arrays():
    rng = np.random.default_rng(0)
    return {
        "float32": rng.normal(size=(3, 5, 7)).astype(np.float32),
        "bfloat16": rng.normal(size=(4, 6)).astype(ml_dtypes.bfloat16),
        "int32": rng.integers(-2**31, 2**31, size=(10,), dtype=np.int32),
        "uint8": rng.integers(0, 256, size=(2, 3), dtype=np.uint8),
        "bool": rng.random(5) < 0.5,
        "scalar": np.float32(-1.5),
    }


def test_every_dtype_matches_numpy():
    arrays = random_arrays()
    got = checksum.checksums({name: jnp.asarray(a) for name, a in arrays.items()})
    assert got == {name: numpy_checksum(a) for name, a in arrays.items()}


def test_a_sharded_array_sums_as_the_whole():
    assert jax.device_count() == 8
    values = np.random.default_rng(1).normal(size=(16, 6)).astype(np.float32)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.device_put(values, NamedSharding(mesh, PartitionSpec("data")))
    assert len(sharded.addressable_shards) == 8
    assert checksum.checksums({"x": sharded}) == {"x": numpy_checksum(values)}


def test_a_prng_key_is_summed_as_its_key_data():
    key = jax.random.key(3)
    assert checksum.checksums([key]) == {"0": numpy_checksum(jax.random.key_data(key))}


def test_any_bit_of_any_element_changes_it():
    values = np.random.default_rng(2).normal(size=(9, 4)).astype(np.float32)
    original = checksum.checksums({"x": values})["x"]
    for index in ((0, 0), (4, 2), (8, 3)):
        for bit in range(32):
            changed = values.copy()
            changed.view(np.uint32)[index] ^= np.uint32(1 << bit)
            assert checksum.checksums({"x": changed})["x"] != original, (index, bit)


def test_names_follow_the_tree_and_mismatches_name_the_leaf():
    tree = {"a": {"b": np.zeros(3, np.float32)}, "c": [np.ones(2, np.int32), np.arange(4.0)]}
    sums = checksum.checksums(tree)
    assert sorted(sums) == ["a/b", "c/0", "c/1"]
    assert checksum.mismatches(sums, tree) == []
    tree["c"][1] = np.arange(4.0) + np.array([0, 0, 1e-6, 0])
    assert checksum.mismatches(sums, tree) == ["c/1"]
    assert checksum.mismatches({**sums, "gone": 1}, tree) == ["c/1", "gone"]
    tree["new"] = np.zeros(1, np.float32)  # a leaf the checksums never saw
    assert checksum.mismatches(sums, tree) == ["c/1", "new"]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_sign_of_zero_counts(dtype):
    # -0.0 == 0.0 as numbers, but a flipped sign bit is still damage.
    zero = checksum.checksums({"x": np.zeros(3, dtype)})["x"]
    assert checksum.checksums({"x": -np.zeros(3, dtype)})["x"] != zero
