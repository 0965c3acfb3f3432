"""Test-batch orders as pure index orderings over the eval split's labels.

Batch-mixing noise (optimal Q, circulant) makes a prediction depend on the
other examples in its batch, so the order in which a test split is cut into
batches is part of the result. Every order here returns a list of index
arrays that together hold every example exactly once:

* ``class_sorted``: stable sort by label, consecutive batches (the published
  NoisyViT evaluation read ImageNet's class-sorted folders this way);
* ``shuffled``: a seeded random permutation, consecutive batches;
* ``single``: one example per batch;
* ``same_class``: every batch holds one class only (seeded order inside each
  class); a class's leftover examples form a smaller last batch;
* ``distinct_class``: no two examples of a batch share a label; needs
  ``batch_size <= num_classes``. Each batch takes one example from each of
  the ``batch_size`` classes with the most examples left, so classes run out
  together and only the tail can hold smaller batches. Ties between classes
  are broken at random and each batch is shuffled (seeded): otherwise, on
  balanced data, every batch would hold the same classes in the same
  positions, so circulant noise would always mix class c into class c + 1
  and a batch's make-up alone would tell its labels apart.
"""
from __future__ import annotations

import difflib

import numpy as np

ORDERS = ("class_sorted", "shuffled", "single", "same_class", "distinct_class")


def check_order(order: str) -> None:
    if order not in ORDERS:
        close = difflib.get_close_matches(str(order), ORDERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown batch order {order!r}{hint}; choose one of {', '.join(ORDERS)}")


def batch_indices(labels: np.ndarray, order: str, batch_size: int, *, seed: int = 0,
                  num_classes: int | None = None) -> list[np.ndarray]:
    """Index batches (int64 arrays into ``labels``) for one order."""
    labels = check_batches(labels, order, batch_size, num_classes)
    rng = np.random.default_rng(seed)
    if order == "class_sorted":
        return _consecutive(np.argsort(labels, kind="stable"), batch_size)
    if order == "shuffled":
        return _consecutive(rng.permutation(len(labels)), batch_size)
    if order == "single":
        return _consecutive(np.arange(len(labels)), 1)
    if order == "same_class":
        return [batch for members in _members_by_class(labels, rng)
                for batch in _consecutive(members, batch_size)]
    return _distinct_class(labels, batch_size, rng)


def check_batches(labels, order: str, batch_size: int, num_classes: int | None = None
                  ) -> np.ndarray:
    """Refuses an order that cannot cut ``labels`` into batches of
    ``batch_size``, without cutting them; returns the labels as an array."""
    labels = _check_labels(labels)
    check_order(order)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if order != "distinct_class":
        return labels
    num_classes = int(num_classes if num_classes is not None else
                      (labels.max() + 1 if len(labels) else 0))
    if batch_size > num_classes:
        raise ValueError(f"distinct_class batches need batch_size <= num_classes, got "
                         f"batch_size={batch_size} with {num_classes} classes")
    present = len(np.unique(labels))
    if len(labels) and batch_size > present:
        # Else every batch would silently hold fewer examples than asked.
        raise ValueError(f"distinct_class batches of {batch_size} need {batch_size} classes, "
                         f"but the labels hold only {present} of the {num_classes}; evaluate a "
                         f"split with more classes, or pass a batch size <= {present}")
    return labels


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got dtype {labels.dtype}, "
                         f"shape {labels.shape}")
    if len(labels) and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    return labels


def _consecutive(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    indices = np.asarray(indices, np.int64)
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def _members_by_class(labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Each present class's indices, classes ascending, seeded order inside a class."""
    return [rng.permutation(np.flatnonzero(labels == c)).astype(np.int64)
            for c in np.unique(labels)]


def _distinct_class(labels, batch_size, rng) -> list[np.ndarray]:
    """Batches checked possible by check_batches."""
    queues = {int(c): list(m) for c, m in zip(np.unique(labels), _members_by_class(labels, rng))}
    batches = []
    while queues:
        # The classes with most examples left give one each; ties at random.
        shuffled = [int(c) for c in rng.permutation(sorted(queues))]
        classes = sorted(shuffled, key=lambda c: -len(queues[c]))[:batch_size]
        batches.append(rng.permutation(np.array([queues[c].pop() for c in classes], np.int64)))
        for c in classes:
            if not queues[c]:
                del queues[c]
    return batches


def batch_sizes_summary(batches: list[np.ndarray]) -> dict[str, int]:
    """Counts that a report states next to an order's accuracy."""
    sizes = [len(b) for b in batches]
    return {"num_batches": len(sizes), "examples": int(sum(sizes)),
            "max_batch": max(sizes, default=0), "min_batch": min(sizes, default=0)}
