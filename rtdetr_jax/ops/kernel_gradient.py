"""The kernel gradient of a stride-1 convolution computed over the batch stacked into one tall image.

Why: XLA:CPU computes a convolution's kernel gradient as a convolution whose contraction runs over the batch and
the pixels, with the batch as its innermost ("feature") axis. So it first copies the input and the output
gradient into batch-innermost layout, (in, H, W, batch), a transpose that writes 4-float runs at batch 4: in the
r18vd batch-4 training step at 640 those copies took 40-120 ms of thread time each for the stem's and the first
stage's maps (the XLA op profile, benchmarks/README.md).

Here the images are stacked along the rows into one image of batch 1, each still padded by `padding` on every
side, and the output gradient likewise, with `kh - 1` zero rows after each image: the kernel gradient of the
VALID convolution of that tall image is the sum over the images of theirs (at a seam every product meets a zero
row of the gradient). With batch 1 the layout change is a plain (pixels, channels) -> (channels, pixels)
transpose. Measured alone on the 2-core CPU (kernel gradient with the batch norm and ReLU that produce its input,
batch 4, median of 7): 3x3 (160, 160, 64) -> 64 185 -> 148 ms, (320, 320, 32) -> 32 242 -> 208 ms,
(80, 80, 128) -> 128 147 -> 85 ms (Winograd's kernel gradient: 110 ms), (40, 40, 256) -> 256 90 -> 67 ms;
equal to XLA's within float32 rounding (relative 1e-6).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rtdetr_jax.ops.strided_conv import plain_conv2d, xla_input_gradient, xla_kernel_gradient


def stacked_kernel_gradient(x, dy, kernel_size: tuple[int, int], padding: int):
    """dL/dkernel of `plain_conv2d(x, kernel, 1, padding)` given dy = dL/dy: x (batch, H, W, in),
    dy (batch, H + 2 * padding - kh + 1, W + 2 * padding - kw + 1, out) -> (kh, kw, in, out) in x's dtype."""
    n, h, w, cin = x.shape
    kh, kw = kernel_size
    if n == 0:  # an empty batch: no products, and no tall image to build
        return jnp.zeros((kh, kw, cin, dy.shape[3]), x.dtype)
    rows = h + 2 * padding  # of each padded image
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    xp = xp.reshape(1, n * rows, w + 2 * padding, cin)  # the images one below the other
    # each image's dy rows, then kh - 1 zero rows (dy has rows - kh + 1 rows); the tall VALID output has
    # n * rows - kh + 1 rows, so the last image's zero rows are dropped
    dyp = jnp.pad(dy.astype(x.dtype), ((0, 0), (0, kh - 1), (0, 0), (0, 0)))
    dyp = dyp.reshape(1, n * rows, dy.shape[2], dy.shape[3])[:, :n * rows - kh + 1]
    return xla_kernel_gradient(xp, dyp, (kh, kw, cin, dy.shape[3]), 1, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_stacked_kernel_gradient(x, kernel, padding: int):
    """`plain_conv2d(x, kernel, 1, padding)`: XLA's forward and input gradient, the kernel gradient by
    `stacked_kernel_gradient`."""
    return plain_conv2d(x, kernel, 1, padding)


def _fwd(x, kernel, padding):
    return plain_conv2d(x, kernel, 1, padding), (x, kernel)


def _bwd(padding, residuals, dy):
    x, kernel = residuals
    dx = xla_input_gradient(x, kernel, dy, 1, padding)
    dkernel = stacked_kernel_gradient(x, dy, kernel.shape[:2], padding).astype(kernel.dtype)
    return dx, dkernel


conv2d_stacked_kernel_gradient.defvjp(_fwd, _bwd)
