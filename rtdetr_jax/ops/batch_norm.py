"""Training-mode batch norm over the last axis, its per-channel sums by a C++ kernel on the CPU (float32) and as
matrix-vector products elsewhere.

Training batch norm needs four per-channel sums over (batch, H, W): the mean and variance forward, the bias and
weight gradients backward (in every trainable norm of the encoder). The backward pass is the textbook one, written
out so that autodiff does not add its own reductions.

- CPU, float32, one device (`moments_targets`): ops/cpu_channel_moments.cc, one custom call per direction that
  reads the map once (the forward's second, centered pass re-reads each chunk from the cache) and sums in fixed
  chunks combined in double. XLA:CPU's form below writes (x - mean)^2 and dy * xhat out before summing them, and
  its matrix-vector products add the rows one after another in float32: at (4, 80, 80, 256) (the encoder's largest
  norms at the training batch) its mean and variance came out 7e-6 and 1e-5 (relative) from float64 and the
  gradients 3-4e-6, the kernel's all 1-4e-7 (tests/test_native_channel_moments.py). Measured (benchmarks/README.md):
  one norm's forward and backward 2x faster alone, the r18vd batch-4 train step 0.9-1.8% faster.
- Elsewhere (GPU, TPU, other dtypes, a data-parallel mesh, native kernels off or not built): each sum as
  `ones @ x.reshape(-1, channels)`, a matrix-vector product. XLA:CPU would lower a plain reduction over (batch, H,
  W) to a reduce-window tree that runs near 2 GB/s; the product ran near 25 GB/s on the 2-core development CPU
  ((4, 80, 80, 128) float32: 5.8 ms vs 0.5 ms). Under a data-parallel mesh these sums run over the global batch
  (XLA adds the all-reduce), which an opaque custom call would not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rtdetr_jax.ops import native


def channel_sum(x):
    """Sum of x (..., channels) over every axis but the last, as a float32 (or wider) matrix-vector product."""
    rows = x.reshape(-1, x.shape[-1])
    ones = jnp.ones((rows.shape[0],), x.dtype)
    return jax.lax.dot_general(ones, rows, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))


def moments_targets(dtype) -> tuple[str, str] | None:
    """The C++ kernel's two custom-call targets (moments, gradient moments; ops/cpu_channel_moments.cc) where the
    statistics are to be summed there: on the CPU with a single device (under a mesh the sums must run over the
    global batch, which XLA's all-reduce does for its own sums, not for an opaque custom call), for float32 maps,
    where native kernels are on and build (ops/native.py, `RTDETR_JAX_NATIVE`). None elsewhere."""
    return native.targets("channel_moments") if native.applies("channel_moments", dtype) else None


def _native_call(target: str, channels: int, *operands):
    """Two (channels,) float32 results of the custom call `target` on `operands`."""
    out = jax.ShapeDtypeStruct((channels,), jnp.float32)
    return jax.ffi.ffi_call(target, (out, out), vmap_method="sequential")(*operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, weight, bias, eps: float):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with the batch's mean and biased variance over every axis
    but the last. x: (..., channels) in any float dtype; weight, bias: (channels,) float32.
    Returns (y in x's dtype, mean, var), the statistics in float32 (or wider) for the running averages."""
    return _forward(x, weight, bias, eps)[0]


def _forward(x, weight, bias, eps):
    c = x.shape[-1]
    n = x.size // c
    targets = moments_targets(x.dtype) if n else None
    if targets is not None:
        mean, var = _native_call(targets[0], c, x.reshape(n, c))
        centered = x - mean
    else:
        mean = channel_sum(x) / n
        centered = x.astype(mean.dtype) - mean
        var = channel_sum(jnp.square(centered)) / n
    inv = jax.lax.rsqrt(var + eps)
    y = (centered * (inv * weight) + bias).astype(x.dtype)
    return (y, mean, var), (x, mean, inv, weight)


def _bwd(eps, residuals, cotangents):
    x, mean, inv, weight = residuals
    dy, dmean_out, dvar_out = cotangents
    c = x.shape[-1]
    n = x.size // c
    stat_dtype = mean.dtype
    xhat = (x.astype(stat_dtype) - mean) * inv
    dy = dy.astype(stat_dtype)
    targets = moments_targets(x.dtype) if n else None  # as in the forward (float32 x: float32 dy)
    if targets is not None:
        dbias, dcentered = _native_call(targets[1], c, dy.reshape(n, c), x.reshape(n, c), mean)
        dweight = dcentered * inv
    else:
        dbias = channel_sum(dy)
        dweight = channel_sum(dy * xhat)
    # d/dx of the normalised output, plus the (rarely used) direct gradients of the returned statistics
    dx = (weight * inv / n) * (n * dy - dbias - xhat * dweight)
    dx = dx + dmean_out / n + dvar_out * (2.0 / n) * (xhat / inv)
    return dx.astype(x.dtype), dweight.astype(weight.dtype), dbias.astype(weight.dtype)


batch_norm_train.defvjp(_forward, _bwd)
