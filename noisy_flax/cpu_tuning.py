"""CPU speed settings XLA does not pick by itself (BENCHMARKS.md has the numbers).

* A malloc that keeps the step's memory. XLA:CPU allocates a step's
  temporaries afresh on every call (2.1-2.4 GB for ViT-Ti/16 at batch 32).
  glibc maps a block that large with ``mmap`` and unmaps it on free, so the
  kernel faults it in again on every step: 626,000 page faults and 1.5 s of
  kernel time per step on the 2-core machine. Two remedies, applied at
  start-up since both are read only then:
  - TCMalloc (gperftools; Debian's ``libtcmalloc-minimal4``), where
    installed, is preloaded. It keeps freed memory for the next step: no
    faults, and 0.67-0.84x the ViT-Ti/16 step time of glibc with huge pages.
  - ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` makes glibc ask for
    transparent huge pages (1,800 faults of 2 MiB); it is what glibc's own
    malloc runs with when TCMalloc is absent.
  The command-line entry points re-execute themselves once with these
  (same PID, same arguments). ``NOISY_FLAX_NO_TCMALLOC=1`` keeps glibc's
  malloc; ``NOISY_FLAX_NO_REEXEC=1`` turns both off.
* What XLA:CPU hands to YNNPACK. By default YNNPACK runs the dots and the
  reductions; with dots left to Eigen and reductions kept in YNNPACK
  (``config.cpu_ynnpack = 'reductions'``, the default here) the train step
  was 1.6x faster for ResNet-18 at 224 px (BatchNorm statistics), 1.12x
  for ViT-Ti/16 at 224 px and 1.07x for ViT-Nano at 28 px, all with huge
  pages. Without YNNPACK at all, XLA's own tree reductions cost more still.
  ``'default'`` keeps XLA's choice.
"""
from __future__ import annotations

import ctypes.util
import functools
import os
import platform
import sys
from typing import Any, Callable, Mapping, Optional

HUGE_PAGES = "glibc.malloc.hugetlb=1"
NO_REEXEC = "NOISY_FLAX_NO_REEXEC"
NO_TCMALLOC = "NOISY_FLAX_NO_TCMALLOC"
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # gperftools' two builds
CPU_YNNPACK = ("reductions", "default")
DEFAULT_CPU_YNNPACK = "reductions"
_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
_REDUCTIONS_ONLY = "LIBRARY_FUSION_TYPE_REDUCE"


def find_tcmalloc() -> Optional[str]:
    """The name of an installed TCMalloc library, for ``LD_PRELOAD``, or None."""
    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def environment_with_fast_malloc(
        env: Mapping[str, str],
        find_allocator: Callable[[], Optional[str]] = find_tcmalloc) -> Optional[dict[str, str]]:
    """``env`` plus TCMalloc (where installed) and the huge-page tunable, or
    None when nothing should change: not glibc, opted out, or both already
    chosen (by an earlier start or by the user)."""
    if _opted_out(env, NO_REEXEC) or platform.libc_ver()[0] != "glibc":
        return None
    new = dict(env)
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        new["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
    preload = env.get("LD_PRELOAD", "")
    # Any preloaded *malloc* (tcmalloc, jemalloc, mimalloc) is the user's choice.
    if not _opted_out(env, NO_TCMALLOC) and "malloc" not in preload:
        allocator = find_allocator()
        if allocator:
            new["LD_PRELOAD"] = f"{allocator}:{preload}" if preload else allocator
    return None if new == dict(env) else new


def _opted_out(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip() not in ("", "0")  # "0" keeps the setting on


def started_as_entry_point(orig_argv) -> bool:
    """``python [options] -m noisy_flax.<module>``: this command may be
    restarted. A host program that runs the module inside itself (runpy,
    IPython's %run -m) would restart from its own beginning."""
    args = list(orig_argv)
    modules = [b for a, b in zip(args, args[1:]) if a == "-m"]  # "-m module"
    modules += [a[2:] for a in args if a.startswith("-m")]  # "-mmodule"
    return any(m.startswith("noisy_flax.") for m in modules)


def reexec_with_fast_malloc() -> None:
    """Replaces this process by the same command with the malloc settings
    above; returns only when there is nothing to change. Call it first in a
    ``__main__`` block, before any heavy import."""
    env = environment_with_fast_malloc(os.environ)
    if env is None or not started_as_entry_point(sys.orig_argv):
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
    reexec_with_fast_malloc()
    import json
    with open("/proc/self/maps") as maps:
        mapped = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in maps if "malloc" in line})
    print(json.dumps({"pid": os.getpid(), "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
                      "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""), "mapped": mapped}))
