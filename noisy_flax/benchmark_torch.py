"""The PyTorch reference for ``python -m noisy_flax.benchmark --vs-torch``.

The published NoisyNN code trains timm ViTs and torchvision ResNets with
AdamW; this times that same step (forward, cross-entropy, backward, AdamW)
at the same batch and resolution: fp32 on the CPU, bf16 autocast on a GPU,
optionally under ``torch.compile``; with ``--eval``, also the forward pass
alone. Needs the ``torch`` extra (torch, timm, torchvision).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Optional

from noisy_flax.benchmark import Case
from noisy_flax.cli import first_line

_RESNET = re.compile(r"resnet(\d+)$")


def available() -> bool:
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def create_model(name: str, num_classes: int = 1000):
    """timm for ViTs, torchvision for ResNets: what the published code used."""
    if _RESNET.match(name):
        import torchvision
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if name.startswith("vit_"):
        import timm
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise ValueError(f"no PyTorch reference for {name!r}; use a vit_* or resnet{{18,34,50,...}} name")


def configure_threads() -> int:
    """All cores for intra-op work, as XLA's CPU client uses them."""
    import torch
    threads = os.cpu_count() or 1
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


def _reference(model_name: str, batch: int, resolution: int, num_classes: int) -> _Reference:
    import torch
    threads = configure_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(model_name, num_classes).to(device)
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1).to(device)
    # fp32 on the CPU; bf16 compute under autocast on the GPU (AMP).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    return _Reference(threads, device, model, generator, images, autocast)


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
            "autocast": "bf16" if ref.device.type == "cuda" else "off (fp32)",
            "params": sum(p.numel() for p in ref.model.parameters())}
    return Case(name, run, info)


def train_case(model_name: str, batch: int, resolution: int, *, compile: bool = False,
               num_classes: int = 1000, lr: float = 1e-3, weight_decay: float = 1e-4) -> Case:
    """One AdamW training step of the PyTorch model, as a benchmark Case."""
    import torch
    ref = _reference(model_name, batch, resolution, num_classes)
    model = ref.model.train()
    # fp32 master weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                  fused=ref.device.type == "cuda")
    forward = torch.compile(model) if compile else model
    labels = torch.randint(0, num_classes, (batch,), generator=ref.generator).to(ref.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with ref.autocast:
            loss = torch.nn.functional.cross_entropy(forward(ref.images), labels)
        loss.backward()
        optimizer.step()

    return _case(f"torch train{' compiled' if compile else ''}", step, ref, compile)


def compiled_train_case(model_name: str, batch: int, resolution: int) -> Optional[Case]:
    """The train step under ``torch.compile``, or None (with a warning) where
    it does not compile: the issue asks for it "where it works", and a
    failure must not cost the other cases of the run."""
    try:
        return train_case(model_name, batch, resolution, compile=True)
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


def eval_case(model_name: str, batch: int, resolution: int, *,
              num_classes: int = 1000) -> Case:
    """One forward pass of the PyTorch model in eval mode, without autograd."""
    import torch
    ref = _reference(model_name, batch, resolution, num_classes)
    model = ref.model.eval()

    def step():
        with torch.inference_mode(), ref.autocast:
            model(ref.images)

    return _case("torch eval", step, ref)


def _now() -> float:
    import time
    return time.perf_counter()
