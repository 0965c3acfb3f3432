"""Where training metrics go: TensorBoard (clu), metrics.jsonl, the console.

Only process 0 writes files; every process may call these safely.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
from clu import metric_writers, parameter_overview

from noisy_flax import workdir as workdir_lib


class MetricsReporter:
    """Writes scalars to TensorBoard event files and to ``metrics.jsonl``.

    ``start_step``: the step training resumes from. Records after it were
    written by a run that crashed before its next checkpoint; those steps
    run again, so their old records are dropped rather than repeated. With
    ``reevaluating``, the evaluation at ``start_step`` runs again too (a
    crash before its summary), so its record is dropped as well.
    ``last_train`` is the last train record kept (process 0; else None).
    """

    def __init__(self, workdir: str, start_step: int = 0, *, reevaluating: bool = False):
        self.is_writer = jax.process_index() == 0
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.last_train = None
        self.writer = metric_writers.create_default_writer(
            workdir, just_logging=not self.is_writer, asynchronous=True)
        if self.is_writer:
            self._drop_records_after(start_step, reevaluating)

    def _drop_records_after(self, step: int, reevaluating: bool) -> None:
        if not workdir_lib.file_exists(self.jsonl_path):
            return
        with workdir_lib.open_file(self.jsonl_path) as f:
            lines = f.read().splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a write cut short by a crash: drop it
                    continue
                raise ValueError(f"{self.jsonl_path} line {number} is not JSON; repair or delete "
                                 "that line to resume") from None
            rerun = record["step"] == step and record["split"] == "eval" and reevaluating
            if record["step"] <= step and not rerun:
                kept.append(line)
                if record["split"] == "train":
                    self.last_train = record
        if len(kept) != len(lines):
            workdir_lib.replace_file(self.jsonl_path, "".join(kept))

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in scalars.items()})
        if self.is_writer:
            with workdir_lib.open_file(self.jsonl_path, "a") as f:
                f.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class Progress:
    """One console line every few steps: step, loss, accuracy, images/s, ETA."""

    def __init__(self, total_steps: int, batch_size: int, first_step: int = 0):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.last_step = first_step
        self.last_time = time.perf_counter()
        self.images_per_second = float("nan")
        self.enabled = jax.process_index() == 0

    def restart(self, step: int) -> None:
        """Measures the rate from ``step`` on (after compilation, say)."""
        self.last_step, self.last_time = step, time.perf_counter()

    def update(self, step: int, metrics: Mapping[str, float]) -> str:
        now = time.perf_counter()
        steps = step - self.last_step
        if steps > 0:
            self.images_per_second = steps * self.batch_size / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        remaining = (self.total_steps - step) * self.batch_size / self.images_per_second \
            if self.images_per_second > 0 else float("nan")
        line = (f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} | "
                f"loss {metrics['loss']:.4f} | acc {100 * metrics['accuracy']:5.1f}% | "
                f"lr {metrics['lr']:.2e} | {self.images_per_second:,.0f} img/s | "
                f"ETA {format_duration(remaining)}")
        self.print(line)
        return line

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)


def write_parameter_overview(workdir: str, params) -> str:
    """Every parameter's name, shape and dtype, to ``parameters.txt``; the
    console gets the one-line total instead of a page of names. Shapes only:
    with FSDP, no process can read all the values."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    path = os.path.join(workdir, "parameters.txt")
    with workdir_lib.open_file(path, "w") as f:
        f.write(parameter_overview.get_parameter_overview(shapes, include_stats=False) + "\n")
    return path


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def summary_table(rows: Mapping[str, Any]) -> str:
    """A two-column table for the end of a run."""
    width = max(len(k) for k in rows)
    lines = ["-" * (width + 22)]
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"{key:<{width}} | {value}")
    lines.append(lines[0])
    return "\n".join(lines)


def echo(line: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(line, flush=True, file=sys.stdout)
