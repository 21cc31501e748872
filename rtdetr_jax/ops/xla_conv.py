"""XLA's own 2-d convolution (NHWC, HWIO) and its two gradients, as jax derives them: the building blocks that
`conv2d` (ops/conv.py) and its faster paths (ops/strided_conv.py, ops/kernel_gradient.py, ops/winograd.py) share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_DIMS = ("NHWC", "HWIO", "NHWC")


def plain_conv2d(x, kernel, stride: int, padding: int):
    """XLA's convolution: x (batch, H, W, in), kernel (kh, kw, in, out), symmetric padding."""
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                        dimension_numbers=_DIMS)


def xla_input_gradient(x, kernel, dy, stride: int, padding: int):
    """XLA's dL/dx of `plain_conv2d(x, kernel, stride, padding)` given dy = dL/dy."""
    return jax.vjp(lambda v: plain_conv2d(v, kernel, stride, padding), x)[1](dy)[0]


def xla_kernel_gradient(x, dy, kernel_shape, stride: int, padding: int):
    """XLA's dL/dkernel of `plain_conv2d(x, kernel, stride, padding)` given dy = dL/dy, in x's dtype (the
    convolution is linear in the kernel, so no kernel value is needed)."""
    zeros = jnp.zeros(tuple(kernel_shape), x.dtype)
    return jax.vjp(lambda v: plain_conv2d(x, v, stride, padding), zeros)[1](dy.astype(x.dtype))[0]
