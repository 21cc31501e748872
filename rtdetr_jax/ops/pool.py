"""Max pooling (NHWC) as the maximum of strided views, with PyTorch's gradient (all of it to the first maximum).

Why: XLA:CPU differentiates `lax.reduce_window(max)` through a variadic reduce-window that carries the argmax
position as four int32 index arrays the size of the input. Measured in the r18vd batch-4 training step at 640:
that reduce-window plus its index arrays took ~0.5 s of thread time for the stem's one (4, 320, 320, 64) pool.
Here the forward pass is the elementwise maximum of the kh*kw strided windows (exactly the reduce-window's
values), and the backward pass routes each output's gradient to the first window position, in row-major order,
that holds the maximum, as `torch.nn.MaxPool2d` does. The shares are summed on the stride x stride phases of the
input grid (small pads of output-sized arrays) and interleaved once, so no input-sized buffer is written per
window position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _windows(xp, kernel: int, stride: int, out_hw: tuple[int, int]):
    """The kernel*kernel strided views of the padded input, row-major: each (batch, H_out, W_out, channels)."""
    n, _, _, c = xp.shape
    ho, wo = out_hw
    return [
        jax.lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                      (1, stride, stride, 1))
        for i in range(kernel) for j in range(kernel)
    ]


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pad(x, padding: int):
    low = jnp.array(-jnp.inf, x.dtype)
    return jax.lax.pad(x, low, ((0, 0, 0), (padding, padding, 0), (padding, padding, 0), (0, 0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool2d(x, kernel: int, stride: int, padding: int):
    """`torch.nn.MaxPool2d(kernel, stride, padding)` on x (batch, H, W, channels) -> (batch, H_out, W_out,
    channels); padding counts as -inf."""
    out_hw = (_out_size(x.shape[1], kernel, stride, padding), _out_size(x.shape[2], kernel, stride, padding))
    return functools.reduce(jnp.maximum, _windows(_pad(x, padding), kernel, stride, out_hw))


def _max_pool2d_fwd(x, kernel, stride, padding):
    y = max_pool2d(x, kernel, stride, padding)
    return y, (x, y)


def _max_pool2d_bwd(kernel, stride, padding, residuals, dy):
    x, y = residuals
    n, h, w, c = x.shape
    ho, wo = y.shape[1], y.shape[2]
    # the padded input grid split into stride x stride phases: padded row r = stride * m + a is row m of phase a;
    # window position i of output o lands on padded row stride * o + i, i.e. phase i % stride, row o + i // stride
    hq, wq = -(-(h + 2 * padding) // stride), -(-(w + 2 * padding) // stride)
    zero = jnp.array(0, dy.dtype)
    taken = jnp.zeros(y.shape, bool)  # an earlier window position already holds this output's maximum
    phases = {}
    for k, window in enumerate(_windows(_pad(x, padding), kernel, stride, (ho, wo))):
        i, j = divmod(k, kernel)
        first = (window == y) & ~taken
        taken = taken | first
        di, dj = i // stride, j // stride
        # (batch, hq, wq, channels): this window position's gradient on its phase grid
        share = jax.lax.pad(jnp.where(first, dy, zero), zero,
                            ((0, 0, 0), (di, hq - ho - di, 0), (dj, wq - wo - dj, 0), (0, 0, 0)))
        key = (i % stride, j % stride)
        phases[key] = phases[key] + share if key in phases else share
    empty = jnp.zeros((n, hq, wq, c), dy.dtype)
    # (batch, hq, stride, wq, stride, channels) -> the padded grid, then drop the padding
    grid = jnp.stack([jnp.stack([phases.get((a, b), empty) for b in range(stride)], 3) for a in range(stride)], 2)
    grid = grid.reshape(n, hq * stride, wq * stride, c)
    return (grid[:, padding:padding + h, padding:padding + w, :],)


max_pool2d.defvjp(_max_pool2d_fwd, _max_pool2d_bwd)
