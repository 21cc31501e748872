"""ops/cpu_kernel_gradient.cc through `native_kernel_gradient` (ops/kernel_gradient.py): the C++ kernel gradient
equals the float64 one to float32 rounding for every stride, padding, kernel size and channel count (tile and
vector remainders, padded output channels, empty batch); it is bitwise reproducible, also with one thread; its own
gradients, vmap and concurrent calls work; and `conv2d` takes it where it applies and nowhere else (test_native.py
compares the detector's training gradients with the C++ kernels and without them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_kernel_refuses, one_thread_outputs
from rtdetr_jax.ops import native
from rtdetr_jax.ops.conv import conv2d, conv_algorithm, uses_native_kernel_gradient
from rtdetr_jax.ops.kernel_gradient import native_kernel_gradient
from rtdetr_jax.ops.xla_conv import xla_kernel_gradient

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


@pytest.fixture(autouse=True)
def native_required(monkeypatch):
    """The kernel must build here (a failed build would otherwise fall back to XLA's and pass for the wrong
    reason); the fallback has its own tests (test_native.py)."""
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "require")


def data(n, h, w, cin, cout, k, stride, padding, seed=0):
    kh, kw = (k, k) if isinstance(k, int) else k
    rng = np.random.default_rng(seed)
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    return rng.normal(size=(n, h, w, cin)), rng.normal(size=(n, ho, wo, cout)), (kh, kw, cin, cout)


# (batch, H, W, in, out, kernel, stride, padding): channel counts that leave tile remainders (5, 13, 25 inputs;
# 12 per AVX-512 tile, 6 per AVX2 one) and output channels padded to 16 (17, 8) or a single vector (48 = 32 + 16),
# strides 2 and 3, 1x1, 5x5, a 3x1 kernel, a single pixel, more padding than the kernel needs, odd sizes, an empty
# batch, one-pixel-wide images at stride 2 (taps past the image's only column), and one large enough (0.9 GFLOP)
# to be split into the 8 chunks run on the thread pool
SHAPES = [(3, 9, 10, 5, 16, 3, 1, 1), (2, 8, 8, 13, 17, 3, 1, 1), (2, 7, 9, 3, 32, 3, 2, 1),
          (1, 11, 13, 25, 48, 3, 2, 1), (2, 6, 5, 4, 16, 1, 1, 0), (2, 12, 11, 6, 8, 5, 2, 2),
          (2, 9, 9, 4, 16, 3, 3, 0), (2, 8, 7, 3, 16, (3, 1), 1, 1), (1, 1, 1, 3, 16, 3, 1, 1),
          (2, 5, 7, 2, 16, 3, 1, 2), (0, 4, 4, 2, 16, 3, 1, 1), (2, 1, 1, 3, 16, 3, 2, 1), (1, 6, 1, 4, 16, 3, 2, 1),
          (2, 40, 40, 64, 64, 3, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_matches_float64_to_float32_rounding(shape):
    x, dy, kernel_shape = data(*shape)
    stride, padding = shape[6], shape[7]
    with jax.enable_x64(True):
        truth = np.asarray(xla_kernel_gradient(jnp.asarray(x), jnp.asarray(dy), kernel_shape, stride, padding))
    x32, dy32 = jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32)
    got = jax.jit(native_kernel_gradient, static_argnums=(2, 3, 4))(x32, dy32, kernel_shape, stride, padding)
    assert got.shape == kernel_shape and got.dtype == jnp.float32
    if shape[0] == 0:
        assert not np.asarray(got).any()
        return
    xla = np.asarray(xla_kernel_gradient(x32, dy32, kernel_shape, stride, padding))
    err, err_xla = np.abs(np.asarray(got) - truth).max(), np.abs(xla - truth).max()
    assert err <= max(4 * err_xla, 1e-6 * np.abs(truth).max()), (err, err_xla)


def test_training_size_rounding_of_the_order_of_xlas():
    """r18vd's first stage at batch 2 (~1.9 GFLOP, several parts per chunk): as close to float64 as XLA's."""
    x, dy, kernel_shape = data(2, 80, 80, 64, 64, 3, 1, 1, seed=3)
    with jax.enable_x64(True):
        truth = np.asarray(xla_kernel_gradient(jnp.asarray(x), jnp.asarray(dy), kernel_shape, 1, 1))
    x32, dy32 = jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32)
    err = np.abs(np.asarray(native_kernel_gradient(x32, dy32, kernel_shape, 1, 1)) - truth).max()
    err_xla = np.abs(np.asarray(xla_kernel_gradient(x32, dy32, kernel_shape, 1, 1)) - truth).max()
    assert err <= 2e-6 * np.abs(truth).max() and err <= 2 * err_xla, (err, err_xla)


def test_bitwise_reproducible_with_any_number_of_threads(tmp_path):
    """The summation order depends on the shapes only: the same bits on every call, and in a process that may
    use one core only (`taskset`), whose XLA thread pool has one thread."""
    x, dy, shape = data(2, 40, 40, 64, 64, 3, 1, 1, seed=7)
    x32, dy32 = jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32)
    first = np.asarray(native_kernel_gradient(x32, dy32, shape, 1, 1))
    for _ in range(3):
        assert np.array_equal(np.asarray(native_kernel_gradient(x32, dy32, shape, 1, 1)), first)
    one_thread = one_thread_outputs("""
        import jax.numpy as jnp
        from test_native_kernel_gradient import data
        from rtdetr_jax.ops.kernel_gradient import native_kernel_gradient
        x, dy, shape = data(2, 40, 40, 64, 64, 3, 1, 1, seed=7)
        outs = [native_kernel_gradient(jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32), shape, 1, 1)]
    """, tmp_path)
    assert np.array_equal(one_thread[0], first)


def test_its_gradients_are_those_of_xlas_kernel_gradient():
    """<KG(x, dy), c> = <conv(x, c), dy>: the custom VJP gives the same x and dy gradients as differentiating
    XLA's kernel gradient (second-order use, e.g. a gradient penalty)."""
    x, dy, shape = data(2, 9, 8, 5, 16, 3, 2, 1, seed=2)
    c = np.random.default_rng(9).normal(size=shape)
    args = jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32)

    def grads(fn):
        return jax.grad(lambda a, b: jnp.sum(fn(a, b, shape, 2, 1) * c), argnums=(0, 1))(*args)

    for got, want in zip(grads(native_kernel_gradient), grads(xla_kernel_gradient)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_vmap_and_concurrent_calls_in_one_program():
    """Under vmap (one call per element) and with six independent calls in one jit program, which XLA may run
    side by side on its thread pool, repeatedly: the results of the single calls."""
    x, dy, shape = data(6, 24, 24, 16, 32, 3, 1, 1, seed=4)
    x, dy = jnp.asarray(x, jnp.float32)[:, None], jnp.asarray(dy, jnp.float32)[:, None]
    singles = np.stack([np.asarray(native_kernel_gradient(x[i], dy[i], shape, 1, 1)) for i in range(6)])
    batched = jax.jit(jax.vmap(lambda a, b: native_kernel_gradient(a, b, shape, 1, 1)))
    six = jax.jit(lambda a, b: [native_kernel_gradient(a[i], b[i], shape, 1, 1) for i in range(6)])
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(batched(x, dy)), singles)
        np.testing.assert_array_equal(np.stack([np.asarray(r) for r in six(x, dy)]), singles)


def test_wrong_shapes_or_dtype_are_one_line_errors():
    x, dy = jnp.ones((2, 6, 6, 3)), jnp.ones((2, 6, 6, 16))
    with pytest.raises(ValueError, match=r"^native_kernel_gradient: x \(2, 6, 6, 3\) and dy \(2, 5, 5, 16\) do not "
                                         r"fit a \(3, 3, 3, 16\) kernel at stride 1, padding 1$"):
        native_kernel_gradient(x, dy[:, :5, :5], (3, 3, 3, 16), 1, 1)
    with pytest.raises(ValueError, match=r"^native_kernel_gradient: x \(2, 6, 6, 3\) and dy"):
        native_kernel_gradient(x, dy, (3, 3, 4, 16), 1, 1)  # in channels
    with pytest.raises(ValueError, match=r"^native_kernel_gradient: x is bfloat16, the C\+\+ kernel takes float32$"):
        native_kernel_gradient(x.astype(jnp.bfloat16), dy, (3, 3, 3, 16), 1, 1)


def test_the_kernel_itself_names_the_shapes_it_refuses():
    """Called past `native_kernel_gradient`'s checks, the C++ kernel's own errors: one line naming the shapes."""
    f32 = jnp.float32
    target = native.target("kernel_gradient")
    x, dy = jnp.ones((2, 6, 6, 3), f32), jnp.ones((2, 6, 6, 16), f32)
    kernel = jax.ShapeDtypeStruct((3, 3, 3, 16), f32)
    cases = [
        ((x[0], dy), kernel, 1, 1,
         r"kernel_gradient: x \(6, 6, 3\), dy \(2, 6, 6, 16\) and the kernel gradient \(3, 3, 3, 16\) must be 4-d "
         r"\(NHWC, NHWC, HWIO\)"),
        ((x, dy), kernel, 0, 1, r"kernel_gradient: stride 0 and padding 1 must be >= 1 and >= 0"),
        ((x, dy[:, :5]), kernel, 1, 1,
         r"kernel_gradient: x \(2, 6, 6, 3\), dy \(2, 5, 6, 16\) and the kernel gradient \(3, 3, 3, 16\) do not fit "
         r"at stride 1, padding 1"),
        ((x, dy[:, :, :, :1]), jax.ShapeDtypeStruct((3, 3, 3, 1), f32), 1, 1,
         r"kernel_gradient: 1 output channels are not a multiple of \d+ \(the Python side pads them\)"),
    ]
    for operands, out, stride, padding, message in cases:
        assert_kernel_refuses(target, out, operands, message, stride=np.int64(stride), padding=np.int64(padding))


def gradient_graph(x, kernel, stride=1, padding=1):
    return str(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(conv2d(x, k, stride, padding))))(kernel))


def test_conv2d_takes_it_where_it_applies(monkeypatch):
    """Every kernel gradient of a float32 convolution on the CPU (3x3 and 1x1 at stride 1, strided, Winograd's
    below 256 channels, batch 1 too), but not Winograd's from 256 channels, not in bfloat16, not with the
    native kernels off, not under `conv_algorithm("direct")`; and tracing a forward does not build it."""
    f32 = jnp.float32
    kernel = "target_name=rtdetr_jax_kernel_gradient\n"  # (Winograd's transforms are custom calls too)
    for x_shape, k_shape, stride, padding in [
            ((4, 12, 12, 8), (3, 3, 8, 8), 1, 1), ((1, 12, 12, 8), (3, 3, 8, 8), 1, 1),
            ((2, 12, 12, 8), (1, 1, 8, 16), 1, 0), ((2, 12, 12, 8), (3, 3, 8, 16), 2, 1),
            ((1, 40, 40, 128), (3, 3, 128, 128), 1, 1)]:
        assert kernel in gradient_graph(jnp.ones(x_shape, f32), jnp.ones(k_shape, f32), stride, padding)
    assert kernel not in gradient_graph(jnp.ones((1, 20, 20, 256), f32), jnp.ones((3, 3, 256, 256), f32))
    assert kernel not in gradient_graph(jnp.ones((4, 12, 12, 8), jnp.bfloat16),
                                        jnp.ones((3, 3, 8, 8), jnp.bfloat16))
    with conv_algorithm("direct"):
        assert not uses_native_kernel_gradient(f32)
        assert kernel not in gradient_graph(jnp.ones((4, 12, 12, 8), f32), jnp.ones((3, 3, 8, 8), f32))
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")
    assert not uses_native_kernel_gradient(f32)
    assert kernel not in gradient_graph(jnp.ones((4, 12, 12, 8), f32), jnp.ones((3, 3, 8, 8), f32))
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "on")
    monkeypatch.setattr(native, "_targets", {})

    def no_build(name, cxx=None):
        raise AssertionError("a forward pass built the kernel")

    monkeypatch.setattr(native, "build", no_build)
    jax.make_jaxpr(lambda a, b: conv2d(a, b, 1, 1))(jnp.ones((4, 12, 12, 8), f32), jnp.ones((3, 3, 8, 8), f32))
