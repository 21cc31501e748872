"""The command line's malloc (rtdetr_jax/host_memory.py), tcmalloc where installed, else glibc malloc on transparent
huge pages: when the command line asks for which, that it re-executes itself once to get it, and that each does
what it is there for (XLA:CPU's per-call scratch memory kept between calls by tcmalloc, faulted in 2 MiB at a time
instead of 4 KiB by glibc); and that `release_free_heap` gives freed heap pages back under both."""

import os
import platform
import subprocess
import sys

import pytest

from rtdetr_jax.host_memory import (
    MARKER,
    SWITCH,
    TCMALLOC_NAMES,
    THREAD_CACHE_BYTES,
    THREAD_CACHE_VAR,
    TUNABLE,
    find_tcmalloc,
    glibc_supports_hugetlb,
    library_dirs,
    malloc_env,
    release_free_heap,
    release_surplus_heap,
    transparent_hugepages_enabled,
    transparent_hugepages_mode,
)

SUPPORTED = glibc_supports_hugetlb() and transparent_hugepages_enabled()
needs_support = pytest.mark.skipif(not SUPPORTED, reason="needs glibc >= 2.35 on Linux with transparent huge pages")
TCMALLOC = find_tcmalloc()  # None where not installed (.ci/run installs it where it can)
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None, reason="needs tcmalloc (Debian: libtcmalloc-minimal4)")
FAKE_TCMALLOC = "/opt/lib/libtcmalloc_minimal.so.4"
BAD_SWITCH = r"RTDETR_JAX_MALLOC='maybe': use 'on' \(the default\), 'glibc' or 'off'"


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in (MARKER, SWITCH, "GLIBC_TUNABLES", "LD_PRELOAD", THREAD_CACHE_VAR)}
    return {**env, **extra}


TCMALLOC_ENV = {"LD_PRELOAD": FAKE_TCMALLOC, THREAD_CACHE_VAR: "4194304"}


def test_tcmalloc_preloaded_by_default_where_found():
    assert malloc_env({}, supported=True, tcmalloc=FAKE_TCMALLOC) == TCMALLOC_ENV
    assert malloc_env({SWITCH: " ON "}, supported=False, tcmalloc=FAKE_TCMALLOC) == TCMALLOC_ENV
    # the user's other tunables do not keep tcmalloc out, and are left as they are
    assert malloc_env({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}, supported=True,
                      tcmalloc=FAKE_TCMALLOC) == TCMALLOC_ENV


def test_users_own_thread_cache_size_is_kept():
    assert malloc_env({THREAD_CACHE_VAR: "67108864"}, supported=True, tcmalloc=FAKE_TCMALLOC) == {
        "LD_PRELOAD": FAKE_TCMALLOC}
    assert THREAD_CACHE_BYTES == 4 * 1024 * 1024


# the thread-cache cap tcmalloc runs with, as it reports it
_THREAD_CACHE_PROBE = (
    "import ctypes; lib = ctypes.CDLL(None); value = ctypes.c_size_t(0); "
    "lib.MallocExtension_GetNumericProperty.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]; "
    "assert lib.MallocExtension_GetNumericProperty(b'tcmalloc.max_total_thread_cache_bytes', ctypes.byref(value)); "
    "print(value.value)"
)


@needs_tcmalloc
def test_tcmalloc_takes_the_thread_cache_cap_from_the_environment():
    def cap(**extra):
        done = subprocess.run([sys.executable, "-c", _THREAD_CACHE_PROBE], capture_output=True, text=True,
                              env=_clean_env(LD_PRELOAD=TCMALLOC, **extra))
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    default = cap()
    capped = cap(**{k: v for k, v in malloc_env({}, supported=True, tcmalloc=TCMALLOC).items() if k != "LD_PRELOAD"})
    assert capped == THREAD_CACHE_BYTES < default, (capped, default)


def test_tunable_added_without_tcmalloc_or_when_glibc_is_chosen():
    assert malloc_env({}, supported=True, tcmalloc=None) == {"GLIBC_TUNABLES": TUNABLE}
    assert malloc_env({SWITCH: " ON "}, supported=True, tcmalloc=None) == {"GLIBC_TUNABLES": TUNABLE}
    assert malloc_env({SWITCH: "glibc"}, supported=True, tcmalloc=FAKE_TCMALLOC) == {"GLIBC_TUNABLES": TUNABLE}
    assert malloc_env({SWITCH: "GLIBC"}, supported=False, tcmalloc=FAKE_TCMALLOC) == {}
    # another preloaded library (not an allocator): no tcmalloc in front of it, glibc's tunable instead
    assert malloc_env({"LD_PRELOAD": "/opt/lib/libtrace.so"}, supported=True, tcmalloc=FAKE_TCMALLOC) == {
        "GLIBC_TUNABLES": TUNABLE}


def test_other_tunables_are_kept():
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.cpu.hwcaps=-AVX512F"}
    assert malloc_env(env, supported=True, tcmalloc=None) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:glibc.cpu.hwcaps=-AVX512F:{TUNABLE}"}


@pytest.mark.parametrize("environ", [
    {SWITCH: "off"},
    {SWITCH: "Off"},
    {MARKER: "1"},  # already re-executed
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's own choice wins
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"},
    {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
    {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
    {"LD_PRELOAD": "/opt/lib/libtrace.so:/usr/lib/libmimalloc.so.2"},
])
@pytest.mark.parametrize("tcmalloc", [None, FAKE_TCMALLOC])
def test_steps_aside(environ, tcmalloc):
    assert malloc_env(environ, supported=True, tcmalloc=tcmalloc) == {}


def test_nothing_where_unsupported_and_no_tcmalloc():
    assert malloc_env({}, supported=False, tcmalloc=None) == {}


def test_find_tcmalloc(tmp_path):
    system, conda, empty = tmp_path / "usr-lib", tmp_path / "conda-lib", tmp_path / "empty"
    for folder in (system, conda, empty):
        folder.mkdir()
    dirs = [str(empty), str(system), str(conda)]
    assert find_tcmalloc(dirs) is None
    (conda / "libtcmalloc.so.4").write_bytes(b"")  # the full one, with the profiler
    assert find_tcmalloc(dirs) == str(conda / "libtcmalloc.so.4")
    (conda / "libtcmalloc_minimal.so.4").write_bytes(b"")  # the minimal one is preferred, wherever it lies
    assert find_tcmalloc(dirs) == str(conda / "libtcmalloc_minimal.so.4")
    (system / "libtcmalloc_minimal.so.4").write_bytes(b"")  # and the first folder holding it wins
    assert find_tcmalloc(dirs) == str(system / "libtcmalloc_minimal.so.4")
    (empty / "libtcmalloc_minimal.so.4").mkdir()  # not a file
    assert find_tcmalloc(dirs) == str(system / "libtcmalloc_minimal.so.4")
    assert TCMALLOC_NAMES[0] == "libtcmalloc_minimal.so.4"


def test_library_dirs_cover_distributions_and_this_python():
    dirs = library_dirs()
    assert "/usr/lib64" in dirs and "/usr/local/lib" in dirs and os.path.join(sys.prefix, "lib") in dirs
    assert any(d.startswith("/usr/lib/") and d.endswith("-linux-gnu") for d in dirs), dirs  # Debian multiarch
    assert len(dirs) == len(set(dirs))


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
    with pytest.raises(ValueError, match=f"^{BAD_SWITCH}$"):
        malloc_env({SWITCH: "maybe"}, supported=True, tcmalloc=FAKE_TCMALLOC)


def test_cli_rejects_bad_switch_value():
    done = subprocess.run([sys.executable, "-m", "rtdetr_jax", "--help"], capture_output=True, text=True,
                          env=_clean_env(**{SWITCH: "maybe"}))
    assert done.returncode == 2
    assert done.stderr.strip() == ("rtdetr-jax: error: RTDETR_JAX_MALLOC='maybe': use 'on' (the default), 'glibc' "
                                   "or 'off'")


# what the (re-executed) process sees; prints once before and once after the exec when it happens
_PROBE = (
    "import os, sys; "
    "print('RUN', os.environ.get('GLIBC_TUNABLES'), os.environ.get('LD_PRELOAD'), "
    "os.environ.get('RTDETR_JAX_MALLOC_APPLIED'), os.environ.get('TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES'), "
    "flush=True); "
    "sys.argv = ['rtdetr-jax', '--help']; "
    "from rtdetr_jax.cli import entry; sys.exit(entry())"
)


def _probe_runs(env):
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "usage: rtdetr-jax" in done.stdout
    return [line for line in done.stdout.splitlines() if line.startswith("RUN")]


def test_cli_reexecutes_itself_once_with_the_default_malloc():
    """tcmalloc where this machine has it, else glibc's tunable where glibc supports it, else nothing."""
    if TCMALLOC is not None:
        assert _probe_runs(_clean_env()) == ["RUN None None None None", f"RUN None {TCMALLOC} 1 4194304"]
    elif SUPPORTED:
        assert _probe_runs(_clean_env()) == ["RUN None None None None", f"RUN {TUNABLE} None 1 None"]
    else:
        assert _probe_runs(_clean_env()) == ["RUN None None None None"]


@needs_support
def test_cli_reexecutes_itself_once_with_the_tunable_when_glibc_is_chosen():
    assert _probe_runs(_clean_env(**{SWITCH: "glibc"})) == ["RUN None None None None", f"RUN {TUNABLE} None 1 None"]


@pytest.mark.parametrize("extra", [{SWITCH: "off"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}])
def test_cli_runs_once_when_the_malloc_setting_steps_aside(extra):
    assert _probe_runs(_clean_env(**extra)) == [f"RUN {extra.get('GLIBC_TUNABLES')} None None None"]


# page faults of the calls after the first four of a jit function whose scratch block is 400 MB (two 200 MB
# temporaries live at once, 97,657 pages of 4 KiB), and whether tcmalloc runs the process
_FAULTS = """
import ctypes, resource, sys, time, jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) * jnp.cos(x)[::-1]).sum())
x = jnp.ones((50_000_000,), jnp.float32)
for _ in range(4):
    f(x).block_until_ready()
faults = 0
for _ in range(int(sys.argv[1])):
    time.sleep(0.05)  # the previous call's scratch block is freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults, hasattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory"))
"""
_BLOCK_PAGES = 400_000_000 // 4096


def _faults(env, calls=4) -> tuple[int, bool]:
    done = subprocess.run([sys.executable, "-c", _FAULTS, str(calls)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    faults, tcmalloc = done.stdout.strip().splitlines()[-1].split()
    return int(faults), tcmalloc == "True"


@needs_support
def test_hugepages_cut_xla_scratch_page_faults():
    if transparent_hugepages_mode() == "always":
        pytest.skip("transparent huge pages are always on here: malloc gets them without the tunable")
    default, _ = _faults(_clean_env())
    hugepages, _ = _faults(_clean_env(GLIBC_TUNABLES=TUNABLE))
    # 4 KiB pages: each call maps its 400 MB scratch block afresh, ~97,700 faults a call (measured)
    assert default > 4 * _BLOCK_PAGES // 2, default
    # 2 MiB pages: 512x fewer faults for the same memory (measured ~570 a call, the rest small allocations)
    assert hugepages < default // 20, (hugepages, default)


@needs_tcmalloc
def test_tcmalloc_keeps_xla_scratch_between_calls():
    faults, tcmalloc_runs = _faults(_clean_env(LD_PRELOAD=TCMALLOC), calls=8)
    assert tcmalloc_runs
    # glibc maps the block afresh for every call (8 x 97,657 faults with 4 KiB pages); tcmalloc hands the freed
    # block out again and returns free spans to the system only now and then (measured, 8 calls in each of eight runs:
    # 0 or 1 call faulted the block back in, the others 0-30 faults)
    assert faults < 2.5 * _BLOCK_PAGES, faults


IS_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# resident set (MB) after 200,000 freed 1 KiB blocks that a live block above them keeps from being trimmed, then
# after release_free_heap(): the heap of a compiler that freed its temporaries
_HEAP_PRELUDE = """
import ctypes, sys
def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) // 1024 for l in fh if l.startswith("VmRSS"))
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
"""  # rss() in MB, and malloc/free of the C library that runs the process (or of a preloaded allocator)

_FREED_HEAP = _HEAP_PRELUDE + """
from rtdetr_jax.host_memory import release_free_heap
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
@pytest.mark.parametrize("switch", ["on", "glibc", "off"])
def test_release_free_heap_returns_freed_pages(switch):
    done = subprocess.run([sys.executable, "-c", _FREED_HEAP], capture_output=True, text=True,
                          env=_clean_env(**{SWITCH: switch}))
    assert done.returncode == 0, done.stderr
    before, after, released = done.stdout.split()
    before, after = int(before), int(after)
    if switch != "off":
        assert released == "True" and before - after > 150, (before, after)  # ~200 MB freed but resident
    else:
        assert released == "False" and before - after < 20, (before, after)  # left alone


@needs_tcmalloc
@pytest.mark.parametrize("switch", ["on", "off"])
def test_release_free_heap_returns_tcmallocs_free_pages(switch):
    """Under tcmalloc, its `MallocExtension_ReleaseFreeMemory` (glibc's `malloc_trim` would find nothing)."""
    done = subprocess.run([sys.executable, "-c", _FREED_HEAP], capture_output=True, text=True,
                          env=_clean_env(**{SWITCH: switch, "LD_PRELOAD": TCMALLOC}))
    assert done.returncode == 0, done.stderr
    before, after, released = done.stdout.split()
    before, after = int(before), int(after)
    if switch == "on":
        assert released == "True" and before - after > 150, (before, after)  # measured 226 -> 31 MB
    else:
        assert released == "False" and before - after < 20, (before, after)


# resident set (MB) with a freed 100 MB block (touched, so resident until given back), then after
# release_surplus_heap(limit) for each limit given on the command line (MB), and what each returned
_SURPLUS = _HEAP_PRELUDE + """
from rtdetr_jax.host_memory import release_surplus_heap
block = libc.malloc(100 << 20)
ctypes.memset(block, 1, 100 << 20)
libc.free(block)
figures = [rss()]
for limit in sys.argv[1:]:
    figures += [release_surplus_heap(int(limit) << 20), rss()]
print(*figures)
"""


def _surplus(env, *limits):
    done = subprocess.run([sys.executable, "-c", _SURPLUS, *map(str, limits)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    return [int(x) if x.isdigit() else x == "True" for x in done.stdout.split()]


@needs_tcmalloc
def test_release_surplus_heap_gives_back_tcmallocs_free_pages_beyond_the_limit():
    """tcmalloc keeps the freed 100 MB block: below the limit (256 MB) it stays, above it (64 MB) it goes."""
    before, kept, after_kept, released, after = _surplus(_clean_env(LD_PRELOAD=TCMALLOC), 256, 64)
    assert kept is False and before - after_kept < 20, (before, after_kept)
    assert released is True and after_kept - after > 80, (after_kept, after)


@pytest.mark.parametrize("env", [{}, {SWITCH: "off"}, {SWITCH: "glibc"}])
def test_release_surplus_heap_is_a_no_op_without_tcmalloc_or_switched_off(env):
    """glibc maps and unmaps such blocks itself (the freed one is gone already); `off` leaves tcmalloc alone."""
    extra = {"LD_PRELOAD": TCMALLOC} if env.get(SWITCH) == "off" and TCMALLOC else {}
    before, released, after = _surplus(_clean_env(**env, **extra), 0)
    assert released is False, (before, after)
    if extra:  # tcmalloc kept the freed block and nobody gave it back
        assert before - after < 20, (before, after)


def test_release_surplus_heap_rejects_bad_switch_value(monkeypatch):
    monkeypatch.setenv(SWITCH, "maybe")
    with pytest.raises(ValueError, match=f"^{BAD_SWITCH}$"):
        release_surplus_heap()


def test_release_free_heap_steps_aside_for_another_allocator(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert release_free_heap() is False


def test_release_free_heap_rejects_bad_switch_value(monkeypatch):
    monkeypatch.setenv(SWITCH, "maybe")
    with pytest.raises(ValueError, match=f"^{BAD_SWITCH}$"):
        release_free_heap()
