"""modeling/layers.rows_dot_general: the linear layers' matmul over flattened rows gives lax.dot_general's values
and gradients, its gradients are 2-d matmuls, and dimension numbers other than a linear layer's pass through."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rtdetr_jax.modeling.layers import dense, rows_dot_general

LINEAR = (((2,), (0,)), ((), ()))


def test_same_values_and_gradients_as_lax():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
    ours = jax.value_and_grad(lambda a, b: jnp.sum(rows_dot_general(a, b, LINEAR) * probe), argnums=(0, 1))(x, w)
    laxs = jax.value_and_grad(lambda a, b: jnp.sum(jax.lax.dot_general(a, b, LINEAR) * probe), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(ours[0]), np.asarray(laxs[0]), rtol=1e-6)
    for got, want in zip(ours[1], laxs[1]):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_gradients_are_two_dimensional_matmuls():
    """Every dot_general of the linear layer's gradient has 2-d operands (with lax's, the kernel gradient
    contracts two 3-d operands over their first two axes)."""
    x, w = jnp.ones((4, 6, 8)), jnp.ones((8, 2))

    def operand_ranks(fn):
        graph = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(fn(a, b, LINEAR) ** 2), argnums=(0, 1)))(x, w).jaxpr
        return sorted({tuple(v.aval.ndim for v in e.invars) for e in graph.eqns if e.primitive.name == "dot_general"})

    assert operand_ranks(rows_dot_general) == [(2, 2)]
    assert (3, 3) in operand_ranks(jax.lax.dot_general)


def test_other_dimension_numbers_pass_through():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 5, 2)), jnp.float32)
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(np.asarray(rows_dot_general(a, b, batched)),
                                  np.asarray(jax.lax.dot_general(a, b, batched)))
    m = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    plain = (((1,), (0,)), ((), ()))
    np.testing.assert_array_equal(np.asarray(rows_dot_general(m, b[0], plain)),
                                  np.asarray(jax.lax.dot_general(m, b[0], plain)))


def test_the_dense_layer_uses_it_and_keeps_its_parameters():
    """`dense` is flax's Dense with the same parameter names and shapes, and the same output as plain flax."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 4)), jnp.float32)
    layer = dense(5, "proj")
    params = layer.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(jnp.shape, params) == {"params": {"kernel": (4, 5), "bias": (5,)}}
    want = jax.lax.dot_general(x, params["params"]["kernel"], LINEAR) + params["params"]["bias"]
    np.testing.assert_allclose(np.asarray(layer.apply(params, x)), np.asarray(want), rtol=1e-6)
    assert layer.dot_general is rows_dot_general
