"""Deformable sampling against an independent float64 NumPy reference (per-point loops, grid_sample semantics),
including non-uniform points per level, and against torch's grid_sample directly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdetr_jax.ops import native
from rtdetr_jax.ops.deformable_sampling import sampling_targets
from rtdetr_jax.modeling.deformable import (
    MultiscaleDeformableAttention,
    _project_then_sample,
    _sample_then_project,
    _sampling_taps,
    multi_scale_deformable_sampling,
    projected_deformable_sampling,
)


@pytest.fixture(autouse=True, scope="module", params=["off", "require"])
def native_kernels(request):
    """Every test here runs twice: with XLA's gathers ("off": the GPU's and TPU's path, and the CPU's in bfloat16 or
    where no C++ compiler is found) and with the C++ kernel (ops/deformable_sampling.py, the CPU's in float32;
    "require": a failed build fails the test instead of falling back)."""
    if request.param == "require" and (jax.default_backend() != "cpu" or native.compiler() is None):
        pytest.skip("the C++ kernel needs the CPU backend and a C++ compiler")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RTDETR_JAX_NATIVE", request.param)
        jax.clear_caches()  # traces are cached by function and shapes, not by the variable
        yield request.param
    jax.clear_caches()


def numpy_reference(value, shapes, locations, weights, points, method):
    """Straightforward float64 loops: bilinear with zero padding (align_corners=False), or rounded indexing."""
    b, s, h, d = value.shape
    _, q, _, p, _ = locations.shape
    starts = np.concatenate([[0], np.cumsum([hh * ww for hh, ww in shapes])[:-1]])
    level = np.repeat(np.arange(len(points)), points)
    out = np.zeros((b, q, h, d))
    for bi in range(b):
        for qi in range(q):
            for hi in range(h):
                for pi in range(p):
                    hh, ww = shapes[level[pi]]
                    fmap = value[bi, starts[level[pi]]: starts[level[pi]] + hh * ww, hi].reshape(hh, ww, d)
                    x, y = locations[bi, qi, hi, pi]
                    if method == "discrete":
                        ix = min(max(int(x * ww + 0.5), 0), ww - 1)
                        iy = min(max(int(y * hh + 0.5), 0), hh - 1)
                        sample = fmap[iy, ix]
                    else:
                        px, py = x * ww - 0.5, y * hh - 0.5
                        x0, y0 = int(np.floor(px)), int(np.floor(py))
                        sample = np.zeros(d)
                        for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= cx < ww and 0 <= cy < hh:
                                sample += (1 - abs(px - cx)) * (1 - abs(py - cy)) * fmap[cy, cx]
                    out[bi, qi, hi] += weights[bi, qi, hi, pi] * sample
    return out.reshape(b, q, h * d)


def random_inputs(points, shapes, seed=0, b=2, q=5, h=2, d=3):
    rng = np.random.default_rng(seed)
    s = sum(hh * ww for hh, ww in shapes)
    value = rng.normal(size=(b, s, h, d))
    # include locations outside [0, 1] to exercise the zero padding and the clamping
    locations = rng.uniform(-0.15, 1.15, size=(b, q, h, sum(points), 2))
    logits = rng.normal(size=(b, q, h, sum(points)))
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return value, locations, weights


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("points", [(4, 4, 4), (2, 4, 3), (1, 6, 2)])
def test_matches_numpy_reference(points, method):
    shapes = ((6, 8), (3, 4), (2, 2))
    value, locations, weights = random_inputs(points, shapes, seed=sum(points))
    expected = numpy_reference(value, shapes, locations, weights, points, method)
    with jax.enable_x64(True):
        ours = multi_scale_deformable_sampling(jnp.asarray(value), shapes, jnp.asarray(locations),
                                               jnp.asarray(weights), points, method)
        np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-10)
    ours32 = multi_scale_deformable_sampling(jnp.asarray(value, jnp.float32), shapes,
                                             jnp.asarray(locations, jnp.float32), jnp.asarray(weights, jnp.float32),
                                             points, method)
    if method == "default":  # rounding boundaries make the discrete float32 case non-comparable point-wise
        np.testing.assert_allclose(np.asarray(ours32), expected, atol=1e-5)


def test_bilinear_matches_torch_grid_sample():
    torch = pytest.importorskip("torch")
    shapes = ((5, 7),)
    value, locations, weights = random_inputs((3,), shapes, seed=5, h=1)
    b, s, h, d = value.shape
    fmap = torch.tensor(value[:, :, 0].reshape(b, 5, 7, d)).permute(0, 3, 1, 2)
    grid = torch.tensor(2 * locations[:, :, 0] - 1)  # (b, q, points, 2)
    sampled = torch.nn.functional.grid_sample(fmap, grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=False)  # (b, d, q, points)
    expected = (sampled * torch.tensor(weights[:, :, 0])[:, None]).sum(-1).permute(0, 2, 1).numpy()
    with jax.enable_x64(True):
        ours = multi_scale_deformable_sampling(jnp.asarray(value), shapes, jnp.asarray(locations),
                                               jnp.asarray(weights), (3,), "default")
        np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-10)


def test_point_count_mismatch_is_an_error():
    value, locations, weights = random_inputs((2, 2), ((2, 2), (1, 1)))
    with pytest.raises(ValueError, match="points_per_level"):
        multi_scale_deformable_sampling(jnp.asarray(value), ((2, 2), (1, 1)), jnp.asarray(locations),
                                        jnp.asarray(weights), (2, 3), "default")


def projection_inputs(points, shapes, seed, b=2, q=5, h=2, d=3, channels=4):
    """Memory and a value projection (kernel, bias) with sampling locations and weights for `h` heads of `d`."""
    _, locations, weights = random_inputs(points, shapes, seed=seed, b=b, q=q, h=h, d=d)
    rng = np.random.default_rng(seed + 100)
    s = sum(hh * ww for hh, ww in shapes)
    return (rng.normal(size=(b, s, channels)), rng.normal(size=(channels, h * d)), rng.normal(size=(h * d,)),
            locations, weights)


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("points", [(4, 4, 4), (2, 4, 3)])
def test_projected_sampling_matches_numpy_reference(points, method):
    shapes = ((6, 8), (3, 4), (2, 2))
    memory, kernel, bias, locations, weights = projection_inputs(points, shapes, seed=sum(points) + 1)
    b, s, _ = memory.shape
    value = (memory @ kernel + bias).reshape(b, s, 2, 3)
    expected = numpy_reference(value, shapes, locations, weights, points, method)
    with jax.enable_x64(True):
        args = [jnp.asarray(a) for a in (memory, kernel, bias)]
        ours = projected_deformable_sampling(*args, shapes, jnp.asarray(locations), jnp.asarray(weights), points,
                                             method)
        np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-10)
        # both forms, whichever platform this runs on
        index, weight = _sampling_taps(shapes, jnp.asarray(locations), jnp.asarray(weights), points, method)
        for form in (_project_then_sample, _sample_then_project):
            out = np.asarray(form(*args, index, weight)).reshape(expected.shape)
            np.testing.assert_allclose(out, expected, atol=1e-10, err_msg=form.__name__)
    args32 = [jnp.asarray(a, jnp.float32) for a in (memory, kernel, bias, locations, weights)]
    ours32 = projected_deformable_sampling(*args32[:3], shapes, *args32[3:], points, method)
    if method == "default":  # rounding boundaries make the discrete float32 case non-comparable point-wise
        np.testing.assert_allclose(np.asarray(ours32), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_projected_sampling_derivatives_match_projecting_first(method):
    """Reverse and forward mode through the projected sampling equal those of projecting the value with a matmul
    and sampling it, for the memory, the projection, the locations and the attention weights."""
    points, shapes = (2, 4, 3), ((6, 8), (3, 4), (2, 2))
    inputs = projection_inputs(points, shapes, seed=7)
    cotangent = np.random.default_rng(8).normal(size=(2, 5, 6))

    def projected(memory, kernel, bias, locations, weights):
        return projected_deformable_sampling(memory, kernel, bias, shapes, locations, weights, points, method)

    def projecting_first(memory, kernel, bias, locations, weights):
        value = (memory @ kernel + bias).reshape(*memory.shape[:2], 2, 3)
        return multi_scale_deformable_sampling(value, shapes, locations, weights, points, method)

    with jax.enable_x64(True):
        inputs = [jnp.asarray(a) for a in inputs]
        argnums = tuple(range(5))
        ours = jax.grad(lambda *a: jnp.sum(projected(*a) * cotangent), argnums)(*inputs)
        expected = jax.grad(lambda *a: jnp.sum(projecting_first(*a) * cotangent), argnums)(*inputs)
        for name, a, e in zip(("memory", "kernel", "bias", "locations", "weights"), ours, expected):
            # rounding has no derivative in the locations
            assert (float(jnp.abs(e).max()) > 0) == (name != "locations" or method == "default"), name
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-10, err_msg=name)
        tangents = [jnp.asarray(np.random.default_rng(9).normal(size=a.shape)) for a in inputs]
        _, ours_t = jax.jvp(projected, inputs, tangents)
        _, expected_t = jax.jvp(projecting_first, inputs, tangents)
        np.testing.assert_allclose(np.asarray(ours_t), np.asarray(expected_t), atol=1e-10)


def test_projected_sampling_rejects_a_projection_that_does_not_fit():
    shapes = ((2, 2), (1, 1))
    memory, kernel, bias, locations, weights = projection_inputs((2, 2), shapes, seed=3)
    with pytest.raises(ValueError, match=r"value projection kernel \(5, 6\)"):
        projected_deformable_sampling(jnp.asarray(memory), jnp.zeros((5, 6)), jnp.asarray(bias), shapes,
                                      jnp.asarray(locations), jnp.asarray(weights), (2, 2))
    with pytest.raises(ValueError, match=r"bias \(5,\)"):
        projected_deformable_sampling(jnp.asarray(memory), jnp.asarray(kernel), jnp.zeros(5), shapes,
                                      jnp.asarray(locations), jnp.asarray(weights), (2, 2))


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_projected_sampling_with_a_value_mask_zeroes_the_masked_projected_values(method):
    """A masked token's projected value, bias included, is 0: the same as sampling `where(mask, memory @ kernel +
    bias, 0)`."""
    points, shapes = (2, 4, 3), ((6, 8), (3, 4), (2, 2))
    memory, kernel, bias, locations, weights = projection_inputs(points, shapes, seed=13)
    mask = np.random.default_rng(14).random(memory.shape[:2]) < 0.6
    value = np.where(mask[..., None], memory @ kernel + bias, 0.0).reshape(*memory.shape[:2], 2, 3)
    expected = numpy_reference(value, shapes, locations, weights, points, method)
    with jax.enable_x64(True):
        ours = projected_deformable_sampling(*(jnp.asarray(a) for a in (memory, kernel, bias)), shapes,
                                             jnp.asarray(locations), jnp.asarray(weights), points, method,
                                             jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-10)
    with pytest.raises(ValueError, match=r"value_mask has shape \(2, 63\), expected \(batch, tokens\) = \(2, 64\)"):
        projected_deformable_sampling(*(jnp.asarray(a) for a in (memory, kernel, bias)), shapes,
                                      jnp.asarray(locations), jnp.asarray(weights), points, method,
                                      jnp.asarray(mask[:, 1:]))


def test_attention_value_mask():
    """The attention's parameters are the same with and without a mask (one `value_proj` kernel and bias, as the
    converter names them); an all-True mask changes nothing, and an all-False one leaves only `output_proj`'s
    bias."""
    shapes = ((6, 8), (3, 4))
    rng = np.random.default_rng(11)
    queries = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    memory = jnp.asarray(rng.normal(size=(2, 60, 16)), jnp.float32)
    reference = jnp.asarray(rng.uniform(0.2, 0.8, size=(2, 5, 1, 4)), jnp.float32)
    module = MultiscaleDeformableAttention(16, 2, (3, 2))
    params = module.init(jax.random.PRNGKey(0), queries, None, memory, reference, shapes)
    masked_params = module.init(jax.random.PRNGKey(0), queries, None, memory, reference, shapes,
                                jnp.ones((2, 60), bool))
    assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(jnp.shape, masked_params)
    assert params["params"]["value_proj"]["kernel"].shape == (16, 16)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    unmasked = module.apply(params, queries, None, memory, reference, shapes)
    all_true = module.apply(params, queries, None, memory, reference, shapes, jnp.ones((2, 60), bool))
    np.testing.assert_allclose(np.asarray(unmasked), np.asarray(all_true), atol=1e-6)
    all_false = module.apply(params, queries, None, memory, reference, shapes, jnp.zeros((2, 60), bool))
    output_bias = np.broadcast_to(np.asarray(params["params"]["output_proj"]["bias"]), all_false.shape)
    np.testing.assert_allclose(np.asarray(all_false), output_bias, atol=1e-6)
    assert float(jnp.abs(unmasked - all_false).max()) > 0.1


def test_projected_sampling_in_bfloat16_stays_near_float32():
    """bfloat16 memory and projection: the taps are summed in float32, so the result is the float32 one up to
    bfloat16's rounding of the inputs, the sums and the product (relative 2^-8 each)."""
    points, shapes = (4, 4, 4), ((6, 8), (3, 4), (2, 2))
    memory, kernel, bias, locations, weights = projection_inputs(points, shapes, seed=12, q=40, channels=64)
    f32 = projected_deformable_sampling(*(jnp.asarray(a, jnp.float32) for a in (memory, kernel, bias)), shapes,
                                        jnp.asarray(locations, jnp.float32), jnp.asarray(weights, jnp.float32), points)
    bf16 = projected_deformable_sampling(*(jnp.asarray(a, jnp.bfloat16) for a in (memory, kernel, bias)), shapes,
                                         jnp.asarray(locations, jnp.float32), jnp.asarray(weights, jnp.float32),
                                         points)
    assert bf16.dtype == jnp.bfloat16
    scale = float(jnp.abs(f32).max())
    assert float(jnp.abs(bf16.astype(jnp.float32) - f32).max()) < 2e-2 * scale


def _dot_operand_shapes(fn, *args):
    """The operand types of every dot_general in `fn`'s StableHLO for the default backend."""
    text = jax.jit(fn).lower(*args).as_text()
    return [line.rsplit(":", 1)[1] for line in text.splitlines() if "stablehlo.dot_general" in line]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the projection moves after the sampling on the CPU only")
def test_on_the_cpu_the_forward_projects_only_the_sampled_rows(native_kernels):
    """60 tokens x 16 channels at batch 2, 5 queries x 2 heads: on the CPU the forward's only product is the
    per-head one of the 10 sampled sums, (2, 10, 16) x (2, 16, 8) from XLA's gathers, or from the C++ kernel's
    (2, 5, 2, 16) sums with the kernel as (16, 2, 8); projecting first multiplies all 120 token rows, which is what
    the derivatives do."""
    shapes, points = ((6, 8), (3, 4)), (3, 2)
    memory, kernel, bias, locations, weights = (jnp.asarray(a, jnp.float32) for a in projection_inputs(
        points, shapes, seed=1, q=5, h=2, d=8, channels=16))

    def forward(m, k, b, loc, w):
        return projected_deformable_sampling(m, k, b, shapes, loc, w, points)

    every_token = "tensor<120x16xf32>, tensor<16x16xf32>"
    native_used = sampling_targets(jnp.float32) is not None
    assert native_used is (native_kernels == "require")
    assert _dot_operand_shapes(forward, memory, kernel, bias, locations, weights) == (
        [" (tensor<16x2x8xf32>, tensor<2x5x2x16xf32>) -> tensor<2x8x2x5xf32>"] if native_used else
        [" (tensor<2x10x16xf32>, tensor<2x16x8xf32>) -> tensor<2x10x8xf32>"])
    index, weight = _sampling_taps(shapes, locations, weights, points, "default")
    assert any(every_token in s for s in _dot_operand_shapes(_project_then_sample, memory, kernel, bias, index,
                                                             weight))
    gradient = jax.grad(lambda *a: jnp.sum(forward(*a) ** 2), argnums=(0, 1, 2))
    assert any(every_token in s for s in _dot_operand_shapes(gradient, memory, kernel, bias, locations, weights))
