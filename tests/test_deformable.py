"""Deformable sampling against an independent float64 NumPy reference (per-point loops, grid_sample semantics),
including non-uniform points per level, and against torch's grid_sample directly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdetr_jax.modeling.deformable import multi_scale_deformable_sampling


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
