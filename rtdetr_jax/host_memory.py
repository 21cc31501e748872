"""The malloc the command line runs on: tcmalloc where it is installed, else glibc malloc on transparent huge pages,
for the scratch memory XLA:CPU takes afresh on every call.

An XLA:CPU executable takes its temporaries with malloc at the start of every call and frees them at its end:
3.4 GB for the r18vd batch-4 training step at 640x640, a few hundred MB for a demo training step. The call runs
on XLA's worker threads, and glibc serves such large blocks from a worker thread's arena with a fresh `mmap`,
returned by `munmap` when freed (whatever `mallopt` says: a thread arena cannot hold them). So every call
page-faults its whole scratch block in again and the kernel zeroes it: 730,000-760,000 page faults and 3-4 s of
kernel time per r18vd training step on the 2-core development machine with 4 KiB pages.

tcmalloc (gperftools' `libtcmalloc_minimal.so.4`; Debian/Ubuntu package `libtcmalloc-minimal4`) keeps freed spans
in its page heap and hands them out again, returning them to the system only now and then, so a call's scratch
block is mostly faulted in once per process, not once per call. Measured on that machine (benchmarks/README.md,
"Host memory"), r18vd training step, against glibc with huge pages (below): kernel time per step 0.9 s -> 0.02 s,
peak memory 6.6 -> 4.8 GB, steady-state steps the same within noise (paired, tcmalloc's 1.04x glibc's time), and no
penalty on a step after a pause (11.6-12.8 s with glibc, 5.7-6.7 s with tcmalloc, on a VM that hands freed memory
back to its host); the demo 4 min 23-25 s -> 3 min 53-58 s (kernel time 39-40 s -> 9-10 s), peak 3.05-3.10 ->
2.28-2.61 GB (two runs each). It must be preloaded (`LD_PRELOAD`) before the process starts.

Its thread caches are capped at `THREAD_CACHE_BYTES` (4 MiB in all, `TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES`,
which tcmalloc reads at start-up; a user's own value is kept). Compiling leaves small freed objects in the caches of
XLA's compiler threads, which `release_free_heap` cannot give back. On the 2-core AVX-512 development machine of
2026-12-02, the r18vd batch-1 forward's process peak in fresh processes: 659-805 MB, median 705 (20 processes),
with gperftools' default cap (32 MiB); 596-724 MB, median 622 (27), with 4 MiB; PyTorch's 621-656 MB, median 634.
The training step was no slower (paired 0.96 of the default's time, 5 rounds; peak 4.44 vs 4.53 GB), nor the
forward or its first call.

Without tcmalloc, the glibc tunable

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1    (glibc >= 2.35)

makes malloc ask for transparent huge pages (2 MiB) on the memory it maps (`madvise(MADV_HUGEPAGE)`, which works
where /sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`, the common default): 512x fewer
faults for the same memory, but the pages are still zeroed afresh every call. Measured: the r18vd training step
9.4 s -> 8.6 s (8.9 s -> 7.8 s in an earlier run), the demo's first 150 training steps 179-189 s -> 167 s (kernel
time 46-49 s -> 23 s, peak memory +2%), batch-1 inference unchanged within noise.

Both are read once, at process start, so the command line (`rtdetr-jax ...`, `python -m rtdetr_jax ...`)
re-executes itself once with them (`malloc_env`), as `RTDETR_JAX_MALLOC` says:

- `on` or unset (the default): tcmalloc when `find_tcmalloc()` finds it and `LD_PRELOAD` is empty, else the
  glibc tunable;
- `glibc`: the glibc tunable only, never tcmalloc;
- `off`: neither (nor the heap trimming below, nor the dropping of jax's tracing caches: rtdetr_jax/jax_caches.py);
- any other value is an error.

It does neither where the user chose: `glibc.malloc.hugetlb` in their `GLIBC_TUNABLES`, or an allocator
(jemalloc, tcmalloc, mimalloc) in their `LD_PRELOAD`; anything else in their `LD_PRELOAD` gets the glibc
tunable, not tcmalloc in front of it. The tunable needs Linux with glibc 2.35 or newer and transparent huge pages
not `never`. The marker `RTDETR_JAX_MALLOC_APPLIED=1` stops a second re-exec.

Library users (`import rtdetr_jax` in their own program) get nothing changed: start the program with
`LD_PRELOAD=<path of libtcmalloc_minimal.so.4>` (what `find_tcmalloc()` returns) and
`TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES=4194304`, or with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, for the same gain.

Measured and not used: jemalloc 5.3 (`libjemalloc.so.2`, defaults): it returns freed pages to the system
within seconds, so the r18vd step faulted ~890,000 4 KiB pages and took 3.2-3.6 s of kernel time, slower than
glibc with huge pages. `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0` with a huge `MALLOC_TRIM_THRESHOLD_` (every thread
on glibc's main heap, freed memory kept) ends the faults too, but made the demo 11% slower (one malloc arena
shared by all threads) with 25% more peak memory, and its heap grew by 2-9x the scratch block in a microbenchmark
(freed blocks fragmented by small allocations).

Compiling leaves freed memory behind: XLA's compiler allocates and frees a few hundred MB of small objects, and
the allocator keeps the freed pages. `release_free_heap()` gives them back to the system (glibc's
`malloc_trim(0)`; tcmalloc's `MallocExtension_ReleaseFreeMemory()`); the model calls it after each compilation of
a new input shape and after loading weights. Measured on r18vd at 1x3x640x640 with glibc (benchmarks/README.md,
"Peak memory"): the resident set after the first forward goes from ~670-740 MB to ~520 MB (PyTorch: ~550 MB);
`malloc_trim` itself takes well under a millisecond.

A forward can also leave a second scratch block behind under tcmalloc: XLA's worker thread frees a call's
temporaries just after its outputs are ready, so a forward issued at once after the last one returned can take its
scratch block while the last one's is still allocated, and tcmalloc then keeps both resident for good (glibc maps
and unmaps each block, so it never keeps one). `release_surplus_heap()`, which the model calls right after
dispatching each forward of a compiled shape, hands tcmalloc's free pages back when they exceed `SURPLUS_BYTES`
(64 MB). Measured on the 2-core AVX2 development machine (2026-12-03), r18vd at 640, fresh processes, forwards back
to back: batch 8, process peak while forwarding 1660-1707 MB without it (two processes; 1669 MB in a third, after
nine forwards at ~1120 MB), 1135-1225 MB with it (three), against 1260-1277 MB on glibc with huge pages and
PyTorch's 1462-1743 MB; batch 1 591-641 MB without it (four), 583-632 MB with it (four).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import sysconfig
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
MARKER = "RTDETR_JAX_MALLOC_APPLIED"
THREAD_CACHE_VAR = "TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES"
THREAD_CACHE_BYTES = 4 * 1024 * 1024  # tcmalloc's thread caches, all threads together (module docstring)
SURPLUS_BYTES = 64 * 1024 * 1024  # tcmalloc's free pages beyond which `release_surplus_heap` gives them back
SWITCH = "RTDETR_JAX_MALLOC"
CHOICES = ("on", "glibc", "off")
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")  # gperftools; the minimal one has no profiler
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def glibc_supports_hugetlb() -> bool:
    """Linux with glibc 2.35 or newer (the first with `glibc.malloc.hugetlb`)."""
    if not sys.platform.startswith("linux"):
        return False
    name, version = platform.libc_ver()
    try:
        return name == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def transparent_hugepages_mode(setting_file: str = _THP_SETTING) -> str | None:
    """The kernel's transparent huge page mode, the bracketed word of `always [madvise] never`; None where the
    setting cannot be read (not Linux, no such kernel feature)."""
    try:
        with open(setting_file) as f:
            setting = f.read()
    except OSError:
        return None
    start, end = setting.find("["), setting.find("]")
    return setting[start + 1:end] if 0 <= start < end else None


def transparent_hugepages_enabled(setting_file: str = _THP_SETTING) -> bool:
    """Whether the kernel grants huge pages to memory madvised for them (mode `always` or `madvise`)."""
    return transparent_hugepages_mode(setting_file) in ("always", "madvise")


def library_dirs() -> list[str]:
    """Where distributions put shared libraries: the multiarch folders (Debian, Ubuntu), lib64 (Fedora, SUSE),
    /usr/local/lib, and this Python's own prefix (conda's gperftools)."""
    arch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    dirs = [f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/lib64", "/usr/lib", "/usr/local/lib",
            os.path.join(sys.prefix, "lib")]
    return list(dict.fromkeys(dirs))


def find_tcmalloc(dirs: Sequence[str] | None = None) -> str | None:
    """The path of gperftools' tcmalloc (`libtcmalloc_minimal.so.4` first, then `libtcmalloc.so.4`) in `dirs`
    (default `library_dirs()`), or None; Linux only."""
    if dirs is None:
        if not sys.platform.startswith("linux"):
            return None
        dirs = library_dirs()
    for name in TCMALLOC_NAMES:
        for folder in dirs:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def malloc_choice(environ: Mapping[str, str] | None = None) -> str:
    """`RTDETR_JAX_MALLOC` in `environ` (default `os.environ`): `on` (unset, the default), `glibc` or `off`, any case,
    spaces ignored; ValueError naming the value for anything else."""
    environ = os.environ if environ is None else environ
    choice = environ.get(SWITCH, "").strip().lower() or "on"
    if choice not in CHOICES:
        raise ValueError(f"{SWITCH}={environ[SWITCH]!r}: use 'on' (the default), 'glibc' or 'off'")
    return choice


def switched_on(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `RTDETR_JAX_MALLOC` in `environ` (default `os.environ`) leaves the malloc tuning on (`on`, `glibc`);
    ValueError naming the value for one that is neither these nor `off`."""
    return malloc_choice(environ) != "off"


def other_allocator_preloaded(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `LD_PRELOAD` in `environ` (default `os.environ`) names jemalloc, tcmalloc or mimalloc: the user chose
    their allocator (or the command line preloaded tcmalloc), and glibc's tunables and `malloc_trim` are not ours
    to use."""
    environ = os.environ if environ is None else environ
    return any(name in environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS)


_FIND = object()  # malloc_env's default for `tcmalloc`: look with find_tcmalloc()


def malloc_env(environ: Mapping[str, str] | None = None, supported: bool | None = None,
               tcmalloc: str | None | object = _FIND) -> dict[str, str]:
    """The variables to set in `environ` (default `os.environ`) for the command line's malloc (module docstring):
    `{"LD_PRELOAD": tcmalloc, THREAD_CACHE_VAR: "4194304"}` when `tcmalloc` (default: `find_tcmalloc()`) is a
    path, `RTDETR_JAX_MALLOC` is `on` and `LD_PRELOAD` is empty (without `THREAD_CACHE_VAR` where the user set it);
    else `GLIBC_TUNABLES` with the huge-page tunable added where `supported` (default:
    glibc >= 2.35 on Linux with transparent huge pages on); `{}` when the user opted out, chose for themselves, or
    it already ran. Raises ValueError for a `RTDETR_JAX_MALLOC` other than on/glibc/off."""
    environ = os.environ if environ is None else environ
    choice = malloc_choice(environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (choice == "off" or environ.get(MARKER) or other_allocator_preloaded(environ)
            or "glibc.malloc.hugetlb" in tunables):
        return {}
    if choice == "on" and not environ.get("LD_PRELOAD", "").strip():
        path = find_tcmalloc() if tcmalloc is _FIND else tcmalloc
        if path:
            added = {"LD_PRELOAD": str(path)}
            if THREAD_CACHE_VAR not in environ:
                added[THREAD_CACHE_VAR] = str(THREAD_CACHE_BYTES)
            return added
    if supported is None:
        supported = glibc_supports_hugetlb() and transparent_hugepages_enabled()
    if not supported:
        return {}
    return {"GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec_with_tuned_malloc() -> None:
    """Replace this process by the same command line (`sys.orig_argv`: interpreter options and script or `-m`
    kept) with `malloc_env()` set, when that is not empty; otherwise return and let the caller go on. Call it
    first thing, before any thread is started or file opened."""
    added = malloc_env()
    if not added:
        return
    # argv[0] as sys.executable, not as typed: a bare `python` would be looked up on PATH again (another venv?)
    command = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, {**os.environ, **added, MARKER: "1"})


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's `malloc_trim` from the running process, or None (another C library, another platform)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


@functools.lru_cache(maxsize=1)
def _tcmalloc_extension():
    """(ReleaseFreeMemory, GetNumericProperty) of the tcmalloc running this process (preloaded), or None."""
    try:
        process = ctypes.CDLL(None)
        release, numeric = process.MallocExtension_ReleaseFreeMemory, process.MallocExtension_GetNumericProperty
    except (OSError, AttributeError):
        return None
    release.argtypes, release.restype = [], None
    numeric.argtypes, numeric.restype = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)], ctypes.c_int
    return release, numeric


def _tcmalloc_free_bytes(numeric) -> int:
    """Bytes tcmalloc holds free and mapped (`tcmalloc.pageheap_free_bytes`)."""
    value = ctypes.c_size_t(0)
    numeric(b"tcmalloc.pageheap_free_bytes", ctypes.byref(value))
    return value.value


def release_free_heap() -> bool:
    """Return the allocator's free pages to the system: tcmalloc's `MallocExtension_ReleaseFreeMemory()` where
    tcmalloc runs this process, else glibc's `malloc_trim(0)` (every arena); True when some were released. Call it
    after a burst of freed memory that will not be needed again soon, e.g. after XLA compiled something: the
    compiler's temporaries stay resident otherwise. A no-op (False) without glibc or tcmalloc, with another
    allocator preloaded, or with `RTDETR_JAX_MALLOC=off`; ValueError for a `RTDETR_JAX_MALLOC` other than
    on/glibc/off, as on the command line."""
    if not switched_on():
        return False
    extension = _tcmalloc_extension()
    if extension is not None:
        release, numeric = extension
        before = _tcmalloc_free_bytes(numeric)
        release()
        return _tcmalloc_free_bytes(numeric) < before
    if other_allocator_preloaded():
        return False
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def release_surplus_heap(limit: int = SURPLUS_BYTES) -> bool:
    """Under tcmalloc only: give its free pages back to the system when it holds more than `limit` bytes of them
    (`tcmalloc.pageheap_free_bytes`); True when it did. The model calls it right after dispatching each forward
    of a compiled shape: that forward's scratch block is then taken (live, so kept), and the pages tcmalloc holds
    free beyond `limit` are mostly a second scratch block. It takes one when a forward is issued before XLA's
    worker thread has freed the last forward's temporaries (it frees them just after the outputs are ready), and
    kept, that block stays resident beside the first for good. A no-op (False) under glibc, which maps and unmaps
    each scratch block, or another allocator, and with `RTDETR_JAX_MALLOC=off`; ValueError for a
    `RTDETR_JAX_MALLOC` other than on/glibc/off."""
    if not switched_on():
        return False
    extension = _tcmalloc_extension()
    if extension is None:
        return False
    release, numeric = extension
    if _tcmalloc_free_bytes(numeric) <= limit:
        return False
    release()
    return True
