"""glibc malloc on transparent huge pages, for the scratch memory XLA:CPU takes afresh on every call.

An XLA:CPU executable takes its temporaries with malloc at the start of every call and frees them at its end:
2.95 GB for the r18vd batch-4 training step at 640x640, a few hundred MB for a demo training step. The call runs
on XLA's worker threads, and glibc serves such large blocks from a worker thread's arena with a fresh `mmap`,
returned by `munmap` when freed. So every call page-faults its whole scratch block in again, one 4 KiB page at a
time, and the kernel zeroes it: 730,000-760,000 page faults and 3-4 s of kernel time per r18vd training step on the
2-core development machine. With the glibc tunable

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1    (glibc >= 2.35)

malloc asks for transparent huge pages (2 MiB) on the memory it maps (`madvise(MADV_HUGEPAGE)`, which works
where /sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`, the common default): 512x fewer
faults for the same memory. Measured on that machine (benchmarks/README.md, "Host memory"): the r18vd training
step 9.4 s -> 8.6 s (8.9 s -> 7.8 s in an earlier run), the demo's first 150 training steps 179-189 s -> 167 s (kernel time 46-49 s -> 23 s, peak
memory +2%), batch-1 inference unchanged within noise.

glibc reads tunables once, at process start, so the command line (`rtdetr-jax ...`, `python -m rtdetr_jax ...`)
re-executes itself once with the tunable added to `GLIBC_TUNABLES`, unless:

- `RTDETR_JAX_MALLOC=off` is set (`on` or unset is the default; any other value is an error),
- the platform is not Linux with glibc 2.35 or newer, or transparent huge pages are `never`,
- the user set `glibc.malloc.hugetlb` in `GLIBC_TUNABLES` themselves, or `LD_PRELOAD`s another allocator (the
  user's choice wins),
- it already did (the marker `RTDETR_JAX_MALLOC_APPLIED=1` is in the environment).

Library users (`import rtdetr_jax` in their own program) get nothing changed: start the program with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for the same gain.

Measured and not used: `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0` with a huge `MALLOC_TRIM_THRESHOLD_` (every
thread on glibc's main heap, freed memory kept) ends the faults altogether and gave the fastest r18vd training
step (7.0 s), but made the demo 11% slower (one malloc arena shared by all threads) with 25% more peak memory, and
its heap grew by 2-9x the scratch block in a microbenchmark (freed blocks fragmented by small allocations).

Compiling leaves freed memory behind: XLA's compiler allocates and frees a few hundred MB of small objects, and
glibc keeps the freed pages in its heaps. `release_free_heap()` (glibc's `malloc_trim(0)`) gives them back to the
system; the model calls it after each compilation of a new input shape and after loading weights. Measured on
r18vd at 1x3x640x640 (benchmarks/README.md, "Peak memory"): the resident set after the first forward goes from
~670-740 MB to ~520 MB (PyTorch: ~550 MB); `malloc_trim` itself takes well under a millisecond.
`RTDETR_JAX_MALLOC=off` turns this off too, and the dropping of jax's tracing caches that comes with it
(rtdetr_jax/jax_caches.py).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
MARKER = "RTDETR_JAX_MALLOC_APPLIED"
SWITCH = "RTDETR_JAX_MALLOC"
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


def switched_on(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `RTDETR_JAX_MALLOC` in `environ` (default `os.environ`) leaves the malloc tuning on: unset or `on`
    (any case, spaces ignored) is on, `off` is off; ValueError naming the value for anything else."""
    environ = os.environ if environ is None else environ
    choice = environ.get(SWITCH, "").strip().lower()
    if choice not in ("", "on", "off"):
        raise ValueError(f"{SWITCH}={environ[SWITCH]!r}: use 'on' (the default) or 'off'")
    return choice != "off"


def other_allocator_preloaded(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `LD_PRELOAD` in `environ` (default `os.environ`) names jemalloc, tcmalloc or mimalloc: the user chose
    their allocator, and glibc's tunables and `malloc_trim` are not ours to use."""
    environ = os.environ if environ is None else environ
    return any(name in environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS)


def hugepage_malloc_env(environ: Mapping[str, str] | None = None, supported: bool | None = None) -> dict[str, str]:
    """The variables to set in `environ` (default `os.environ`) for malloc to use transparent huge pages; `{}` when
    the user opted out or chose for themselves, or `supported` (default: glibc >= 2.35 on Linux with transparent
    huge pages on) is false. Raises ValueError for a `RTDETR_JAX_MALLOC` other than on/off."""
    environ = os.environ if environ is None else environ
    if not switched_on(environ) or environ.get(MARKER):
        return {}
    if supported is None:
        supported = glibc_supports_hugetlb() and transparent_hugepages_enabled()
    if not supported:
        return {}
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return {}
    if other_allocator_preloaded(environ):
        return {}
    return {"GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec_with_hugepage_malloc() -> None:
    """Replace this process by the same command line (`sys.orig_argv`: interpreter options and script or `-m`
    kept) with `hugepage_malloc_env()` set, when that is not empty; otherwise return and let the caller go on.
    Call it first thing, before any thread is started or file opened."""
    added = hugepage_malloc_env()
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


def release_free_heap() -> bool:
    """Return the malloc heaps' free pages to the system (glibc's `malloc_trim(0)`, every arena); True when glibc
    released some. Call it after a burst of freed memory that will not be needed again soon, e.g. after XLA
    compiled something: the compiler's temporaries stay resident otherwise. A no-op (False) without glibc, with
    another allocator preloaded, or with `RTDETR_JAX_MALLOC=off`; ValueError for a `RTDETR_JAX_MALLOC` other than
    on/off, as on the command line."""
    if not switched_on() or other_allocator_preloaded():
        return False
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
