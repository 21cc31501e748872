"""ops/activations.py: jax's ReLU, SiLU and softmax values and gradients, with one residual kept per call."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from rtdetr_jax.modeling.layers import activation
from rtdetr_jax.ops.activations import relu, silu, softmax

RNG = np.random.default_rng(0)


def _x(shape=(3, 5, 7)):
    x = RNG.standard_normal(shape).astype(np.float32) * 4
    x.flat[:6] = [0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0]  # ReLU's kink and SiLU's saturated tails
    return jnp.asarray(x)


def _vjp(f, x, g):
    y, pull = jax.vjp(f, x)
    return y, pull(g)[0]


@pytest.mark.parametrize("ours, theirs", [(relu, jax.nn.relu), (silu, jax.nn.silu),
                                          (lambda v: softmax(v, -1), lambda v: jax.nn.softmax(v, axis=-1)),
                                          (lambda v: softmax(v, 1), lambda v: jax.nn.softmax(v, axis=1))])
def test_values_and_gradients_are_jaxs(ours, theirs):
    x = _x()
    g = jnp.asarray(RNG.standard_normal(x.shape).astype(np.float32))
    y, dx = jax.jit(lambda a, b: _vjp(ours, a, b))(x, g)
    y_ref, dx_ref = jax.jit(lambda a, b: _vjp(theirs, a, b))(x, g)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-6, atol=1e-6)


def test_relu_gradient_is_zero_at_and_below_zero():
    x = jnp.asarray([-2.0, -0.0, 0.0, 1e-30, 3.0])
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda v: relu(v).sum())(x)), [0, 0, 0, 1, 1])


def test_softmax_gradient_with_masked_entries():
    # attention masks add -inf: those entries get probability 0 and gradient 0, as jax's
    x = _x((2, 4, 6)).at[:, :, 2].set(-jnp.inf)
    g = jnp.asarray(RNG.standard_normal(x.shape).astype(np.float32))
    _, dx = _vjp(lambda v: softmax(v, -1), x, g)
    _, dx_ref = _vjp(lambda v: jax.nn.softmax(v, axis=-1), x, g)
    assert np.all(np.asarray(dx)[:, :, 2] == 0)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("f", [relu, silu, lambda v: softmax(v, -1)])
def test_one_residual_per_call(f):
    # what is kept from the forward for the backward pass: one array the size of x (jax 0.10's own functions keep
    # two or three: ReLU's mask and zeros, SiLU's sigmoid, softmax's exponentials)
    x = _x((64, 64))
    w = jnp.asarray(RNG.standard_normal((64, 64)).astype(np.float32))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda v, m: jnp.sum(f(v) @ m), x, w)
    # one line per residual, "f32[64,64] output of ..."; the arguments (x, w) are not counted
    kept = [line for line in out.getvalue().splitlines() if line.strip() and "argument" not in line]
    assert len(kept) == 1 and kept[0].startswith("f32[64,64]"), kept


def test_the_detectors_activations_are_these():
    assert activation("relu") is relu
    assert activation("silu") is silu and activation("swish") is silu


def test_forward_mode_is_refused():
    with pytest.raises(TypeError):
        jax.jvp(relu, (_x(),), (_x(),))
