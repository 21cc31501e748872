"""1x1 stride-1 convolutions whose gradients are matmuls over the pixels.

A 1x1 convolution is a matmul of the (pixels, in) input with the (in, out) kernel. Its forward here stays XLA's
convolution (the same kernel as the matmul), but its gradients are written as the two matmuls they are:

- input gradient: (pixels, out) dy @ kernel^T -> (pixels, in);
- kernel gradient: x^T @ dy, a `dot_general` contracting the pixel axis of both -> (in, out).

Why: XLA:CPU takes a convolution's kernel gradient as a convolution that contracts over the batch and the
pixels with the batch as its innermost axis (ops/kernel_gradient.py), so it first transposes the input and the
output gradient into (in, H, W, batch) layout. For a 1x1 kernel that copy is all the extra work: measured alone on
the 2-core Intel development machine (batch 4, median of 15), (80, 80, 512) -> 128 42.8 -> 19.2 ms,
(160, 160, 64) -> 64 21.9 -> 11.1 ms, (80, 80, 256) -> 256 33.1 -> 16.8 ms (PyTorch's oneDNN: 23.2, 6.6, 13.9);
the input gradient by the matmul equals XLA's (within 5%; at (160, 160, 64) -> 64 3.4 against 8.2 ms).
benchmarks/README.md has the training step's A/B.

Both gradients come in their arguments' dtypes, as XLA's do.
"""

from __future__ import annotations

import functools

import jax

from rtdetr_jax.ops.kernel_gradient import native_kernel_gradient
from rtdetr_jax.ops.xla_conv import plain_conv2d

KERNEL_GRADIENTS = ("matmul", "native")


def pointwise_conv2d(x, kernel, kernel_gradient: str = "matmul"):
    """`plain_conv2d(x, kernel, 1, 0)` for x (batch, H, W, in) and a (1, 1, in, out) kernel; the kernel gradient
    by the matmul ("matmul") or by the C++ kernel of ops/kernel_gradient.py ("native", which `conv2d` picks on the
    CPU in float32 where it is built: alone, batch 4, (160, 160, 64) -> 64 5.9 against 13.0 ms)."""
    if kernel_gradient not in KERNEL_GRADIENTS:
        raise ValueError(f"pointwise_conv2d kernel_gradient {kernel_gradient!r} is not one of "
                         f"{', '.join(KERNEL_GRADIENTS)}")
    return _pointwise(x, kernel, kernel_gradient)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise(x, kernel, kernel_gradient):
    return plain_conv2d(x, kernel, 1, 0)


def _fwd(x, kernel, kernel_gradient):
    return plain_conv2d(x, kernel, 1, 0), (x, kernel)


def _bwd(kernel_gradient, residuals, dy):
    x, kernel = residuals
    cin, cout = kernel.shape[2], kernel.shape[3]
    rows = dy.astype(x.dtype).reshape(-1, cout)  # (pixels, out)
    # (pixels, out) x (in, out) contracting out -> (pixels, in)
    dx = jax.lax.dot_general(rows, kernel[0, 0].astype(x.dtype), (((1,), (1,)), ((), ())))
    if kernel_gradient == "native":
        dkernel = native_kernel_gradient(x, dy.astype(x.dtype), kernel.shape, 1, 0)
    else:  # (pixels, in) x (pixels, out) contracting pixels -> (in, out)
        dkernel = jax.lax.dot_general(x.reshape(-1, cin), rows, (((0,), (0,)), ((), ())))
    return dx.reshape(x.shape).astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


_pointwise.defvjp(_fwd, _bwd)
