"""ops/conv.py: the custom-gradient convolution equals lax.conv_general_dilated forward and backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdetr_jax.ops.conv import conv2d


def lax_conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), (padding, padding),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# (input height, width, in, out, kernel, stride, padding): odd sizes leave rows a strided window never reaches
CASES = [(8, 8, 3, 5, 3, 1, 1), (9, 7, 4, 6, 3, 2, 1), (10, 11, 6, 4, 1, 1, 0), (9, 9, 5, 3, 1, 2, 0),
         (7, 10, 2, 3, 3, 2, 0), (6, 6, 3, 3, 3, 1, 2)]


@pytest.mark.parametrize("h, w, cin, cout, k, stride, pad", CASES)
def test_forward_and_gradients_match_lax_in_float64(h, w, cin, cout, k, stride, pad):
    rng = np.random.default_rng(h * 100 + w)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, h, w, cin)))
        kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)))
        probe = jnp.asarray(rng.normal(size=lax_conv(x, kernel, stride, (pad, pad)).shape))

        def loss(f):
            return lambda x_, k_: jnp.sum(jnp.tanh(f(x_, k_, stride, (pad, pad))) * probe)

        np.testing.assert_array_equal(conv2d(x, kernel, stride, (pad, pad)), lax_conv(x, kernel, stride, (pad, pad)))
        ours = jax.grad(loss(conv2d), argnums=(0, 1))(x, kernel)
        theirs = jax.grad(loss(lax_conv), argnums=(0, 1))(x, kernel)
        for a, b, name in zip(ours, theirs, ("input", "kernel")):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


def test_float32_kernel_gradient_within_rounding_at_detector_size():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 40, 40, 64)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 64, 32)) * 0.05, jnp.float32)
    f = lambda conv: jax.jit(jax.grad(lambda k_: jnp.sum(conv(x, k_, 2, (1, 1)) ** 2)))  # noqa: E731
    ours, theirs = f(conv2d)(kernel), f(lax_conv)(kernel)
    scale = float(jnp.max(jnp.abs(theirs)))
    assert float(jnp.max(jnp.abs(ours - theirs))) <= 1e-5 * scale


def test_bfloat16_gradients_keep_dtypes():
    x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
    kernel = jnp.full((3, 3, 4, 2), 0.5, jnp.bfloat16)
    dx, dk = jax.grad(lambda x_, k_: jnp.sum(conv2d(x_, k_, 1, (1, 1)).astype(jnp.float32)), argnums=(0, 1))(x, kernel)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
    # the centre tap sees all 64 pixels, a corner tap 49
    assert float(dk[1, 1, 0, 0]) == 64.0 and float(dk[0, 0, 0, 0]) == 49.0
