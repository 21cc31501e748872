"""Training-mode batch norm over the last axis with its per-channel sums done as matrix-vector products.

Why: XLA:CPU lowers a reduction over (batch, H, W) to a reduce-window tree that runs near 2 GB/s; the same sum
as `ones @ x.reshape(-1, channels)` runs as a matrix-vector product near 25 GB/s (measured on the 2-core
development CPU for a (4, 80, 80, 128) float32 map: 5.8 ms vs 0.5 ms). Training batch norm needs four such sums
(mean and variance forward; the bias and weight gradients backward), in every trainable norm of the encoder.
The backward pass is the textbook one, written out so that autodiff does not add its own reductions.

Under a data-parallel mesh the sums run over the global batch (XLA adds the all-reduce), as before.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def channel_sum(x):
    """Sum of x (..., channels) over every axis but the last, as a float32 (or wider) matrix-vector product."""
    rows = x.reshape(-1, x.shape[-1])
    ones = jnp.ones((rows.shape[0],), x.dtype)
    return jax.lax.dot_general(ones, rows, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, weight, bias, eps: float):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with the batch's mean and biased variance over every axis
    but the last. x: (..., channels) in any float dtype; weight, bias: (channels,) float32.
    Returns (y in x's dtype, mean, var), the statistics in float32 (or wider) for the running averages."""
    return _forward(x, weight, bias, eps)[0]


def _forward(x, weight, bias, eps):
    n = x.size // x.shape[-1]
    mean = channel_sum(x) / n
    stat_dtype = mean.dtype
    centered = x.astype(stat_dtype) - mean
    var = channel_sum(jnp.square(centered)) / n
    inv = jax.lax.rsqrt(var + eps)
    y = (centered * (inv * weight) + bias).astype(x.dtype)
    return (y, mean, var), (x, mean, inv, weight)


def _bwd(eps, residuals, cotangents):
    x, mean, inv, weight = residuals
    dy, dmean_out, dvar_out = cotangents
    n = x.size // x.shape[-1]
    stat_dtype = mean.dtype
    xhat = (x.astype(stat_dtype) - mean) * inv
    dy = dy.astype(stat_dtype)
    dbias = channel_sum(dy)
    dweight = channel_sum(dy * xhat)
    # d/dx of the normalised output, plus the (rarely used) direct gradients of the returned statistics
    dx = (weight * inv / n) * (n * dy - dbias - xhat * dweight)
    dx = dx + dmean_out / n + dvar_out * (2.0 / n) * (xhat / inv)
    return dx.astype(x.dtype), dweight.astype(weight.dtype), dbias.astype(weight.dtype)


batch_norm_train.defvjp(_forward, _bwd)
