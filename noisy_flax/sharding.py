"""Device mesh, parameter placement rules and batch placement."""
from __future__ import annotations

import collections
import math
import re
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("replicate", "fsdp")


def create_mesh(axes: Sequence[tuple[str, int]] | None = None, devices=None) -> Mesh:
    """A mesh from ``[(name, size), ...]``; one size may be -1 (the rest).

    The batch is sharded over all axes, so ``data`` x ``fsdp`` is the data
    parallel degree. ``config.sharding='fsdp'`` shards each large parameter
    over all axes too (``fsdp_spec``), so how the devices split between
    ``data`` and ``fsdp`` changes nothing today; a parameter with no
    dimension divisible by the device count stays replicated.
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = list(axes or [("data", -1), ("fsdp", 1)])
    if not all(isinstance(axis, (tuple, list)) and len(axis) == 2 for axis in axes):
        raise ValueError(f"config.mesh={axes!r} must be (name, size) pairs, e.g. "
                         "'((\"data\", -1), (\"fsdp\", 1))'")
    names = tuple(name for name, _ in axes)
    unknown = set(names) - set(BATCH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axis {sorted(unknown)}; use the axes {BATCH_AXES}")
    if len(set(names)) != len(names):
        raise ValueError(f"config.mesh {axes} names an axis twice; give each of {BATCH_AXES} "
                         "at most once")
    sizes = [int(size) for _, size in axes]
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"config.mesh {axes}: an axis size must be >= 1, or -1 for the "
                         "remaining devices")
    if sizes.count(-1) > 1:
        raise ValueError("config.mesh: at most one axis may have size -1 (the remaining devices)")
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
        raise ValueError(f"config.mesh {axes} does not divide the {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"config.mesh {axes} uses {math.prod(sizes)} devices but "
                         f"{len(devices)} are present; set one axis to -1")
    # Auto axes: XLA propagates shardings from the ones we set explicitly.
    return jax.make_mesh(tuple(sizes), names, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dimension split over every mesh axis."""
    return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "config.batch_size") -> None:
    if batch_size <= 0:
        raise ValueError(f"{what}={batch_size} must be a positive integer")
    if batch_size % mesh.size:
        raise ValueError(f"{what}={batch_size} is not divisible by the {mesh.size} devices; "
                         f"use a multiple of {mesh.size}")


FSDP_MIN_SIZE = 2 ** 16  # smaller arrays stay replicated: splitting them costs more than it saves


def fsdp_spec(shape: Sequence[int], axis_size: int, axes=BATCH_AXES,
              min_size: int = FSDP_MIN_SIZE) -> P:
    """ZeRO-3 style: shard the largest dimension that the axis divides."""
    if math.prod(shape) < min_size or axis_size == 1:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % axis_size == 0:
            spec = [None] * len(shape)
            spec[dim] = axes
            return P(*spec)
    return P()


def param_shardings(abstract_tree: Any, mesh: Mesh, strategy: str = "replicate",
                    rules: Sequence[tuple[str, P]] = ()) -> Any:
    """Shardings for a pytree of arrays (or ShapeDtypeStructs).

    ``rules``: ``(regex, PartitionSpec)`` pairs matched against the
    '/'-joined path first; then the strategy decides (replicate, or FSDP over
    all batch axes).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown config.sharding {strategy!r}; use one of {STRATEGIES}")
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    replicated = []  # large arrays FSDP could not split

    def choose(path, leaf):
        name = path_name(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, spec)
        if strategy == "fsdp" and getattr(leaf, "ndim", 0) > 0:
            spec = fsdp_spec(leaf.shape, mesh.size, mesh.axis_names)
            if spec == P() and mesh.size > 1 and math.prod(leaf.shape) >= FSDP_MIN_SIZE:
                replicated.append((name, math.prod(leaf.shape) * leaf.dtype.itemsize))
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    shardings = jax.tree_util.tree_map_with_path(choose, abstract_tree)
    if replicated:
        logging.warning(
            "fsdp: %d arrays (%.1f MB, e.g. %s) have no dimension divisible by the %d devices "
            "and stay whole on every device", len(replicated),
            sum(size for _, size in replicated) / 1e6, replicated[0][0], mesh.size)
    return shardings


def path_name(path) -> str:
    """A pytree path as "a/b/0": dict keys, dataclass fields, sequence positions."""
    return "/".join(_key_name(k) for k in path)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy arrays -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def prefetch_to_device(local_batches: Iterable[dict[str, np.ndarray]], mesh: Mesh,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
    """Global batches whose host-to-device copies were started ``size`` steps
    ahead, so a step never waits for its input to be transferred.

    ``flax.jax_utils.prefetch_to_device`` serves ``pmap``; this one yields the
    sharded global arrays that ``jit`` over a mesh takes.
    """
    if size < 1:
        raise ValueError(f"prefetch size {size} must be at least 1")
    queue: collections.deque = collections.deque()
    for local in local_batches:
        queue.append(global_batch(local, mesh))  # device_put is asynchronous
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def bytes_per_device(shardings: Any, abstract_tree: Any) -> int:
    """Bytes one device holds for a tree placed with ``shardings``."""
    total = 0
    for sharding, leaf in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract_tree)):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total
