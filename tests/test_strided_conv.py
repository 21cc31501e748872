"""ops/strided_conv.py: forward and both gradients equal torch conv2d's, for strides, kernels and sizes where the
stride phases differ (odd sizes, taps that miss a phase, input rows the forward never reads), with XLA's kernel
gradient and with the per-phase one (`phase_kernel_gradient`, ops/kernel_gradient.py); `conv2d`'s choice between
them; the error for an unknown kernel gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_conv_with_gradients
from rtdetr_jax.modeling.layers import Conv2d
from rtdetr_jax.ops.conv import conv2d, conv_algorithm, uses_phase_kernel_gradient
from rtdetr_jax.ops.kernel_gradient import phase_kernel_gradient
from rtdetr_jax.ops.strided_conv import strided_conv2d
from rtdetr_jax.ops.xla_conv import xla_kernel_gradient

torch = pytest.importorskip("torch")

# (height, width, kernel, stride, padding)
CASES = [
    (8, 8, 3, 2, 1),    # the model's downsampling convolutions
    (9, 7, 3, 2, 1),    # odd sizes: the phases have different row counts
    (8, 8, 1, 2, 0),    # no tap reaches the odd phase: its gradient is zero
    (9, 9, 3, 2, 0),    # the last input row is never read
    (10, 11, 4, 2, 1),  # even kernel
    (11, 13, 5, 3, 2),  # stride 3
    (7, 7, 2, 3, 0),    # kernel smaller than the stride
    (5, 8, 3, 2, 2),    # padding larger than the stride's reach
    (6, 6, 3, 1, 1),    # stride 1 (XLA's own input gradient)
]


@pytest.mark.parametrize("h, w, kernel, stride, padding, kernel_gradient",
                         [(*case, how) for case in CASES for how in ("conv2d", "xla", "phases")
                          if case[3] > 1 or how == "conv2d"])  # strided_conv2d is for stride >= 2
def test_matches_torch(h, w, kernel, stride, padding, kernel_gradient):
    rng = np.random.default_rng(h * 100 + w * 10 + kernel)
    x = rng.normal(size=(2, h, w, 3))
    k = rng.normal(size=(kernel, kernel, 3, 4))
    out_hw = ((h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
    probe = rng.normal(size=(2, *out_hw, 4))
    expected = torch_conv_with_gradients(x, k, probe, stride, padding)
    if kernel_gradient == "conv2d":
        conv = lambda x_, k_: conv2d(x_, k_, stride, padding)  # noqa: E731
    else:
        conv = lambda x_, k_: strided_conv2d(x_, k_, stride, padding, kernel_gradient)  # noqa: E731
    with jax.enable_x64(True):
        loss = lambda x_, k_: jnp.sum(conv(x_, k_) * probe)  # noqa: E731
        y = conv(jnp.asarray(x), jnp.asarray(k))
        dx, dk = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(k))
        if stride > 1:  # the per-phase kernel gradient on its own, and on one image and on an empty batch
            direct = phase_kernel_gradient(jnp.asarray(x), jnp.asarray(probe), k.shape, stride, padding)
            np.testing.assert_allclose(np.asarray(direct), expected[2], rtol=1e-12, atol=1e-12)
            one = phase_kernel_gradient(jnp.asarray(x[:1]), jnp.asarray(probe[:1]), k.shape, stride, padding)
            np.testing.assert_allclose(np.asarray(one), torch_conv_with_gradients(x[:1], k, probe[:1], stride, padding)[2],
                                       rtol=1e-12, atol=1e-12)
            empty = phase_kernel_gradient(jnp.zeros((0, h, w, 3)), jnp.zeros((0, *out_hw, 4)), k.shape, stride,
                                          padding)
            assert empty.shape == k.shape and not np.asarray(empty).any()
    for name, got, want in zip(("y", "dx", "dkernel"), (y, dx, dk), expected):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12, err_msg=name)


def test_per_phase_kernel_gradient_float32_matches_xlas():
    """At a training-like size the per-phase kernel gradient equals XLA's to float32 rounding, on both of the
    stacked kernel gradient's transposes (a matmul up to 64 input channels, XLA's above)."""
    rng = np.random.default_rng(3)
    for cin in (64, 96):
        x = jnp.asarray(rng.normal(size=(4, 24, 24, cin)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=(4, 12, 12, 32)), jnp.float32)
        want = xla_kernel_gradient(x, dy, (3, 3, cin, 32), 2, 1)
        got = phase_kernel_gradient(x, dy, (3, 3, cin, 32), 2, 1)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


def test_conv2d_chooses_the_per_phase_kernel_gradient_on_the_cpu():
    on_cpu = jax.default_backend() == "cpu"
    assert uses_phase_kernel_gradient((4, 160, 160, 64), (3, 3, 64, 128), 2) is on_cpu
    assert uses_phase_kernel_gradient((4, 80, 80, 256), (3, 3, 256, 256), 2) is on_cpu
    assert not uses_phase_kernel_gradient((4, 640, 640, 3), (3, 3, 3, 32), 2)  # the stem: XLA's was faster
    assert not uses_phase_kernel_gradient((1, 160, 160, 64), (3, 3, 64, 128), 2)  # batch 1
    assert not uses_phase_kernel_gradient((4, 160, 160, 64), (3, 3, 64, 64), 1)  # stride 1: not strided
    with conv_algorithm("direct"):
        assert not uses_phase_kernel_gradient((4, 160, 160, 64), (3, 3, 64, 128), 2)
    x = jnp.ones((2, 8, 8, 64))
    k = jnp.ones((3, 3, 64, 8))
    def jaxpr():  # a fresh function each time: jax caches traces per function
        return str(jax.make_jaxpr(jax.grad(lambda k_: jnp.sum(conv2d(x, k_, 2, 1))))(k))
    assert ("rhs_dilation=(2, 2)" not in jaxpr()) is on_cpu  # XLA's strided kernel gradient dilates dy
    with conv_algorithm("direct"):
        assert "rhs_dilation=(2, 2)" in jaxpr()


def test_unknown_kernel_gradient_is_rejected():
    with pytest.raises(ValueError, match="strided_conv2d kernel_gradient 'fast' is not one of xla, phases"):
        strided_conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), 2, 1, "fast")


def test_float32_gradient_matches_xla_autodiff():
    """At the model's size and dtype the per-phase gradient equals XLA's dilated one to float32 rounding."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 16, 24)) * 0.1, jnp.float32)
    dy = jnp.asarray(rng.normal(size=(2, 16, 16, 24)), jnp.float32)
    plain = lambda x_: jax.lax.conv_general_dilated(x_, k, (2, 2), ((1, 1), (1, 1)),  # noqa: E731
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = jax.vjp(plain, x)[1](dy)[0]
    got = jax.vjp(lambda x_: strided_conv2d(x_, k, 2, 1), x)[1](dy)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_dtype_kept():
    x = jnp.ones((1, 6, 6, 2), jnp.bfloat16)
    k = jnp.ones((3, 3, 2, 3), jnp.bfloat16)
    y = strided_conv2d(x, k, 2, 1)
    assert y.shape == (1, 3, 3, 3) and y.dtype == jnp.bfloat16
    dx, dk = jax.grad(lambda a, b: jnp.sum(strided_conv2d(a, b, 2, 1).astype(jnp.float32)), argnums=(0, 1))(x, k)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16


def test_conv2d_module_uses_it_with_unchanged_results():
    """The Conv2d module's strided path gives the plain convolution's output and gradients."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 9, 10, 4)), jnp.float32)
    module = Conv2d(features=5, kernel_size=3, stride=2)
    params = module.init(jax.random.PRNGKey(0), x)
    kernel = params["params"]["kernel"]
    assert "custom_vjp_call" in str(jax.make_jaxpr(module.apply)(params, x))
    plain = lambda x_, k_: jax.lax.conv_general_dilated(x_, k_, (2, 2), ((1, 1), (1, 1)),  # noqa: E731
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(module.apply(params, x)), np.asarray(plain(x, kernel)), atol=1e-6)
    got = jax.grad(lambda p, x_: jnp.sum(module.apply(p, x_) ** 2), argnums=(0, 1))(params, x)
    want = jax.grad(lambda k_, x_: jnp.sum(plain(x_, k_) ** 2), argnums=(0, 1))(kernel, x)
    np.testing.assert_allclose(np.asarray(got[0]["params"]["kernel"]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)
