"""ops/cpu_winograd_transforms.cc, Winograd's data transforms in C++ (ops/winograd.py): both custom calls equal
XLA's forms bit for bit on even, odd, single-pixel and channel-remainder shapes; the convolution with them against
float64 in float32, forward and both gradients; vmap; one-line errors; and the convolution takes them where they
apply and nowhere else. The fallback on a failed build is test_native.py's, shared by every kernel."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_kernel_refuses, torch_conv_with_gradients
from rtdetr_jax.ops import winograd
from rtdetr_jax.ops.winograd import transform_targets, winograd_conv3x3

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


@pytest.fixture(autouse=True)
def native_required(monkeypatch):
    """The kernel must build here (a failed build would fall back to XLA's forms and pass for the wrong reason)."""
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "require")


@pytest.fixture
def jitted(monkeypatch):
    """`jitted(f, *args, native=...)`: f(*args) traced afresh and jitted, with both transforms in C++ or (native
    False) in XLA's form, the reference (the choice is read when f is traced, so jax's caches are cleared first)."""

    def run(f, *args, native: bool):
        monkeypatch.setattr(winograd, "NATIVE_INPUT_TRANSFORM", native)
        monkeypatch.setattr(winograd, "NATIVE_OUTPUT_TRANSFORM", native)
        jax.clear_caches()
        return jax.jit(f)(*args)

    return run


def flat_planes(x):
    return [p for row in winograd._input_planes(x)[0] for p in row]


def assemble(h, w):
    return lambda planes: winograd._assemble_output([planes[4 * a:4 * a + 4] for a in range(4)], h, w)


# (batch, H, W, channels): a model-like map; odd sizes (the last tile row and column half outside); one pixel; one
# row; channels below one 16-float vector, with a remainder, and one short of a vector
SHAPES = [(2, 40, 40, 64), (1, 7, 9, 20), (2, 1, 1, 3), (1, 1, 6, 17), (3, 5, 4, 33), (1, 12, 10, 15)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_both_transforms_equal_xlas_bit_for_bit(shape, jitted):
    """The same additions in the same order: the same bits, not merely close ones."""
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    want = jitted(flat_planes, x, native=False)
    got = jitted(flat_planes, x, native=True)
    assert len(got) == len(want) == 16
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    products = [p * (1 + i) for i, p in enumerate(want)]  # 16 different planes, as the matmuls give
    ref = jitted(assemble(*shape[1:3]), products, native=False)
    got = jitted(assemble(*shape[1:3]), products, native=True)
    assert got.shape == shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_the_convolution_with_them_matches_float64():
    """Output and both gradients of a float32 convolution with Winograd's own gradients (the input gradient
    transforms dy, the kernel gradient x) within float32 rounding of torch's float64 ones."""
    rng = np.random.default_rng(11)
    n, h, w, cin, cout = 2, 11, 14, 48, 40
    x, k = rng.normal(size=(n, h, w, cin)), rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin)
    probe = rng.normal(size=(n, h, w, cout))
    want = torch_conv_with_gradients(x, k, probe, padding=1)
    jax.clear_caches()

    def loss(x_, k_):
        return jnp.sum(winograd_conv3x3(x_, k_, "winograd", "winograd") * probe.astype(np.float32))

    x32, k32 = jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32)
    y = jax.jit(lambda a, b: winograd_conv3x3(a, b, "winograd", "winograd"))(x32, k32)
    dx, dk = jax.jit(jax.grad(loss, argnums=(0, 1)))(x32, k32)
    assert "rtdetr_jax_winograd_transforms" in str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x32, k32))
    for name, got, ref in zip(("y", "dx", "dkernel"), (y, dx, dk), want):
        err = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()
        assert err <= 2e-6, (name, err)


def test_under_vmap_each_element_is_its_own_batch():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 2, 6, 5, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 16, 8)), jnp.float32)

    def loss(x_, k_):
        return jnp.sum(jnp.tanh(winograd_conv3x3(x_, k_, "winograd", "winograd")))

    step = jax.value_and_grad(loss, argnums=(0, 1))
    batched = jax.jit(jax.vmap(step, in_axes=(0, None)))(x, k)
    for i in range(3):
        single = jax.jit(step)(x[i], k)
        for a, s in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(single)):
            np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(s))


def test_wrong_shapes_are_one_line_errors_naming_them():
    input_target, output_target = transform_targets(jnp.float32)
    x = jnp.ones((2, 5, 6, 4), jnp.float32)
    plane = jax.ShapeDtypeStruct((2, 3, 3, 4), jnp.float32)
    planes = [jnp.ones((2, 3, 3, 4), jnp.float32)] * 16
    y = jax.ShapeDtypeStruct((2, 5, 6, 4), jnp.float32)
    cases = [
        (input_target, (jnp.ones((5, 6, 4), jnp.float32),), (plane,) * 16,
         r"winograd_input_transform: x must be \(batch, H, W, c\), got \(5, 6, 4\)"),
        (input_target, (x,), (plane,) * 15, r"winograd_input_transform: expected 16 planes, got 15"),
        (input_target, (x,), (plane,) * 3 + (jax.ShapeDtypeStruct((2, 3, 2, 4), jnp.float32),) + (plane,) * 12,
         r"winograd_input_transform: plane 3 must be \(2, 3, 3, 4\) float32 for x \(2, 5, 6, 4\), got \(2, 3, 2, 4\)"),
        (output_target, planes, jax.ShapeDtypeStruct((2, 5, 6), jnp.float32),
         r"winograd_output_transform: y must be \(batch, H, W, c\), got \(2, 5, 6\)"),
        (output_target, planes[:4], y, r"winograd_output_transform: expected 16 planes, got 4"),
        (output_target, planes[:15] + [jnp.ones((2, 3, 3, 5), jnp.float32)], y,
         r"winograd_output_transform: plane 15 must be \(2, 3, 3, 4\) float32 for y \(2, 5, 6, 4\), "
         r"got \(2, 3, 3, 5\)"),
    ]
    for name, operands, outs, message in cases:
        assert_kernel_refuses(name, outs, operands, message)


def conv_graphs(dtype=jnp.float32, shape=(1, 6, 6, 8)):
    """The jaxprs of a Winograd convolution's forward and of its gradients (Winograd's both) on a small map."""
    x = jnp.ones(shape, dtype)
    k = jnp.ones((3, 3, shape[-1], 8), dtype)

    def loss(x_, k_):
        return jnp.sum(winograd_conv3x3(x_, k_, "winograd", "winograd").astype(jnp.float32) ** 2)

    return (str(jax.make_jaxpr(winograd_conv3x3)(x, k)),
            str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, k)))


def calls(jaxpr: str) -> tuple[int, int]:
    """How many input and output transform calls a jaxpr's text holds."""
    names = re.findall(r"target_name=(rtdetr_jax_winograd_transforms(?:_1)?)$", jaxpr, re.M)
    return names.count("rtdetr_jax_winograd_transforms"), names.count("rtdetr_jax_winograd_transforms_1")


def test_the_convolution_takes_them_where_they_apply(monkeypatch):
    """In float32 on the CPU, forward and backward; not in bfloat16 or float64, not on an empty batch, not with the
    native kernels off."""
    jax.clear_caches()
    forward, gradient = conv_graphs()
    assert calls(forward) == (1, 1)
    # the forward again, then dy's planes and dx's output (the input gradient) and x's planes (the kernel gradient)
    assert calls(gradient) == (3, 2)
    assert "ffi_call" not in conv_graphs(jnp.bfloat16)[1]
    with jax.enable_x64(True):
        assert "ffi_call" not in conv_graphs(jnp.float64)[1]
    assert "ffi_call" not in conv_graphs(shape=(0, 6, 6, 8))[1]
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")
    assert "ffi_call" not in conv_graphs()[1]
