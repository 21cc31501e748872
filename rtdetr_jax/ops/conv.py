"""`conv2d`, the one entry point for the detector's 2-d convolutions, and the choice of algorithm behind it.

- stride >= 2: XLA's convolution with the input gradient taken per stride phase (ops/strided_conv.py), and on the
  CPU at batch >= 2 and from `PHASE_KERNEL_GRADIENT_MIN_CHANNELS` input channels the kernel gradient too
  (`uses_phase_kernel_gradient`);
- 3x3, stride 1, padding 1, float32, on the CPU, both channel counts >= `WINOGRAD_MIN_CHANNELS` and at least
  `WINOGRAD_MIN_FLOP` of work: Winograd's F(2x2, 3x3) (ops/winograd.py), 2.25x fewer multiplications;
- 1x1, stride 1, no padding, on the CPU: XLA's convolution with its gradients taken as the matmuls they are
  (ops/pointwise_conv.py), which spares XLA's kernel gradient its transposes into batch-innermost layout;
- anything else: XLA's convolution.

Stride-1 convolutions on the CPU with a kernel larger than 1x1 and a batch of 2 or more take their kernel gradient
over the batch stacked into one tall image (ops/kernel_gradient.py), which spares XLA:CPU's transposes into
batch-innermost layout, unless Winograd's kernel gradient is used (from `WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS`).
In the r18vd batch-4 training step at 640: paired 0.965 of the time (8 rounds, benchmarks/README.md). 1x1
convolutions are not stacked (6-11% slower alone): their kernel gradient is one matmul over the pixels.

All of that is the fallback since the twenty-first session: on the CPU in float32 on one device, where the C++
kernels are on and can be built (ops/native.py), every kernel gradient but Winograd's comes from the C++ kernel
(`native_kernel_gradient`, ops/kernel_gradient.py; `uses_native_kernel_gradient`), at any stride, kernel size
and batch: the r18vd batch-4 training step paired 0.937-0.941 of the time of the forms above.

The choice is made when the function is traced (shapes, dtype and backend are static), so one compiled graph
holds one algorithm per layer. `conv_algorithm("direct")` (or "winograd") overrides it for the functions traced
inside the block, for benchmarks and tests that compare the two in one process. jax caches a trace per function
object, so jit a fresh function (a new lambda) inside the block: a function traced before is not traced again.

Where Winograd pays (benchmarks/README.md, "Winograd"): on the 2-core CPU at 64-512 channels, one convolution's
forward 1.25-1.75x faster than XLA's, and wherever the forward is Winograd's the input gradient by Winograd too
(from 64 channels; from 128 before the twenty-fourth session), from 256 the kernel gradient (`gradient_algorithms`;
ops/winograd.py says why); at 32 channels (the deep stem at 320x320) it was 1.2-2.9x slower.
`WINOGRAD_MIN_FLOP` keeps small convolutions direct: at 0.12 GFLOP ((1, 20, 20, 128) -> 128, the encoder's last
RepVGG blocks) runs disagreed (0.81x to 1.24x, a fraction of a millisecond either way), while each Winograd
convolution adds some 40 operations for XLA to compile, which the narrow test and demo models would pay for
nothing; from 0.47 GFLOP up ((1, 40, 40, 128) -> 128, (16, 20, 20, 64) -> 64) it won in every run, except
(4, 160, 160, 64) -> 64 (training's first stage, 0.91x to 1.11x across runs on the AVX2 machine, 0.82x on the
Intel AVX-512 one). So below `WINOGRAD_WIDE_CHANNELS` channels Winograd is used only up to
`WINOGRAD_NARROW_MAX_PIXELS` output pixels over the batch. That bound is machine-dependent. On the Intel machine,
with one 160x160 map as the bound, the r18vd training step took paired 0.986 of the time and the batch-8 forward
0.981, against Winograd everywhere. On the Zen 4 machine of the later sessions (twenty-fourth session) Winograd
won at (4, 160, 160, 64) -> 64: forward 37-44 against 43-48 ms, input gradient 36-41 against 43-46 ms
(medians of 7, several runs). The training step with Winograd for the first stage, forward and input gradient,
took paired 0.983, 0.991, 0.996 and 1/1.037 of the time (4 in-process A/Bs, both orders). At batch 8 the two
were even (forward 79-102 against 86-106 ms). So the bound is now four 160x160 maps, the r18vd batch-4 step's
first stage, and the batch-8 forward keeps XLA's there.
On GPU (cuDNN picks its own algorithms, Winograd among them) and TPU (convolutions run on the matrix unit) it is
not used, nor in bfloat16/float16, whose rounding the transforms would amplify.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from rtdetr_jax.ops import native
from rtdetr_jax.ops.kernel_gradient import conv2d_with_kernel_gradient
from rtdetr_jax.ops.pointwise_conv import pointwise_conv2d
from rtdetr_jax.ops.strided_conv import strided_conv2d
from rtdetr_jax.ops.xla_conv import plain_conv2d
from rtdetr_jax.ops.winograd import winograd_conv3x3

WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_GRADIENT_MIN_CHANNELS = 64  # the input gradient by Winograd too (ops/winograd.py)
WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS = 256  # and the kernel gradient; below, the stacked one (ops/kernel_gradient.py)
PHASE_KERNEL_GRADIENT_MIN_CHANNELS = 64  # strided kernel gradients per phase: faster from 64, slower at 3
WINOGRAD_MIN_FLOP = 2.5e8  # of the direct convolution: 2 * 9 * in * out per output pixel
WINOGRAD_WIDE_CHANNELS = 128  # from here on Winograd at any number of pixels; below, only up to:
WINOGRAD_NARROW_MAX_PIXELS = 4 * 160 * 160  # output pixels over the whole batch
ALGORITHMS = ("auto", "direct", "winograd")
_ALGORITHM = contextvars.ContextVar("rtdetr_jax_conv_algorithm", default="auto")


@contextlib.contextmanager
def conv_algorithm(name: str):
    """Within the block, functions traced use `name` for every 3x3 stride-1 padding-1 convolution: "auto" (the
    default rule above), "direct" (XLA's convolution) or "winograd" (wherever it applies, any dtype or backend,
    with Winograd's gradients too)."""
    if name not in ALGORITHMS:
        raise ValueError(f"conv_algorithm {name!r} is not one of {', '.join(ALGORITHMS)}")
    token = _ALGORITHM.set(name)
    try:
        yield
    finally:
        _ALGORITHM.reset(token)


def uses_winograd(x_shape, kernel_shape, dtype, stride: int, padding: int) -> bool:
    """Whether `conv2d` computes this convolution by Winograd's F(2x2, 3x3)."""
    kh, kw, cin, cout = kernel_shape
    if (kh, kw, stride, padding) != (3, 3, 1, 1):
        return False
    choice = _ALGORITHM.get()
    if choice != "auto":
        return choice == "winograd"
    n, h, w, _ = x_shape
    channels = min(cin, cout)
    return (jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu"
            and channels >= WINOGRAD_MIN_CHANNELS and 18 * n * h * w * cin * cout >= WINOGRAD_MIN_FLOP
            and (channels >= WINOGRAD_WIDE_CHANNELS or n * h * w <= WINOGRAD_NARROW_MAX_PIXELS))


def uses_stacked_kernel_gradient(x_shape, kernel_shape, stride: int) -> bool:
    """Whether a convolution's kernel gradient is taken over the batch stacked into one image
    (ops/kernel_gradient.py): under "auto", on the CPU, at stride 1, for kernels larger than 1x1 and a batch of 2
    or more (at batch 1 it is XLA's own computation)."""
    return (_ALGORITHM.get() == "auto" and jax.default_backend() == "cpu" and stride == 1
            and tuple(kernel_shape[:2]) != (1, 1) and x_shape[0] >= 2)


def uses_phase_kernel_gradient(x_shape, kernel_shape, stride: int) -> bool:
    """Whether a strided convolution's kernel gradient is taken one stride phase at a time over the batch stacked
    into one image (`phase_kernel_gradient`, ops/kernel_gradient.py): under "auto", on the CPU, at a batch of 2 or
    more and from `PHASE_KERNEL_GRADIENT_MIN_CHANNELS` input channels. Alone, batch 4: (160, 160, 64) -> 128
    101 -> 64 ms, (80, 80, 256) -> 256 114 -> 90 ms; the stem's 3 channels at 640 46 -> 51 ms, so XLA's there."""
    return (_ALGORITHM.get() == "auto" and jax.default_backend() == "cpu" and stride > 1 and x_shape[0] >= 2
            and kernel_shape[2] >= PHASE_KERNEL_GRADIENT_MIN_CHANNELS)


def uses_native_kernel_gradient(dtype) -> bool:
    """Whether a convolution's kernel gradient is computed by the C++ kernel (`native_kernel_gradient`,
    ops/kernel_gradient.py): under "auto", on the CPU with a single device (XLA would gather a sharded batch to
    run an opaque custom call), in float32, and where native kernels are on and can be built (ops/native.py,
    `RTDETR_JAX_NATIVE`); the build itself waits until a gradient is traced. Then it is used for every kernel
    gradient but Winograd's (from `WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS`), at any stride and batch."""
    return _ALGORITHM.get() == "auto" and native.applies("kernel_gradient", dtype)


def uses_pointwise_gradients(kernel_shape, stride: int, padding: int) -> bool:
    """Whether a convolution's gradients are matmuls over the pixels (ops/pointwise_conv.py): under "auto", on the
    CPU, for a 1x1 kernel at stride 1 without padding."""
    return (_ALGORITHM.get() == "auto" and jax.default_backend() == "cpu" and stride == 1 and padding == 0
            and tuple(kernel_shape[:2]) == (1, 1))


def gradient_algorithms(x_shape, kernel_shape, dtype=jnp.float32) -> tuple[str, str]:
    """For a convolution that `uses_winograd`: (input gradient, kernel gradient) as `winograd_conv3x3` takes them.
    Under "auto": Winograd's input gradient from `WINOGRAD_GRADIENT_MIN_CHANNELS` channels up (faster per
    convolution: 1.2-2x at 40x40 maps and below, about even at (4, 80, 80, 128); at 64 channels on the large maps
    XLA's was faster on the earlier machines, Winograd's on the Zen 4 one, see above), Winograd's kernel gradient
    from `WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS` up (at (4, 20, 20, 512) 38 ms against the stacked one's 71 ms; at
    (4, 80, 80, 128) 110 vs 85 ms), the stacked one below the C++ kernel where `uses_native_kernel_gradient`, else
    the stacked one where `uses_stacked_kernel_gradient`, else XLA's. Under `conv_algorithm("winograd")` both
    Winograd's."""
    if _ALGORITHM.get() == "winograd":
        return "winograd", "winograd"
    channels = min(kernel_shape[2], kernel_shape[3])
    input_gradient = "winograd" if channels >= WINOGRAD_GRADIENT_MIN_CHANNELS else "xla"
    if channels >= WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS:
        return input_gradient, "winograd"
    if uses_native_kernel_gradient(dtype):
        return input_gradient, "native"
    return input_gradient, "stacked" if uses_stacked_kernel_gradient(x_shape, kernel_shape, 1) else "xla"


def conv2d(x, kernel, stride: int = 1, padding: int = 0):
    """`torch.nn.functional.conv2d(x, kernel, stride=stride, padding=padding)` on x (batch, H, W, in) with kernel
    (kh, kw, in, out): symmetric zero padding, no dilation, no groups."""
    by_native = uses_native_kernel_gradient(x.dtype)
    if stride > 1:
        phases = uses_phase_kernel_gradient(x.shape, kernel.shape, stride)
        return strided_conv2d(x, kernel, stride, padding, "native" if by_native else "phases" if phases else "xla")
    if uses_winograd(x.shape, kernel.shape, x.dtype, stride, padding):
        return winograd_conv3x3(x, kernel, *gradient_algorithms(x.shape, kernel.shape, x.dtype))
    if uses_pointwise_gradients(kernel.shape, stride, padding):
        return pointwise_conv2d(x, kernel, "native" if by_native else "matmul")
    if by_native:
        return conv2d_with_kernel_gradient(x, kernel, padding, "native")
    if uses_stacked_kernel_gradient(x.shape, kernel.shape, stride):
        return conv2d_with_kernel_gradient(x, kernel, padding, "stacked")
    return plain_conv2d(x, kernel, stride, padding)
