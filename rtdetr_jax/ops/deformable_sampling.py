"""The deformable attention's weighted gather by the C++ kernel (ops/cpu_deformable_sampling.cc) on the CPU.

    out[b, q, h, :] = sum over k of weight[b, q, h, k] * value[b, index[b, q, h, k], g(h), :]

with value (batch, tokens, groups, channels), groups == heads (head h reads group h: the projected value split
into heads) or 1 (every head reads the same rows: the unprojected memory), and index, weight (batch, queries,
heads, taps). modeling/deformable.py builds the taps (bilinear corners or rounded pixels) and their weights, and
its CPU forward (the projection-last form, one group of memory rows) calls `weighted_gather` where
`sampling_targets` says so; derivatives and other backends keep its XLA gathers, the reference this kernel is
tested against. `weighted_gather` is differentiable (reverse mode) in value and weight: the gradient is a second
custom call that reads each tap's row once and adds into d_value without a scatter.

Why: XLA:CPU writes every tap's row out before it sums them (the r18vd decoder at batch 8: 2400 x 8 rows of 256
floats per image and layer), and its gradient is a scatter-add into a zeroed buffer plus the products again.
Measured (benchmarks/README.md): the r18vd forward at batch 8 1.8% faster in an A/B run in both orders, batch 1
even; in the batch-4 training step the kernel and its gradient took ~80 ms less thread time a step than XLA's
gathers, but the step's time did not move (paired 1.002 and 1.010 of XLA's in two 20-round A/B runs), so the
training path keeps XLA's gathers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rtdetr_jax.ops import native


def sampling_targets(value_dtype, weight_dtype=jnp.float32) -> tuple[str, str] | None:
    """The kernel's two custom-call targets (forward, gradient) where the weighted gather is to run in C++: on the
    CPU with a single device (XLA would gather a sharded batch to run an opaque custom call), for float32 values and
    weights (float64 weights under x64 keep XLA's gather and their precision), where native kernels are on and
    build (ops/native.py, `RTDETR_JAX_NATIVE`; built here on first use). None elsewhere, and where the build failed
    under `RTDETR_JAX_NATIVE=on` (after its one warning)."""
    if not native.applies("deformable_sampling", value_dtype, weight_dtype):
        return None
    return native.targets("deformable_sampling")


def weighted_gather(value, index, weight, targets: tuple[str, str]):
    """value (batch, tokens, groups, channels) float32, index (batch, queries, heads, taps) int32 (clamped into
    [0, tokens)), weight (batch, queries, heads, taps) -> (batch, queries, heads, channels) float32, by the C++
    kernel behind `targets` (from `sampling_targets`)."""
    if value.ndim != 4 or index.ndim != 4 or weight.shape != index.shape or index.shape[0] != value.shape[0]:
        raise ValueError(f"weighted_gather: value {value.shape}, index {index.shape} and weight {weight.shape} do "
                         "not fit (batch, tokens, groups, channels) and (batch, queries, heads, taps)")
    if value.shape[2] not in (1, index.shape[2]):
        raise ValueError(f"weighted_gather: value has {value.shape[2]} groups; {index.shape[2]} heads need 1 or "
                         f"{index.shape[2]}")
    if value.dtype != jnp.float32:
        raise ValueError(f"weighted_gather: value is {value.dtype}, the C++ kernel takes float32")
    if not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"weighted_gather: index is {index.dtype}, expected an integer dtype")
    if value.shape[1] == 0 and index.size:
        raise ValueError(f"weighted_gather: value {value.shape} has no tokens to gather")
    return _gather(value, index.astype(jnp.int32), weight.astype(jnp.float32), tuple(targets))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather(value, index, weight, targets):
    batch, queries, heads, _ = index.shape
    call = jax.ffi.ffi_call(targets[0], jax.ShapeDtypeStruct((batch, queries, heads, value.shape[3]), jnp.float32),
                            vmap_method="sequential")
    return call(value, index, weight)


def _gather_fwd(value, index, weight, targets):
    return _gather(value, index, weight, targets), (value, index, weight)


def _gather_bwd(targets, residuals, d_out):
    value, index, weight = residuals
    call = jax.ffi.ffi_call(targets[1], (jax.ShapeDtypeStruct(value.shape, jnp.float32),
                                         jax.ShapeDtypeStruct(weight.shape, jnp.float32)),
                            vmap_method="sequential")
    d_value, d_weight = call(value, index, weight, d_out.astype(jnp.float32))
    return d_value, np.zeros(index.shape, jax.dtypes.float0), d_weight


_gather.defvjp(_gather_fwd, _gather_bwd)
