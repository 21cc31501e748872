"""Strided 2-d convolution (NHWC, HWIO) whose input gradient is computed one stride phase at a time.

Why: XLA differentiates a strided convolution with respect to its input as a convolution over the output gradient
dilated by the stride (`lhs_dilate=2x2`). XLA:CPU's Eigen kernels do not take dilated inputs, so that convolution
runs as a plain loop over the dilated grid, three quarters of it zeros at stride 2. In the r18vd batch-4 training
step at 640 the five stride-2 3x3 input gradients (backbone stages 2-4, encoder downsampling) took ~0.3 s of
thread time, e.g. 121 ms for the (4, 80, 80, 128) -> (4, 160, 160, 64) one, against 37 ms here.

Here the input grid is split into stride x stride phases: input row `s*m + r` only ever meets the kernel taps
`t` with `t = r + p (mod s)`, at output row `m + (r + p - t) / s`. So each phase of the input gradient is a
stride-1 convolution of the output gradient with a sub-kernel of those taps (for 3x3 at stride 2: 1x1, 1x2, 2x1
and 2x2 taps, 9 in all, no zeros multiplied), and the phases are interleaved once at the end. The forward pass
is XLA's own; the kernel gradient XLA's or the same phase split on the input side (`phase_kernel_gradient`,
ops/kernel_gradient.py), as `conv2d` (ops/conv.py), the entry point that sends strided convolutions here, picks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rtdetr_jax.ops.kernel_gradient import native_kernel_gradient, phase_kernel_gradient
from rtdetr_jax.ops.xla_conv import plain_conv2d, xla_kernel_gradient

KERNEL_GRADIENTS = ("xla", "phases", "native")


def strided_conv2d(x, kernel, stride: int, padding: int, kernel_gradient: str = "xla"):
    """`conv2d` for stride >= 2, with the per-phase input gradient; the kernel gradient XLA's ("xla") or one
    stride-1 kernel gradient per stride phase over the batch stacked into one image ("phases",
    `phase_kernel_gradient` in ops/kernel_gradient.py) or the C++ kernel ("native", `native_kernel_gradient`
    there); `conv2d` picks the C++ kernel on the CPU in float32 where it is built, else the phases from 64 input
    channels at batch >= 2."""
    if kernel_gradient not in KERNEL_GRADIENTS:
        raise ValueError(f"strided_conv2d kernel_gradient {kernel_gradient!r} is not one of "
                         f"{', '.join(KERNEL_GRADIENTS)}")
    return _strided_conv(x, kernel, stride, padding, kernel_gradient)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _strided_conv(x, kernel, stride, padding, kernel_gradient):
    return plain_conv2d(x, kernel, stride, padding)


def _fwd(x, kernel, stride, padding, kernel_gradient):
    return plain_conv2d(x, kernel, stride, padding), (x, kernel)


def _phase_taps(size: int, out_size: int, k: int, stride: int, padding: int, r: int):
    """For the input rows `stride * m + r`: how many there are, the taps that reach them in the order of the output
    row they read (tap t meets output row m + (r + padding - t) / stride, so descending t), and the (low, high)
    padding of the output gradient that the stride-1 pass over those taps needs. No taps when k < stride."""
    rows = -(-(size - r) // stride)
    taps = [t for t in reversed(range(k)) if (t - r - padding) % stride == 0]
    if not taps:
        return rows, taps, None
    first = (r + padding - taps[0]) // stride  # output row read by m = 0
    last = rows - 1 + (r + padding - taps[-1]) // stride  # output row read by m = rows - 1
    return rows, taps, (-first, last - (out_size - 1))


def _input_gradient(x_shape, kernel, dy, stride: int, padding: int):
    """dL/dx of the strided convolution, one stride phase of the input at a time."""
    n, h, w, cin = x_shape
    zero = jnp.zeros((), dy.dtype)
    phases = []
    for a in range(stride):
        rows_a, taps_h, pad_h = _phase_taps(h, dy.shape[1], kernel.shape[0], stride, padding, a)
        cols = []
        for b in range(stride):
            cols_b, taps_w, pad_w = _phase_taps(w, dy.shape[2], kernel.shape[1], stride, padding, b)
            if not taps_h or not taps_w:
                cols.append(jnp.zeros((n, rows_a, cols_b, cin), dy.dtype))
                continue
            sub = kernel[jnp.array(taps_h)][:, jnp.array(taps_w)]  # (len(taps_h), len(taps_w), in, out)
            d = jax.lax.pad(dy, zero, ((0, 0, 0), (*pad_h, 0), (*pad_w, 0), (0, 0, 0)))
            # "HWOI": the sub-kernel's `in` axis is this convolution's output, `out` its input
            cols.append(jax.lax.conv_general_dilated(d, sub, (1, 1), "VALID",
                                                     dimension_numbers=("NHWC", "HWOI", "NHWC")))
        phases.append(cols)
    hq, wq = -(-h // stride), -(-w // stride)
    # pad every phase to (hq, wq) rows/cols, interleave: (n, hq, stride, wq, stride, in), then crop to (h, w)
    grid = jnp.stack([
        jnp.stack([jax.lax.pad(p, zero, ((0, 0, 0), (0, hq - p.shape[1], 0), (0, wq - p.shape[2], 0), (0, 0, 0)))
                   for p in cols], axis=3)
        for cols in phases], axis=2)
    return grid.reshape(n, hq * stride, wq * stride, cin)[:, :h, :w]


def _bwd(stride, padding, kernel_gradient, residuals, dy):
    x, kernel = residuals
    dx = _input_gradient(x.shape, kernel, dy, stride, padding).astype(x.dtype)
    if kernel_gradient == "native":
        dkernel = native_kernel_gradient(x, dy.astype(x.dtype), kernel.shape, stride, padding)
    elif kernel_gradient == "phases":
        dkernel = phase_kernel_gradient(x, dy, kernel.shape, stride, padding)
    else:
        dkernel = xla_kernel_gradient(x, dy, kernel.shape, stride, padding)
    return dx, dkernel.astype(kernel.dtype)


_strided_conv.defvjp(_fwd, _bwd)
