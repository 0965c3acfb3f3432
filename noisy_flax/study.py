"""The noise study: train short runs, evaluate each under every batch order.

    python -m noisy_flax.study --config configs/study_fashion_mnist.py[:runlocal] \
        --workdir workdirs/study

For every architecture, seed and training noise (config.study) it trains one
model, then evaluates it under the noise settings the protocols need:

* the model trained without noise: noise off ('none') and each noise on at
  test time only ('eval only', the published NoisyViT protocol);
* a model trained with noise N: N off ('train only') and N on ('both', the
  published NoisyCNN protocol).

Each evaluation runs every batch order of ``noisy_flax.batch_order`` and,
when ``study.entropy`` is set, H(Y|Z) estimates at the noise site and the
pre-logits. Everything lands in ``workdir/runs/<arch>/seed<s>/<train noise>/``:
``variables.msgpack`` and ``train.json`` after training, one
``eval/<noise>_<on|off>.json`` per evaluation. A file that exists is never
recomputed, so rerunning the command resumes; the report
(``workdir/report/report.md`` and PNGs, see ``study_report``) is rebuilt
from those files at the end of every run.

Training here is a compact loop over train.py's pieces (model, optimizer,
state, jitted train step) on an in-memory slice of the train split, so that
one process compiles each train step once and reuses it for every seed.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before heavy imports: see noisy_flax.cpu_tuning
    from noisy_flax import cpu_tuning
    cpu_tuning.reexec_with_fast_malloc()

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

import flax.serialization
import jax
import ml_collections
import numpy as np

from noisy_flax import batch_order, evaluate, noise, optim, reporting, sharding, train
from noisy_flax import workdir as workdir_lib
from noisy_flax.noise import noise_config as make_noise_config

OFF, ON = "off", "on"
PRETRAIN = "_pretrain"  # run directory of the clean pre-training shared by a seed


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model and the evaluations it owes."""
    arch: str
    seed: int
    train_noise: str  # a noise label; 'none' for the clean model
    evals: tuple[tuple[str, str], ...]  # (noise label, 'on' | 'off')

    @property
    def path(self) -> str:
        return os.path.join("runs", self.arch, f"seed{self.seed}", self.train_noise)


def plan(study: ml_collections.ConfigDict) -> list[Run]:
    labels = [n["label"] for n in study.noises]
    if "none" not in labels:
        raise ValueError("study.noises must include the clean reference {'label': 'none'}")
    protocols = set(study.protocols)
    unknown = protocols - {"train_only", "eval_only", "both"}
    if unknown:
        raise ValueError(f"unknown study protocols {sorted(unknown)}; use train_only, "
                         "eval_only, both")
    runs = []
    # Seed-major: a study cut short still has whole seeds of every arch.
    for seed in study.seeds:
        for arch in study.archs:
            for label in labels:
                if label == "none":
                    evals = [("none", OFF)]
                    if "eval_only" in protocols:
                        evals += [(other, ON) for other in labels if other != "none"]
                else:
                    evals = ([(label, OFF)] if "train_only" in protocols else []) + \
                            ([(label, ON)] if "both" in protocols else [])
                if evals:
                    runs.append(Run(arch["name"], int(seed), label, tuple(evals)))
    return runs


def run_config(config: ml_collections.ConfigDict, arch: dict, noise_fields: dict,
               seed: int, steps: Optional[int] = None) -> ml_collections.ConfigDict:
    """The full training config of one run (``steps``: default the fine-tuning steps)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.model = arch["model"]
    c.model_kwargs = ml_collections.ConfigDict(dict(arch.get("model_kwargs", {})))
    fields = {k: v for k, v in noise_fields.items() if k != "label"}
    c.noise = make_noise_config(**fields, site=arch["site"], layer=arch["layer"],
                                stage=arch["stage"], train=True, eval=True,
                                scope=config.noise.scope)
    c.seed = seed
    c.lr = arch["lr"]
    c.batch_size = arch["batch"]
    c.total_steps = steps or arch["steps"]
    c.num_epochs = 0.0
    c.warmup_steps = int(round(config.study.warmup_fraction * c.total_steps))
    return c


# ---------------------------------------------------------------------------
# Data, held in memory once
# ---------------------------------------------------------------------------
class Data:
    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self._train: Optional[evaluate.EvalData] = None
        self._eval: Optional[evaluate.EvalData] = None

    @property
    def train(self) -> evaluate.EvalData:
        if self._train is None:
            n = self.config.study.train_examples
            self._train = evaluate.load_eval_data(
                self.config, split=f"{self.config.train_split}[:{n}]")
        return self._train

    @property
    def eval(self) -> evaluate.EvalData:
        if self._eval is None:
            self._eval = evaluate.load_eval_data(self.config,
                                                 per_class=self.config.study.eval_per_class)
        return self._eval


def train_batches(data: evaluate.EvalData, batch_size: int, seed: int, flip: bool,
                  stream: int = 0):
    """Endless seeded batches: one permutation per epoch, random horizontal flips.
    ``stream`` separates pre-training (0) from fine-tuning (1) data orders."""
    rng = np.random.default_rng([seed, 7, stream])
    n = len(data.labels)
    if n < batch_size:
        raise ValueError(f"study.train_examples={n} is smaller than the batch {batch_size}")
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            images = data.images[index]
            if flip:
                flipped = rng.random(batch_size) < 0.5
                images = np.where(flipped[:, None, None, None], images[:, :, ::-1], images)
            yield {"image": images, "label": data.labels[index]}


# ---------------------------------------------------------------------------
# Training one run
# ---------------------------------------------------------------------------
class Trainer:
    """Trains runs; keeps one jitted train step per (arch, training noise)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self._steps: dict[tuple, Any] = {}

    def train(self, c: ml_collections.ConfigDict, key: tuple, data: evaluate.EvalData,
              init: Optional[dict] = None):
        """Trains from ``init`` (variables) if given, with a fresh optimizer."""
        model = train.build_model(c, self.mesh)
        tx, schedule = optim.make_optimizer(c, c.total_steps, c.warmup_steps)
        state, shardings = train.create_train_state(c, model, tx, self.mesh)
        if init is not None:
            state = state.replace(
                params=jax.device_put(init["params"], shardings.params),
                batch_stats=jax.device_put(init.get("batch_stats", {}), shardings.batch_stats))
        if key not in self._steps:
            self._steps[key] = train.jit_train_step(model, tx, schedule, c, shardings, self.mesh)
        step_fn = self._steps[key]
        batches = train_batches(data, c.batch_size, c.seed, bool(c.input.flip),
                                stream=int(init is not None))
        losses, accs = [], []
        for _ in range(c.total_steps):
            state, metrics = step_fn(state, sharding.global_batch(next(batches), self.mesh))
            losses.append(metrics["loss"])
            accs.append(metrics["accuracy"])
        losses = [float(x) for x in jax.device_get(losses)]
        if not all(math.isfinite(x) for x in losses):
            raise train.TrainingError(f"run {key} diverged (loss {losses[-1]}); lower its lr")
        tail = max(1, len(losses) // 10)
        summary = {"steps": int(c.total_steps), "batch": int(c.batch_size), "lr": c.lr,
                   "train_examples": len(data.labels),
                   "final_train_loss": float(np.mean(losses[-tail:])),
                   "final_train_accuracy": float(np.mean(jax.device_get(accs[-tail:])))}
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return model, jax.device_get(variables), summary


def save_variables(path: str, variables) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(jax.device_get(variables)))
    os.replace(tmp, path)  # atomic: a killed run never leaves half a file


def load_variables(path: str):
    with open(path, "rb") as f:
        return flax.serialization.msgpack_restore(f.read())


def write_json(path: str, payload: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Evaluating one run under one noise setting
# ---------------------------------------------------------------------------
def evaluate_run(model, variables, data: evaluate.EvalData, noise_cfg, on: bool,
                 study: ml_collections.ConfigDict, mesh, cache: dict) -> dict[str, Any]:
    """{order: metrics (+ 'entropy')} for one noise setting."""
    setting = evaluate.evaluate_setting(
        model, variables, data, noise_cfg, on=on, orders=tuple(study.orders),
        batch_size=study.eval_batch_size, mesh=mesh, seed=study.order_seed,
        with_features=study.entropy, forward_cache=cache)
    out, shared_entropy = {}, None
    for order, result in setting.items():
        row = dict(result["metrics"])
        if study.entropy:
            shared = row["pass_"] == "shared_pass"
            if shared and shared_entropy is not None:
                row["entropy"] = shared_entropy  # the same features for every order
            else:
                row["entropy"] = evaluate.entropy_estimates(
                    result["features"], data.labels, data.num_classes,
                    probe_steps=study.probe_steps)
                if shared:
                    shared_entropy = row["entropy"]
        out[order] = row
    return out


# ---------------------------------------------------------------------------
# Progress with ETA
# ---------------------------------------------------------------------------
class StudyProgress:
    """Counts units (trainings, evaluations); ETA from the mean time per kind."""

    def __init__(self, remaining: dict[tuple, int]):
        self.remaining = dict(remaining)  # (kind, arch) -> units left
        self.times: dict[tuple, list[float]] = {}
        self.started = time.perf_counter()
        self.done = 0
        self.total = sum(remaining.values())

    def finished(self, kind: str, arch: str, seconds: float, what: str) -> str:
        self.remaining[(kind, arch)] -= 1
        self.times.setdefault((kind, arch), []).append(seconds)
        self.done += 1
        line = (f"[{self.done}/{self.total}] {what}: {seconds:.1f}s | elapsed "
                f"{reporting.format_duration(time.perf_counter() - self.started)} | "
                f"ETA {reporting.format_duration(self.eta())}")
        reporting.echo(line)
        return line

    def eta(self) -> float:
        all_times = [t for ts in self.times.values() for t in ts]
        fallback = float(np.mean(all_times)) if all_times else math.nan
        total = 0.0
        for key, left in self.remaining.items():
            known = self.times.get(key)
            # Untimed kinds borrow the other arch's mean for the same kind.
            same_kind = [t for (kind, _), ts in self.times.items() if kind == key[0] for t in ts]
            mean = np.mean(known) if known else (np.mean(same_kind) if same_kind else fallback)
            total += left * mean
        return total


# ---------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------
def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs what is missing, then writes the report; returns the report paths."""
    from noisy_flax import study_report

    study = config.study
    mesh = sharding.create_mesh(config.mesh)
    archs = {a["name"]: a for a in study.archs}
    noises = {n["label"]: n for n in study.noises}
    runs = plan(study)
    check_study(config, mesh)  # before anything is written or trained
    workdir_lib.check_workdir(workdir)
    workdir_lib.check_config_unchanged(workdir, config, file_name=STUDY_CONFIG, what="study")
    os.makedirs(workdir, exist_ok=True)
    pending = _pending(runs, workdir)
    progress = StudyProgress(_count_units(pending, workdir))
    reporting.echo(f"study: {len(runs)} runs, {progress.total} units to do "
                   f"({len(runs) - len(pending)} runs complete) on {mesh.size} device(s)")
    write_json(os.path.join(workdir, STUDY_CONFIG), json.loads(config.to_json()))
    with open(os.path.join(workdir, "devices.txt"), "w") as f:
        f.write(str(mesh.size))

    data = Data(config)
    trainer = Trainer(mesh)
    caches: dict[str, dict] = {name: {} for name in archs}
    started = time.perf_counter()
    for run, todo_train, todo_evals in pending:
        rundir = os.path.join(workdir, run.path)
        os.makedirs(os.path.join(rundir, "eval"), exist_ok=True)
        arch = archs[run.arch]
        c = run_config(config, arch, noises[run.train_noise], run.seed)
        variables_path = os.path.join(rundir, "variables.msgpack")
        if todo_train:
            start = _pretrained(workdir, config, arch, run.seed, trainer, data, progress)
            t0 = time.perf_counter()
            model, variables, summary = trainer.train(c, (run.arch, run.train_noise), data.train,
                                                      init=start)
            summary["seconds"] = round(time.perf_counter() - t0, 1)
            save_variables(variables_path, variables)
            write_json(os.path.join(rundir, "train.json"),
                       {"run": run.path, "model": c.model, "noise": c.noise.to_dict(), **summary})
            progress.finished("train", run.arch, summary["seconds"],
                              f"train {run.path} (train acc {100 * summary['final_train_accuracy']:.1f}%)")
        else:
            model = train.build_model(c, mesh)
            variables = load_variables(variables_path)
        for label, switch in todo_evals:
            t0 = time.perf_counter()
            eval_cfg = run_config(config, arch, noises[label], run.seed).noise
            orders = evaluate_run(model, variables, data.eval, eval_cfg, switch == ON,
                                  study, mesh, caches[run.arch])
            seconds = round(time.perf_counter() - t0, 1)
            write_json(_eval_path(rundir, label, switch),
                       {"run": run.path, "arch": run.arch, "seed": run.seed,
                        "train_noise": run.train_noise, "eval_noise": label, "switch": switch,
                        "examples": int(len(data.eval.labels)), "seconds": seconds,
                        "orders": orders})
            first = orders[study.orders[0]]
            progress.finished("eval", run.arch, seconds,
                              f"eval {run.path} {label} {switch} ({study.orders[0]} top-1 "
                              f"{100 * first['top1']:.1f}%)")
    compute_seconds = time.perf_counter() - started
    paths = study_report.write_report(config, workdir, compute_seconds=compute_seconds)
    reporting.echo(f"study done: report at {paths['report']}")
    return paths


STUDY_CONFIG = "study_config.json"


def check_study(config: ml_collections.ConfigDict, mesh) -> None:
    """Settings that would otherwise fail after hours of training: the batch
    orders, the test batch against the classes and the devices, each noise."""
    study = config.study
    if not study.orders or not study.seeds or not study.archs or not study.noises:
        raise ValueError("study.orders, study.seeds, study.archs and study.noises each need at "
                         "least one entry, e.g. --config.study.orders='(\"shuffled\",)'")
    if not 0 <= study.warmup_fraction < 1:
        raise ValueError(f"study.warmup_fraction={study.warmup_fraction} must be in [0, 1), "
                         "e.g. 0.05")
    for key, lowest in (("train_examples", 1), ("eval_per_class", 0), ("probe_steps", 1)):
        if study.get(key, lowest) < lowest:
            raise ValueError(f"study.{key}={study[key]} must be "
                             f"{'>= 0' if lowest == 0 else 'positive'}")
    for order in study.orders:
        if order not in batch_order.ORDERS:
            raise ValueError(f"unknown study.orders entry {order!r}; use any of "
                             f"{', '.join(batch_order.ORDERS)}")
    size = study.eval_batch_size
    if int(size) != size or size < 1:
        raise ValueError(f"study.eval_batch_size={size} must be a positive integer")
    if "distinct_class" in study.orders and size > config.num_classes:
        raise ValueError(f"study.eval_batch_size={size} is larger than the {config.num_classes} "
                         "classes, so no distinct_class batch can be built; use a test batch "
                         f"<= {config.num_classes} or drop distinct_class from study.orders")
    shards = mesh.size if config.noise.scope == "device" else 1
    for arch in study.archs:
        for fields in study.noises:
            c = run_config(config, arch, fields, seed=0)
            noise.make_noise(c.noise, mesh=mesh)
            if c.noise.type == "circulant":  # test batches are padded and masked
                # Each device holds ceil(batch / devices) rows of a padded batch.
                noise.check_circulant(-(-size // shards), c.noise.alpha, padded=True)


def _pretrained(workdir, config, arch, seed, trainer, data, progress) -> dict:
    """The clean pre-trained variables of (arch, seed), trained once and kept.

    Every run of an (arch, seed) fine-tunes from them, with or without its
    noise, as the published recipes fine-tune pre-trained weights."""
    rundir = os.path.join(workdir, "runs", arch["name"], f"seed{seed}", PRETRAIN)
    path = os.path.join(rundir, "variables.msgpack")
    if os.path.exists(os.path.join(rundir, "train.json")) and os.path.exists(path):
        return load_variables(path)
    os.makedirs(rundir, exist_ok=True)
    c = run_config(config, arch, {"type": "none"}, seed, steps=arch["pretrain_steps"])
    t0 = time.perf_counter()
    _, variables, summary = trainer.train(c, (arch["name"], PRETRAIN), data.train)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    save_variables(path, variables)
    write_json(os.path.join(rundir, "train.json"), {"run": os.path.relpath(rundir, workdir),
                                                    "model": c.model, **summary})
    progress.finished("pretrain", arch["name"], summary["seconds"],
                      f"pretrain {arch['name']} seed{seed} (train acc "
                      f"{100 * summary['final_train_accuracy']:.1f}%)")
    return variables


def _eval_path(rundir: str, label: str, switch: str) -> str:
    return os.path.join(rundir, "eval", f"{label}_{switch}.json")


def _pending(runs: list[Run], workdir: str):
    """[(run, needs training, evaluations missing)] for runs with work left."""
    out = []
    for run in runs:
        rundir = os.path.join(workdir, run.path)
        trained = os.path.exists(os.path.join(rundir, "train.json")) and \
            os.path.exists(os.path.join(rundir, "variables.msgpack"))
        missing = tuple(e for e in run.evals if not os.path.exists(_eval_path(rundir, *e)))
        if not trained or missing:
            out.append((run, not trained, missing))
    return out


def _count_units(pending, workdir: str) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    pretrain = {(run.arch, run.seed) for run, todo_train, _ in pending if todo_train and not
                os.path.exists(os.path.join(workdir, "runs", run.arch, f"seed{run.seed}",
                                            PRETRAIN, "train.json"))}
    for arch, _ in pretrain:
        counts[("pretrain", arch)] = counts.get(("pretrain", arch), 0) + 1
    for run, todo_train, todo_evals in pending:
        if todo_train:
            counts[("train", run.arch)] = counts.get(("train", run.arch), 0) + 1
        counts[("eval", run.arch)] = counts.get(("eval", run.arch), 0) + len(todo_evals)
    return counts


# Keys every run's config takes from study.archs / study.noises (run_config):
# given on the command line they would change nothing.
PER_RUN_KEYS = ("model", "model_kwargs", "seed", "lr", "batch_size", "total_steps", "num_epochs",
                "warmup_steps", "warmup_epochs", "noise")


def check_no_per_run_keys(argv: Sequence[str]) -> None:
    for arg in argv:
        key = arg.removeprefix("--config.").split("=", 1)[0] if arg.startswith("--config.") else ""
        if key and key != "noise.scope" and key.split(".")[0] in PER_RUN_KEYS:
            raise ValueError(f"--config.{key} is set for each run by the study (study.archs: "
                             "model, lr, batch, steps; study.noises: the noise; study.seeds); "
                             "change it in the study config file")


def main(argv) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from noisy_flax import cli

    cli.add_config_roots(sys.argv)  # configs/ lives in the repository root
    config_flag = config_flags.DEFINE_config_file("config", None, "Study config file.")
    workdir = flags.DEFINE_string("workdir", None, "Where runs and the report go.")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(args):
        cli.start(args)
        try:
            check_no_per_run_keys(argv)
            run_study(cli.config_value(config_flag), workdir.value)
        except (ValueError, train.TrainingError) as error:
            cli.fail(cli.first_line(error))

    app.run(_main, argv=argv, flags_parser=cli.flags_parser(config_flag))


if __name__ == "__main__":
    main(sys.argv)
