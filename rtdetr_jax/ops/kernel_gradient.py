"""Convolution kernel gradients: by the C++ kernel (`native_kernel_gradient`, ops/cpu_kernel_gradient.cc), which
`conv2d` takes on the CPU in float32 where it builds, and otherwise over the batch stacked into one tall image, at
stride 1 and, one stride phase at a time, at larger strides (what follows is about the latter).

Why: XLA:CPU computes a convolution's kernel gradient as a convolution whose contraction runs over the batch and
the pixels, with the batch as its innermost ("feature") axis. So it first copies the input and the output
gradient into batch-innermost layout, (in, H, W, batch), a transpose that writes 4-float runs at batch 4: in the
r18vd batch-4 training step at 640 those copies took 40-120 ms of thread time each for the stem's and the first
stage's maps (the XLA op profile, benchmarks/README.md).

Here the images are stacked along the rows into one image of batch 1, each still padded by `padding` on every
side, and the output gradient likewise, with `kh - 1` zero rows after each image: the kernel gradient of the
VALID convolution of that tall image is the sum over the images of theirs (at a seam every product meets a zero
row of the gradient). With batch 1 the layout change is a plain (pixels, channels) -> (channels, pixels)
transpose, done by a matmul with the identity up to `TRANSPOSE_BY_MATMUL_MAX_CHANNELS` input channels (XLA's
element-wise transpose reads with a stride of `in` floats, slow for few channels) and above by an explicit
two-dimensional transpose ahead of XLA's convolution: left to XLA, the transpose is a four-dimensional
permutation, (1, rows, W, in) -> (in, rows, W, 1), which XLA:CPU's loop emitter runs 3.5x slower than the same
data moved as a (pixels, in) -> (in, pixels) transpose (alone, (4, 82, 82, 128): 8.2 against 2.4 ms, on the
Intel machine). Measured alone on the 2-core CPU (kernel gradient with the batch norm and ReLU that produce its
input, batch 4, median of 7): 3x3
(160, 160, 64) -> 64 185 -> 148 ms, (320, 320, 32) -> 32 242 -> 208 ms, (80, 80, 128) -> 128 147 -> 85 ms
(Winograd's kernel gradient: 110 ms), (40, 40, 256) -> 256 90 -> 67 ms; the matmul transpose then took
(320, 320, 32) -> 32 from 171 to 119 ms (median of 9). Equal to XLA's within float32 rounding (relative 1e-6).
A strided convolution's kernel gradient is one such stride-1 kernel gradient per stride phase of the input
(`phase_kernel_gradient`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rtdetr_jax.ops import native
from rtdetr_jax.ops.xla_conv import plain_conv2d, xla_input_gradient, xla_kernel_gradient


TRANSPOSE_BY_MATMUL_MAX_CHANNELS = 64  # up to this many input channels, the tall image is transposed by a matmul
TRANSPOSES = ("auto", "matmul", "plain", "xla")
NATIVE_CHANNEL_MULTIPLE = 16  # the C++ kernel's output channels come in vectors of 16 floats at most; dy is padded


def native_kernel_gradient(x, dy, kernel_shape, stride: int, padding: int):
    """dL/dkernel of `plain_conv2d(x, kernel, stride, padding)` given dy = dL/dy, by the C++ kernel
    (ops/cpu_kernel_gradient.cc, built and registered by ops/native.py): the pixels walked in place, in NHWC, with
    no padded, stacked or transposed copy, on the CPU in float32. x (batch, H, W, in), dy (batch, out H, out W,
    out) -> kernel_shape (kh, kw, in, out). When the kernel cannot be built (`RTDETR_JAX_NATIVE=on`, after the
    one warning) this is XLA's kernel gradient. Differentiable (reverse mode) in x and dy: the kernel gradient is
    bilinear, <KG(x, dy), c> = <conv(x, c), dy>."""
    kernel_shape = tuple(int(d) for d in kernel_shape)
    kh, kw, cin, cout = kernel_shape
    n, h, w, _ = x.shape
    if x.shape[3] != cin or dy.shape != (n, (h + 2 * padding - kh) // stride + 1,
                                         (w + 2 * padding - kw) // stride + 1, cout):
        raise ValueError(f"native_kernel_gradient: x {x.shape} and dy {dy.shape} do not fit a {kernel_shape} kernel "
                         f"at stride {stride}, padding {padding}")
    if x.dtype != jnp.float32:
        raise ValueError(f"native_kernel_gradient: x is {x.dtype}, the C++ kernel takes float32")
    name = native.target("kernel_gradient")
    if name is None:
        return xla_kernel_gradient(x, dy, kernel_shape, stride, padding)
    return _native(x, dy.astype(jnp.float32), kernel_shape, stride, padding, name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _native(x, dy, kernel_shape, stride, padding, name):
    kh, kw, cin, cout = kernel_shape
    extra = -cout % NATIVE_CHANNEL_MULTIPLE
    if extra:
        dy = jnp.pad(dy, ((0, 0), (0, 0), (0, 0), (0, extra)))
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((kh, kw, cin, cout + extra), jnp.float32),
                            vmap_method="sequential")
    dk = call(x, dy, stride=np.int64(stride), padding=np.int64(padding))
    return dk[..., :cout] if extra else dk


def _native_fwd(x, dy, kernel_shape, stride, padding, name):
    return _native(x, dy, kernel_shape, stride, padding, name), (x, dy)


def _native_bwd(kernel_shape, stride, padding, name, residuals, cotangent):
    x, dy = residuals
    return (xla_input_gradient(x, cotangent, dy, stride, padding),  # d<conv(x, c), dy>/dx
            plain_conv2d(x, cotangent, stride, padding))  # d<conv(x, c), dy>/ddy


_native.defvjp(_native_fwd, _native_bwd)


def stacked_kernel_gradient(x, dy, kernel_size: tuple[int, int], padding: int, transpose: str = "auto"):
    """dL/dkernel of `plain_conv2d(x, kernel, 1, padding)` given dy = dL/dy: x (batch, H, W, in),
    dy (batch, H + 2 * padding - kh + 1, W + 2 * padding - kw + 1, out) -> (kh, kw, in, out) in x's dtype.
    `transpose`: how the tall image becomes channels-first, "matmul" (a product with the identity), "plain" (a
    two-dimensional transpose), "xla" (XLA's own transpose inside its kernel gradient) or "auto" (the matmul up to
    `TRANSPOSE_BY_MATMUL_MAX_CHANNELS` input channels, the plain transpose above); benchmarks and tests pick one to
    compare them."""
    if transpose not in TRANSPOSES:
        raise ValueError(f"transpose {transpose!r} is not one of {', '.join(TRANSPOSES)}")
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
    if transpose == "xla":
        return xla_kernel_gradient(xp, dyp, (kh, kw, cin, dy.shape[3]), 1, 0)
    by_matmul = transpose == "matmul" or (transpose == "auto" and cin <= TRANSPOSE_BY_MATMUL_MAX_CHANNELS)
    return _tall_kernel_gradient(xp[0], dyp[0], by_matmul)


def _tall_kernel_gradient(xp, dyp, by_matmul: bool):
    """XLA's kernel gradient of the VALID convolution of one tall image, xp (R, W, in) and dyp (R', W', out), with
    the (pixels, in) -> (in, pixels) transpose it needs done ahead of it: as a product with the identity
    (`by_matmul`) or as a two-dimensional transpose. Both exact: each output of the product is one input times 1
    plus zeros. The matmul is faster at up to 64 channels, where XLA:CPU's transpose is an element-wise copy that
    reads with a stride of `in` floats (alone, with the batch norm and ReLU in front, batch 4, median of 9:
    (320, 320, 32) -> 32 171 -> 119 ms, -> 64 214 -> 179 ms, (160, 160, 64) -> 64 85 -> 78 ms; at 128 channels
    slower, 62 -> 72 ms). Above, the plain transpose: in the r18vd batch-4 training step on the Intel machine,
    paired 0.974 and 0.980 of the time of XLA's own (6 and 8 rounds), where with the plain transpose at every
    channel count it was 1.013."""
    r, w, cin = xp.shape
    if by_matmul:
        eye = jnp.eye(cin, dtype=xp.dtype)
        xt = jax.lax.dot_general(eye, xp.reshape(r * w, cin), (((1,), (1,)), ((), ())),
                                 precision=jax.lax.Precision.HIGHEST)  # (in, pixels)
    else:
        xt = xp.reshape(r * w, cin).T  # (in, pixels)
    # the kernel gradient as XLA computes it: a convolution whose batch is `in`, whose kernel is dy and whose
    # one input channel is contracted with dy's single "in" channel
    dk = jax.lax.conv_general_dilated(xt.reshape(cin, r, w, 1), dyp.reshape(*dyp.shape[:2], 1, dyp.shape[2]),
                                      (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)  # (in, kh, kw, out)
    return dk.transpose(1, 2, 0, 3)


def phase_kernel_gradient(x, dy, kernel_shape, stride: int, padding: int):
    """dL/dkernel of `plain_conv2d(x, kernel, stride, padding)` for any stride, one stride phase at a time: kernel
    tap t = stride * d + a reads padded input row stride * m + t, i.e. row m + d of the phase image of padded rows
    a, a + stride, ...; so the taps of phase (a, b) get the stride-1 kernel gradient (`stacked_kernel_gradient`)
    of that phase image, cropped to the rows and columns they read, with dy. For 3x3 at stride 2: 2x2, 2x1, 1x2
    and 1x1 sub-kernels, 9 taps in all, no zeros multiplied. Why: XLA's strided kernel gradient transposes its
    operands into batch-innermost layout, as at stride 1 (the module docstring); alone, batch 4, with the batch
    norm and ReLU in front, median of 9: (160, 160, 64) -> 128 101 -> 64 ms, (80, 80, 256) -> 256 114 -> 90 ms,
    (80, 80, 128) -> 256 52 -> 40 ms; with 3 input channels (the stem) slower, 46 -> 51 ms. x (batch, H, W, in),
    dy (batch, out H, out W, out) -> kernel_shape (kh, kw, in, out) in x's dtype."""
    kh, kw = kernel_shape[:2]
    out_h, out_w = dy.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dkernel = jnp.zeros(tuple(kernel_shape), x.dtype)
    for a in range(min(stride, kh)):
        taps_h = len(range(a, kh, stride))
        for b in range(min(stride, kw)):
            taps_w = len(range(b, kw, stride))
            # the phase image, cropped to the out + taps - 1 rows (columns) its taps read; the forward's output
            # size guarantees that it has them
            phase = xp[:, a::stride, b::stride][:, :out_h + taps_h - 1, :out_w + taps_w - 1]
            dkernel = dkernel.at[a::stride, b::stride].set(
                stacked_kernel_gradient(phase, dy, (taps_h, taps_w), 0))
    return dkernel


KERNEL_GRADIENTS = ("stacked", "native")


def conv2d_with_kernel_gradient(x, kernel, padding: int, kernel_gradient: str):
    """`plain_conv2d(x, kernel, 1, padding)`: XLA's forward and input gradient, the kernel gradient by
    `stacked_kernel_gradient` ("stacked") or by the C++ kernel (`native_kernel_gradient`, "native")."""
    if kernel_gradient not in KERNEL_GRADIENTS:
        raise ValueError(f"kernel_gradient {kernel_gradient!r} is not one of {', '.join(KERNEL_GRADIENTS)}")
    return _conv(x, kernel, padding, kernel_gradient)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, padding: int, kernel_gradient: str):
    return plain_conv2d(x, kernel, 1, padding)


def _fwd(x, kernel, padding, kernel_gradient):
    return plain_conv2d(x, kernel, 1, padding), (x, kernel)


def _bwd(padding, kernel_gradient, residuals, dy):
    x, kernel = residuals
    dx = xla_input_gradient(x, kernel, dy, 1, padding)
    if kernel_gradient == "native":
        dkernel = native_kernel_gradient(x, dy, kernel.shape, 1, padding)
    else:
        dkernel = stacked_kernel_gradient(x, dy, kernel.shape[:2], padding)
    return dx, dkernel.astype(kernel.dtype)


_conv.defvjp(_fwd, _bwd)
