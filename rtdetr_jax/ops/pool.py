"""Max pooling (NHWC) as the maximum of strided views, with PyTorch's gradient (all of it to the first maximum).

Why: XLA:CPU differentiates `lax.reduce_window(max)` through a variadic reduce-window that carries the argmax
position as four int32 index arrays the size of the input. Measured in the r18vd batch-4 training step at 640:
that reduce-window plus its index arrays took ~0.5 s of thread time for the stem's one (4, 320, 320, 64) pool.
Here the forward pass is the elementwise maximum of the kh*kw strided windows (exactly the reduce-window's
values), and the backward pass routes each output's gradient to the first window position, in row-major order,
that holds the maximum, as `torch.nn.MaxPool2d` does. The shares are summed on the stride x stride phases of the
input grid (small pads of output-sized arrays), so no input-sized buffer is written per window position, and the
phases are spread onto the input grid by interior pads and added, all in one fused kernel. (Interleaving them by
stacking and reshaping instead made that kernel 1.6x slower: the stem's pool in the r18vd batch-4 training step,
74.7 -> 46.5 ms of thread time a step; the pool's forward and backward after a batch norm and ReLU at
(4, 320, 320, 64), alone, 296-336 -> 176-220 ms.)

Outside differentiation (inference) the windows are strided slices of the unpadded input, each padded to the
output's size (`_windows`), which XLA fuses with the maximum into one kernel: no padded copy of the input. For the
stem's (1, 320, 320, 64) pool alone: 15 -> 3 ms and 25 MB -> 0 of temporaries; the r18vd batch-1 forward's
temporaries 63.3 -> 57.4 MB (`compiled.memory_analysis()`; the rest of the padded copy's space goes to other
buffers placed there). Differentiation keeps the padded copy (`_padded_windows`), shared by its forward and backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _in_bounds(size: int, out: int, offset: int, stride: int) -> tuple[int, int]:
    """The outputs o whose input index stride * o + offset lies in [0, size): (first, end), end >= first."""
    first = max(0, -(offset // stride))  # ceil(-offset / stride)
    end = min(out, (size - 1 - offset) // stride + 1)
    return first, max(first, end)


def _windows(x, kernel: int, stride: int, padding: int, out_hw: tuple[int, int]):
    """The kernel*kernel strided views of x padded by `padding` (-inf), row-major: each (batch, H_out, W_out,
    channels), window position (i, j) of output (p, q) reading input (stride * p + i - padding, stride * q + j -
    padding). Each view is a strided slice of x with its out-of-bounds rows and columns padded by -inf, so the
    padding is applied to output-sized arrays, not to a padded copy of x: XLA fuses the slices, pads and the
    maximum over them into one kernel that reads x (the padded copy of the stem's (1, 320, 320, 64) map was 25 MB
    of the r18vd batch-1 forward's 63 MB of temporaries, written next to the map itself)."""
    n, h, w, c = x.shape
    ho, wo = out_hw
    low = jnp.array(-jnp.inf, x.dtype)
    views = []
    for i in range(kernel):
        r0, r1 = _in_bounds(h, ho, i - padding, stride)
        for j in range(kernel):
            c0, c1 = _in_bounds(w, wo, j - padding, stride)
            if r1 == r0 or c1 == c0:  # this window position lies in the padding for every output
                views.append(jnp.full((n, ho, wo, c), low))
                continue
            start = (0, stride * r0 + i - padding, stride * c0 + j - padding, 0)
            stop = (n, stride * (r1 - 1) + i - padding + 1, stride * (c1 - 1) + j - padding + 1, c)
            view = jax.lax.slice(x, start, stop, (1, stride, stride, 1))  # (batch, r1 - r0, c1 - c0, channels)
            views.append(jax.lax.pad(view, low, ((0, 0, 0), (r0, ho - r1, 0), (c0, wo - c1, 0), (0, 0, 0))))
    return views


def _padded_windows(x, kernel: int, stride: int, padding: int, out_hw: tuple[int, int]):
    """The same views as `_windows`, as strided slices of one -inf padded copy of x. Differentiation takes these,
    forward and backward: with `_windows` in the backward pass XLA wrote each view apart, and the pool's gradient
    took 1.3x the time ((1, 320, 320, 64): 106 vs 81 ms; (4, 320, 320, 64): 287 vs 251 ms) with twice the
    temporaries."""
    n, _, _, c = x.shape
    ho, wo = out_hw
    xp = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype),
                     ((0, 0, 0), (padding, padding, 0), (padding, padding, 0), (0, 0, 0)))
    return [
        jax.lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                      (1, stride, stride, 1))
        for i in range(kernel) for j in range(kernel)
    ]


def _out_hw(x, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """(H_out, W_out) of the pool of x (batch, H, W, channels)."""
    return tuple((size + 2 * padding - kernel) // stride + 1 for size in x.shape[1:3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool2d(x, kernel: int, stride: int, padding: int):
    """`torch.nn.MaxPool2d(kernel, stride, padding)` on x (batch, H, W, channels) -> (batch, H_out, W_out,
    channels); padding counts as -inf."""
    return functools.reduce(jnp.maximum, _windows(x, kernel, stride, padding, _out_hw(x, kernel, stride, padding)))


def _max_pool2d_fwd(x, kernel, stride, padding):
    # under differentiation the forward takes the padded copy too, which XLA then shares with the backward's
    # windows: with `_windows` here, the forward and backward of (4, 320, 320, 64) took 350 vs 234 ms
    y = functools.reduce(jnp.maximum, _padded_windows(x, kernel, stride, padding, _out_hw(x, kernel, stride, padding)))
    return y, (x, y)


def _max_pool2d_bwd(kernel, stride, padding, residuals, dy):
    x, y = residuals
    _, h, w, _ = x.shape
    ho, wo = y.shape[1], y.shape[2]
    # the padded input grid split into stride x stride phases: padded row r = stride * m + a is row m of phase a;
    # window position i of output o lands on padded row stride * o + i, i.e. phase i % stride, row o + i // stride
    hq, wq = -(-(h + 2 * padding) // stride), -(-(w + 2 * padding) // stride)
    zero = jnp.array(0, dy.dtype)
    taken = jnp.zeros(y.shape, bool)  # an earlier window position already holds this output's maximum
    phases = {}
    for k, window in enumerate(_padded_windows(x, kernel, stride, padding, (ho, wo))):
        i, j = divmod(k, kernel)
        first = (window == y) & ~taken
        taken = taken | first
        di, dj = i // stride, j // stride
        # (batch, hq, wq, channels): this window position's gradient on its phase grid
        share = jax.lax.pad(jnp.where(first, dy, zero), zero,
                            ((0, 0, 0), (di, hq - ho - di, 0), (dj, wq - wo - dj, 0), (0, 0, 0)))
        key = (i % stride, j % stride)
        phases[key] = phases[key] + share if key in phases else share
    # each phase spread onto the padded grid (row m of phase a -> padded row stride * m + a) by an interior pad,
    # then summed and the padding dropped
    grid = None
    for (a, b), phase in phases.items():
        spread = jax.lax.pad(phase, zero, ((0, 0, 0), (a, stride - 1 - a, stride - 1), (b, stride - 1 - b, stride - 1),
                                           (0, 0, 0)))
        grid = spread if grid is None else grid + spread
    return (grid[:, padding:padding + h, padding:padding + w, :],)


max_pool2d.defvjp(_max_pool2d_fwd, _max_pool2d_bwd)
