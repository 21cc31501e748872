"""ops/batch_norm.py: training batch norm with hand-written backward equals plain jnp autodiff, and torch's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdetr_jax.ops.batch_norm import batch_norm_train, channel_sum


def reference(x, weight, bias, eps):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return (x - mean) * jax.lax.rsqrt(var + eps) * weight + bias, mean, var


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 4, 6)])
def test_values_and_all_gradients_match_autodiff_in_float64(shape):
    rng = np.random.default_rng(len(shape))
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(2.0, 3.0, size=shape))
        weight, bias = jnp.asarray(rng.normal(size=shape[-1])), jnp.asarray(rng.normal(size=shape[-1]))
        probes = [jnp.asarray(rng.normal(size=s)) for s in (shape, shape[-1:], shape[-1:])]

        def loss(f):
            # every output carries a gradient, the statistics included
            return lambda *a: sum(jnp.sum(jnp.tanh(o) * p) for o, p in zip(f(*a, 1e-5), probes))

        ours, theirs = batch_norm_train(x, weight, bias, 1e-5), reference(x, weight, bias, 1e-5)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        g_ours = jax.grad(loss(batch_norm_train), argnums=(0, 1, 2))(x, weight, bias)
        g_theirs = jax.grad(loss(reference), argnums=(0, 1, 2))(x, weight, bias)
        for a, b, name in zip(g_ours, g_theirs, ("x", "weight", "bias")):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)


def test_matches_torch_batchnorm2d_training_forward_and_backward():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(4, 6, 5, 8)).astype(np.float32)  # NHWC
    probe = rng.normal(size=x.shape).astype(np.float32)
    bn = torch.nn.BatchNorm2d(8).train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(rng.normal(size=8)))
        bn.bias.copy_(torch.tensor(rng.normal(size=8)))
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    yt = bn(xt)
    (yt * torch.tensor(probe.transpose(0, 3, 1, 2))).sum().backward()

    weight, bias = jnp.asarray(bn.weight.detach().numpy()), jnp.asarray(bn.bias.detach().numpy())
    f = lambda *a: jnp.sum(batch_norm_train(*a, 1e-5)[0] * probe)  # noqa: E731
    grads = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(x), weight, bias)
    y = batch_norm_train(jnp.asarray(x), weight, bias, 1e-5)[0]
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 1), atol=2e-5)
    np.testing.assert_allclose(grads[0], xt.grad.numpy().transpose(0, 2, 3, 1), atol=2e-5)
    np.testing.assert_allclose(grads[1], bn.weight.grad.numpy(), atol=1e-4)
    np.testing.assert_allclose(grads[2], bn.bias.grad.numpy(), atol=1e-4)


def test_bfloat16_input_keeps_its_dtype_and_float32_statistics():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 4)), jnp.bfloat16)
    y, mean, var = batch_norm_train(x, jnp.ones(4), jnp.zeros(4), 1e-5)
    assert y.dtype == jnp.bfloat16 and mean.dtype == jnp.float32 and var.dtype == jnp.float32
    dx = jax.grad(lambda x_: jnp.sum(batch_norm_train(x_, jnp.ones(4), jnp.zeros(4), 1e-5)[0].astype(jnp.float32)
                                     ** 2))(x)
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(channel_sum(x), np.asarray(x, np.float32).sum((0, 1, 2)), rtol=1e-6)


def test_inference_norm_subtracts_the_mean_first():
    """The inference form (modeling/layers.BatchNorm with running statistics) in float32 against float64, on
    activations whose mean is large against their spread: (x - mean) * scale + bias stays within a few float32
    roundings of the spread; x * scale + (bias - mean * scale) rounds x * scale and is off by ~eps * |mean| * scale
    (6e-5 here)."""
    from rtdetr_jax.modeling.layers import BatchNorm

    rng = np.random.default_rng(0)
    c = 16
    x = rng.normal(1000.0, 1.0, size=(2, 4, 5, c))
    mean, var = 1000.0 + rng.normal(0, 0.1, c), rng.uniform(0.5, 2.0, c)
    weight, bias = rng.normal(size=c), rng.normal(size=c)
    variables = {"params": {"weight": weight, "bias": bias}, "batch_stats": {"running_mean": mean, "running_var": var}}
    expected = (x - mean) / np.sqrt(var + 1e-5) * weight + bias  # float64
    as32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), variables)
    got = np.asarray(BatchNorm().apply(as32, jnp.asarray(x, jnp.float32)), np.float64)
    # the float32 inputs themselves are off by up to ~3e-5 (half an ulp at 1000), times |scale| <= ~3.5
    x32, mean32 = np.float32(x).astype(np.float64), np.float32(mean).astype(np.float64)
    exact_from_32 = (x32 - mean32) / np.sqrt(np.float32(var).astype(np.float64) + 1e-5) * np.float32(weight) + bias
    assert np.max(np.abs(got - exact_from_32)) < 2e-6, np.max(np.abs(got - exact_from_32))
    assert np.max(np.abs(got - expected)) < 3e-4
