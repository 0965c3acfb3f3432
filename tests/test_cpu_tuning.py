"""noisy_flax.cpu_tuning: TCMalloc and huge-page malloc by re-exec, and the CPU dot library."""
import json
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


def _fast(env, allocator=None):
    return cpu_tuning.environment_with_fast_malloc(env, find_allocator=lambda: allocator)


@glibc_only
def test_environment_gains_the_tunable_once_and_keeps_the_others():
    assert _fast({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = _fast({"GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    # Already chosen (by us or by the user), or opted out: nothing to do.
    assert _fast({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert _fast({"NOISY_FLAX_NO_REEXEC": "1"}, "libtcmalloc_minimal.so.4") is None
    # "0" does not opt out (it used to: any value did).
    assert _fast({"NOISY_FLAX_NO_REEXEC": "0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    # Values are read as a shell user writes them: spaces around do not count.
    assert _fast({"NOISY_FLAX_NO_REEXEC": " 1 "}) is None
    assert _fast({"NOISY_FLAX_NO_REEXEC": " 0 "})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert _fast({"NOISY_FLAX_NO_REEXEC": " "})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_only_a_command_started_as_a_noisy_flax_module_restarts_itself():
    assert cpu_tuning.started_as_entry_point(["python3", "-u", "-m", "noisy_flax.main", "--x"])
    assert cpu_tuning.started_as_entry_point(["python3", "-mnoisy_flax.study"])
    # runpy.run_module or IPython's %run -m inside a host program: its own argv.
    assert not cpu_tuning.started_as_entry_point(["python3", "host.py", "-m", "x"])
    assert not cpu_tuning.started_as_entry_point(["ipython"])


def test_only_an_entry_point_is_replaced_by_the_fast_malloc_command(monkeypatch):
    """The same interpreter, options and arguments, with the new environment;
    nothing at all inside a host program."""
    calls = []
    monkeypatch.setattr(cpu_tuning, "environment_with_fast_malloc", lambda env: {"NEW": "1"})
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(sys, "orig_argv", ["python3", "host.py", "-m", "x"])
    cpu_tuning.reexec_with_fast_malloc()
    assert calls == []
    command = ["python3", "-u", "-m", "noisy_flax.main", "--workdir", "w"]
    monkeypatch.setattr(sys, "orig_argv", command)
    cpu_tuning.reexec_with_fast_malloc()
    assert calls == [(sys.executable, command, {"NEW": "1"})]


@glibc_only
def test_environment_preloads_tcmalloc_where_installed_unless_an_allocator_is_chosen():
    tc = "libtcmalloc_minimal.so.4"
    hugetlb = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert _fast(hugetlb, tc) == {**hugetlb, "LD_PRELOAD": tc}
    assert _fast({**hugetlb, "LD_PRELOAD": "libfoo.so"}, tc)["LD_PRELOAD"] == f"{tc}:libfoo.so"
    assert _fast({**hugetlb, "LD_PRELOAD": tc}, tc) is None  # the re-executed process
    assert _fast({**hugetlb, "LD_PRELOAD": "/opt/libjemalloc.so.2"}, tc) is None  # the user's
    assert _fast({**hugetlb, "NOISY_FLAX_NO_TCMALLOC": "1"}, tc) is None
    assert _fast({**hugetlb, "NOISY_FLAX_NO_TCMALLOC": "0"}, tc)["LD_PRELOAD"] == tc
    assert _fast(hugetlb, None) is None  # not installed: glibc with huge pages


def test_find_tcmalloc_takes_either_gperftools_build(monkeypatch):
    """libtcmalloc_minimal first; the full libtcmalloc where only it is installed."""
    installed = {}
    monkeypatch.setattr(cpu_tuning.ctypes.util, "find_library", installed.get)
    assert cpu_tuning.find_tcmalloc() is None
    installed["tcmalloc"] = "libtcmalloc.so.4"
    assert cpu_tuning.find_tcmalloc() == "libtcmalloc.so.4"
    installed["tcmalloc_minimal"] = "libtcmalloc_minimal.so.4"
    assert cpu_tuning.find_tcmalloc() == "libtcmalloc_minimal.so.4"


def _run_module(env_overrides):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "NOISY_FLAX_NO_REEXEC", "NOISY_FLAX_NO_TCMALLOC")}
    env.update(env_overrides)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "noisy_flax.cpu_tuning"], env=env,
                            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(
                                os.path.abspath(cpu_tuning.__file__))))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return proc.pid, json.loads(out)


@glibc_only
def test_entry_point_reexecutes_itself_in_place_with_huge_pages():
    started, seen = _run_module({"NOISY_FLAX_NO_TCMALLOC": "1"})
    assert seen["pid"] == started  # execve: the same process, so signals and launchers still reach it
    assert seen["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert seen["LD_PRELOAD"] == "" and seen["mapped"] == []
    _, seen = _run_module({"NOISY_FLAX_NO_REEXEC": "1"})
    assert seen["GLIBC_TUNABLES"] == "" and seen["LD_PRELOAD"] == ""


@glibc_only
@pytest.mark.skipif(cpu_tuning.find_tcmalloc() is None,
                    reason="TCMalloc is not installed (Debian: libtcmalloc-minimal4)")
def test_entry_point_reexecutes_itself_with_tcmalloc_mapped():
    started, seen = _run_module({})
    assert seen["pid"] == started
    assert seen["LD_PRELOAD"] == cpu_tuning.find_tcmalloc()
    assert any(name.startswith("libtcmalloc") for name in seen["mapped"])  # really loaded


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


def test_an_option_this_jaxlib_rejects_is_not_passed_on():
    # XLA refuses an unknown option or value at compile time; the probe says no.
    assert not cpu_tuning._jaxlib_accepts("xla_cpu_no_such_option_anywhere", "1")
    assert not cpu_tuning._jaxlib_accepts("xla_cpu_experimental_ynn_fusion_type", "NOT_A_TYPE")


def test_unknown_cpu_ynnpack_is_one_line_with_the_choices():
    with pytest.raises(ValueError,
                       match=r"unknown config.cpu_ynnpack 'all'; use one of reductions, default"):
        cpu_tuning.compiler_options(ml_collections.ConfigDict({"cpu_ynnpack": "all"}))
