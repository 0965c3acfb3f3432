"""sharding.prefetch_to_device: the train loop's input, copied ahead to the mesh."""
import numpy as np
import pytest

from noisy_flax import sharding


def numbered_batches(count, consumed):
    """Batches whose pixels equal their index; ``consumed`` counts the reads."""
    for i in range(count):
        consumed.append(i)
        yield {"image": np.full((16, 2, 2, 1), i, np.float32),
               "label": np.arange(16, dtype=np.int32) + 100 * i}


def test_yields_every_batch_in_order_sharded_over_the_batch_axes():
    mesh = sharding.create_mesh()
    consumed = []
    got = list(sharding.prefetch_to_device(numbered_batches(5, consumed), mesh, size=2))
    assert len(got) == 5
    for i, batch in enumerate(got):
        np.testing.assert_array_equal(np.asarray(batch["image"]), np.full((16, 2, 2, 1), i))
        np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(16) + 100 * i)
        assert batch["image"].sharding == sharding.batch_sharding(mesh)
        assert len(batch["image"].addressable_shards) == 8


@pytest.mark.parametrize("size", [1, 2, 3])
def test_reads_exactly_size_batches_ahead(size):
    consumed = []
    stream = sharding.prefetch_to_device(numbered_batches(10, consumed), sharding.create_mesh(),
                                         size=size)
    first = next(stream)
    assert float(np.asarray(first["image"]).max()) == 0
    # The one handed out plus ``size`` in flight.
    assert len(consumed) == size + 1


def test_short_stream_and_bad_size():
    consumed = []
    got = list(sharding.prefetch_to_device(numbered_batches(1, consumed), sharding.create_mesh(),
                                           size=4))
    assert len(got) == 1
    with pytest.raises(ValueError, match="at least 1"):
        next(sharding.prefetch_to_device(numbered_batches(1, []), sharding.create_mesh(), size=0))
