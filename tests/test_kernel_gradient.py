"""ops/kernel_gradient.py: the kernel gradient over the batch stacked into one tall image equals torch's (float64)
for any batch, size, kernel and padding; the convolution built on it keeps XLA's forward and input gradient;
float32 rounding stays that of XLA's own kernel gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rtdetr_jax.ops.kernel_gradient as kernel_gradient_module
from conftest import torch_conv_with_gradients
from rtdetr_jax.ops.kernel_gradient import conv2d_with_kernel_gradient, stacked_kernel_gradient
from rtdetr_jax.ops.xla_conv import xla_kernel_gradient

torch = pytest.importorskip("torch")


# (batch, H, W, in, out, kernel, padding): 3x3 as in the detector, 1x1, 5x5, no padding, a single pixel, a
# single row, one image (no seam), an empty batch
SHAPES = [(3, 5, 7, 2, 3, 3, 1), (2, 4, 4, 3, 2, 1, 0), (2, 6, 5, 2, 2, 3, 0), (2, 5, 6, 2, 3, 5, 2),
          (2, 1, 1, 3, 2, 3, 1), (3, 1, 6, 2, 2, 3, 1), (1, 4, 5, 2, 2, 3, 1), (0, 4, 4, 2, 3, 3, 1)]


@pytest.fixture(params=["matmul", "plain", "xla"])
def transpose(request, monkeypatch):
    """Every way the tall image is transposed: by a matmul (up to TRANSPOSE_BY_MATMUL_MAX_CHANNELS input
    channels), by a two-dimensional transpose (above) and by XLA inside its own kernel gradient (for comparison).
    Passed as `transpose=` where the test calls `stacked_kernel_gradient`; for the convolution built on it, which
    takes the "auto" way, the limit is set to 0 for the plain transpose."""
    if request.param != "matmul":
        monkeypatch.setattr(kernel_gradient_module, "TRANSPOSE_BY_MATMUL_MAX_CHANNELS", 0)
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_in_float64(shape, transpose):
    n, h, w, cin, cout, k, padding = shape
    rng = np.random.default_rng(sum(shape))
    x, kernel = rng.normal(size=(n, h, w, cin)), rng.normal(size=(k, k, cin, cout))
    probe = rng.normal(size=(n, h + 2 * padding - k + 1, w + 2 * padding - k + 1, cout))
    y_t, dx_t, dk_t = torch_conv_with_gradients(x, kernel, probe, padding=padding)
    with jax.enable_x64(True):
        dk = stacked_kernel_gradient(jnp.asarray(x), jnp.asarray(probe), (k, k), padding, transpose)
        loss = lambda a, b: jnp.sum(conv2d_with_kernel_gradient(a, b, padding, "stacked") * probe)  # noqa: E731
        y = conv2d_with_kernel_gradient(jnp.asarray(x), jnp.asarray(kernel), padding, "stacked")
        dx, dk_vjp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
    assert dk.shape == kernel.shape and dk.dtype == jnp.float64
    for name, got, want in (("dkernel", dk, dk_t), ("y", y, y_t), ("dx", dx, dx_t), ("dkernel via grad", dk_vjp, dk_t)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10, err_msg=name)


def test_float32_rounding_of_the_order_of_xlas(transpose):
    """At a training-like size (batch 4, 64 channels) the float32 kernel gradient sits no further from the float64
    one than a few times XLA's float32 kernel gradient does (the sums only run in another order)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 24, 24, 64))
    k = rng.normal(size=(3, 3, 64, 64)) / np.sqrt(9 * 64)
    dy = rng.normal(size=(4, 24, 24, 64))
    with jax.enable_x64(True):
        truth = np.asarray(xla_kernel_gradient(jnp.asarray(x), jnp.asarray(dy), k.shape, 1, 1))
    x32, dy32 = jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32)
    err_xla = np.abs(np.asarray(xla_kernel_gradient(x32, dy32, k.shape, 1, 1)) - truth).max()
    err_stacked = np.abs(np.asarray(stacked_kernel_gradient(x32, dy32, (3, 3), 1, transpose)) - truth).max()
    assert err_stacked <= 1e-5 * np.abs(truth).max(), (err_stacked, err_xla)
    assert err_stacked <= 4 * err_xla, (err_stacked, err_xla)


def test_dtype_of_the_input_and_of_the_kernel_kept():
    x = jnp.ones((2, 6, 5, 2), jnp.bfloat16)
    kernel = jnp.ones((3, 3, 2, 3), jnp.float32)
    assert stacked_kernel_gradient(x, jnp.ones((2, 6, 5, 3), jnp.float32), (3, 3), 1).dtype == jnp.bfloat16
    dk = jax.grad(lambda k_: jnp.sum(conv2d_with_kernel_gradient(x, k_.astype(jnp.bfloat16), 1, "stacked")))(kernel)
    assert dk.dtype == jnp.float32 and dk.shape == kernel.shape


def test_the_transpose_is_a_matmul_up_to_the_limit(monkeypatch):
    def jaxpr(cin, transpose="auto"):
        x, dy = jnp.ones((2, 6, 5, cin)), jnp.ones((2, 6, 5, 3))
        return str(jax.make_jaxpr(lambda a, b: stacked_kernel_gradient(a, b, (3, 3), 1, transpose))(x, dy))
    limit = kernel_gradient_module.TRANSPOSE_BY_MATMUL_MAX_CHANNELS
    assert "dot_general" in jaxpr(limit) and "dot_general" not in jaxpr(limit + 1)
    # chosen by name, whatever the channels
    assert "dot_general" in jaxpr(limit + 1, "matmul") and "dot_general" not in jaxpr(1, "xla")
    assert "dot_general" not in jaxpr(1, "plain")
    monkeypatch.setattr(kernel_gradient_module, "TRANSPOSE_BY_MATMUL_MAX_CHANNELS", 0)
    assert "dot_general" not in jaxpr(1)


def test_above_the_limit_a_two_dimensional_transpose():
    """Above TRANSPOSE_BY_MATMUL_MAX_CHANNELS the tall image's transpose is one (pixels, in) -> (in, pixels)
    transpose ahead of the convolution (XLA runs its own as a 4-d permutation, 3.5x slower); "xla" leaves it to
    XLA, so its graph has no transpose of the input before the convolution."""
    cin = kernel_gradient_module.TRANSPOSE_BY_MATMUL_MAX_CHANNELS + 1
    x, dy = jnp.ones((2, 6, 5, cin)), jnp.ones((2, 6, 5, 3))
    tall_pixels = 2 * 8 * 7  # two padded 8 x 7 images stacked

    def jaxpr(transpose):
        return jax.make_jaxpr(lambda a, b: stacked_kernel_gradient(a, b, (3, 3), 1, transpose))(x, dy).jaxpr

    def transposes(transpose):
        return [tuple(e.outvars[0].aval.shape) for e in jaxpr(transpose).eqns if e.primitive.name == "transpose"]

    assert (cin, tall_pixels) in transposes("auto") and (cin, tall_pixels) in transposes("plain")
    assert (cin, tall_pixels) not in transposes("xla")


def test_an_unknown_transpose_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^transpose 'eigen' is not one of auto, matmul, plain, xla$"):
        stacked_kernel_gradient(jnp.ones((2, 6, 5, 2)), jnp.ones((2, 6, 5, 3)), (3, 3), 1, "eigen")
