"""noisy_flax.cpu_tuning: huge-page malloc by re-exec, and the CPU dot library."""
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from noisy_flax import cpu_tuning

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc")


@glibc_only
def test_environment_gains_the_tunable_once_and_keeps_the_others():
    env = cpu_tuning.environment_with_huge_pages({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = cpu_tuning.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    # Already chosen (by us or by the user), or opted out: nothing to do.
    assert cpu_tuning.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert cpu_tuning.environment_with_huge_pages({"NOISY_FLAX_NO_REEXEC": "1"}) is None


def _run_module(env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "NOISY_FLAX_NO_REEXEC")}
    env.update(env_overrides)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "noisy_flax.cpu_tuning"], env=env,
                            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(
                                os.path.abspath(cpu_tuning.__file__))))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    pid, _, tunables = out.strip().partition(" ")
    return proc.pid, int(pid), tunables


@glibc_only
def test_entry_point_reexecutes_itself_in_place_with_huge_pages():
    started, running, tunables = _run_module({})
    assert running == started  # execve: the same process, so signals and launchers still reach it
    assert tunables == "glibc.malloc.hugetlb=1"
    _, _, tunables = _run_module({"NOISY_FLAX_NO_REEXEC": "1"})
    assert tunables == ""


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return "[never]"


FAULTS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 * 2**20  # written once, as XLA:CPU writes a step's temporaries
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc.memset(ctypes.c_void_p(libc.malloc(size)), 1, ctypes.c_size_t(size))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@glibc_only
@pytest.mark.skipif("[never]" in _thp_mode(), reason="transparent huge pages are off")
def test_huge_page_tunable_cuts_page_faults_of_a_large_allocation():
    def faults(tunables):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True,
                             text=True, check=True, timeout=60).stdout
        return int(out)
    small_pages = faults("")
    assert small_pages >= 0.9 * 256 * 2**20 / 4096  # one fault per 4 KiB page
    assert faults(cpu_tuning.HUGE_PAGES) < 0.5 * small_pages


def _entry(fn, options):
    a = jnp.ones((64, 64))
    text = jax.jit(fn, compiler_options=options).lower(a).compile().as_text()
    return text[text.index("ENTRY"):]


def test_reductions_choice_leaves_dots_to_eigen_and_reductions_to_ynnpack(monkeypatch):
    assert "ynn" not in os.environ.get("XLA_FLAGS", "")
    tuned = cpu_tuning.compiler_options(ml_collections.ConfigDict({"cpu_ynnpack": "reductions"}))
    default = cpu_tuning.compiler_options(ml_collections.ConfigDict({"cpu_ynnpack": "default"}))
    assert default == {} and tuned
    matmul, column_sums = (lambda a: a @ a), (lambda a: a.sum(0))
    assert "ynn_fusion" in _entry(matmul, default)
    assert "ynn_fusion" not in _entry(matmul, tuned) and " dot(" in _entry(matmul, tuned)
    assert "ynn_fusion" in _entry(column_sums, tuned)
    # Configs made before the key existed get the tuned default.
    assert cpu_tuning.compiler_options(ml_collections.ConfigDict()) == tuned
    # A user's own XLA_FLAGS choice wins.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") +
                       " --xla_cpu_experimental_ynn_fusion_type=")
    assert cpu_tuning.compiler_options(ml_collections.ConfigDict()) == {}


def test_unknown_cpu_ynnpack_is_one_line_with_the_choices():
    with pytest.raises(ValueError,
                       match=r"unknown config.cpu_ynnpack 'all'; use one of reductions, default"):
        cpu_tuning.compiler_options(ml_collections.ConfigDict({"cpu_ynnpack": "all"}))
