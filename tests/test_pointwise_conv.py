"""ops/pointwise_conv.py: a 1x1 convolution with its gradients as matmuls equals torch's (float64) output and both
gradients, keeps its dtypes, and is what `conv2d` picks for 1x1 stride-1 convolutions on the CPU under "auto"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_conv_with_gradients
from rtdetr_jax.ops.conv import conv2d, conv_algorithm, uses_pointwise_gradients
from rtdetr_jax.ops.pointwise_conv import pointwise_conv2d
from rtdetr_jax.ops.xla_conv import plain_conv2d

torch = pytest.importorskip("torch")


# (batch, H, W, in, out): several images, one pixel, one image, more outputs than inputs, an empty batch
SHAPES = [(3, 5, 7, 4, 3), (2, 1, 1, 3, 2), (1, 4, 6, 2, 5), (0, 4, 4, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_in_float64(shape):
    n, h, w, cin, cout = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=(n, h, w, cin))
    kernel = rng.normal(size=(1, 1, cin, cout))
    probe = rng.normal(size=(n, h, w, cout))
    with jax.enable_x64(True):
        loss = lambda x_, k_: jnp.sum(pointwise_conv2d(x_, k_) * probe)  # noqa: E731
        y = pointwise_conv2d(jnp.asarray(x), jnp.asarray(kernel))
        dx, dk = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
        assert y.dtype == dx.dtype == dk.dtype == jnp.float64
    want_y, want_dx, want_dk = torch_conv_with_gradients(x, kernel, probe)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dk), want_dk, rtol=1e-12, atol=1e-12)


def test_float32_gradients_within_rounding_of_xlas():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 16, 16, 32)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(1, 1, 32, 16)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(4, 16, 16, 16)), jnp.float32)
    ours = jax.grad(lambda x_, k_: jnp.sum(pointwise_conv2d(x_, k_) * probe), argnums=(0, 1))(x, kernel)
    xlas = jax.grad(lambda x_, k_: jnp.sum(plain_conv2d(x_, k_, 1, 0) * probe), argnums=(0, 1))(x, kernel)
    for got, want in zip(ours, xlas):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_dtypes_kept():
    """bfloat16 input and kernel: both gradients in bfloat16, each within bfloat16 rounding (2^-8 of the largest
    entry) of the float64 sums over the 4096 pixels."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 32, 32, 8)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(1, 1, 8, 4)), jnp.bfloat16)
    probe = jnp.asarray(rng.normal(size=(4, 32, 32, 4)), jnp.bfloat16)
    dx, dk = jax.grad(lambda x_, k_: jnp.sum(pointwise_conv2d(x_, k_).astype(jnp.float32) * probe),
                      argnums=(0, 1))(x, kernel)
    assert dx.dtype == dk.dtype == jnp.bfloat16
    x64, k64, p64 = (np.asarray(a, np.float64) for a in (x, kernel, probe))
    want_dk = np.einsum("nhwc,nhwd->cd", x64, p64)
    want_dx = np.einsum("nhwd,cd->nhwc", p64, k64[0, 0])
    for got, want in ((np.asarray(dk, np.float64)[0, 0], want_dk), (np.asarray(dx, np.float64), want_dx)):
        assert np.abs(got - want).max() <= 2.0 ** -8 * np.abs(want).max()


def test_conv2d_takes_it_for_1x1_stride_1_on_the_cpu():
    """Under "auto" on the CPU a 1x1 stride-1 unpadded convolution's gradient graph is matmuls only; a padded or
    strided 1x1, a 3x3, and the "direct" override keep XLA's convolution gradients."""
    on_cpu = jax.default_backend() == "cpu"
    assert uses_pointwise_gradients((1, 1, 8, 8), 1, 0) is on_cpu
    assert not uses_pointwise_gradients((1, 1, 8, 8), 2, 0)
    assert not uses_pointwise_gradients((1, 1, 8, 8), 1, 1)
    assert not uses_pointwise_gradients((3, 3, 8, 8), 1, 0)
    x = jnp.ones((2, 6, 6, 8))
    kernel = jnp.ones((1, 1, 8, 4))

    def gradient_graph(fn):
        return str(jax.make_jaxpr(jax.grad(lambda x_, k_: jnp.sum(fn(x_, k_) ** 2), argnums=(0, 1)))(x, kernel))

    auto = gradient_graph(lambda x_, k_: conv2d(x_, k_))
    # the forward's convolution stays; its two gradients are dot_generals
    assert auto.count("conv_general_dilated") == (1 if on_cpu else 3)
    with conv_algorithm("direct"):
        direct = gradient_graph(lambda x_, k_: conv2d(x_, k_))
    assert direct.count("conv_general_dilated") == 3
    with conv_algorithm("direct"):
        assert not uses_pointwise_gradients((1, 1, 8, 8), 1, 0)
