"""jax's tracing caches, dropped after the model compiled a new input shape.

When jax traces a jit function it caches, per function and argument signature, the jaxpr of every jit-wrapped
function it met on the way (the detector's own forward, and the hundreds of `jnp` and `lax` helpers that are jit
functions themselves), the abstract evaluations, and the lowered module. Once the forward is compiled, those
entries serve only a later trace of the same functions with the same shapes, which the model never does: its
compiled executables sit in each jit function's own executable cache (jax's C++ fast path), which a call of a
compiled shape consults without tracing. For r18vd at 1x3x640x640 the tracing caches held ~50-60 MB after the
first forward (benchmarks/README.md, "jax's tracing caches"), about the batch-1 excess of our process over PyTorch's.

`drop_tracing_caches()` clears them, as `jax.clear_caches()` does, but leaves the jit functions' own executable
caches alone: a call of a signature that ran, ours or the user's, is served by jax's C++ fast path and neither
traces nor compiles (tests/test_jax_caches.py). Only a call that jax handles in Python instead (a signature the
fast path does not hold, e.g. one it evicted) would compile again rather than reuse the Python-side cache. What a
later trace of a new shape pays is re-tracing the `jnp` helpers instead of finding them cached (the r18vd
forward's second shape took 14.5 s and 16.9 s to its first output with the drop, 14.5 s and 15.1 s without:
within this machine's noise), and eager `jnp` operations outside jit compile their small kernels once more.

jax offers no public call that clears the tracing caches but not the compiled ones, so this uses
`jax._src.util.clear_all_caches` (the first half of `jax.clear_caches`) where it exists, and does nothing
otherwise; tests/test_jax_caches.py fails if a jax release removes it. `RTDETR_JAX_MALLOC=off` (the switch for
everything this library does to the process's memory, rtdetr_jax/host_memory.py) turns it off.
"""

from __future__ import annotations

from rtdetr_jax.host_memory import switched_on


def _clear_all_tracing_caches():
    """jax's function that clears its Python-side caches (tracing, lowering) but not the C++ executable caches;
    None where this jax has no such function."""
    try:
        from jax._src import util
    except ImportError:
        return None
    return getattr(util, "clear_all_caches", None)


def drop_tracing_caches() -> bool:
    """Clear jax's tracing caches (see the module's docstring); True when cleared, False with
    `RTDETR_JAX_MALLOC=off` or a jax without the function. ValueError for a bad `RTDETR_JAX_MALLOC`."""
    if not switched_on():
        return False
    clear = _clear_all_tracing_caches()
    if clear is None:
        return False
    clear()
    return True
