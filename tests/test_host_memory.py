"""glibc malloc on transparent huge pages (rtdetr_jax/host_memory.py): when the command line asks for it, that it
re-executes itself once to get it, and that it does what it is there for (XLA:CPU's per-call scratch memory is
faulted in 2 MiB at a time instead of 4 KiB); and that `release_free_heap` gives freed heap pages back."""

import os
import platform
import subprocess
import sys

import pytest

from rtdetr_jax.host_memory import (
    MARKER,
    SWITCH,
    TUNABLE,
    glibc_supports_hugetlb,
    hugepage_malloc_env,
    release_free_heap,
    transparent_hugepages_enabled,
    transparent_hugepages_mode,
)

SUPPORTED = glibc_supports_hugetlb() and transparent_hugepages_enabled()
needs_support = pytest.mark.skipif(not SUPPORTED, reason="needs glibc >= 2.35 on Linux with transparent huge pages")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in (MARKER, SWITCH, "GLIBC_TUNABLES", "LD_PRELOAD")}
    return {**env, **extra}


def test_tunable_added_by_default():
    assert hugepage_malloc_env({}, supported=True) == {"GLIBC_TUNABLES": TUNABLE}
    assert hugepage_malloc_env({SWITCH: " ON "}, supported=True) == {"GLIBC_TUNABLES": TUNABLE}


def test_other_tunables_are_kept():
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.cpu.hwcaps=-AVX512F"}
    assert hugepage_malloc_env(env, supported=True) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:glibc.cpu.hwcaps=-AVX512F:{TUNABLE}"}


@pytest.mark.parametrize("environ", [
    {SWITCH: "off"},
    {SWITCH: "Off"},
    {MARKER: "1"},  # already re-executed
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's own choice wins
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"},
    {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
    {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
])
def test_steps_aside(environ):
    assert hugepage_malloc_env(environ, supported=True) == {}


def test_nothing_where_unsupported():
    assert hugepage_malloc_env({}, supported=False) == {}


def test_transparent_hugepage_setting(tmp_path):
    setting = tmp_path / "enabled"
    for text, mode, on in [("always [madvise] never\n", "madvise", True), ("[always] madvise never\n", "always", True),
                           ("always madvise [never]\n", "never", False), ("garbled\n", None, False)]:
        setting.write_text(text)
        assert transparent_hugepages_mode(str(setting)) == mode
        assert transparent_hugepages_enabled(str(setting)) is on
    assert transparent_hugepages_mode(str(tmp_path / "missing")) is None
    assert transparent_hugepages_enabled(str(tmp_path / "missing")) is False


def test_bad_switch_value_is_one_line_error():
    with pytest.raises(ValueError, match=r"RTDETR_JAX_MALLOC='maybe': use 'on' \(the default\) or 'off'"):
        hugepage_malloc_env({SWITCH: "maybe"}, supported=True)


def test_cli_rejects_bad_switch_value():
    done = subprocess.run([sys.executable, "-m", "rtdetr_jax", "--help"], capture_output=True, text=True,
                          env=_clean_env(**{SWITCH: "maybe"}))
    assert done.returncode == 2
    assert done.stderr.strip() == "rtdetr-jax: error: RTDETR_JAX_MALLOC='maybe': use 'on' (the default) or 'off'"


# what the (re-executed) process sees; prints once before and once after the exec when it happens
_PROBE = (
    "import os, sys; "
    "print('RUN', os.environ.get('GLIBC_TUNABLES'), os.environ.get('RTDETR_JAX_MALLOC_APPLIED'), flush=True); "
    "sys.argv = ['rtdetr-jax', '--help']; "
    "from rtdetr_jax.cli import entry; sys.exit(entry())"
)


def _probe_runs(env):
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "usage: rtdetr-jax" in done.stdout
    return [line for line in done.stdout.splitlines() if line.startswith("RUN")]


@needs_support
def test_cli_reexecutes_itself_once_with_the_tunable():
    assert _probe_runs(_clean_env()) == ["RUN None None", f"RUN {TUNABLE} 1"]


@pytest.mark.parametrize("extra", [{SWITCH: "off"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}])
def test_cli_runs_once_when_the_tunable_steps_aside(extra):
    assert _probe_runs(_clean_env(**extra)) == [f"RUN {extra.get('GLIBC_TUNABLES')} None"]


# page faults of calls 5-8 of a jit function whose scratch block is 400 MB (two 200 MB temporaries live at once)
_FAULTS = """
import resource, time, jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) * jnp.cos(x)[::-1]).sum())
x = jnp.ones((50_000_000,), jnp.float32)
for _ in range(4):
    f(x).block_until_ready()
faults = 0
for _ in range(4):
    time.sleep(0.05)  # the previous call's scratch block is freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def _faults(env) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


@needs_support
def test_hugepages_cut_xla_scratch_page_faults():
    if transparent_hugepages_mode() == "always":
        pytest.skip("transparent huge pages are always on here: malloc gets them without the tunable")
    default = _faults(_clean_env())
    hugepages = _faults(_clean_env(GLIBC_TUNABLES=TUNABLE))
    # 4 KiB pages: each call maps its 400 MB scratch block afresh, ~97,700 faults a call (measured)
    assert default > 4 * 50_000, default
    # 2 MiB pages: 512x fewer faults for the same memory (measured ~570 a call, the rest small allocations)
    assert hugepages < default // 20, (hugepages, default)


IS_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# resident set (MB) after 200,000 freed 1 KiB blocks that a live block above them keeps from being trimmed, then
# after release_free_heap(): the heap of a compiler that freed its temporaries
_FREED_HEAP = """
import ctypes
from rtdetr_jax.host_memory import release_free_heap
def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) // 1024 for l in fh if l.startswith("VmRSS"))
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(1000) for _ in range(200_000)]
for b in blocks:
    ctypes.memset(b, 1, 1000)
guard = libc.malloc(1000)
for b in blocks:
    libc.free(b)
before = rss()
released = release_free_heap()
print(before, rss(), released)
"""


@pytest.mark.skipif(not IS_GLIBC, reason="malloc_trim is glibc's")
@pytest.mark.parametrize("switch", ["on", "off"])
def test_release_free_heap_returns_freed_pages(switch):
    done = subprocess.run([sys.executable, "-c", _FREED_HEAP], capture_output=True, text=True,
                          env=_clean_env(**{SWITCH: switch}))
    assert done.returncode == 0, done.stderr
    before, after, released = done.stdout.split()
    before, after = int(before), int(after)
    if switch == "on":
        assert released == "True" and before - after > 150, (before, after)  # ~200 MB freed but resident
    else:
        assert released == "False" and before - after < 20, (before, after)  # left alone


def test_release_free_heap_steps_aside_for_another_allocator(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert release_free_heap() is False


def test_release_free_heap_rejects_bad_switch_value(monkeypatch):
    monkeypatch.setenv(SWITCH, "maybe")
    with pytest.raises(ValueError, match=r"^RTDETR_JAX_MALLOC='maybe': use 'on' \(the default\) or 'off'$"):
        release_free_heap()
