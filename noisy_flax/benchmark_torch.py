"""The PyTorch reference for ``python -m noisy_flax.benchmark --vs-torch``.

The published NoisyNN code trains timm ViTs and torchvision ResNets with
AdamW; this times that same step (forward, cross-entropy, backward, AdamW)
at the same batch and resolution: fp32 on the CPU, bf16 autocast on a GPU,
optionally under ``torch.compile``; with ``--eval``, also the forward pass
alone. The dtype policy follows the JAX step's ``--dtype``: float32, or bf16
compute under autocast with fp32 master weights. AdamW decays what the JAX
step decays: the weights of the linear and convolution layers. Needs the
``torch`` extra (torch, timm, torchvision).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Optional

from noisy_flax.benchmark import Case, cpu_vendor
from noisy_flax.cli import first_line

_RESNET = re.compile(r"resnet(\d+)$")

# Built and preloaded by `bash benchmarks/run_cpu.sh mkl_intel_path`.
MKL_INTEL_PATH_LIBRARY = "libmkl_intel_path.so"
MKL_GENERIC_PATH_WARNING = (
    "warning: PyTorch's oneMKL runs its generic code path on this {vendor} CPU, slower than its "
    "cores allow, so the JAX / PyTorch ratios flatter JAX; `bash benchmarks/run_cpu.sh "
    "mkl_intel_path` times PyTorch on the kernels of the CPU's instruction set (BENCHMARKS.md)")


def mkl_generic_path(vendor: str, ld_preload: str, mkl: bool) -> bool:
    """Whether PyTorch's BLAS runs slower than this CPU allows: oneMKL picks its
    kernels by vendor, and off Intel processors takes a generic path (on the
    AVX-512 AMD EPYC of BENCHMARKS.md, torch.mm 2048 at 165-172 GFLOP/s against
    420-444 on its AVX-512 path) unless benchmarks/mkl_intel_path.c is preloaded."""
    return mkl and vendor not in ("", "GenuineIntel") and MKL_INTEL_PATH_LIBRARY not in ld_preload


def available() -> bool:
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def check_reference(name: str) -> None:
    """A ValueError, before anything compiles, where neither timm (ViTs) nor
    torchvision (ResNets) publishes a model of this name, e.g. the registry's
    own small models."""
    if _RESNET.match(name):
        import torchvision
        known = hasattr(torchvision.models, name)
    elif name.startswith("vit_"):
        import timm
        known = timm.is_model(name)
    else:
        known = False
    if not known:
        raise ValueError(f"no PyTorch reference for {name!r}: --vs-torch needs a model timm or "
                         "torchvision publishes under the same name, e.g. vit_tiny_patch16_224 "
                         "or resnet18")


def create_model(name: str, num_classes: int = 1000, resolution: int = 224):
    """timm for ViTs (position embeddings for ``resolution``), torchvision for
    ResNets: what the published code used."""
    check_reference(name)
    if _RESNET.match(name):
        import torchvision
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    import timm
    return timm.create_model(name, pretrained=False, num_classes=num_classes,
                             img_size=resolution)


def configure_threads() -> int:
    """One intra-op thread per core this process may run on: what XLA's CPU
    client takes (the affinity mask, not os.cpu_count(), under taskset or a
    cpuset)."""
    import torch
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


@dataclasses.dataclass
class _Reference:
    """What both PyTorch cases set up alike: model, synthetic images, policy."""
    threads: int
    device: Any
    model: Any
    generator: Any  # drew the images; the train step draws its labels next
    images: Any
    autocast: Any
    bf16: bool  # autocast on


def _reference(model_name: str, batch: int, resolution: int, num_classes: int,
               dtype: str) -> _Reference:
    import torch
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"no PyTorch dtype policy for {dtype!r}; use float32 or bfloat16")
    threads = configure_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(model_name, num_classes, resolution).to(device)
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1).to(device)
    # As the JAX step: fp32, or bf16 compute on fp32 weights (AMP).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    return _Reference(threads, device, model, generator, images, autocast, dtype == "bfloat16")


def _case(name: str, step, ref: _Reference, compile: bool = False) -> Case:
    """``step`` made blocking, run once (optimizer state, compilation), as a Case."""
    import torch

    def run():
        step()
        if ref.device.type == "cuda":
            torch.cuda.synchronize()

    start = _now()
    run()
    info = {"compile_s": _now() - start, "torch": torch.__version__, "torch_threads": ref.threads,
            "torch_device": str(ref.device), "torch_compile": compile,
            "autocast": "bf16" if ref.bf16 else "off (fp32)",
            "params": sum(p.numel() for p in ref.model.parameters())}
    if ref.device.type == "cpu":
        info["mkl_generic_path"] = mkl_generic_path(cpu_vendor(), os.environ.get("LD_PRELOAD", ""),
                                                    torch.backends.mkl.is_available())
    return Case(name, run, info)


def decay_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on the weights of linear and convolution
    layers only, as the JAX step's ``wd_mask='kernels'``; none on biases,
    norms, the class token and position embeddings."""
    import torch
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, layers)}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


def train_case(model_name: str, batch: int, resolution: int, *, dtype: str = "float32",
               compile: bool = False, num_classes: int = 1000, lr: float = 1e-3,
               weight_decay: float = 1e-4) -> Case:
    """One AdamW training step of the PyTorch model, as a benchmark Case."""
    import torch
    ref = _reference(model_name, batch, resolution, num_classes, dtype)
    model = ref.model.train()
    groups = decay_groups(model, weight_decay)
    # fp32 master weights
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=ref.device.type == "cuda")
    forward = torch.compile(model) if compile else model
    labels = torch.randint(0, num_classes, (batch,), generator=ref.generator).to(ref.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with ref.autocast:
            loss = torch.nn.functional.cross_entropy(forward(ref.images), labels)
        loss.backward()
        optimizer.step()

    case = _case(f"torch train{' compiled' if compile else ''}", step, ref, compile)
    case.info["decayed_params"] = sum(p.numel() for p in groups[0]["params"])
    return case


def compiled_train_case(model_name: str, batch: int, resolution: int,
                        dtype: str = "float32") -> Optional[Case]:
    """The train step under ``torch.compile``, or None (with a warning) where
    it does not compile: the issue asks for it "where it works", and a
    failure must not cost the other cases of the run."""
    try:
        return train_case(model_name, batch, resolution, dtype=dtype, compile=True)
    except Exception as error:  # inductor raises many types (no compiler, unsupported op)
        print(f"warning: torch.compile failed, its case is left out: "
              f"{type(error).__name__}: {first_line(error)[:200]}", file=sys.stderr, flush=True)
        return None


def matmul_case(n: int) -> Case:
    """An n x n fp32 torch.mm on the CPU: one more candidate for the peak,
    since PyTorch's BLAS can be faster than XLA's on the same cores."""
    import torch
    configure_threads()
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    return Case(f"torch.mm {n}", lambda: torch.mm(a, b), {"flops": 2.0 * n ** 3})


def eval_case(model_name: str, batch: int, resolution: int, *, dtype: str = "float32",
              num_classes: int = 1000) -> Case:
    """One forward pass of the PyTorch model in eval mode, without autograd."""
    import torch
    ref = _reference(model_name, batch, resolution, num_classes, dtype)
    model = ref.model.eval()

    def step():
        with torch.inference_mode(), ref.autocast:
            model(ref.images)

    return _case("torch eval", step, ref)


def _now() -> float:
    import time
    return time.perf_counter()
