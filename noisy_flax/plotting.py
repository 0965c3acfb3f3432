"""Train / eval curves as a PNG, read back from ``metrics.jsonl``."""
from __future__ import annotations

import io
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from noisy_flax import workdir as workdir_lib  # noqa: E402


def read_metrics(jsonl_path: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{split: {metric: [(step, value), ...]}}"""
    series: dict = defaultdict(lambda: defaultdict(list))
    with workdir_lib.open_file(jsonl_path) as f:
        for line in f:
            record = json.loads(line)
            step, split = record.pop("step"), record.pop("split")
            for name, value in record.items():
                series[split][name].append((step, value))
    return series


def plot_curves(jsonl_path: str, png_path: str, title: str = "") -> None:
    series = read_metrics(jsonl_path)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    _line(loss_ax, series.get("train", {}).get("loss"), "train loss")
    _line(loss_ax, series.get("eval", {}).get("loss"), "eval loss", marker="o")
    _line(acc_ax, series.get("train", {}).get("accuracy"), "train accuracy")
    _line(acc_ax, series.get("eval", {}).get("top1"), "eval top-1", marker="o")
    loss_ax.set(xlabel="step", ylabel="loss")
    acc_ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    image = io.BytesIO()  # matplotlib writes local files only; the workdir may be gs://
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    with workdir_lib.open_file(png_path, "wb") as f:
        f.write(image.getvalue())


def _line(ax, points, label, marker=None):
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, label=label, marker=marker)
