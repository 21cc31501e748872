"""ops/cpu_channel_moments.cc, the training batch norm's per-channel sums in C++ (ops/batch_norm.py): both custom
calls against float64 for channel counts on and off the 16-float vectors and row counts below, at and above a
chunk; batch_norm_train with it against float64 at the encoder's largest training batch; bitwise reproducible, also with
one thread; vmap; one-line errors; and the batch norm takes it where it applies and nowhere else. The fallback on a
failed build is in test_native.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_kernel_refuses, one_thread_outputs
from rtdetr_jax.ops import native
from rtdetr_jax.ops.batch_norm import batch_norm_train, moments_targets

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


@pytest.fixture(autouse=True)
def native_required(monkeypatch):
    """The kernel must build here (a failed build would fall back to the matrix-vector sums and pass for the wrong
    reason)."""
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "require")


def moments(x):
    """The forward custom call on x (rows, channels) float32 -> (mean, var)."""
    out = jax.ShapeDtypeStruct((x.shape[1],), jnp.float32)
    return jax.ffi.ffi_call(moments_targets(jnp.float32)[0], (out, out))(x)


def grad_moments(dy, x, mean):
    """The backward custom call -> (sum of dy, sum of dy * (x - mean)) per channel."""
    out = jax.ShapeDtypeStruct((x.shape[1],), jnp.float32)
    return jax.ffi.ffi_call(moments_targets(jnp.float32)[1], (out, out))(dy, x, mean)


def data(rows, channels, seed=0):
    """x with a mean large against its spread (where a float32 sum of squares about zero would cancel), dy."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(rows, channels)) * 0.5 + rng.uniform(-20, 20, size=channels)).astype(np.float32)
    return x, rng.normal(size=(rows, channels)).astype(np.float32)


# (rows, channels): the encoder's maps at batch 4 ((4, 80, 80, 256): 256 rows a chunk -> 100 chunks; 128 channels);
# a map within one chunk; 3 and 20 channels (no whole vector, one and a remainder) over many chunks; one row; more
# channels than a chunk's floats (one row a chunk)
SHAPES = [(25600, 256), (6400, 128), (37, 48), (30000, 3), (513, 20), (1, 16), (3, 70000)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_both_calls_match_float64(shape):
    x, dy = data(*shape)
    mean, var = (np.asarray(a, np.float64) for a in jax.jit(moments)(x))
    x64 = x.astype(np.float64)
    want_mean, want_var = x64.mean(0), x64.var(0)
    # each chunk's float32 sum runs over at most 256 rows: a few roundings of the largest |x|
    np.testing.assert_allclose(mean, want_mean, rtol=0, atol=5e-7 * np.abs(x).max())
    np.testing.assert_allclose(var, want_var, rtol=2e-6, atol=1e-7 * want_var.max())
    m32 = mean.astype(np.float32)
    s1, s2 = (np.asarray(a, np.float64) for a in jax.jit(grad_moments)(dy, x, m32))
    want_s1 = dy.astype(np.float64).sum(0)
    want_s2 = (dy.astype(np.float64) * (x64 - m32.astype(np.float64))).sum(0)
    # a sum of n terms of either sign, to float32 rounding of its terms' scale (sqrt(n) * spread)
    scale = np.sqrt(shape[0]) * np.abs(dy).max()
    np.testing.assert_allclose(s1, want_s1, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(s2, want_s2, rtol=0, atol=1e-6 * scale * np.abs(x64 - m32).max())


def reference(x, weight, bias, probe, eps=1e-5):
    """Float64: y, mean, var and the gradients of sum(probe * tanh(y)) for x, weight and bias."""
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    n = x.shape[0]
    mean, var = x.mean(0), x.var(0)
    inv = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * inv
    y = xhat * weight + bias
    dy = probe.reshape(y.shape).astype(np.float64) * (1 - np.tanh(y) ** 2)
    dbias, dweight = dy.sum(0), (dy * xhat).sum(0)
    dx = (weight * inv / n) * (n * dy - dbias - xhat * dweight)
    return y, mean, var, dx, dweight, dbias


def norm_errors(shape, seed=3):
    """batch_norm_train's outputs and gradients (a smooth loss: no ReLU mask for rounding to flip) against
    `reference`, each as its largest error relative to its largest element."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
    weight = (1 + 0.1 * rng.normal(size=shape[-1])).astype(np.float32)
    bias = (0.1 * rng.normal(size=shape[-1])).astype(np.float32)
    probe = rng.normal(size=shape).astype(np.float32)
    want = reference(x, weight, bias, probe)
    jax.clear_caches()

    def loss(x, w, b):
        y, mean, var = batch_norm_train(x, w, b, 1e-5)
        return jnp.sum(jnp.tanh(y) * probe), (y, mean, var)

    grads, outs = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, weight, bias)
    got = [np.asarray(a, np.float64).reshape(w.shape) for a, w in zip((*outs, *grads), want)]
    return dict(zip(("y", "mean", "var", "dx", "dweight", "dbias"),
                    (np.abs(g - w).max() / np.abs(w).max() for g, w in zip(got, want))))


def test_batch_norm_with_it_matches_float64():
    """The training batch of the encoder's largest norms, (4, 80, 80, 256): outputs and gradients within a few
    float32 roundings of float64 (measured: 1.6e-7 to 4e-7; the matrix-vector form's statistics were 7e-6 and 1e-5
    off there, its sums running over the 102,400 rows in float32, one after another)."""
    for name, err in norm_errors((4, 80, 80, 256)).items():
        assert err <= 1e-6, (name, err)


def test_bitwise_reproducible_with_any_number_of_threads(tmp_path):
    """The chunks and their order depend on the shape only: the same bits on every call, and in a process that
    may use one core only (`taskset`), whose XLA thread pool has one thread."""
    x, dy = data(25600, 256, seed=5)

    def run():
        mean, var = moments(x)
        return [np.asarray(a) for a in (mean, var, *grad_moments(dy, x, mean))]

    first = run()
    for _ in range(3):
        for a, b in zip(run(), first):
            assert np.array_equal(a, b)
    one_thread = one_thread_outputs("""
        from test_native_channel_moments import data, grad_moments, moments
        x, dy = data(25600, 256, seed=5)
        mean, var = moments(x)
        outs = [mean, var, *grad_moments(dy, x, mean)]
    """, tmp_path)
    for a, b in zip(one_thread, first, strict=True):
        assert np.array_equal(a, b)


def test_under_vmap_each_element_is_its_own_batch():
    """vmap over a leading axis (per-group statistics): the forward and the gradients of each element equal those
    of single calls."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 2, 5, 5, 24)), jnp.float32)
    w, b = jnp.asarray(rng.normal(size=24), jnp.float32), jnp.asarray(rng.normal(size=24), jnp.float32)

    def loss(x, w, b):
        y, mean, var = batch_norm_train(x, w, b, 1e-5)
        return jnp.sum(jnp.tanh(y)) + jnp.sum(mean * var)

    step = jax.value_and_grad(loss, argnums=(0, 1, 2))
    batched = jax.jit(jax.vmap(step, in_axes=(0, None, None)))(x, w, b)
    for n in range(3):
        single = jax.jit(step)(x[n], w, b)
        for a, s in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(single)):
            np.testing.assert_array_equal(np.asarray(a)[n], np.asarray(s))


def test_wrong_shapes_are_one_line_errors_naming_them():
    x = jnp.ones((6, 4), jnp.float32)
    target, grad_target = moments_targets(jnp.float32)
    vec = jax.ShapeDtypeStruct((4,), jnp.float32)
    cases = [
        (target, (jnp.ones((2, 3, 4), jnp.float32),), (vec, vec),
         r"channel_moments: x must be \(rows, channels\), got \(2, 3, 4\)"),
        (target, (jnp.ones((0, 4), jnp.float32),), (vec, vec), r"channel_moments: x \(0, 4\) has no rows"),
        (target, (x,), (jax.ShapeDtypeStruct((5,), jnp.float32), vec),
         r"channel_moments: the outputs must be \(channels,\) for x \(6, 4\), got \(5,\) and \(4,\)"),
        (grad_target, (x, jnp.ones((6, 5), jnp.float32), jnp.ones(4, jnp.float32)), (vec, vec),
         r"channel_grad_moments: dy and x must be \(rows, channels\) alike, got \(6, 4\) and \(6, 5\)"),
        (grad_target, (x, x, jnp.ones(3, jnp.float32)), (vec, vec),
         r"channel_grad_moments: mean must be \(channels,\) for x \(6, 4\), got \(3,\)"),
        (grad_target, (x, x, jnp.ones(4, jnp.float32)), (vec, jax.ShapeDtypeStruct((2, 2), jnp.float32)),
         r"channel_grad_moments: the outputs must be \(channels,\) for x \(6, 4\), got \(4,\) and \(2, 2\)"),
    ]
    for name, operands, outs, message in cases:
        assert_kernel_refuses(name, outs, operands, message)


def norm_graphs(dtype=jnp.float32):
    """The jaxprs of batch_norm_train's forward and of its gradient on a small map."""
    x = jnp.ones((2, 3, 3, 8), dtype)
    w, b = jnp.ones(8, jnp.float32), jnp.zeros(8, jnp.float32)

    def forward(x):
        return batch_norm_train(x, w, b, 1e-5)

    def loss(x):
        return jnp.sum(forward(x)[0].astype(jnp.float32) ** 2)

    return str(jax.make_jaxpr(forward)(x)), str(jax.make_jaxpr(jax.grad(loss))(x))


def test_the_norm_takes_it_where_it_applies(monkeypatch):
    """In float32 on the CPU, forward and backward; not in bfloat16 or float64, not with the native kernels off,
    not on an empty map."""
    jax.clear_caches()
    forward, gradient = norm_graphs()
    assert "rtdetr_jax_channel_moments" in forward and "rtdetr_jax_channel_moments_1" in gradient
    assert "ffi_call" not in norm_graphs(jnp.bfloat16)[1]
    with jax.enable_x64(True):
        assert "ffi_call" not in norm_graphs(jnp.float64)[1]
    empty = batch_norm_train(jnp.ones((0, 3, 3, 8)), jnp.ones(8), jnp.zeros(8), 1e-5)
    assert empty[0].shape == (0, 3, 3, 8)
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")
    jax.clear_caches()
    assert moments_targets(jnp.float32) is None
    assert "ffi_call" not in norm_graphs()[1]
    jax.clear_caches()


def test_the_detectors_training_forward_takes_it(monkeypatch):
    """The small detector in training mode under `require`: the forward call once per trainable norm (and the
    backward's as often in its gradient), and the updated running statistics those of the matrix-vector form but
    for float32 rounding carried through the 61 norms (measured: 3.4e-7 of each leaf's largest element at the
    median leaf, 1.1e-5 at the worst; the precision itself is compared with float64 above)."""
    if native.compiler() is None:
        pytest.skip("needs a C++ compiler")
    from flax import traverse_util

    from conftest import small_config
    from rtdetr_jax.modeling.detector import RTDetrV2Detector
    from rtdetr_jax.train.loop import fresh_model

    config = small_config()
    model = fresh_model(config, seed=0)
    pixels = jnp.asarray(np.random.default_rng(0).random((2, 3, 64, 64)), jnp.float32)
    module = RTDetrV2Detector(config, jnp.float32)
    trainable = [k for k in traverse_util.flatten_dict(model.variables["batch_stats"])
                 if k[-1] == "running_mean" and not (config.freeze_backbone_batch_norms and "backbone" in k)]

    def forward(params):
        out, stats = module.apply({"params": params, "batch_stats": model.variables["batch_stats"]}, pixels,
                                  mutable=["batch_stats"])
        return jnp.sum(out["logits"] ** 2), stats

    def run():
        jax.clear_caches()
        lowered = jax.jit(jax.grad(forward, has_aux=True)).lower(model.params)
        return lowered.as_text(), traverse_util.flatten_dict(jax.device_get(lowered.compile()(model.params)[1]))

    text, stats = run()
    assert text.count("@rtdetr_jax_channel_moments(") == len(trainable) > 0
    assert text.count("@rtdetr_jax_channel_moments_1(") == len(trainable)
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")
    off_text, off_stats = run()
    assert "rtdetr_jax_channel_moments" not in off_text
    for key, want in off_stats.items():
        err = np.abs(stats[key] - want).max() / np.abs(want).max()
        assert err <= 1e-4, (key, err)
    jax.clear_caches()
