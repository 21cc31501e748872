"""3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016).

Each 2x2 block of outputs is computed from the 4x4 input tile around it as `A^T [(G g G^T) * (B^T d B)] A`: the
input tile and the kernel are transformed into 16 "planes", multiplied plane by plane (one matmul over channels per
plane, for all tiles at once) and transformed back. That is 16 multiplications per 2x2 outputs and channel pair
instead of 36: 2.25x fewer matmul FLOPs, bought with elementwise transforms (additions only, plus halves on the
kernel side) that write the input 4x and the output 4x over.

Why here: XLA:CPU's direct convolution already runs near the matmul peak (~150-160 GFLOP/s on the 2-core
development machine), so only fewer FLOPs make it faster. Measured there (benchmarks/README.md, "Winograd"): one
convolution's forward 1.25-1.75x faster at 64-512 channels and batch 1-8; the r18vd forward at 640x640 0.43 s ->
0.36 s at batch 1. It loses at 32 channels (the deep stem), where the transforms' memory traffic outweighs the
saved FLOPs; `conv2d` (ops/conv.py) decides where it is used. The price is compile time: the r18vd forward
compiled in ~16 s instead of ~3.3 s all direct (16 planes per convolution, and the ordering in `_after`); with the
C++ transforms below, the batch-1 forward's first call takes 6.4 s against 9.4 s with XLA's (twenty-fifth session).

The gradients come from a `custom_vjp` that saves only the input and the kernel (a convolution's gradient does not
depend on how its forward was computed); each is picked on its own (`conv2d` decides): the input gradient is XLA's
or, from 64 channels up (128 until the twenty-fourth session), Winograd's (`_winograd_input_gradient`); the kernel
gradient is XLA's, the stacked-batch one, the C++ one (ops/kernel_gradient.py) or, from 256 channels up, Winograd's
(`_winograd_kernel_gradient`), the planes recomputed in the backward. Winograd's gradients from 128 channels made
the r18vd batch-4 train step 0.94x the time (paired A/B) for a 32 s longer first step; at (4, 80, 80, 128) the
stacked kernel gradient later beat Winograd's (85 vs 110 ms), at (4, 20, 20, 512) Winograd's stayed faster (38 vs
71 ms). Letting jax differentiate the planes instead was 1.4-1.8x faster for one convolution alone, but slower in that
step (7.65 s vs 7.23 s a step, direct throughout) and compiled 28 s longer: its residuals are the 4x-sized
transformed inputs.

The 16 planes are kept as separate arrays, not stacked into one (16, tiles, channels) batch: stacked, XLA:CPU
built the transformed input as one concatenation that ran several times slower than the 16 fused slices-and-adds
(e.g. (1, 160, 160, 64): 31 ms stacked, 8 ms as planes).

On the CPU in float32 both data transforms (the input's planes: forward, and of dy and x in the backward; the
output's assembly) run in C++ instead (ops/cpu_winograd_transforms.cc, `transform_targets`): each tile's patch is
read once and its 16 planes written once, where XLA wrote a padded copy and re-read it (the input transform alone
at (4, 80, 80, 128): 4.2 -> 2.4 ms). Their results equal the XLA forms' bit for bit (the same additions in the same
order). Measured in-process against XLA's forms (benchmarks/README.md, both orders): the r18vd batch-4 train step
2.3-2.7% faster (the output transform's share 0.4-2.0%), the batch-8 forward 0.5-1.4%, batch 1 0.4%.

Rounding: float32 outputs land ~2x further from the float64 result than the direct convolution's (2.4e-6 vs 1.4e-6
at outputs up to ~4; tests/test_winograd.py), and the whole r18vd forward's float32 error stays at the direct
convolution's and PyTorch's (~5e-4 on the logits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rtdetr_jax.ops import native
from rtdetr_jax.ops.kernel_gradient import native_kernel_gradient, stacked_kernel_gradient
from rtdetr_jax.ops.xla_conv import xla_input_gradient, xla_kernel_gradient

INPUT_GRADIENTS = ("xla", "winograd")
KERNEL_GRADIENTS = ("xla", "stacked", "winograd", "native")
# Which data transforms run in C++ (ops/cpu_winograd_transforms.cc) where `transform_targets` allows it
NATIVE_INPUT_TRANSFORM = True
NATIVE_OUTPUT_TRANSFORM = True


def transform_targets(dtype) -> tuple[str, str] | None:
    """The C++ transforms' two custom-call targets (input, output; ops/cpu_winograd_transforms.cc) where the data
    transforms are to run there: on the CPU with a single device (XLA would gather a sharded batch to run an opaque
    custom call), for float32 maps, where native kernels are on and build (ops/native.py, `RTDETR_JAX_NATIVE`).
    None elsewhere: XLA's forms below, which the kernels equal bit for bit."""
    return native.targets("winograd_transforms") if native.applies("winograd_transforms", dtype) else None


def _input_transform(d0, d1, d2, d3):
    """The rows (or columns) of B^T d for one axis of the 4x4 input tile: B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],
    [0,1,0,-1]]."""
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _kernel_transform(g0, g1, g2):
    """G g for one axis of the 3x3 kernel: G = [[1,0,0],[1/2,1/2,1/2],[1/2,-1/2,1/2],[0,0,1]]."""
    return [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]


def _output_transform(m0, m1, m2, m3):
    """A^T m for one axis: A^T = [[1,1,1,0],[0,1,-1,-1]]."""
    return [m0 + m1 + m2, m1 - m2 - m3]


def _after(kernel, x):
    """`kernel`, unchanged, but computed only once `x` exists.

    The kernel transform depends on the parameters alone, so XLA:CPU's scheduler computed every layer's at the
    start of the forward and kept them all alive until their layers ran (16x the kernel each: 16 MB at 512
    channels). That raised the r18vd batch-1 forward's planned scratch from 57 MB (direct convolutions) to 124 MB.
    Adding zero derived from one element of the layer's input makes the transform wait for that input; with it
    the plan is 57 MB again. (`lax.optimization_barrier` does not do this on the CPU: XLA removes it before
    scheduling.) The zero is exact: a non-finite element is replaced by 0 before the multiplication."""
    if x.size == 0:  # an empty batch: nothing to wait for
        return kernel
    x0 = x[(0,) * x.ndim]
    return kernel + (jnp.where(jnp.isfinite(x0), x0, 0) * 0).astype(kernel.dtype)


def winograd_kernel(kernel):
    """(3, 3, in, out) HWIO kernel -> 4x4 nested list of (in, out) planes U[a][b] = (G g G^T)[a, b]."""
    rows = [_kernel_transform(kernel[0, j], kernel[1, j], kernel[2, j]) for j in range(3)]  # rows[j][a]
    return [_kernel_transform(rows[0][a], rows[1][a], rows[2][a]) for a in range(4)]


def _kernel_gradient_transform(u0, u1, u2, u3):
    """G^T u for one axis: the transpose of `_kernel_transform`, from 4 plane gradients to 3 kernel taps."""
    return [u0 + 0.5 * (u1 + u2), 0.5 * (u1 - u2), 0.5 * (u1 + u2) + u3]


def _output_gradient_transform(d0, d1):
    """A d for one axis: the transpose of `_output_transform`, from the 2 outputs of a tile to its 4 planes."""
    return [d0, d0 + d1, d0 - d1, -d1]


# Rotating the kernel by 180 degrees reverses G's columns, which is G with rows 0 and 3 swapped: the rotated
# kernel's planes are the kernel's planes U[FLIP[a]][FLIP[b]].
FLIP = (3, 1, 2, 0)


def winograd_conv3x3(x, kernel, input_gradient: str = "xla", kernel_gradient: str = "xla"):
    """`conv2d(x, kernel, stride=1, padding=1)` for x (batch, H, W, in) and a (3, 3, in, out) kernel; any H, W
    (odd sizes are padded by one row or column and cropped back). Gradients: `input_gradient` "xla" (the direct
    convolution's) or "winograd"; `kernel_gradient` "xla", "stacked" (ops/kernel_gradient.py), "native" (the C++
    kernel there) or "winograd"."""
    if input_gradient not in INPUT_GRADIENTS:
        raise ValueError(f"input_gradient {input_gradient!r} is not one of {', '.join(INPUT_GRADIENTS)}")
    if kernel_gradient not in KERNEL_GRADIENTS:
        raise ValueError(f"kernel_gradient {kernel_gradient!r} is not one of {', '.join(KERNEL_GRADIENTS)}")
    return _winograd_conv(x, kernel, input_gradient, kernel_gradient)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd_conv(x, kernel, input_gradient, kernel_gradient):
    return _winograd_forward(x, kernel)


def _forward_with_residuals(x, kernel, input_gradient, kernel_gradient):
    return _winograd_forward(x, kernel), (x, kernel)


def _gradients(input_gradient, kernel_gradient, residuals, dy):
    """From the saved input and kernel (nothing 4x-sized is kept for the backward)."""
    x, kernel = residuals
    dy = dy.astype(x.dtype)
    if input_gradient == "winograd":
        dx = _winograd_input_gradient(x.shape, kernel, dy)
    else:
        dx = xla_input_gradient(x, kernel, dy, 1, 1)
    if kernel_gradient == "winograd":
        dkernel = _winograd_kernel_gradient(x, dy)
    elif kernel_gradient == "stacked":
        dkernel = stacked_kernel_gradient(x, dy, (3, 3), 1)
    elif kernel_gradient == "native":
        dkernel = native_kernel_gradient(x, dy, kernel.shape, 1, 1)
    else:
        dkernel = xla_kernel_gradient(x, dy, kernel.shape, 1, 1)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_winograd_conv.defvjp(_forward_with_residuals, _gradients)


def _winograd_input_gradient(x_shape, kernel, dy):
    """The convolution of dy with the kernel rotated 180 degrees and its channels swapped, i.e. the forward
    algorithm with the kernel's planes permuted (FLIP) and each plane's matmul transposed.

    Measured per convolution against XLA's gradients (benchmarks/README.md, "Winograd convolutions"): faster from
    128 channels up at 40x40 maps and below (1.2-2x), about even at (4, 80, 80, 128)."""
    _, h, w, _ = x_shape
    u = winograd_kernel(_after(kernel, dy).astype(dy.dtype))
    dy_planes, _, _ = _input_planes(dy)
    return _assemble_output(_plane_products(dy_planes, u, rotated=True), h, w)


def _winograd_kernel_gradient(x, dy):
    """Per plane, (input planes)^T @ (dy's planes, A dy A^T), summed over all tiles by the matmul, then
    G^T dU G back to the 3x3 taps."""
    _, h, w, cin = x.shape
    cout = dy.shape[-1]
    x_planes, th, tw = _input_planes(x)
    dyp = jnp.pad(dy, ((0, 0), (0, 2 * th - h), (0, 2 * tw - w), (0, 0)))  # whole tiles; the extra outputs get 0
    d = [[dyp[:, p::2, q::2] for q in range(2)] for p in range(2)]  # d[p][q]: (batch, th, tw, out)
    rows = [_output_gradient_transform(d[0][q], d[1][q]) for q in range(2)]  # rows[q][a]
    dm = [_output_gradient_transform(rows[0][a], rows[1][a]) for a in range(4)]  # dm[a][b]
    du = [[jnp.dot(x_planes[a][b].reshape(-1, cin).T, dm[a][b].reshape(-1, cout)) for b in range(4)]
          for a in range(4)]  # (in, out) each
    cols = [_kernel_gradient_transform(*[du[a][b] for a in range(4)]) for b in range(4)]  # cols[b][i]
    taps = [_kernel_gradient_transform(*[cols[b][i] for b in range(4)]) for i in range(3)]  # taps[i][j]
    return jnp.stack([jnp.stack(row) for row in taps])


def _input_planes(x):
    """x (batch, H, W, c) -> 4x4 nested list of (batch, th, tw, c) planes B^T d B of its 4x4 tiles (stride 2,
    zero padding 1, odd sizes padded to whole tiles), with th, tw the tiles per column and row."""
    n, h, w, c = x.shape
    th, tw = -(-h // 2), -(-w // 2)  # tiles of 2x2 outputs
    targets = transform_targets(x.dtype) if NATIVE_INPUT_TRANSFORM and x.size else None
    if targets is not None:
        plane = jax.ShapeDtypeStruct((n, th, tw, c), x.dtype)
        flat = jax.ffi.ffi_call(targets[0], (plane,) * 16, vmap_method="sequential")(x)
        return [list(flat[4 * a:4 * a + 4]) for a in range(4)], th, tw
    xp = jnp.pad(x, ((0, 0), (1, 1 + h % 2), (1, 1 + w % 2), (0, 0)))  # (batch, 2*th + 2, 2*tw + 2, c)
    # tile (t, s) reads padded rows 2t..2t+3 and columns 2s..2s+3
    rows = _input_transform(*[xp[:, i:i + 2 * th:2] for i in range(4)])  # 4 x (batch, th, 2*tw + 2, c)
    return [_input_transform(*[r[:, :, j:j + 2 * tw:2] for j in range(4)]) for r in rows], th, tw


def _plane_products(planes, u, rotated: bool = False):
    """The 16 matmuls over channels, one per plane: (batch * th * tw, in) @ U[a][b] (in, out) for every tile at
    once. `rotated`: with the kernel rotated 180 degrees and its channels swapped instead (the input gradient),
    i.e. @ U[FLIP[a]][FLIP[b]]^T, the transpose taken by the matmul. -> 4x4 nested list of (batch, th, tw, ...)."""
    n, th, tw, c = planes[0][0].shape
    out = u[0][0].shape[0 if rotated else 1]

    def product(a, b):
        p = planes[a][b].reshape(-1, c)
        if rotated:
            m = jax.lax.dot_general(p, u[FLIP[a]][FLIP[b]], (((1,), (1,)), ((), ())))
        else:
            m = jnp.dot(p, u[a][b])
        return m.reshape(n, th, tw, out)

    return [[product(a, b) for b in range(4)] for a in range(4)]


def _assemble_output(m, h, w):
    """4x4 nested list of (batch, th, tw, out) products -> (batch, h, w, out): A^T m A per tile, tiles interleaved."""
    n, th, tw, out = m[0][0].shape
    targets = transform_targets(m[0][0].dtype) if NATIVE_OUTPUT_TRANSFORM and n * th * tw * out else None
    if targets is not None:
        y = jax.ShapeDtypeStruct((n, h, w, out), m[0][0].dtype)
        return jax.ffi.ffi_call(targets[1], y, vmap_method="sequential")(*[p for row in m for p in row])
    cols = [_output_transform(*[m[a][b] for a in range(4)]) for b in range(4)]  # cols[b][p]
    y = [_output_transform(*[cols[b][p] for b in range(4)]) for p in range(2)]  # y[p][q]: (batch, th, tw, out)
    y = jnp.stack([jnp.stack(y[p], 3) for p in range(2)], 2)  # (batch, th, 2, tw, 2, out)
    return y.reshape(n, 2 * th, 2 * tw, out)[:, :h, :w]


def _winograd_forward(x, kernel):
    planes, _, _ = _input_planes(x)
    u = winograd_kernel(_after(kernel, x).astype(x.dtype))
    return _assemble_output(_plane_products(planes, u), x.shape[1], x.shape[2])
