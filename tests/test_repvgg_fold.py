"""The encoder's RepVGG blocks run as one folded 3x3 convolution at inference and as two branches in training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rtdetr_jax.config import RTDetrV2Config
from rtdetr_jax.modeling.encoder import RepVggBlock
from rtdetr_jax.modeling.layers import activation


def block_and_variables():
    config = RTDetrV2Config.from_preset("tiny")
    block = RepVggBlock(config)
    c = int(config.encoder_hidden_dim * config.hidden_expansion)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 9, c)), jnp.float32)
    variables = block.init(jax.random.PRNGKey(0), x)
    # non-trivial statistics and affine parameters, so that folding them matters
    leaves, tree = jax.tree_util.tree_flatten(variables)
    rng = np.random.default_rng(1)
    leaves = [leaf + jnp.asarray(rng.uniform(0.2, 1.0, leaf.shape), leaf.dtype) for leaf in leaves]
    return block, jax.tree_util.tree_unflatten(tree, leaves), x


def two_branches(block, variables, x):
    """The block as written in the checkpoint: act(norm1(conv3x3(x)) + norm2(conv1x1(x)))."""
    def branches(module, x_):
        return activation(module.config.activation_function)(module.conv1(x_) + module.conv2(x_))
    return block.apply(variables, x, method=branches)


def test_inference_fold_equals_the_two_branches():
    block, variables, x = block_and_variables()
    folded = block.apply(variables, x)
    expected = two_branches(block, variables, x)
    assert float(jnp.abs(expected).max()) > 1.0
    np.testing.assert_allclose(np.asarray(folded), np.asarray(expected), rtol=1e-5, atol=1e-5)
    # one convolution instead of two
    n_convs = str(jax.make_jaxpr(lambda v: block.apply(v, x))(variables)).count("conv_general_dilated[")
    assert n_convs == 1


def test_training_keeps_both_branches_and_updates_statistics():
    block, variables, x = block_and_variables()
    y, updates = block.apply(variables, x, mutable=["batch_stats"])
    n_convs = str(jax.make_jaxpr(lambda v: block.apply(v, x, mutable=["batch_stats"]))(variables)).count(
        "conv_general_dilated[")
    assert n_convs == 2
    old = variables["batch_stats"]["conv1"]["norm"]["running_mean"]
    assert not np.allclose(np.asarray(updates["batch_stats"]["conv1"]["norm"]["running_mean"]), np.asarray(old))
    assert y.shape == x.shape
