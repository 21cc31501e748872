"""jax's persistent compilation cache, on by default for the command line.

XLA compiles the r18vd forward in ~14 s on the 2-core CPU (the Winograd convolutions make a large program,
ops/winograd.py) and the training step in 1-2 minutes, and each `rtdetr-jax` command is a fresh process. jax
can store compiled programs on disk and load them in later processes (`jax_compilation_cache_dir`); the command
line turns that on, in

    $RTDETR_JAX_CACHE   (else $XDG_CACHE_HOME/rtdetr_jax, else ~/.cache/rtdetr_jax)  /jax_compilation/

next to the converted weights (rtdetr_jax/convert/cache.py), with jax's least-recently-used eviction above
`MAX_BYTES`. Measured on r18vd at 1x3x640x640 (benchmarks/README.md, "First call and compilation"): a fresh
process's first forward 14.3 s -> 3.1 s, and its peak memory 1102-1158 MB -> 565 MB, as nothing is compiled.

jax keys each entry by the program, the jax/jaxlib versions, the backend and the XLA flags, so a changed model,
input shape or flag compiles again; programs that compiled in under a second are not stored (jax's default).
Left alone: a user's own `JAX_COMPILATION_CACHE_DIR` (jax reads it itself) and `RTDETR_JAX_CACHE=off` (no
cache at all). Library users (`import rtdetr_jax`) get nothing changed; `jax.config.update(
"jax_compilation_cache_dir", path)` turns the same cache on in their program.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

from rtdetr_jax.convert.cache import cache_root

SUBDIR = "jax_compilation"
MAX_BYTES = 2 * 1024**3  # the r18vd forward takes ~0.9 MB, a training step a few MB
USER_DIR = "JAX_COMPILATION_CACHE_DIR"
USER_MAX = "JAX_COMPILATION_CACHE_MAX_SIZE"


def command_line_cache_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The folder the command line gives jax for compiled programs; None when the user chose one
    (`JAX_COMPILATION_CACHE_DIR`) or turned rtdetr-jax's cache off (`RTDETR_JAX_CACHE=off`)."""
    environ = os.environ if environ is None else environ
    if environ.get(USER_DIR):
        return None
    root = cache_root(environ)
    return None if root is None else os.path.join(root, SUBDIR)


def enable_for_command_line(environ: Mapping[str, str] | None = None) -> str | None:
    """Point jax's persistent compilation cache at `command_line_cache_dir()`; returns the folder, or None when
    left alone or when the folder cannot be created (one warning naming it; the command runs uncached). Call it
    before the first compilation."""
    environ = os.environ if environ is None else environ
    path = command_line_cache_dir(environ)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        warnings.warn(f"compiled programs are not cached: cannot create {path} ({err.strerror or err})", stacklevel=2)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    if not environ.get(USER_MAX):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
