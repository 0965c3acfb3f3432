"""Two CPU speed settings XLA does not pick by itself (BENCHMARKS.md has the numbers).

* Huge pages for large allocations. XLA:CPU allocates a step's temporaries
  afresh on every call (2.4 GB for ViT-Ti/16 at batch 32); glibc maps them
  with ``mmap`` and the kernel then faults them in 4 KiB at a time: 626,000
  page faults and 1.5 s of kernel time per step on the 2-core machine.
  ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` makes glibc ask for transparent
  huge pages instead (1,800 faults). glibc reads it only at process start,
  so the command-line entry points re-execute themselves once with it (same
  PID, same arguments); ``NOISY_FLAX_NO_REEXEC=1`` turns that off.
* What XLA:CPU hands to YNNPACK. By default YNNPACK runs the dots and the
  reductions; with dots left to Eigen and reductions kept in YNNPACK
  (``config.cpu_ynnpack = 'reductions'``, the default here) the train step
  was 1.6x faster for ResNet-18 at 224 px (BatchNorm statistics), 1.12x
  for ViT-Ti/16 at 224 px and 1.07x for ViT-Nano at 28 px, all with huge
  pages. Without YNNPACK at all, XLA's own tree reductions cost more still.
  ``'default'`` keeps XLA's choice.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
from typing import Any, Mapping, Optional

HUGE_PAGES = "glibc.malloc.hugetlb=1"
NO_REEXEC = "NOISY_FLAX_NO_REEXEC"
CPU_YNNPACK = ("reductions", "default")
DEFAULT_CPU_YNNPACK = "reductions"
_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
_REDUCTIONS_ONLY = "LIBRARY_FUSION_TYPE_REDUCE"


def environment_with_huge_pages(env: Mapping[str, str]) -> Optional[dict[str, str]]:
    """``env`` plus the huge-page tunable, or None when nothing should change
    (not glibc, opted out, or a hugetlb tunable already chosen)."""
    if env.get(NO_REEXEC) or platform.libc_ver()[0] != "glibc":
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command with huge-page malloc (see
    above); returns only when there is nothing to change. Call it first in
    a ``__main__`` block, before any heavy import."""
    env = environment_with_huge_pages(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps the interpreter's own options (-u, -X ...) and "-m module".
    os.execve(sys.executable, list(sys.orig_argv), env)


def cpu_ynnpack_choice(config) -> str:
    """``config.cpu_ynnpack`` (configs made before the key get the default), checked."""
    choice = config.get("cpu_ynnpack", DEFAULT_CPU_YNNPACK)
    if choice not in CPU_YNNPACK:
        raise ValueError(f"unknown config.cpu_ynnpack {choice!r}; use one of {', '.join(CPU_YNNPACK)}")
    return choice


def compiler_options(config) -> dict[str, Any]:
    """XLA options for jitting the steps of ``config`` on this backend."""
    choice = cpu_ynnpack_choice(config)
    if choice == "default" or _YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
        return {}  # XLA's default, or the user's own XLA_FLAGS choice
    import jax
    if jax.default_backend() != "cpu" or not _jaxlib_accepts(_YNN_FLAG, _REDUCTIONS_ONLY):
        return {}
    return {_YNN_FLAG: _REDUCTIONS_ONLY}


@functools.lru_cache(maxsize=None)
def _jaxlib_accepts(flag: str, value: str) -> bool:
    """Whether this jaxlib accepts ``flag=value`` (older and newer ones may not)."""
    import jax
    import jax.numpy as jnp
    try:
        jax.jit(jnp.negative).lower(jnp.zeros(2)).compile(compiler_options={flag: value})
    except Exception:  # XLA reports an unknown option as a generic error
        return False
    return True


if __name__ == "__main__":  # used by the tests: shows what a re-executed process sees
    reexec_with_huge_pages()
    print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""))
