"""ops/pool.py: max pooling equals torch.nn.MaxPool2d forward and backward, ties included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdetr_jax.ops.pool import max_pool2d

torch = pytest.importorskip("torch")

# (height, width, kernel, stride, padding): the stem's 3/2/1 on even and odd sizes, a 2/2/0 and a 3/1/1
# a 3/3/1, and a one-row map whose first and last window rows lie wholly in the padding
CASES = [(8, 8, 3, 2, 1), (9, 7, 3, 2, 1), (10, 11, 2, 2, 0), (6, 5, 3, 1, 1), (4, 4, 3, 3, 1), (1, 5, 3, 1, 1)]


def torch_pool(x, probe, kernel, stride, padding):
    """Output and input gradient of sum(MaxPool2d(x) * probe), NHWC in and out."""
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    y = torch.nn.functional.max_pool2d(xt, kernel, stride, padding)
    (y * torch.tensor(probe.transpose(0, 3, 1, 2))).sum().backward()
    return y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1)


def ours(x, probe, kernel, stride, padding):
    f = lambda x_: jnp.sum(max_pool2d(x_, kernel, stride, padding) * probe)  # noqa: E731
    return np.asarray(max_pool2d(jnp.asarray(x), kernel, stride, padding)), np.asarray(jax.grad(f)(jnp.asarray(x)))


@pytest.mark.parametrize("h, w, kernel, stride, padding", CASES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_matches_torch(h, w, kernel, stride, padding, ties):
    rng = np.random.default_rng(h * 10 + w)
    x = rng.normal(size=(2, h, w, 3))
    if ties:  # after a ReLU most windows hold repeated values; PyTorch gives the gradient to the first maximum
        x = np.maximum(np.round(x), 0.0)
    x = x.astype(np.float64)
    y_shape = ((h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
    probe = rng.normal(size=(2, *y_shape, 3))
    expected_y, expected_dx = torch_pool(x, probe, kernel, stride, padding)
    with jax.enable_x64(True):
        got_y, got_dx = ours(x, probe, kernel, stride, padding)
    np.testing.assert_array_equal(got_y, expected_y)
    np.testing.assert_allclose(got_dx, expected_dx, rtol=1e-12, atol=1e-12)


def test_dtype_kept_and_ties_go_to_one_position():
    x = jnp.ones((1, 5, 6, 2), jnp.bfloat16)
    y = max_pool2d(x, 3, 2, 1)
    assert y.shape == (1, 3, 3, 2) and y.dtype == jnp.bfloat16
    dx = jax.grad(lambda x_: jnp.sum(max_pool2d(x_, 3, 2, 1).astype(jnp.float32)))(x)
    assert dx.dtype == jnp.bfloat16
    # all values tie: output (a, b) sends its whole gradient to its window's first in-bounds position,
    # (max(2a - 1, 0), max(2b - 1, 0)), not a share to every tied one
    expected = np.zeros((5, 6))
    expected[np.ix_([0, 1, 3], [0, 1, 3])] = 1.0
    np.testing.assert_array_equal(np.asarray(dx[0, :, :, 0], np.float32), expected)


def test_inference_pool_writes_no_padded_copy():
    """Outside differentiation the windows are slices of the unpadded input, fused with their maximum: XLA needs no
    temporary buffer (a padded copy of the input was one, 25 MB for the r18vd stem's map at 640)."""
    x = jnp.zeros((1, 64, 64, 16), jnp.float32)
    compiled = jax.jit(lambda x_: max_pool2d(x_, 3, 2, 1)).lower(x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes == 0
