"""The study's report: tables (mean ± std over seeds, runs named) and figures.

Reads every ``runs/<arch>/seed<s>/<train noise>/eval/<noise>_<on|off>.json``
under the workdir, maps each to a protocol, and writes
``workdir/report/report.md``, ``all_runs.csv`` and the PNGs:

* ``none``: trained and tested without noise;
* ``train_only``: trained with the noise, tested without;
* ``eval_only``: trained without, tested with (published NoisyViT protocol);
* ``both``: trained and tested with (published NoisyCNN protocol).
"""
from __future__ import annotations

import csv
import glob
import itertools
import json
import os
import platform
import time
from collections import defaultdict
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PROTOCOLS = ("train_only", "eval_only", "both")
PROTOCOL_TEXT = {"none": "no noise", "train_only": "train only", "eval_only": "eval only",
                 "both": "train + eval"}
FAMILIES = (("circulant", "alpha"), ("gaussian", "strength"), ("salt_pepper", "p"))


def protocol_of(record: dict) -> str:
    train_noise, eval_noise, switch = record["train_noise"], record["eval_noise"], record["switch"]
    if train_noise == "none":
        return "none" if switch == "off" else "eval_only"
    if eval_noise != train_noise:
        raise ValueError(f"{record['run']}: a noisy run evaluated under another noise")
    return "both" if switch == "on" else "train_only"


def load_records(workdir: str) -> list[dict]:
    records = []
    for path in sorted(glob.glob(os.path.join(workdir, "runs", "*", "seed*", "*", "eval", "*.json"))):
        with open(path) as f:
            record = json.load(f)
        record["file"] = os.path.relpath(path, workdir)
        record["protocol"] = protocol_of(record)
        records.append(record)
    return records


def cells(records: list[dict]) -> dict[tuple, list[dict]]:
    """(arch, protocol, noise, order) -> one entry per seed."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        for order, m in r["orders"].items():
            noise = "none" if r["protocol"] == "none" else r["eval_noise"]
            entry = {"seed": r["seed"], "file": r["file"], **{k: m[k] for k in
                     ("top1", "top5", "batch_mean_top1", "count", "num_batches", "pass_")}}
            if "entropy" in m:
                for site, estimates in m["entropy"].items():
                    for method, e in estimates.items():
                        entry[f"H_{method}_{site}"] = e["value"]
                    probe = estimates["probe"].get("settings", {})
                    if "steps_run" in probe:  # True: stopped at the cap, not the tolerance
                        entry[f"probe_capped_{site}"] = probe["steps_run"] >= probe["max_steps"]
                        entry["probe_max_steps"] = probe["max_steps"]
                entry["H_Y"] = m["entropy"]["pre_logits"]["probe"]["label_entropy"]
                entry["n_entropy"] = (m["entropy"]["pre_logits"]["probe"]["n_train"],
                                      m["entropy"]["pre_logits"]["probe"]["n_test"])
            out[(r["arch"], r["protocol"], noise, order)].append(entry)
    for entries in out.values():
        entries.sort(key=lambda e: e["seed"])
    return out


def mean_std(entries: list[dict], key: str, scale: float = 100.0) -> tuple[float, float]:
    values = np.array([e[key] for e in entries if key in e], float) * scale
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def fmt(entries: Optional[list[dict]], key: str = "top1", scale: float = 100.0,
        digits: int = 1) -> str:
    if not entries:
        return "–"
    mean, std = mean_std(entries, key, scale)
    if len(entries) < 2:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _row_keys(c: dict, arch: str, noises: list[str]) -> list[tuple[str, str]]:
    rows = [("none", "none")] if (arch, "none", "none", _any_order(c)) in c else []
    for noise in noises:
        if noise == "none":
            continue
        for protocol in PROTOCOLS:
            if any(k[:3] == (arch, protocol, noise) for k in c):
                rows.append((protocol, noise))
    return rows


def _any_order(c: dict) -> str:
    return next(iter(c))[3]


def _runs_text(entries: list[dict]) -> str:
    """'vit/seed{0,1,2}/none · optimal_q_on' from the entries' files."""
    parts = entries[0]["file"].split(os.sep)  # runs/arch/seedS/train/eval/x.json
    seeds = ",".join(str(e["seed"]) for e in entries)
    return f"`{parts[1]}/seed{{{seeds}}}/{parts[3]}/eval/{parts[5][:-5]}`"


def accuracy_table(c: dict, arch: str, noises: list[str], orders: list[str],
                   key: str = "top1") -> str:
    header = ["noise", "protocol"] + orders + ["runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for protocol, noise in _row_keys(c, arch, noises):
        entries = [c.get((arch, protocol, noise, o)) for o in orders]
        first = next(e for e in entries if e)
        lines.append("| " + " | ".join([noise, PROTOCOL_TEXT[protocol]]
                                       + [fmt(e, key) for e in entries]
                                       + [_runs_text(first)]) + " |")
    return "\n".join(lines)


def delta_table(c: dict, arch: str, noises: list[str], orders: list[str]) -> str:
    """Top-1 change against the clean model under the same order, paired by seed."""
    header = ["noise", "protocol"] + orders
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for protocol, noise in _row_keys(c, arch, noises):
        if protocol == "none":
            continue
        cells_ = []
        for o in orders:
            cells_.append(_pm(paired_deltas(c, arch, protocol, noise, o), signed=True))
        lines.append("| " + " | ".join([noise, PROTOCOL_TEXT[protocol]] + cells_) + " |")
    return "\n".join(lines)


def _pm(values: list[float], signed: bool = False, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = float(np.mean(values))
    sign = "+" if signed else ""
    if len(values) < 2:
        return f"{mean:{sign}.{digits}f} (1 seed)"
    std = float(np.std(values, ddof=1))
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def entropy_table(c: dict, arch: str, noises: list[str], orders: list[str], site: str,
                  method: str = "probe") -> str:
    key = f"H_{method}_{site}"
    header = ["noise", "protocol"] + orders
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for protocol, noise in _row_keys(c, arch, noises):
        entries = [c.get((arch, protocol, noise, o)) for o in orders]
        lines.append("| " + " | ".join([noise, PROTOCOL_TEXT[protocol]]
                                       + [fmt(e, key, 1.0, 3) for e in entries]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------
def paired_deltas(c: dict, arch: str, protocol: str, noise: str, order: str) -> list[float]:
    """Top-1 change in points against the clean model, same order and seed."""
    base = {e["seed"]: e["top1"] for e in c.get((arch, "none", "none", order), [])}
    return [100 * (e["top1"] - base[e["seed"]]) for e in c.get((arch, protocol, noise, order), [])
            if e["seed"] in base]


def figure_orders(c: dict, arch: str, noises: list[str], orders: list[str], path: str) -> None:
    """Top-1 change against no noise per noise and batch order, one panel per
    protocol (bars: mean over seeds of the paired change; whiskers: std)."""
    fig, axes = plt.subplots(len(PROTOCOLS), 1, figsize=(12, 3.2 * len(PROTOCOLS)), sharey=True)
    labels = [n for n in noises if n != "none"]
    width = 0.8 / len(orders)
    for ax, protocol in zip(np.atleast_1d(axes), PROTOCOLS):
        for j, order in enumerate(orders):
            deltas = [paired_deltas(c, arch, protocol, n, order) for n in labels]
            means = [np.mean(d) if d else np.nan for d in deltas]
            stds = [np.std(d, ddof=1) if len(d) > 1 else 0.0 for d in deltas]
            x = np.arange(len(labels)) + (j - (len(orders) - 1) / 2) * width
            ax.bar(x, means, width, yerr=stds, label=order, capsize=2)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_ylabel("top-1 change (points)")
        clean = c.get((arch, "none", "none", orders[0]))
        base = f" (no noise: {mean_std(clean, 'top1')[0]:.1f}%)" if clean else ""
        ax.set_title(f"{arch}: noise {PROTOCOL_TEXT[protocol]}, change against no noise{base}")
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].legend(ncol=5, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _strength(noise: str, family: str) -> Optional[float]:
    if noise == "none":
        return 0.0
    if noise.startswith(family + "_"):
        try:
            return float(noise[len(family) + 1:])
        except ValueError:
            return None
    return None


def figure_strength(c: dict, archs: list[str], noises: list[str], orders: list[str],
                    protocol: str, path: str) -> None:
    """Top-1 against noise strength (0 = the clean model), lines per order."""
    fig, axes = plt.subplots(len(archs), len(FAMILIES), figsize=(13, 3.4 * len(archs)),
                             squeeze=False)
    for i, arch in enumerate(archs):
        for j, (family, symbol) in enumerate(FAMILIES):
            ax = axes[i, j]
            points = sorted((s, n) for n in noises if (s := _strength(n, family)) is not None)
            for order in orders:
                xs, ys, es = [], [], []
                for s, n in points:
                    entries = c.get((arch, "none" if n == "none" else protocol, n, order))
                    if entries:
                        m, sd = mean_std(entries, "top1")
                        xs.append(s), ys.append(m), es.append(sd)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=2, label=order)
            ax.set(title=f"{arch}: {family} ({PROTOCOL_TEXT[protocol]})", xlabel=symbol,
                   ylabel="top-1 (%)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure_entropy(c: dict, archs: list[str], path: str) -> bool:
    """H(Y|Z) (probe) at both sites against top-1, one point per cell mean."""
    sites = ("pre_logits", "noise_site")
    if not any(f"H_probe_{sites[0]}" in e for entries in c.values() for e in entries):
        return False
    orders = sorted({k[3] for k in c})
    markers = dict(zip(orders, "osv^Dx*"))
    colors = dict(zip(archs, ("tab:blue", "tab:red", "tab:green", "tab:purple")))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, site in zip(axes, sites):
        for (arch, protocol, noise, order), entries in c.items():
            h = mean_std(entries, f"H_probe_{site}", 1.0)[0]
            acc = mean_std(entries, "top1")[0]
            ax.scatter(h, acc, marker=markers[order], color=colors[arch], alpha=0.6, s=22)
        ax.set(xlabel=f"H(Y|Z) linear-probe estimate at {site} (nats)", ylabel="top-1 (%)",
               title=f"entropy estimate vs accuracy ({site})")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color="gray", marker=markers[o], ls="", label=o) for o in orders]
    handles += [plt.Line2D([], [], color=colors[a], marker="o", ls="", label=a) for a in archs]
    axes[0].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------
def write_csv(records: list[dict], path: str) -> None:
    fields = ["arch", "seed", "protocol", "train_noise", "eval_noise", "switch", "order",
              "top1", "top5", "batch_mean_top1", "count", "num_batches", "pass_",
              "H_probe_pre_logits", "H_gaussian_pre_logits", "H_probe_noise_site",
              "H_gaussian_noise_site", "file"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for r in records:
            for order, m in r["orders"].items():
                row = {k: r[k] for k in ("arch", "seed", "protocol", "train_noise",
                                         "eval_noise", "switch", "file")}
                row.update(order=order, **{k: m[k] for k in fields if k in m})
                for site, estimates in m.get("entropy", {}).items():
                    for method, e in estimates.items():
                        row[f"H_{method}_{site}"] = round(e["value"], 5)
                writer.writerow(row)


def write_report(config, workdir: str, *, compute_seconds: Optional[float] = None,
                 out_dir: Optional[str] = None, command: Optional[str] = None,
                 notes: tuple[str, ...] = ()) -> dict[str, str]:
    study = config.study
    out_dir = out_dir or os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    records = load_records(workdir)
    if not records:
        raise ValueError(f"no evaluation results under {workdir}/runs; run the study first")
    c = cells(records)
    archs = [a["name"] for a in study.archs if any(k[0] == a["name"] for k in c)]
    noises = [n["label"] for n in study.noises]
    orders = [o for o in study.orders if any(k[3] == o for k in c)]
    train_seconds = _train_seconds(workdir)
    eval_seconds = sum(r.get("seconds", 0.0) for r in records)

    figures = {}
    for arch in archs:
        figures[f"orders_{arch}"] = f"accuracy_by_order_{arch}.png"
        figure_orders(c, arch, noises, orders, os.path.join(out_dir, figures[f"orders_{arch}"]))
    for protocol in ("eval_only", "both", "train_only"):
        figures[f"strength_{protocol}"] = f"accuracy_vs_strength_{protocol}.png"
        figure_strength(c, archs, noises, orders, protocol,
                        os.path.join(out_dir, figures[f"strength_{protocol}"]))
    if figure_entropy(c, archs, os.path.join(out_dir, "entropy_vs_accuracy.png")):
        figures["entropy"] = "entropy_vs_accuracy.png"
    write_csv(records, os.path.join(out_dir, "all_runs.csv"))

    arch_text = {a["name"]: a for a in study.archs}
    lines = [
        "# NoisyNN study on Fashion-MNIST: batch order, protocols, entropy",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
        "`noisy_flax.study_report` from the files under `runs/`.",
        "",
        "## Set-up",
        f"- Command: `{command or 'python -m noisy_flax.study --config configs/study_fashion_mnist.py --workdir WORKDIR'}`",
        f"- Machine: {_machine()}",
        f"- Time: training {train_seconds / 60:.1f} min, evaluation and entropy "
        f"{eval_seconds / 60:.1f} min (sums of the per-run timings)"
        + (f"; wall clock of the last invocation {compute_seconds / 60:.1f} min" if compute_seconds else "")
        + ".",
        *[f"- {note}" for note in notes],
        f"- Seeds: {', '.join(map(str, study.seeds))} (mean ± sample std over seeds; every cell names its runs).",
        f"- Training: the first {study.train_examples:,} Fashion-MNIST train images, "
        "random horizontal flips, AdamW, cosine schedule with "
        f"{100 * study.warmup_fraction:.0f}% warm-up, weight decay {config.weight_decay}.",
    ]
    for name in archs:
        a = arch_text[name]
        lines.append(f"  - {name}: `{a['model']}` {dict(a['model_kwargs'])}, noise at "
                     f"`{a['site']}` (layer {a['layer']}" + (f", stage {a['stage']}" if name != 'vit' else "")
                     + f"); {a.get('pretrain_steps', 0)} clean pre-training steps, then "
                     f"{a['steps']} fine-tuning steps per training noise (batch {a['batch']}, "
                     f"lr {a['lr']}).")
    n_eval = records[0]["examples"]
    lines += [
        f"- Evaluation: {n_eval} test images ({study.eval_per_class} per class, the first of each "
        f"class in the test split), test batch {study.eval_batch_size}, "
        + _scope_text(config.noise.scope, int(_devices(workdir)), study.eval_batch_size) + ".",
        "- Batch orders: `class_sorted` (published: sorted by label, consecutive batches), "
        "`shuffled` (seeded), `single` (batch size 1), `same_class` (each batch one class, seeded "
        "order inside the class), `distinct_class` (no two labels alike in a batch). Every order "
        "evaluates every example exactly once.",
        "- Top-1 below is correct / total. The published metric, the running average of per-batch "
        "accuracy, is reported in `all_runs.csv` (`batch_mean_top1`); "
        + _batch_mean_note(records),
        "- Noise settings: " + ", ".join(f"`{n['label']}`" for n in study.noises if n['label'] != 'none')
        + ". Protocols: *train only* (trained with, tested without), *eval only* (trained without, "
        "tested with: the published NoisyViT protocol), *train + eval* (the published NoisyCNN protocol).",
        "",
    ]
    for arch in archs:
        lines += [f"## {arch}: top-1 (%) by batch order", "",
                  accuracy_table(c, arch, noises, orders), "",
                  f"### {arch}: top-1 change against no noise, same order and seed (points)", "",
                  delta_table(c, arch, noises, orders), "",
                  f"![top-1 change by order]({figures[f'orders_{arch}']})", ""]
    if "entropy" in figures:
        h_y = next(e["H_Y"] for entries in c.values() for e in entries if "H_Y" in e)
        n_fit, n_test = next(e["n_entropy"] for entries in c.values() for e in entries if "n_entropy" in e)
        lines += ["## Entropy estimates H(Y|Z) (nats)", "",
                  f"Linear-probe held-out cross-entropy (an upper bound on H(Y|Z) up to sampling "
                  f"error) on features of the evaluated test images, fit on {n_fit} and scored on "
                  f"{n_test} (a stratified half each); H(Y) = {h_y:.3f} nats. Noise-site features: "
                  "the noise output averaged over patch tokens (ViT; the class token, which the "
                  "noise never touches, is left out) or spatial positions (ResNet). Pre-logits: "
                  "the classifier head's input. The Gaussian class-conditional estimate is in "
                  "`all_runs.csv`. " + _probe_caveat(c, h_y),
                  "", _probe_noise_note(c, study.noises), ""]
        for arch in archs:
            for site in ("pre_logits", "noise_site"):
                lines += [f"### {arch}: probe H(Y|Z) at {site}", "",
                          entropy_table(c, arch, noises, orders, site), ""]
        lines += [f"![entropy vs accuracy]({figures['entropy']})", ""]
    lines += ["## Accuracy against noise strength", ""]
    for protocol in ("eval_only", "both", "train_only"):
        lines += [f"![{protocol}]({figures[f'strength_{protocol}']})", ""]
    lines += ["## Files", "",
              "- `all_runs.csv`: one row per run, evaluation and order (seed-level numbers, "
              "both metrics, all entropy estimates, the JSON each came from).",
              "- Run files: `runs/<arch>/seed<s>/<training noise>/eval/<test noise>_<on|off>.json` "
              "in the study workdir.", ""]
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    return {"report": report, **{k: os.path.join(out_dir, v) for k, v in figures.items()}}


def _scope_text(scope: str, devices: int, batch: int) -> str:
    """What a batch-mixing noise mixes, as the runs were placed."""
    if scope == "global" or devices == 1:
        return (f"noise scope `{scope}` on {devices} device(s), so a batch-mixing noise mixes "
                "the whole test batch")
    return (f"noise scope `device` on {devices} devices, so a batch-mixing noise mixes each "
            f"device's {-(-batch // devices)} rows of a test batch separately")


def _feature_set(arch: str, entry: dict, order: str) -> tuple:
    """Which features an entry's estimates were fit on: a setting that no
    order changes (noise off) is one pass shared by every order."""
    return arch, entry["file"], entry["pass_"] if entry["pass_"] == "shared_pass" else order


def _probe_caveat(c: dict, h_y: float) -> str:
    """Says so when the probe does worse than predicting the label prior."""
    # A setting that no order changes (noise off) is one pass shared by every
    # order: count its features once, not once per order.
    clean = {_feature_set(arch, e, order):
             e["H_probe_pre_logits"] for (arch, protocol, _, order), entries in c.items()
             if protocol == "none" for e in entries if "H_probe_pre_logits" in e}
    above = sum(v > h_y for v in clean.values())
    if not above:
        return ""
    return (f"Caveat, measured: on {above} of {len(clean)} distinct clean feature sets "
            f"the probe's held-out cross-entropy exceeds H(Y) = {h_y:.3f} nats, i.e. the probe "
            "overfits its small fit half and the bound is loose; compare values between "
            "settings and orders (same estimator, same sample sizes), not with H(Y).")


def _probe_noise_note(c: dict, noises) -> str:
    """The probe's own noise, measured on features that are the same.

    Optimal Q and circulant Q are the identity on a batch of one, so their
    eval-only ``single`` evaluations see the clean features, up to the float
    rounding of another batch shape. How far the estimates move there is the
    smallest difference between settings that means anything.
    """
    identity_at_one = {n["label"] for n in noises if n["type"] in ("optimal_q", "circulant")}
    moves = {"probe": [], "gaussian": []}
    for (arch, protocol, noise, order), entries in c.items():
        if protocol != "eval_only" or order != "single" or noise not in identity_at_one:
            continue
        clean = {e["seed"]: e for e in c.get((arch, "none", "none", "single"), [])}
        for e in entries:
            for method, site in itertools.product(moves, ("pre_logits", "noise_site")):
                key = f"H_{method}_{site}"
                if key in e and key in clean.get(e["seed"], {}):
                    moves[method].append(abs(e[key] - clean[e["seed"]][key]))
    # A fit shared by every order (noise off) is counted once.
    fits = {(_feature_set(arch, e, order), site):
            e[f"probe_capped_{site}"] for (arch, _, _, order), entries in c.items()
            for e in entries for site in ("pre_logits", "noise_site")
            if f"probe_capped_{site}" in e}
    lines = []
    if fits:
        steps = next(e["probe_max_steps"] for entries in c.values() for e in entries
                     if "probe_max_steps" in e)
        lines.append(f"{sum(fits.values())} of {len(fits)} probe fits stopped at their "
                     f"{steps}-step cap before the gradient tolerance.")
    if moves["probe"]:
        lines.append(
            "Estimator noise, measured: at batch size 1 optimal-Q and circulant noise are the "
            "identity, so their eval-only `single` evaluations see the clean features up to "
            f"float rounding; there the probe's estimates move by up to {max(moves['probe']):.3f} "
            f"nats (median {float(np.median(moves['probe'])):.3f}) and the Gaussian estimate's by "
            f"up to {max(moves['gaussian'], default=0.0):.1g}. Differences between settings "
            "smaller than the probe's figure are within its noise.")
    return " ".join(lines)


def _batch_mean_note(records: list[dict]) -> str:
    gaps = [abs(m["batch_mean_top1"] - m["top1"]) for r in records for m in r["orders"].values()]
    return (f"its largest difference from correct / total over all {len(gaps)} evaluations is "
            f"{100 * max(gaps):.2f} points (it differs only when batches differ in size).")


def _train_seconds(workdir: str) -> float:
    total = 0.0
    for path in glob.glob(os.path.join(workdir, "runs", "*", "seed*", "*", "train.json")):
        with open(path) as f:
            total += json.load(f).get("seconds", 0.0)
    return total


def _devices(workdir: str) -> str:
    path = os.path.join(workdir, "devices.txt")
    return open(path).read().strip() if os.path.exists(path) else "1"


def _machine() -> str:
    cpus = os.cpu_count()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpus} CPU cores ({model}), no accelerator"


def main(argv=None) -> None:
    """``python -m noisy_flax.study_report --config C --workdir W [--out DIR]``:
    rebuilds the report from a study workdir (e.g. into docs/study)."""
    import argparse
    import sys

    from noisy_flax import cli

    cli.add_config_roots(sys.argv)
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", required=True, help="configs/study_fashion_mnist.py[:args]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None, help="default: WORKDIR/report")
    parser.add_argument("--command", default=None, help="the study command, for the report")
    parser.add_argument("--note", action="append", default=[], help="a set-up line to add")
    args = parser.parse_args(argv)
    path, _, arg = args.config.partition(":")
    import importlib.util
    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    from noisy_flax import workdir as workdir_lib
    from noisy_flax.study import STUDY_CONFIG
    saved = workdir_lib.read_saved_config(args.workdir, STUDY_CONFIG)
    if saved is not None:  # the report describes the study that ran
        changes = workdir_lib.config_differences(saved, workdir_lib.config_as_json(config))
        if changes:
            parser.exit(2, f"error: --config differs from the study that ran in {args.workdir} "
                           f"({'; '.join(changes[:5])}); pass the config (and :arguments) that "
                           f"ran it, as recorded in {os.path.join(args.workdir, STUDY_CONFIG)}\n")
    paths = write_report(config, args.workdir, out_dir=args.out, command=args.command,
                         notes=tuple(args.note))
    print(paths["report"])


if __name__ == "__main__":
    main()
