"""ops/cpu_deformable_sampling.cc through `weighted_gather` (ops/deformable_sampling.py): the forward and both
gradients equal float64 NumPy loops to float32 rounding for heads reading their own channels or one shared memory,
channel counts on and off the 16-float vectors, tap counts on and off the 16-tap blocks, out-of-range indices
(clamped), empty inputs; bitwise reproducible, also with one thread; vmap and concurrent calls; one-line errors;
and the deformable attention takes it where it applies and nowhere else. test_deformable.py runs the attention's
own tests with the kernel and without it; test_native.py compares the detector's training gradients with the C++
kernels and without them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_kernel_refuses, one_thread_outputs
from rtdetr_jax.ops.deformable_sampling import sampling_targets, weighted_gather

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


@pytest.fixture(autouse=True)
def native_required(monkeypatch):
    """The kernel must build here (a failed build would otherwise fall back to XLA's gathers and pass for the
    wrong reason); the fallback has its own tests (test_native.py)."""
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "require")


def data(b, t, g, c, q, h, k, seed=0, spread=0):
    """value (b, t, g, c), index (b, q, h, k) in [-spread, t + spread), weight, d_out (b, q, h, c); float64."""
    rng = np.random.default_rng(seed)
    value = rng.normal(size=(b, t, g, c))
    index = rng.integers(-spread, t + spread, size=(b, q, h, k)) if t else np.zeros((b, q, h, k), np.int64)
    return value, index.astype(np.int32), rng.normal(size=(b, q, h, k)), rng.normal(size=(b, q, h, c))


def reference(value, index, weight, d_out):
    """Float64 loops: the forward, d_value and d_weight (indices clamped into the tokens)."""
    b, t, g, c = value.shape
    _, q, h, k = index.shape
    out, d_value, d_weight = np.zeros((b, q, h, c)), np.zeros_like(value), np.zeros_like(weight)
    for bi in range(b):
        for qi in range(q):
            for hi in range(h):
                gi = 0 if g == 1 else hi
                for ki in range(k):
                    ti = min(max(int(index[bi, qi, hi, ki]), 0), t - 1)
                    row = value[bi, ti, gi]
                    out[bi, qi, hi] += weight[bi, qi, hi, ki] * row
                    d_value[bi, ti, gi] += weight[bi, qi, hi, ki] * d_out[bi, qi, hi]
                    d_weight[bi, qi, hi, ki] = row @ d_out[bi, qi, hi]
    return out, d_value, d_weight


def run_kernel(value, index, weight, d_out):
    """The kernel's forward and its (d_value, d_weight) for the cotangent d_out, in float32."""
    targets = sampling_targets(jnp.float32)
    v, w, g = (jnp.asarray(a, jnp.float32) for a in (value, weight, d_out))
    i = jnp.asarray(index)
    out, vjp = jax.vjp(lambda v, w: weighted_gather(v, i, w, targets), v, w)
    return (np.asarray(out), *(np.asarray(a) for a in vjp(g)))


# (batch, tokens, groups, channels, queries, heads, taps): heads on their own channels (groups == heads) and on
# one shared memory (groups == 1); 32 channels (the decoder's), 256 (the memory's), and 7, 20 and 48 (no whole
# vector, a vector and a remainder, three vectors); 48 taps (3 blocks of 16), 4, 1, 17 and 35 (a block and a
# remainder); one token; no queries; no taps
SHAPES = [(2, 37, 3, 32, 5, 3, 48), (2, 37, 1, 256, 4, 3, 12), (1, 23, 2, 7, 6, 2, 17), (2, 19, 1, 20, 3, 4, 35),
          (3, 11, 4, 48, 2, 4, 4), (1, 1, 2, 16, 3, 2, 5), (2, 9, 2, 32, 0, 2, 8), (1, 9, 1, 16, 3, 2, 0),
          (1, 50, 3, 32, 7, 3, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_matches_float64_to_float32_rounding(shape):
    value, index, weight, d_out = data(*shape, seed=sum(shape), spread=3)
    want = reference(value, index, weight, d_out)
    got = run_kernel(value, index, weight, d_out)
    for name, g, w in zip(("out", "d_value", "d_weight"), got, want):
        assert g.shape == w.shape and g.dtype == np.float32, name
        scale = max(np.abs(w).max(initial=0.0), 1.0)
        np.testing.assert_allclose(g, w, atol=2e-6 * scale, rtol=0, err_msg=name)


def test_equals_xlas_gather_at_the_decoders_size(monkeypatch):
    """r18vd's decoder at batch 2 (8400 tokens, 8 heads of 32 channels, 300 queries, 48 taps from the bilinear
    corners of 12 points): the same sums as the XLA gather (modeling/deformable.py with the kernel off) to float32
    rounding, forward and gradients; and as close to float64 as it."""
    from rtdetr_jax.modeling import deformable

    shapes, points = ((80, 80), (40, 40), (20, 20)), (4, 4, 4)
    rng = np.random.default_rng(5)
    value = rng.normal(size=(2, 8400, 8, 32))
    locations = rng.uniform(-0.05, 1.05, size=(2, 300, 8, 12, 2))
    attention = rng.dirichlet(np.ones(12), size=(2, 300, 8))
    d_out = rng.normal(size=(2, 300, 8, 32))
    index, weight = (np.asarray(a) for a in deformable._sampling_taps(
        shapes, jnp.asarray(locations, jnp.float32), jnp.asarray(attention, jnp.float32), points, "default"))
    got = run_kernel(value, index, weight, d_out)
    with jax.enable_x64(True):
        _, vjp = jax.vjp(lambda v, w: deformable._sample_heads(v, jnp.asarray(index), w), jnp.asarray(value),
                         jnp.asarray(weight, jnp.float64))
        truth = (np.asarray(deformable._sample_heads(jnp.asarray(value), jnp.asarray(index),
                                                     jnp.asarray(weight, jnp.float64))),
                 *(np.asarray(a) for a in vjp(jnp.asarray(d_out))))
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")
    jax.clear_caches()
    v32, w32, g32 = (jnp.asarray(a, jnp.float32) for a in (value, weight, d_out))
    out, vjp = jax.vjp(lambda v, w: deformable._sample_heads(v, jnp.asarray(index), w), v32, w32)
    xla = (np.asarray(out), *(np.asarray(a) for a in vjp(g32)))
    jax.clear_caches()
    for name, g, x, t in zip(("out", "d_value", "d_weight"), got, xla, truth):
        scale = np.abs(t).max()
        err, err_xla = np.abs(g - t).max(), np.abs(x - t).max()
        assert err <= max(2 * err_xla, 1e-6 * scale), (name, err, err_xla)
        np.testing.assert_allclose(g, x, atol=4e-6 * scale, rtol=0, err_msg=name)


def test_bitwise_reproducible_with_any_number_of_threads(tmp_path):
    """Each output is one task's sum in a fixed order: the same bits on every call, and in a process that may use
    one core only (`taskset`), whose XLA thread pool has one thread."""
    first = run_kernel(*data(2, 500, 4, 32, 300, 4, 48, seed=11))
    for _ in range(3):
        for a, b in zip(run_kernel(*data(2, 500, 4, 32, 300, 4, 48, seed=11)), first):
            assert np.array_equal(a, b)
    one_thread = one_thread_outputs("""
        from test_native_deformable_sampling import data, run_kernel
        outs = run_kernel(*data(2, 500, 4, 32, 300, 4, 48, seed=11))
    """, tmp_path)
    for a, b in zip(one_thread, first, strict=True):
        assert np.array_equal(a, b)


def test_vmap_and_concurrent_calls_in_one_program():
    """Under vmap (one call per element) and with four independent calls in one jit program, repeatedly: the
    results of the single calls, forward and gradients."""
    value, index, weight, d_out = data(4, 60, 2, 32, 40, 2, 12, seed=4)
    v, i = jnp.asarray(value, jnp.float32)[:, None], jnp.asarray(index)[:, None]
    w = jnp.asarray(weight, jnp.float32)[:, None]
    targets = sampling_targets(jnp.float32)

    def loss(v, i, w):
        return jnp.sum(weighted_gather(v, i, w, targets) ** 2)

    step = jax.value_and_grad(loss, argnums=(0, 2))
    singles = [step(v[n], i[n], w[n]) for n in range(4)]
    batched = jax.jit(jax.vmap(step))
    four = jax.jit(lambda v, i, w: [step(v[n], i[n], w[n]) for n in range(4)])
    for _ in range(3):
        for n, got in enumerate(four(v, i, w)):
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(singles[n])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        got = batched(v, i, w)
        for n in range(4):
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(singles[n])):
                np.testing.assert_array_equal(np.asarray(a)[n], np.asarray(b))


def test_wrong_shapes_or_dtypes_are_one_line_errors():
    targets = sampling_targets(jnp.float32)
    value, index, weight = jnp.ones((2, 10, 4, 8)), jnp.zeros((2, 3, 4, 5), jnp.int32), jnp.ones((2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"^weighted_gather: value \(2, 10, 4, 8\), index \(2, 3, 4, 5\) and weight "
                                         r"\(2, 3, 4, 6\) do not fit \(batch, tokens, groups, channels\) and "
                                         r"\(batch, queries, heads, taps\)$"):
        weighted_gather(value, index, jnp.ones((2, 3, 4, 6)), targets)
    with pytest.raises(ValueError, match=r"^weighted_gather: value \(3, 10, 4, 8\), index"):
        weighted_gather(jnp.ones((3, 10, 4, 8)), index, weight, targets)  # batch
    with pytest.raises(ValueError, match=r"^weighted_gather: value has 2 groups; 4 heads need 1 or 4$"):
        weighted_gather(jnp.ones((2, 10, 2, 8)), index, weight, targets)
    with pytest.raises(ValueError, match=r"^weighted_gather: value is bfloat16, the C\+\+ kernel takes float32$"):
        weighted_gather(value.astype(jnp.bfloat16), index, weight, targets)
    with pytest.raises(ValueError, match=r"^weighted_gather: index is float32, expected an integer dtype$"):
        weighted_gather(value, weight, weight, targets)
    with pytest.raises(ValueError, match=r"^weighted_gather: value \(2, 0, 4, 8\) has no tokens to gather$"):
        weighted_gather(jnp.ones((2, 0, 4, 8)), index, weight, targets)


def test_the_kernels_themselves_name_the_shapes_they_refuse():
    """Called past `weighted_gather`'s checks, the C++ kernels' own errors: one line naming the shapes."""
    forward, backward = sampling_targets(jnp.float32)
    value, index, weight = jnp.ones((2, 10, 4, 8)), jnp.zeros((2, 3, 4, 5), jnp.int32), jnp.ones((2, 3, 4, 5))
    out = jax.ShapeDtypeStruct((2, 3, 4, 8), jnp.float32)
    grads = (jax.ShapeDtypeStruct(value.shape, jnp.float32), jax.ShapeDtypeStruct(weight.shape, jnp.float32))
    d_out = jnp.ones((2, 3, 4, 8))
    misfit = (r"value \(2, 10, 4, 8\), index \(2, 3, 4, 5\) and weight \(2, 3, 4, 6\) do not fit "
              r"\(batch, tokens, groups, channels\) and \(batch, queries, heads, taps\)")
    cases = [
        (forward, (value, index, jnp.ones((2, 3, 4, 6))), out, "deformable_sampling: " + misfit),
        (forward, (value, index, weight), jax.ShapeDtypeStruct((2, 3, 4, 7), jnp.float32),
         r"deformable_sampling: the output \(2, 3, 4, 7\) does not fit value \(2, 10, 4, 8\) and index "
         r"\(2, 3, 4, 5\)"),
        (backward, (value, index, jnp.ones((2, 3, 4, 6)), d_out), grads, "deformable_sampling_grad: " + misfit),
        (backward, (value, index, weight, d_out[:, :2]), grads,
         r"deformable_sampling_grad: d_out \(2, 2, 4, 8\), d_value \(2, 10, 4, 8\) and d_weight \(2, 3, 4, 5\) do "
         r"not fit value \(2, 10, 4, 8\) and index \(2, 3, 4, 5\)"),
    ]
    for target, operands, outs, message in cases:
        assert_kernel_refuses(target, outs, operands, message)


def attention_graphs(dtype=jnp.float32, weight_dtype=None):
    """The jaxprs of the deformable attention's forward and of its gradient, on small inputs."""
    from rtdetr_jax.modeling.deformable import projected_deformable_sampling

    shapes, points = ((4, 4), (2, 2)), (2, 2)
    rng = np.random.default_rng(0)
    memory = jnp.asarray(rng.normal(size=(2, 20, 16)), dtype)
    kernel, bias = jnp.asarray(rng.normal(size=(16, 16)), dtype), jnp.zeros(16, dtype)
    locations = jnp.asarray(rng.uniform(size=(2, 3, 2, 4, 2)), weight_dtype or dtype)
    weights = jnp.asarray(rng.dirichlet(np.ones(4), size=(2, 3, 2)), weight_dtype or dtype)

    def forward(m, k):
        return projected_deformable_sampling(m, k, bias, shapes, locations, weights, points).astype(jnp.float32)

    def loss(m, k):
        return jnp.sum(forward(m, k) ** 2)

    return (str(jax.make_jaxpr(forward)(memory, kernel)),
            str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(memory, kernel)))


def test_the_attention_takes_it_where_it_applies(monkeypatch):
    """In float32 on the CPU, in the forward (the memory's rows, one group), not in the derivatives (XLA's gathers,
    see ops/deformable_sampling.py); not in bfloat16, not for float64 weights under x64, not with the native
    kernels off."""
    jax.clear_caches()
    forward, gradient = attention_graphs()
    assert "rtdetr_jax_deformable_sampling" in forward and "ffi_call" not in gradient
    assert "ffi_call" not in attention_graphs(jnp.bfloat16)[0]
    with jax.enable_x64(True):
        assert sampling_targets(jnp.float32, jnp.float64) is None
        assert "ffi_call" not in attention_graphs(jnp.float32, jnp.float64)[0]
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")
    jax.clear_caches()
    assert sampling_targets(jnp.float32) is None
    assert "ffi_call" not in attention_graphs()[0]
    jax.clear_caches()
