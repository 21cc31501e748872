"""ops/winograd.py and the algorithm choice in ops/conv.py: Winograd's F(2x2, 3x3) gives torch conv2d's output and
both gradients (exactly, up to float64 rounding), float32 rounding of the same order as the direct convolution's,
and `conv2d` uses it exactly where the rule says."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_conv_with_gradients
from rtdetr_jax.modeling.layers import Conv2d
from rtdetr_jax.ops.conv import (WINOGRAD_GRADIENT_MIN_CHANNELS, WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS,
                                 WINOGRAD_MIN_CHANNELS, conv2d, conv_algorithm, gradient_algorithms,
                                 uses_native_kernel_gradient, uses_stacked_kernel_gradient, uses_winograd)
from rtdetr_jax.ops.xla_conv import plain_conv2d
from rtdetr_jax.ops.winograd import winograd_conv3x3

torch = pytest.importorskip("torch")


# (batch, height, width, in, out): even sizes, odd ones (padded to whole tiles and cropped), a single pixel,
# a single row, an empty batch
@pytest.mark.parametrize("gradients", [("xla", "xla"), ("xla", "stacked"), ("winograd", "stacked"),
                                       ("winograd", "winograd")])
@pytest.mark.parametrize("shape", [(2, 8, 8, 3, 4), (1, 7, 9, 5, 2), (2, 1, 1, 4, 3), (1, 1, 6, 2, 2),
                                   (1, 5, 4, 6, 7), (0, 4, 4, 2, 3)])
def test_matches_torch_in_float64(shape, gradients):
    """Output and both gradients, each XLA's (direct), stacked (kernel) or Winograd's, equal torch's up to float64
    rounding."""
    n, h, w, cin, cout = shape
    rng = np.random.default_rng(sum(shape))
    x, k, probe = rng.normal(size=(n, h, w, cin)), rng.normal(size=(3, 3, cin, cout)), rng.normal(size=(n, h, w, cout))
    expected = torch_conv_with_gradients(x, k, probe, padding=1)
    with jax.enable_x64(True):
        loss = lambda x_, k_: jnp.sum(winograd_conv3x3(x_, k_, *gradients) * probe)  # noqa: E731
        y = winograd_conv3x3(jnp.asarray(x), jnp.asarray(k), *gradients)
        dx, dk = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(k))
    for name, got, want in zip(("y", "dx", "dkernel"), (y, dx, dk), expected):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10, err_msg=name)


def test_float32_rounding_of_the_order_of_the_direct_convolution():
    """At a model-like size, float32 Winograd and float32 direct convolution sit at comparable distances from the
    float64 result (measured: 2.4e-6 vs 1.4e-6 at outputs up to ~4): the transforms add rounding of the
    order of one more summation, no more."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 20, 20, 128))
    k = rng.normal(size=(3, 3, 128, 128)) / np.sqrt(9 * 128)
    with jax.enable_x64(True):
        truth = np.asarray(plain_conv2d(jnp.asarray(x), jnp.asarray(k), 1, 1))
    x32, k32 = jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32)
    direct = np.abs(np.asarray(plain_conv2d(x32, k32, 1, 1)) - truth).max()
    winograd = np.abs(np.asarray(winograd_conv3x3(x32, k32)) - truth).max()
    assert winograd <= 1e-5 * np.abs(truth).max(), (winograd, direct)
    assert winograd <= 8 * direct, (winograd, direct)


def test_float32_gradients_rounding_of_the_order_of_xlas():
    """Winograd's float32 input and kernel gradients sit at most a few times further from the float64 gradients
    than XLA's float32 gradients do."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 20, 20, 128))
    k = rng.normal(size=(3, 3, 128, 128)) / np.sqrt(9 * 128)
    probe = rng.normal(size=(2, 20, 20, 128))

    def grads(conv, x_, k_):
        return jax.grad(lambda a, b: jnp.sum(conv(a, b) * probe.astype(a.dtype)), argnums=(0, 1))(x_, k_)

    with jax.enable_x64(True):
        truth = [np.asarray(g) for g in grads(lambda a, b: plain_conv2d(a, b, 1, 1), jnp.asarray(x), jnp.asarray(k))]
    x32, k32 = jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32)
    xla = grads(lambda a, b: plain_conv2d(a, b, 1, 1), x32, k32)
    winograd = grads(lambda a, b: winograd_conv3x3(a, b, "winograd", "winograd"), x32, k32)
    for name, t, d, w in zip(("dx", "dkernel"), truth, xla, winograd):
        err_direct, err_winograd = np.abs(np.asarray(d) - t).max(), np.abs(np.asarray(w) - t).max()
        assert err_winograd <= 1e-5 * np.abs(t).max(), (name, err_winograd, err_direct)
        assert err_winograd <= 8 * err_direct, (name, err_winograd, err_direct)


def test_dtype_kept():
    x = jnp.ones((1, 6, 5, 2), jnp.bfloat16)
    k = jnp.ones((3, 3, 2, 3), jnp.bfloat16)
    y = winograd_conv3x3(x, k)
    assert y.shape == (1, 6, 5, 3) and y.dtype == jnp.bfloat16


@pytest.mark.parametrize("kernel_shape, dtype, stride, padding, expected", [  # on a (1, 80, 80, in) input
    ((3, 3, 64, 64), jnp.float32, 1, 1, True),
    ((3, 3, 512, 256), jnp.float32, 1, 1, True),
    ((3, 3, 32, 64), jnp.float32, 1, 1, False),   # the deep stem: slower there
    ((3, 3, 64, 32), jnp.float32, 1, 1, False),
    ((3, 3, 128, 128), jnp.bfloat16, 1, 1, False),  # reduced precision: direct
    ((3, 3, 128, 128), jnp.float64, 1, 1, False),
    ((3, 3, 128, 128), jnp.float32, 2, 1, False),  # strided: ops/strided_conv.py
    ((3, 3, 128, 128), jnp.float32, 1, 0, False),  # another padding
    ((1, 1, 128, 128), jnp.float32, 1, 0, False),
])
def test_the_automatic_choice(kernel_shape, dtype, stride, padding, expected):
    on_cpu = jax.default_backend() == "cpu"
    assert uses_winograd((1, 80, 80, kernel_shape[2]), kernel_shape, dtype, stride, padding) is (expected and on_cpu)


def test_small_convolutions_stay_direct():
    """Below WINOGRAD_MIN_FLOP the transforms' fixed costs win over the saved multiplications."""
    on_cpu = jax.default_backend() == "cpu"
    assert not uses_winograd((1, 20, 20, 128), (3, 3, 128, 128), jnp.float32, 1, 1)  # 0.12 GFLOP
    assert uses_winograd((1, 40, 40, 128), (3, 3, 128, 128), jnp.float32, 1, 1) is on_cpu  # 0.47 GFLOP
    assert uses_winograd((16, 20, 20, 64), (3, 3, 64, 64), jnp.float32, 1, 1) is on_cpu


def test_narrow_convolutions_on_many_pixels_stay_direct():
    """Below WINOGRAD_WIDE_CHANNELS, Winograd only up to WINOGRAD_NARROW_MAX_PIXELS output pixels over the batch:
    r18vd's first stage up to training's batch 4 (four 160x160 maps) yes, at batch 8 no; 128 channels at any size."""
    on_cpu = jax.default_backend() == "cpu"
    assert uses_winograd((1, 160, 160, 64), (3, 3, 64, 64), jnp.float32, 1, 1) is on_cpu
    assert uses_winograd((4, 160, 160, 64), (3, 3, 64, 64), jnp.float32, 1, 1) is on_cpu
    assert not uses_winograd((5, 160, 160, 64), (3, 3, 64, 64), jnp.float32, 1, 1)
    assert not uses_winograd((8, 160, 160, 64), (3, 3, 64, 64), jnp.float32, 1, 1)
    assert not uses_winograd((4, 160, 161, 64), (3, 3, 64, 128), jnp.float32, 1, 1)  # one column over
    assert uses_winograd((4, 160, 160, 128), (3, 3, 128, 128), jnp.float32, 1, 1) is on_cpu


def test_gradient_choice(monkeypatch):
    """Winograd's input gradient from 64 channels (wherever its forward is used), its kernel gradient from 256;
    below, the C++ kernel gradient on the CPU in float32 (ops/native.py), else the stacked one on the CPU at
    batch >= 2, XLA's at batch 1."""
    on_cpu = jax.default_backend() == "cpu"
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "require")
    native = "native" if on_cpu else "xla"
    assert gradient_algorithms((4, 80, 80, 64), (3, 3, 64, 64)) == ("winograd", native)
    assert gradient_algorithms((4, 80, 80, 32), (3, 3, 32, 64)) == ("xla", native)  # below the input gradient's bound
    assert gradient_algorithms((1, 80, 80, 128), (3, 3, 128, 128)) == ("winograd", native)
    assert gradient_algorithms((4, 80, 80, 64), (3, 3, 64, 64), jnp.bfloat16) == ("winograd",
                                                                                 "stacked" if on_cpu else "xla")
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")
    stacked = "stacked" if on_cpu else "xla"
    assert gradient_algorithms((4, 80, 80, 64), (3, 3, 64, 64)) == ("winograd", stacked)
    assert gradient_algorithms((4, 80, 80, 32), (3, 3, 32, 256)) == ("xla", stacked)
    assert gradient_algorithms((4, 80, 80, 128), (3, 3, WINOGRAD_GRADIENT_MIN_CHANNELS, 512)) == ("winograd", stacked)
    assert gradient_algorithms((1, 80, 80, 128), (3, 3, 128, 128)) == ("winograd", "xla")
    channels = WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS
    assert gradient_algorithms((4, 20, 20, channels), (3, 3, channels, 512)) == ("winograd", "winograd")
    with conv_algorithm("winograd"):
        assert gradient_algorithms((4, 8, 8, 8), (3, 3, 8, 8)) == ("winograd", "winograd")


def test_where_the_stacked_kernel_gradient_is_used():
    on_cpu = jax.default_backend() == "cpu"
    assert uses_stacked_kernel_gradient((4, 320, 320, 32), (3, 3, 32, 32), 1) is on_cpu
    assert uses_stacked_kernel_gradient((2, 8, 8, 3), (5, 5, 3, 4), 1) is on_cpu
    assert not uses_stacked_kernel_gradient((1, 320, 320, 32), (3, 3, 32, 32), 1)  # batch 1: XLA's is the same
    assert not uses_stacked_kernel_gradient((4, 80, 80, 512), (1, 1, 512, 128), 1)  # 1x1: XLA's was faster
    assert not uses_stacked_kernel_gradient((4, 80, 80, 64), (3, 3, 64, 128), 2)  # strided: ops/strided_conv.py
    with conv_algorithm("direct"):
        assert not uses_stacked_kernel_gradient((4, 320, 320, 32), (3, 3, 32, 32), 1)


def test_conv2d_batches_take_the_stacked_kernel_gradient_with_the_same_results(monkeypatch):
    """A 3x3 stride-1 convolution below Winograd's threshold at batch 3, with the C++ kernel gradient off: its
    kernel gradient runs over the three images stacked into one (on the CPU), with the same gradients as XLA's to
    float32 rounding."""
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(3, 9, 10, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 8, 6)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(3, 9, 10, 6)), jnp.float32)
    got = jax.grad(lambda a, b: jnp.sum(conv2d(a, b, 1, 1) * probe), argnums=(0, 1))(x, k)
    want = jax.grad(lambda a, b: jnp.sum(plain_conv2d(a, b, 1, 1) * probe), argnums=(0, 1))(x, k)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    graph = str(jax.make_jaxpr(jax.grad(lambda b: jnp.sum(conv2d(x, b, 1, 1) * probe)))(k))
    # the three padded 11 x 12 images as one of 33 rows
    assert ("f32[1,33,12,8]" in graph) is (jax.default_backend() == "cpu")


def test_conv_algorithm_overrides_the_choice_within_its_block():
    big, small = (3, 3, 128, 128), (3, 3, 8, 8)
    with conv_algorithm("direct"):
        assert not uses_winograd((1, 80, 80, 128), big, jnp.float32, 1, 1)
    with conv_algorithm("winograd"):
        assert uses_winograd((1, 40, 40, 8), small, jnp.bfloat16, 1, 1)
        assert not uses_winograd((1, 40, 40, 8), (3, 3, 8, 8), jnp.float32, 2, 1)  # only where it applies
    with pytest.raises(RuntimeError), conv_algorithm("winograd"):
        raise RuntimeError("the block's setting is undone on the way out")
    assert uses_winograd((1, 80, 80, 128), big, jnp.float32, 1, 1) is (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="^conv_algorithm 'fft' is not one of auto, direct, winograd$"):
        with conv_algorithm("fft"):
            pass


@pytest.mark.parametrize("channels", list(dict.fromkeys([WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS, 128,
                                                         WINOGRAD_GRADIENT_MIN_CHANNELS, WINOGRAD_MIN_CHANNELS, 16])))
def test_conv2d_module_takes_the_chosen_path_with_the_same_results(channels):
    """The Conv2d module at and below the channel thresholds: Winograd (matmuls, no convolution in the graph) or
    XLA's convolution, both gradients by Winograd from 256 channels up, and from 64 the input gradient by Winograd
    with the C++ kernel gradient where it is used (no convolution in the gradient's graph either way), and either
    way the direct convolution's output and gradients to float32 rounding."""
    rng = np.random.default_rng(channels)
    x = jnp.asarray(rng.normal(size=(1, 64, 67, channels)), jnp.float32)  # odd width; 0.31 GFLOP at 64 channels
    module = Conv2d(features=channels, kernel_size=3)
    params = module.init(jax.random.PRNGKey(0), x)
    kernel = params["params"]["kernel"]
    graph = str(jax.make_jaxpr(module.apply)(params, x))
    winograd = channels >= WINOGRAD_MIN_CHANNELS and jax.default_backend() == "cpu"
    assert ("conv_general_dilated" not in graph) is winograd
    np.testing.assert_allclose(np.asarray(module.apply(params, x)), np.asarray(plain_conv2d(x, kernel, 1, 1)),
                               rtol=1e-5, atol=1e-5)
    loss = lambda p, x_: jnp.sum(module.apply(p, x_) ** 2)  # noqa: E731
    gradient_graph = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x))
    no_convolution = winograd and (channels >= WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS or (
        channels >= WINOGRAD_GRADIENT_MIN_CHANNELS and uses_native_kernel_gradient(jnp.float32)))
    assert ("conv_general_dilated" not in gradient_graph) is no_convolution
    got = jax.grad(loss, argnums=(0, 1))(params, x)
    want = jax.grad(lambda k_, x_: jnp.sum(plain_conv2d(x_, k_, 1, 1) ** 2), argnums=(0, 1))(kernel, x)
    scale = float(np.abs(np.asarray(want[0])).max())
    np.testing.assert_allclose(np.asarray(got[0]["params"]["kernel"]), np.asarray(want[0]), rtol=0,
                               atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-4)


def test_conv2d_entry_point():
    """`conv2d` under each algorithm gives the same convolution."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(1, 6, 6, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
    with conv_algorithm("winograd"):
        a = conv2d(x, k, 1, 1)
    with conv_algorithm("direct"):
        b = conv2d(x, k, 1, 1)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_kernel_transforms_are_not_all_computed_up_front():
    """Three chained 256-channel convolutions on a small map, where the transformed kernels (16 x 256 x 256 floats,
    4 MB each) dwarf the activations: XLA's planned scratch holds one layer's transformed kernel at a time, not all
    three (which it did before `_after` tied each transform to its layer's input)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(1, 8, 8, 256)), jnp.float32)
    kernels = [jnp.asarray(rng.normal(size=(3, 3, 256, 256)) * 0.02, jnp.float32) for _ in range(3)]

    def chain(x, k0, k1, k2):
        for k in (k0, k1, k2):
            x = jax.nn.relu(winograd_conv3x3(x, k))
        return x

    compiled = jax.jit(chain).lower(x, *kernels).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    one_kernel = 16 * 256 * 256 * 4
    assert analysis.temp_size_in_bytes < 1.5 * one_kernel, analysis.temp_size_in_bytes
    direct = x
    for k in kernels:
        direct = jax.nn.relu(plain_conv2d(direct, k, 1, 1))
    np.testing.assert_allclose(np.asarray(compiled(x, *kernels)), np.asarray(direct), rtol=1e-4, atol=1e-4)


def test_non_finite_input_stays_local():
    """The zero that orders the kernel transform after the input is exact even when that input element is not
    finite: only the outputs that read the NaN become NaN, as with the direct convolution."""
    x = np.ones((1, 8, 8, 4), np.float32)
    x[0, 0, 0, 0] = np.nan
    k = np.ones((3, 3, 4, 4), np.float32)
    y = np.asarray(winograd_conv3x3(jnp.asarray(x), jnp.asarray(k)))
    direct = np.asarray(plain_conv2d(jnp.asarray(x), jnp.asarray(k), 1, 1))
    assert np.isnan(y[0, :2, :2]).all() and np.isfinite(y[0, 2:]).all()
    np.testing.assert_allclose(y[0, 2:], direct[0, 2:])


def test_unknown_gradient_algorithms_are_refused():
    x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    with pytest.raises(ValueError, match="^input_gradient 'fft' is not one of xla, winograd$"):
        winograd_conv3x3(x, k, "fft")
    with pytest.raises(ValueError, match="^kernel_gradient 'stacked2' is not one of xla, stacked, winograd, native$"):
        winograd_conv3x3(x, k, "xla", "stacked2")
