"""Batch orders: each order's property, and every example exactly once."""
import math

import numpy as np
import pytest

from noisy_flax import batch_order

# Unbalanced classes with counts that batch size 4 does not divide, in a
# scrambled split order: the awkward cases for every order.
COUNTS = [7, 5, 9, 4, 6]
LABELS = np.random.default_rng(3).permutation(np.repeat(np.arange(5), COUNTS))


def _check_exactly_once(batches, n):
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(n))


@pytest.mark.parametrize("order", batch_order.ORDERS)
@pytest.mark.parametrize("batch_size", [1, 4, 5])
def test_every_example_exactly_once(order, batch_size):
    batches = batch_order.batch_indices(LABELS, order, batch_size, seed=1, num_classes=5)
    _check_exactly_once(batches, len(LABELS))
    assert all(1 <= len(b) <= batch_size for b in batches)


def test_class_sorted_is_sorted_and_consecutive():
    batches = batch_order.batch_indices(LABELS, "class_sorted", 4)
    flat = np.concatenate(batches)
    assert np.all(np.diff(LABELS[flat]) >= 0)
    # Stable: inside a class, split order is kept.
    for c in range(5):
        members = flat[LABELS[flat] == c]
        assert np.all(np.diff(members) > 0)
    # Consecutive full batches, only the last may be short (31 = 7 * 4 + 3).
    assert [len(b) for b in batches] == [4] * 7 + [3]
    # A batch straddles a class boundary: 7 examples of class 0, then class 1.
    assert set(LABELS[batches[1]]) == {0, 1}


def test_batch_sizes_summary_by_hand():
    # 31 examples in batches of 4: seven full batches and one of 3.
    batches = batch_order.batch_indices(LABELS, "class_sorted", 4)
    assert batch_order.batch_sizes_summary(batches) == {
        "num_batches": 8, "examples": 31, "max_batch": 4, "min_batch": 3}


def test_batch_sizes_summary_of_an_empty_split():
    # No examples: no batches, and zeros rather than an error from max([]).
    batches = batch_order.batch_indices(np.array([], np.int64), "class_sorted", 4)
    assert batches == []
    assert batch_order.batch_sizes_summary(batches) == {
        "num_batches": 0, "examples": 0, "max_batch": 0, "min_batch": 0}


def test_published_layout_gives_one_class_per_batch():
    # ImageNet validation: 50 per class, batch 10 -> every batch one class.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(20), 50))
    batches = batch_order.batch_indices(labels, "class_sorted", 10)
    assert len(batches) == 100
    assert all(len(set(labels[b])) == 1 for b in batches)


def test_same_class_holds_one_label_per_batch():
    batches = batch_order.batch_indices(LABELS, "same_class", 4, seed=2)
    assert all(len(set(LABELS[b])) == 1 for b in batches)
    # Per class ceil(count / 4) batches: 2 + 2 + 3 + 1 + 2.
    assert len(batches) == 10


def test_distinct_class_never_repeats_a_label():
    batches = batch_order.batch_indices(LABELS, "distinct_class", 4, seed=5, num_classes=5)
    assert all(len(set(LABELS[b])) == len(b) for b in batches)
    # Balanced: all 10 classes, 3 each, batch 10 -> every batch holds one of each.
    labels = np.repeat(np.arange(10), 3)
    balanced = batch_order.batch_indices(labels, "distinct_class", 10, num_classes=10)
    assert [sorted(labels[b].tolist()) for b in balanced] == [list(range(10))] * 3


def test_distinct_class_uses_the_fewest_batches_possible():
    """A batch holds at most one example per class and at most batch_size
    examples, so no order can use fewer than max(ceil(n / batch_size),
    largest class) batches; taking from the fullest classes first reaches it."""
    for case in range(40):
        rng = np.random.default_rng(case)
        num_classes = int(rng.integers(2, 12))
        counts = rng.integers(1, 15, size=num_classes)
        batch_size = int(rng.integers(1, num_classes + 1))
        labels = rng.permutation(np.repeat(np.arange(num_classes), counts))
        batches = batch_order.batch_indices(labels, "distinct_class", batch_size, seed=case,
                                            num_classes=num_classes)
        assert len(batches) == max(math.ceil(counts.sum() / batch_size), counts.max())


def test_distinct_class_counts_classes_from_the_labels_when_not_told():
    # Labels 0..4: five classes, so batches of five are possible.
    labels = np.repeat(np.arange(5), 3)
    batches = batch_order.batch_indices(labels, "distinct_class", 5)
    assert [sorted(labels[b].tolist()) for b in batches] == [[0, 1, 2, 3, 4]] * 3


def test_distinct_class_rejects_batches_larger_than_the_classes():
    with pytest.raises(ValueError, match="batch_size <= num_classes"):
        batch_order.batch_indices(LABELS, "distinct_class", 6, num_classes=5)


def test_distinct_class_rejects_batches_larger_than_the_classes_present():
    """A slice holding 5 of 10 classes cannot fill batches of 10 with
    distinct labels; every batch would silently hold 5."""
    labels = np.repeat(np.arange(5), 6)
    with pytest.raises(ValueError, match="labels hold only 5 of the 10"):
        batch_order.batch_indices(labels, "distinct_class", 10, num_classes=10)
    batches = batch_order.batch_indices(labels, "distinct_class", 5, num_classes=10)
    assert [len(b) for b in batches] == [5] * 6


def test_single_is_batch_size_one_whatever_is_asked():
    batches = batch_order.batch_indices(LABELS, "single", 10)
    assert [len(b) for b in batches] == [1] * len(LABELS)


def test_shuffled_is_seeded():
    a = batch_order.batch_indices(LABELS, "shuffled", 4, seed=0)
    b = batch_order.batch_indices(LABELS, "shuffled", 4, seed=0)
    c = batch_order.batch_indices(LABELS, "shuffled", 4, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_shuffled_mixes_classes_as_a_random_draw_does():
    # 20 classes x 50, batch 10: a random batch holds 20 (1 - (19/20)^10) = 8.03
    # distinct classes on average; class-sorted batches hold one.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(20), 50))
    batches = batch_order.batch_indices(labels, "shuffled", 10, seed=4)
    distinct = np.mean([len(set(labels[b])) for b in batches])
    assert abs(distinct - 20 * (1 - (19 / 20) ** 10)) < 0.5


@pytest.mark.parametrize("order", ["same_class", "distinct_class"])
def test_order_inside_a_class_is_seeded(order):
    labels = np.repeat(np.arange(5), 6)  # split order already sorted by class
    def flat(seed):
        return np.concatenate(batch_order.batch_indices(labels, order, 4, seed=seed,
                                                        num_classes=5))
    assert np.array_equal(flat(0), flat(0))
    assert not np.array_equal(flat(0), flat(1))
    if order == "same_class":  # the members of a class, not in split order
        assert not np.all(np.diff(flat(0)) > 0)


def test_unknown_order_names_the_choices():
    with pytest.raises(ValueError, match="did you mean 'shuffled'"):
        batch_order.batch_indices(LABELS, "shuffle", 4)


@pytest.mark.parametrize("order", batch_order.ORDERS)
@pytest.mark.parametrize("batch_size", [0, -4, 2.5])
def test_batch_size_must_be_a_positive_integer(order, batch_size):
    # A batch of 0 would cut nothing (distinct_class would never finish).
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        batch_order.batch_indices(LABELS, order, batch_size, num_classes=5)


@pytest.mark.parametrize("labels", [np.array([0, -1, 2]), np.array([[0, 1], [1, 0]]),
                                    np.array([0.0, 1.0]), np.array(3)],
                         ids=["negative", "2-D", "float", "scalar"])
def test_labels_must_be_non_negative_integers_in_one_dimension(labels):
    with pytest.raises(ValueError, match="labels must be"):
        batch_order.batch_indices(labels, "class_sorted", 2)


def test_distinct_class_batches_vary_in_make_up_and_position():
    """Balanced classes: a fixed (class 0, ..., class 9) layout would let
    circulant noise mix class c into c + 1 only (10 of the 90 ordered pairs),
    and at batch 5 split the classes into {0-4} and {5-9} every time."""
    labels = np.repeat(np.arange(10), 50)
    batches = batch_order.batch_indices(labels, "distinct_class", 10, seed=0, num_classes=10)
    neighbours = {(labels[b][i], labels[b][(i + 1) % len(b)]) for b in batches for i in range(len(b))}
    assert len(neighbours) > 60  # uniform positions: nearly all 90 pairs over 50 batches
    halves = batch_order.batch_indices(labels, "distinct_class", 5, seed=0, num_classes=10)
    assert len({frozenset(labels[b].tolist()) for b in halves}) > 20  # of C(10, 5) = 252
    assert all(len(set(labels[b])) == len(b) == 5 for b in halves)


def test_distinct_class_slots_do_not_follow_the_class_counts():
    """Class 0 has five times the examples of the others, so it is in every
    batch for a while; its position in the batch must still vary (a batch in
    the order the classes were picked would always put it first)."""
    labels = np.concatenate([np.zeros(100, int), np.repeat(np.arange(1, 10), 20)])
    batches = batch_order.batch_indices(labels, "distinct_class", 10, seed=0, num_classes=10)
    slots = [int(np.flatnonzero(labels[b] == 0)[0]) for b in batches if 0 in labels[b]]
    assert len(set(slots)) >= 8
