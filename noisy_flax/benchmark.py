"""Speed of the real train / eval steps: step time, images/s, FLOPs, utilisation.

    python -m noisy_flax.benchmark --model vit_tiny_patch16_224 --batch 32 --json
    python -m noisy_flax.benchmark --model vit_tiny_patch16_224 --noise all
    python -m noisy_flax.benchmark --model resnet18 --vs-torch      # needs the torch extra
    python -m noisy_flax.benchmark --input mock_imagenet            # tf.data throughput

Times the jitted step that ``noisy_flax.train`` builds, on synthetic data that
already sits on the device. Every configuration of one run is measured in
interleaved rounds (A B C A B C ...), so that load from other processes hits
all of them alike and their ratios stay meaningful on a busy machine.

Only the ``--input`` mode imports TensorFlow; everything else needs jax, flax,
optax, orbax-checkpoint and ml-collections alone (and torch for ``--vs-torch``).
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before heavy imports: see noisy_flax.cpu_tuning
    from noisy_flax import cpu_tuning
    cpu_tuning.reexec_with_fast_malloc()

import argparse
import dataclasses
import functools
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from noisy_flax import noise as noise_lib
from noisy_flax import cli, cpu_tuning, optim, sharding, train
from noisy_flax.models import VisionTransformer
from noisy_flax.models.common import apply_noise, apply_noise_to_patch_tokens

# Dense peak per chip in FLOP/s, without sparsity: (bf16, fp32). GPU "fp32" is
# the TF32 tensor-core figure: XLA runs f32 dots at default precision as TF32
# there. TPUs publish no fp32 peak (f32 dots are bf16 passes), so none is given.
PEAK_FLOPS = {
    "TPU v4": (275e12, None),
    "TPU v5 lite": (197e12, None),   # v5e
    "TPU v5e": (197e12, None),
    "TPU v5p": (459e12, None),
    "TPU v5": (459e12, None),        # v5p reports itself as "TPU v5"
    "TPU v6 lite": (918e12, None),   # v6e (Trillium)
    "TPU v6e": (918e12, None),
    "A100": (312e12, 156e12),
    "H100 PCIe": (756e12, 378e12),
    "H100 NVL": (835e12, 418e12),
    "H100": (989e12, 495e12),        # SXM
    "H200 NVL": (835e12, 418e12),
    "H200": (989e12, 495e12),        # SXM
}
NOISE_CHOICES = tuple(t for t in noise_lib.NOISE_TYPES)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------
def benchmark_config(model: str, batch: int, resolution: int, dtype: str = "float32",
                     noise: str = "none", remat: bool = False, num_classes: int = 1000,
                     model_kwargs: Optional[dict[str, Any]] = None,
                     cpu_ynnpack: str = cpu_tuning.DEFAULT_CPU_YNNPACK) -> ml_collections.ConfigDict:
    """The keys the model, optimizer and steps read, with ImageNet-like values.

    Built here rather than from configs.common, which imports the tf.data
    pipeline (and so TensorFlow).
    """
    c = ml_collections.ConfigDict()
    c.model, c.num_classes, c.image_size, c.dtype, c.remat = model, num_classes, resolution, dtype, remat
    c.model_kwargs = ml_collections.ConfigDict(model_kwargs or {})
    c.input = ml_collections.ConfigDict({"channels": 3})
    c.noise = noise_lib.noise_config(type=noise, site=default_noise_site(model))
    c.batch_size, c.grad_accum_steps, c.label_smoothing = batch, 1, 0.0
    c.optimizer, c.lr, c.end_lr, c.warmup_init_lr, c.schedule = "adamw", 1e-3, 0.0, 0.0, "cosine"
    c.weight_decay, c.wd_mask, c.b1, c.b2, c.eps = 1e-4, "kernels", 0.9, 0.999, 1e-8
    c.momentum, c.nesterov, c.grad_clip_norm = 0.9, False, 0.0
    c.seed, c.sharding = 0, "replicate"
    c.cpu_ynnpack = cpu_ynnpack
    return c


def parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """['num_layers=1', 'dropout_rate=0.1'] -> {'num_layers': 1, 'dropout_rate': 0.1}."""
    kwargs = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw
    return kwargs


def default_noise_site(model: str) -> str:
    """The published sites: last ViT block's attention input, ResNet block input."""
    return "block_input" if model.startswith("resnet") else "attn_input"


def parse_noises(text: str) -> list[str]:
    names = list(NOISE_CHOICES) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in NOISE_CHOICES:
            raise ValueError(f"unknown noise {name!r}; use 'all' or some of {', '.join(NOISE_CHOICES)}")
    if "none" in names:  # the reference comes first
        names.remove("none")
    return ["none"] + names


# ---------------------------------------------------------------------------
# Building the steps on synthetic, device-resident data
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One thing to time: ``run()`` does one blocking step."""
    name: str
    run: Callable[[], None]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    times: list[float] = dataclasses.field(default_factory=list)
    rounds: list[int] = dataclasses.field(default_factory=list)  # the round of each time
    step: Optional[Callable[[Any], None]] = None  # train cases: one step on a given batch


def synthetic_batch(config, mesh, with_mask: bool = False) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.image_size, config.image_size, config.input.channels)
    local = {"image": rng.uniform(-1, 1, shape).astype(np.float32),
             "label": rng.integers(0, config.num_classes, config.batch_size).astype(np.int32)}
    if with_mask:
        local["mask"] = np.ones(config.batch_size, np.int32)
    return sharding.global_batch(local, mesh)


def compile_timed(jitted, *args) -> tuple[Any, float]:
    """(compiled executable, seconds spent lowering and compiling)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def cost_flops(compiled) -> Optional[float]:
    """FLOPs of one call from XLA's cost analysis (None if the backend has none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


FUSED_ATTENTION_TARGET = "cudnn$fmha"  # cuDNN's fused attention custom calls


def fused_attention_flops(hlo_text: str, model, batch: int, resolution: int) -> float:
    """FLOPs of cuDNN's fused attention calls over the whole batch, which
    XLA's cost analysis does not count (a custom call it cannot see into):
    for each forward call 4 B Nq Nk D (Q.K^T and P.V over all heads of width
    D = heads x head_dim; Nq queries, Nk keys), for each backward call twice
    that. Nq and Nk come from the call's query and key operands, (batch,
    tokens, heads, head_dim); where the text does not show them, every token
    (patches + class token), as in self-attention."""
    if not isinstance(model, VisionTransformer):
        return 0.0
    tokens = (resolution // model.patch_size) ** 2 + 1
    total = 0.0
    for line in hlo_text.splitlines():
        if "custom_call_target=" not in line or FUSED_ATTENTION_TARGET not in line:
            continue
        operands = _OPERAND_SHAPE.findall(line.split("custom-call(", 1)[-1])
        queries, keys = (int(operands[0].split(",")[1]), int(operands[1].split(",")[1])) \
            if len(operands) >= 2 and operands[0].count(",") == 3 else (tokens, tokens)
        passes = 2 if "Backward" in line else 1
        total += passes * 4.0 * batch * queries * keys * model.hidden_size
    return total


_OPERAND_SHAPE = re.compile(r"\w+\[([\d,]+)\]")  # bf16[4,197,12,64] -> '4,197,12,64'


def cost_bytes(compiled) -> Optional[float]:
    """Bytes accessed per call by XLA's cost model: a load-independent proxy
    for the memory traffic that noise adds."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    value = (cost or {}).get("bytes accessed")
    return float(value) if value else None


def compiled_memory_bytes(compiled) -> Optional[int]:
    """Arguments + outputs + temporaries of the executable, as XLA plans them."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    aliased = getattr(m, "alias_size_in_bytes", 0)
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - aliased)


def check_same_model(jax_case: Case, torch_case: Case) -> None:
    """The two libraries' models must have the same parameters, and AdamW
    must decay the same ones, or their ratio compares different work."""
    for key, what in (("params", "parameters"), ("decayed_params", "weight-decayed parameters")):
        mine, theirs = jax_case.info.get(key), torch_case.info.get(key)
        if mine != theirs:
            count = lambda n: f"{n:,}" if isinstance(n, int) else "an unknown number of"  # noqa: E731
            raise ValueError(f"--vs-torch: the JAX model has {count(mine)} {what} and the PyTorch "
                             f"model {count(theirs)}; they must be the same model for the ratio "
                             "to mean anything")


def train_case(config, mesh, name: str) -> Case:
    """The jitted, donated, sharded train step of noisy_flax.train, ready to run."""
    model = train.build_model(config, mesh)
    tx, schedule = optim.make_optimizer(config, total_steps=10_000, warmup_steps=0)
    state, state_shardings = train.create_train_state(config, model, tx, mesh)
    batch = synthetic_batch(config, mesh)
    jitted = train.jit_train_step(model, tx, schedule, config, state_shardings, mesh)
    compiled, seconds = compile_timed(jitted, state, batch)
    log(f"{name}: compiled in {seconds:.1f}s")
    holder = {"state": state}

    def step(batch_):
        # Metrics stay on the device; blocking on the new state ends the step.
        holder["state"], _ = compiled(holder["state"], batch_)
        jax.block_until_ready(holder["state"])

    info = {"compile_s": seconds, **step_flops(compiled, model, config, mesh.size),
            "bytes_accessed": cost_bytes(compiled),
            "xla_memory_bytes": compiled_memory_bytes(compiled),
            "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
            "decayed_params": decayed_params(state.params)}
    return Case(name, lambda: step(batch), info, step=step)


def decayed_params(params) -> int:
    """How many parameter values AdamW's weight decay touches (the
    benchmark's ``wd_mask='kernels'``)."""
    mask = optim.decay_mask(params)
    return int(sum(np.prod(x.shape) for x, keep in zip(jax.tree.leaves(params),
                                                       jax.tree.leaves(mask)) if keep))


def step_flops(compiled, model, config, devices: int) -> dict[str, Any]:
    """FLOPs of one step on all ``devices`` together: XLA's count, which is
    per device for a program partitioned over a mesh, times the devices, plus
    what XLA leaves out: cuDNN's fused attention (GPU only), counted here for
    the whole batch."""
    flops, attention = cost_flops(compiled), 0.0
    if flops and jax.default_backend() == "gpu":
        attention = fused_attention_flops(compiled.as_text(), model, config.batch_size,
                                          config.image_size)
    total = flops * devices + attention if flops else flops
    return {"flops": total, "fused_attention_flops": attention, "devices": devices}


def eval_case(config, mesh, name: str) -> Case:
    model = train.build_model(config, mesh)
    tx, _ = optim.make_optimizer(config, total_steps=10_000, warmup_steps=0)
    state, _ = train.create_train_state(config, model, tx, mesh)
    batch = synthetic_batch(config, mesh, with_mask=True)
    key = jax.random.PRNGKey(1)
    jitted = jax.jit(train.make_eval_step(model, config),
                     compiler_options=cpu_tuning.compiler_options(config))
    compiled, seconds = compile_timed(jitted, state.params, state.batch_stats, batch, key)

    def run():
        jax.block_until_ready(compiled(state.params, state.batch_stats, batch, key))

    return Case(name, run, {"compile_s": seconds, **step_flops(compiled, model, config, mesh.size),
                            "xla_memory_bytes": compiled_memory_bytes(compiled)})


class _NoiseSite(nn.Module):
    """The noise exactly as the model applies it at its site, and nothing else."""
    noise: noise_lib.Noise
    grid: Optional[tuple[int, int]]  # ViT token sites: the patch grid

    @nn.compact
    def __call__(self, x):
        if self.grid is not None:
            return apply_noise_to_patch_tokens(self, self.noise, x, self.grid)
        return apply_noise(self, self.noise, x)


def noise_site_input(model, config) -> jax.ShapeDtypeStruct:
    """Shape of what the noise receives in a train step (from the model's own
    ``sow`` of the site input; nothing is computed)."""
    images = jax.ShapeDtypeStruct((config.batch_size, config.image_size, config.image_size,
                                   config.input.channels), train.DTYPES[config.dtype])
    key = jax.random.PRNGKey(0)
    rngs = {"params": key, "noise": key, "dropout": key}
    variables = jax.eval_shape(lambda r, x: model.init(r, x, train=False), rngs, images)
    _, state = jax.eval_shape(
        lambda v, r, x: model.apply(v, x, train=True, rngs=r,
                                    mutable=["intermediates", "batch_stats"]),
        variables, rngs, images)
    found = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
        state.get("intermediates", {}))[0] if "noise_input" in jax.tree_util.keystr(path)]
    if not found:
        raise ValueError(f"{config.model} applies no noise at {config.noise.site} in training")
    return found[0]


def noise_op_case(config, mesh, name: str) -> Case:
    """Forward and backward of the step's noise alone, on the site's tensor.

    Its time over the noiseless step time is the noise overhead, measured on
    milliseconds that repeat tightly, where the difference of two whole-step
    times drowns in the step's own spread on a CPU.
    """
    model = train.build_model(config, mesh)
    site = noise_site_input(model, config)
    grid = None
    if len(site.shape) == 3:  # ViT tokens: class token + a square patch grid
        side = config.image_size // getattr(model, "patch_size", 1)
        grid = (side, side)
    module = _NoiseSite(model.noise, grid)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=site.shape), site.dtype)
    cotangent = jnp.asarray(rng.normal(size=site.shape), site.dtype)
    key = jax.random.PRNGKey(0)

    def forward_backward(x, cotangent, key):
        out, pullback = jax.vjp(lambda x: module.apply({}, x, rngs={"noise": key}), x)
        return out, pullback(cotangent)[0]

    compiled, seconds = compile_timed(
        jax.jit(forward_backward, compiler_options=cpu_tuning.compiler_options(config)),
        x, cotangent, key)

    def run():
        jax.block_until_ready(compiled(x, cotangent, key))

    return Case(name, run, {"compile_s": seconds, "site_shape": list(site.shape)})


# ---------------------------------------------------------------------------
# Peak FLOP/s
# ---------------------------------------------------------------------------
def published_peak(device, dtype: str) -> Optional[float]:
    """The chip's published dense peak for ``dtype``; None if unknown."""
    kind = getattr(device, "device_kind", "")
    for name, (bf16, fp32) in PEAK_FLOPS.items():  # ordered: specific names first
        if name.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def mesh_peak(device, dtype: str, chips: int) -> tuple[Optional[float], str]:
    """(peak FLOP/s of ``chips`` chips like ``device``, its source): every
    chip of the mesh runs the step, and the step's FLOPs count them all."""
    peak = published_peak(device, dtype)
    if peak is None or chips == 1:
        return peak, "published"
    return peak * chips, f"published, x {chips} chips"


def matmul_case(n: int = 1024, dtype: str = "float32",
                cpu_ynnpack: str = cpu_tuning.DEFAULT_CPU_YNNPACK) -> Case:
    """A dense n x n matmul compiled as the steps are: one candidate for what
    the CPU's FLOP/s can reach in this run (the peak is the fastest candidate)."""
    jdtype = train.DTYPES[dtype]
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jdtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jdtype)
    options = cpu_tuning.compiler_options(ml_collections.ConfigDict({"cpu_ynnpack": cpu_ynnpack}))
    compiled = jax.jit(jnp.matmul, compiler_options=options).lower(a, b).compile()

    def run():
        jax.block_until_ready(compiled(a, b))

    return Case(f"matmul_{n}", run, {"flops": 2.0 * n ** 3})


def measure_matmul_peak(n: int = 1024, repeats: int = 10, dtype: str = "float32") -> float:
    """FLOP/s of the fastest of ``repeats`` n x n matmuls (a stand-alone call)."""
    case = matmul_case(n, dtype)
    case.run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        case.run()
        times.append(time.perf_counter() - start)
    return case.info["flops"] / min(times)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
def log(message: str) -> None:
    """Progress on stderr, so that stdout stays a table / JSON lines."""
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def interleave(cases: Sequence[Case], steps: int, warmup: int, chunk: int = 5) -> None:
    """Times ``steps`` runs of every case in rounds of ``chunk``.

    Each round starts with one untimed run, so that a case never pays for the
    previous one's caches or lingering worker threads, and the order rotates
    from round to round: in a fixed order, A/A runs of one step timed the
    first case 15-25% slower than its identical twin on a loaded machine.
    """
    for case in cases:
        for _ in range(warmup):
            case.run()
    log(f"warm-up done; timing {steps} steps of {len(cases)} cases in rounds of {chunk}")
    round_index = 0
    while any(len(c.times) < steps for c in cases):
        log("round: " + ", ".join(f"{c.name} {len(c.times)}/{steps}" for c in cases))
        shift = round_index % len(cases)
        round_index += 1
        for case in list(cases[shift:]) + list(cases[:shift]):
            todo = min(chunk, steps - len(case.times))
            if todo <= 0:
                continue
            case.run()
            for _ in range(todo):
                start = time.perf_counter()
                case.run()
                case.times.append(time.perf_counter() - start)
                case.rounds.append(round_index)


def paired_ratio(case: Case, reference: Case) -> Optional[float]:
    """Median over rounds of (case's median / reference's median in that round).

    Robust to load that drifts during a run: each round compares times taken
    minutes apart at most, where whole-run medians compare all of them.
    """
    ratios = []
    for r in sorted(set(case.rounds) & set(reference.rounds)):
        mine = [t for t, q in zip(case.times, case.rounds) if q == r]
        theirs = [t for t, q in zip(reference.times, reference.rounds) if q == r]
        ratios.append(statistics.median(mine) / statistics.median(theirs))
    return statistics.median(ratios) if ratios else None


def summarize(case: Case, batch: int, peak: Optional[float]) -> dict[str, Any]:
    times = sorted(case.times)
    median = statistics.median(times)
    row = {"name": case.name, "steps": len(times), "step_ms_median": 1e3 * median,
           "step_ms": [round(1e3 * t, 2) for t in case.times],
           "step_ms_p10": 1e3 * float(np.percentile(times, 10)),
           "step_ms_p90": 1e3 * float(np.percentile(times, 90)),
           "spread_pct": 100 * (float(np.percentile(times, 90)) - float(np.percentile(times, 10))) / median,
           "images_per_s": batch / median}
    row.update({k: v for k, v in case.info.items()})
    flops = case.info.get("flops")
    if flops:
        row["flops_per_s"] = flops / median
        if peak:
            row["utilisation"] = flops / median / peak
    return row


def peak_memory_bytes(device) -> Optional[int]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    device = jax.devices()[0]
    env = {"backend": jax.default_backend(), "device_kind": device.device_kind,
           "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
           "cpu_model": cpu_model(), "cpu_vendor": cpu_vendor(),
           # virtual machines often hide the model number in the name ("AMD EPYC")
           "cpu_family_model": cpu_family_model(),
           "python": platform.python_version(),
           "jax": jax.__version__, "jaxlib": _version("jaxlib"), "flax": _version("flax"),
           "optax": _version("optax"), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           # the allocator matters on the CPU (noisy_flax.cpu_tuning)
           "ld_preload": os.environ.get("LD_PRELOAD", ""),
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
           # set: compile_s may be a load from JAX's persistent cache
           "compilation_cache_dir": jax.config.jax_compilation_cache_dir or ""}
    return env


def _cpuinfo(field: str) -> Optional[str]:
    """The first processor's ``field`` in /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor()


def cpu_family_model() -> str:
    """``family/model`` in decimal as /proc/cpuinfo gives them (``25/17`` is
    AMD Zen 4, ``26/2`` Zen 5), or '' where unknown."""
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    return f"{family}/{model}" if family and model else ""


def cpu_vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... ('' where unknown): PyTorch's
    BLAS picks its kernels by it (benchmark_torch.mkl_generic_path)."""
    return _cpuinfo("vendor_id") or ""


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "?"


def print_table(rows: Sequence[dict[str, Any]], out=None) -> None:
    out = out or sys.stdout
    head = f"{'case':<34}{'compile s':>10}{'step ms':>10}{'p10-p90 %':>10}{'img/s':>9}" \
           f"{'GFLOP':>9}{'GFLOP/s':>10}{'util %':>8}{'vs ref':>8}{'paired':>8}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        def fmt(key, spec, scale=1.0):
            v = r.get(key)
            return format(v * scale, spec) if isinstance(v, (int, float)) else format("-", spec.split(".")[0].rstrip("f") or ">")
        print(f"{r['name']:<34}{fmt('compile_s', '>10.1f')}{fmt('step_ms_median', '>10.1f')}"
              f"{fmt('spread_pct', '>10.1f')}{fmt('images_per_s', '>9.2f')}"
              f"{fmt('flops', '>9.1f', 1e-9)}{fmt('flops_per_s', '>10.1f', 1e-9)}"
              f"{fmt('utilisation', '>8.1f', 100)}{fmt('ratio', '>8.3f')}"
              f"{fmt('ratio_paired', '>8.3f')}", file=out)


def emit_json(rows: Sequence[dict[str, Any]], common: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    for r in rows:
        print(json.dumps({**common, **r}, default=float), file=out)


# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------
def run_steps(args) -> list[dict[str, Any]]:
    """Train (and eval) steps for every noise, plus the CPU matmul peak, interleaved."""
    if args.vs_torch:
        from noisy_flax import benchmark_torch  # torch is an optional extra
        if not benchmark_torch.available():
            raise ValueError("--vs-torch needs torch, timm and torchvision: "
                             "pip install -e '.[torch]' (or run from a venv that has them)")
        benchmark_torch.check_reference(args.model)
        if args.model_kwarg:
            raise ValueError("--vs-torch times the published model, which --model-kwarg does not "
                             "change; drop --model-kwarg (--compare-model-kwarg adds JAX cases)")
    mesh = sharding.create_mesh([("data", -1), ("fsdp", 1)])
    model_kwargs = parse_model_kwargs(args.model_kwarg)
    config_for = functools.partial(benchmark_config, args.model, args.batch, args.resolution,
                                   args.dtype, model_kwargs=model_kwargs)
    cases, noisy_configs = [], []
    for noise in parse_noises(args.noise):
        config = config_for(noise=noise, remat=args.remat, cpu_ynnpack=args.cpu_ynnpack)
        cases.append(train_case(config, mesh, f"jax train noise={noise}"))
        if noise != "none":
            noisy_configs.append(config)
    for other in args.compare_cpu_ynnpack:  # the same noiseless step, compiled otherwise
        config = config_for(remat=args.remat, cpu_ynnpack=other)
        cases.append(train_case(config, mesh, f"jax train cpu_ynnpack={other}"))
    for item in args.compare_model_kwarg:  # the same noiseless step, with one model override
        config = config_for(remat=args.remat, cpu_ynnpack=args.cpu_ynnpack,
                            model_kwargs={**model_kwargs, **parse_model_kwargs([item])})
        cases.append(train_case(config, mesh, f"jax train {item}"))
    for config in noisy_configs:
        cases.append(noise_op_case(config, mesh, f"noise op {config.noise.type} (fwd+bwd)"))
    if args.eval:
        config = config_for(cpu_ynnpack=args.cpu_ynnpack)
        cases.append(eval_case(config, mesh, "jax eval noise=none"))
    device = jax.devices()[0]
    cpu = jax.default_backend() == "cpu"
    peak, peak_source = mesh_peak(device, args.dtype, mesh.size)
    peak_cases = []
    if cpu:
        # Measured in the same rounds as the steps, so it sees the same load;
        # the fastest of several sizes (and libraries), so it is a peak.
        peak_cases = [matmul_case(n, args.dtype, args.cpu_ynnpack) for n in args.matmul_sizes]
    torch_cases = []
    if args.vs_torch:
        from noisy_flax import benchmark_torch
        torch_cases = [benchmark_torch.train_case(args.model, args.batch, args.resolution,
                                                  dtype=args.dtype)]
        check_same_model(cases[0], torch_cases[0])
        if args.torch_compile:
            compiled = benchmark_torch.compiled_train_case(args.model, args.batch, args.resolution,
                                                           args.dtype)
            torch_cases += [compiled] if compiled is not None else []
        if args.eval:
            torch_cases.append(benchmark_torch.eval_case(args.model, args.batch, args.resolution,
                                                         dtype=args.dtype))
        if cpu and args.dtype == "float32":
            peak_cases.append(benchmark_torch.matmul_case(max(args.matmul_sizes)))
    interleave(cases + torch_cases + peak_cases, args.steps, args.warmup, args.chunk)
    matmul_rates = {c.name: c.info["flops"] / statistics.median(c.times) for c in peak_cases}
    if matmul_rates:
        fastest = max(matmul_rates, key=matmul_rates.get)
        peak, peak_source = matmul_rates[fastest], f"measured: fastest matmul ({fastest})"
    # Off the CPU a chip without a published peak gets no utilisation: a
    # matmul there is no peak either.
    rows = [summarize(c, args.batch, peak) for c in cases + torch_cases]
    reference = rows[0]["step_ms_median"]
    jax_eval_case = next((c for c in cases if c.name.startswith("jax eval")), None)
    for row, case in zip(rows, cases + torch_cases):
        # Step time / the reference's, per round: the eval steps against JAX's
        # eval step, everything else against JAX's noiseless train step.
        is_eval = case.name in ("torch eval", "jax eval noise=none")
        paired_with = jax_eval_case if is_eval else cases[0]
        if paired_with is not None:
            row["ratio_paired"] = paired_ratio(case, paired_with)
        if row["name"].startswith("jax train"):
            row["ratio"] = row["step_ms_median"] / reference  # noise overhead: step time ratio
            row["overhead_pct"] = 100 * (row["ratio"] - 1)
            if rows[0].get("bytes_accessed") and row.get("bytes_accessed"):
                row["bytes_ratio"] = row["bytes_accessed"] / rows[0]["bytes_accessed"]
        elif row["name"].startswith("noise op"):
            # The noise's own time as a share of the noiseless step.
            row["ratio"] = row["step_ms_median"] / reference
            row["overhead_pct"] = 100 * row["ratio"]
    for row in rows:
        row.update(peak_flops_per_s=peak, peak_source=peak_source if peak else "unknown")
        if matmul_rates:
            row["matmul_flops_per_s"] = matmul_rates
    # The allocator's peak since the process started: the largest case's, not
    # each row's own (that is xla_memory_bytes); hence the key's name.
    mem = peak_memory_bytes(device)
    if mem is not None:
        for row in rows:
            row["process_peak_device_memory_bytes"] = mem
    jax_eval = next((row for row in rows[:len(cases)] if row["name"].startswith("jax eval")), None)
    for torch_row in rows[len(cases):]:
        # For PyTorch rows the ratio is images/s JAX (no noise) / PyTorch: the
        # train step against the train step, the forward pass against the eval step.
        jax_row = jax_eval if torch_row["name"] == "torch eval" else rows[0]
        torch_row["ratio"] = jax_row["images_per_s"] / torch_row["images_per_s"]
        jax_row["jax_over_" + torch_row["name"].replace(" ", "_")] = torch_row["ratio"]
    return rows


# ---------------------------------------------------------------------------
# Input pipeline (the only mode that imports TensorFlow)
# ---------------------------------------------------------------------------
def input_config(args):
    """The experiment config whose tf.data stream feeds the train step."""
    from configs import common  # imports the tf.data pipeline, hence TensorFlow
    c = common.base_config()
    c.model, c.batch_size, c.image_size = args.model, args.batch, args.resolution
    if args.input == "fashion_mnist":  # as configs/fashion_mnist.py reads it
        c.dataset, c.num_classes = "fashion_mnist", 10
        c.input.channels, c.input.train_crop, c.input.cache = 1, "none", True
        if args.resolution != 28:
            c.input.train_crop = "resize"
    else:  # ImageNet-style: JPEG decode, inception crop, flip
        c.dataset, c.num_classes = "imagenet2012", 1000
        c.input.shuffle_buffer = 256
    return c


def write_mock_jpegs(directory: str, count: int, size=(375, 500), seed: int = 0) -> list[str]:
    """``count`` JPEGs of a typical ImageNet size with smooth, photo-like content
    (so they compress, and decode, like photographs rather than noise)."""
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.uniform(0, 255, (size[0] // 25, size[1] // 25, 3)).astype(np.float32)
        image = tf.image.resize(coarse[None], size, method="bicubic")[0]
        image = image + rng.normal(0, 8, image.shape)
        encoded = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8), quality=90)
        path = os.path.join(directory, f"mock_{i:05d}.JPEG")
        tf.io.write_file(path, encoded)
        paths.append(path)
    return paths


def mock_imagenet_source(paths: Sequence[str]):
    """A tfds ``_as_dataset`` replacement: encoded JPEG bytes read from disk."""
    import tensorflow as tf
    labels = np.arange(len(paths)) % 1000

    def as_dataset(self, *unused_args, **unused_kwargs):
        files = tf.data.Dataset.from_tensor_slices((list(paths), labels))
        return files.map(lambda path, label: {"image": tf.io.read_file(path), "label": label})
    return as_dataset


def time_iterator(iterator, batches: int, skip: int = 3) -> list[float]:
    """Seconds per batch of ``batches`` batches after ``skip`` warm-up ones."""
    for _ in range(skip):
        next(iterator)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        next(iterator)
        times.append(time.perf_counter() - start)
    return times


def run_input(args) -> list[dict[str, Any]]:
    """tf.data images/s alone, the train step's images/s on synthetic data, and the
    train step fed by tf.data: the pipeline is no bottleneck when the last two match."""
    import contextlib
    import tempfile

    from noisy_flax import input_pipeline
    config = input_config(args)
    with contextlib.ExitStack() as stack:
        if args.input == "mock_imagenet":
            import tensorflow_datasets as tfds
            directory = stack.enter_context(tempfile.TemporaryDirectory())
            paths = write_mock_jpegs(directory, args.mock_images)
            stack.enter_context(tfds.testing.mock_data(
                num_examples=len(paths), as_dataset_fn=mock_imagenet_source(paths)))
        pipeline = Case("tf.data train stream", lambda: None)
        pipeline.times = time_iterator(input_pipeline.train_iterator(config), args.input_batches)

        mesh = sharding.create_mesh([("data", -1), ("fsdp", 1)])
        step_config = benchmark_config(args.model, args.batch, args.resolution, args.dtype,
                                       num_classes=config.num_classes,
                                       model_kwargs=parse_model_kwargs(args.model_kwarg),
                                       cpu_ynnpack=args.cpu_ynnpack)
        step_config.input.channels = config.input.channels
        synthetic = train_case(step_config, mesh, "jax train, synthetic batch")
        fed = fed_train_case(synthetic, input_pipeline.train_iterator(config), mesh)
        interleave([synthetic, fed], args.steps, args.warmup, args.chunk)
    rows = [summarize(c, args.batch, None) for c in (pipeline, synthetic, fed)]
    rows[0]["ratio"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]  # supply / demand
    rows[2]["ratio"] = rows[2]["step_ms_median"] / rows[1]["step_ms_median"]  # slowdown
    for row in rows:
        row["input"] = args.input
    return rows


def fed_train_case(synthetic: Case, iterator, mesh) -> Case:
    """The same compiled step (and state), each time on the next tf.data batch."""
    return Case("jax train, tf.data batch",
                lambda: synthetic.step(sharding.global_batch(next(iterator), mesh)))


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every entry point reports a user error
        cli.fail(f"{message} (see --help)")


def _at_least(lowest: int):
    def integer(text: str) -> int:  # argparse names it in "invalid integer value"
        value = int(text)
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{value} is below {lowest}")
        return value
    return integer


def parse_args(argv: Optional[Sequence[str]] = None):
    p = _ArgumentParser(prog="python -m noisy_flax.benchmark", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224",
                   help="registry name (default: %(default)s)")
    p.add_argument("--batch", type=_at_least(1), default=32, help="images per step (default: %(default)s)")
    p.add_argument("--resolution", type=_at_least(1),
                   help="image side (default: the model's own: 224, 384 or 28 as in its name)")
    p.add_argument("--dtype", choices=tuple(train.DTYPES), default="float32")
    p.add_argument("--noise", default="none",
                   help="comma-separated noise types, or 'all'; 'none' is always the reference")
    p.add_argument("--model-kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="model override, e.g. num_layers=2 (repeatable)")
    p.add_argument("--remat", action="store_true", help="rematerialise each ViT block")
    p.add_argument("--cpu-ynnpack", choices=cpu_tuning.CPU_YNNPACK,
                   default=cpu_tuning.DEFAULT_CPU_YNNPACK,
                   help="what XLA:CPU hands to YNNPACK, as config.cpu_ynnpack")
    p.add_argument("--compare-cpu-ynnpack", action="append", default=[],
                   choices=cpu_tuning.CPU_YNNPACK,
                   help="also time the noiseless train step with this cpu_ynnpack (repeatable)")
    p.add_argument("--compare-model-kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="also time the noiseless train step with this model override added, "
                        "e.g. last_block_all_tokens=true (repeatable)")
    p.add_argument("--eval", action="store_true",
                   help="also time the eval step (with --vs-torch: and PyTorch's forward pass)")
    p.add_argument("--vs-torch", action="store_true", help="also time timm / torchvision")
    p.add_argument("--torch-compile", action="store_true",
                   help="with --vs-torch: also time the torch.compile'd PyTorch model")
    p.add_argument("--steps", type=_at_least(1), default=20, help="timed steps per case")
    p.add_argument("--warmup", type=_at_least(0), default=3, help="untimed steps per case first")
    p.add_argument("--chunk", type=_at_least(1), default=5, help="timed steps per case per round")
    p.add_argument("--matmul-sizes", type=lambda text: [int(n) for n in text.split(",")],
                   default=[1024, 2048],
                   help="CPU: square matmuls timed beside the steps; the fastest is the peak")
    p.add_argument("--input", choices=("fashion_mnist", "mock_imagenet"),
                   help="measure the tf.data pipeline instead of the steps")
    p.add_argument("--input-batches", type=_at_least(1), default=30, help="tf.data batches to time")
    p.add_argument("--mock-images", type=_at_least(1), default=300, help="JPEGs for mock_imagenet")
    p.add_argument("--json", action="store_true", help="JSON lines only")
    args = p.parse_args(argv)
    from noisy_flax.models import create_model, input_size
    overrides = parse_model_kwargs(args.model_kwarg + args.compare_model_kwarg)
    try:  # the name and every override, before anything compiles
        model = create_model(args.model, num_classes=10, **overrides)
    except ValueError as error:
        cli.fail(cli.first_line(error))
    except TypeError as error:  # a keyword the model does not take
        cli.fail(f"{cli.first_line(error)}; a --model-kwarg names a field of the model, "
                 "e.g. num_layers=2")
    if args.resolution is None:
        args.resolution = input_size(model)
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    env = environment()
    common = {"model": args.model, "batch": args.batch, "resolution": args.resolution,
              "dtype": args.dtype, **env}
    try:
        rows = run_input(args) if args.input else run_steps(args)
    except ValueError as error:  # a bad model, noise or override: before any timing
        cli.fail(cli.first_line(error))
    if args.json:
        emit_json(rows, common)
    else:
        print(f"{args.model} batch {args.batch} at {args.resolution}px, {args.dtype} on "
              f"{env['device_count']}x {env['device_kind']} ({env['cpu_model']}"
              f"{', family/model ' + env['cpu_family_model'] if env['cpu_family_model'] else ''}, "
              f"{env['cpu_count']} CPUs), jax {env['jax']}")
        print_table(rows)
        if rows and rows[0].get("peak_flops_per_s"):
            print(f"util % against {rows[0]['peak_flops_per_s'] / 1e9:,.0f} GFLOP/s "
                  f"({rows[0]['peak_source']})")
        if any(row.get("mkl_generic_path") for row in rows):
            from noisy_flax import benchmark_torch
            print(benchmark_torch.MKL_GENERIC_PATH_WARNING.format(vendor=env["cpu_vendor"]))
        emit_json(rows, common)
    return rows


if __name__ == "__main__":
    main()
