"""ops/native.py: building, caching and choosing the C++ kernels, and every way a build can fail: one-line errors
that name the file or value at fault, nothing half-written left in the cache, and under the default `on` one
warning and XLA's computation instead."""

from __future__ import annotations

import os
import re
import stat
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdetr_jax.ops import native
from rtdetr_jax.ops.kernel_gradient import native_kernel_gradient
from rtdetr_jax.ops.xla_conv import xla_kernel_gradient


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of this test's own, and no kernel registered or failed yet as far as `target` knows (a test
    here must not register a kernel that is registered already: XLA refuses a second handler under a name)."""
    monkeypatch.setenv("RTDETR_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_targets", {})
    monkeypatch.setattr(native, "_registered", {})
    return tmp_path / "cache" / "native"


def fake_compiler(tmp_path, body: str) -> str:
    """An executable shell script standing in for the C++ compiler: it answers --version, then runs `body`."""
    path = tmp_path / "fake-c++"
    path.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_the_choice_is_read_from_the_environment():
    assert native.choice({}) == "on"
    assert native.choice({"RTDETR_JAX_NATIVE": " OFF "}) == "off"
    assert native.choice({"RTDETR_JAX_NATIVE": "require"}) == "require"
    with pytest.raises(ValueError, match=r"^RTDETR_JAX_NATIVE='fast': use one of on, off, require$"):
        native.choice({"RTDETR_JAX_NATIVE": "fast"})


@pytest.mark.skipif(native.compiler() is None, reason="needs a C++ compiler")
def test_a_build_is_cached_per_machine(cache, monkeypatch):
    """Built once into the cache folder, found there the next time; another CPU or a changed shared header gets a
    library of its own."""
    path = native.build("kernel_gradient")
    assert os.path.dirname(path) == str(cache) and os.path.isfile(path)
    mtime = os.stat(path).st_mtime_ns
    assert native.build("kernel_gradient") == path and os.stat(path).st_mtime_ns == mtime
    assert [p for p in os.listdir(cache) if p.startswith(".tmp")] == []
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another CPU")
    other = native.build("kernel_gradient")
    assert other != path and os.path.isfile(other)
    # a changed shared header (cpu_tasks.h, which the sources include) is a new build too
    assert any(h.startswith(b"cpu_tasks.h\0") for h in native._headers())
    monkeypatch.setattr(native, "_headers", lambda: [b"cpu_tasks.h\0changed"])
    assert native.build("kernel_gradient") not in (path, other)


def test_a_failed_compilation_is_one_line_and_leaves_nothing(cache, tmp_path, monkeypatch):
    cxx = fake_compiler(tmp_path, 'echo "kernel.cc:1:1: error: boom" >&2\necho "more text" >&2\nexit 3')
    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(native.NativeBuildError,
                       match=r"^cpu_kernel_gradient.cc: fake-c\+\+ exited with 3: kernel.cc:1:1: error: boom$"):
        native.build("kernel_gradient")
    assert not cache.exists() or os.listdir(cache) == []


def test_a_missing_compiler_is_named(cache, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert native.compiler() is None
    with pytest.raises(native.NativeBuildError,
                       match=r"^cpu_kernel_gradient.cc: CXX='/nonexistent/c\+\+' is not an executable$"):
        native.build("kernel_gradient")
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(native.NativeBuildError, match=r"^cpu_kernel_gradient.cc: no C\+\+ compiler found"):
        native.build("kernel_gradient")


@pytest.mark.parametrize("cxx, cause", [(None, r"no C\+\+ compiler found \(c\+\+, g\+\+ or clang\+\+ on the PATH, or \$CXX\)"),
                                        ("/nonexistent/c++", r"CXX='/nonexistent/c\+\+' is not an executable")])
def test_without_a_compiler_one_warning_says_what_it_costs(cache, monkeypatch, cxx, cause):
    """Under `on`, where a kernel would apply: one warning a process (not one per kernel or per trace), naming the
    cause and the way out; none under `off`."""
    monkeypatch.setattr(native, "_warned_no_compiler", False)
    monkeypatch.setenv("PATH", "")
    if cxx is None:
        monkeypatch.delenv("CXX", raising=False)
    else:
        monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.expected("kernel_gradient")
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "on")
    with pytest.warns(RuntimeWarning) as record:
        assert not native.expected("kernel_gradient")
    assert len(record) == 1
    assert re.fullmatch(rf"rtdetr-jax's C\+\+ CPU kernels: {cause}; XLA's slower forms run instead \(install g\+\+, "
                        r"or set RTDETR_JAX_NATIVE=off to hide this\)", str(record[0].message)), str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.expected("channel_moments") and not native.expected("kernel_gradient")


def test_an_unwritable_cache_is_named(tmp_path, monkeypatch):
    if native.compiler() is None:
        pytest.skip("needs a C++ compiler")
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("RTDETR_JAX_CACHE", str(blocker))  # the cache folder would be a folder inside a file
    with pytest.raises(native.NativeBuildError, match=rf"^{str(blocker / 'native')}: "):
        native.build("kernel_gradient")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fallback of a CPU kernel")
def test_on_a_failed_build_warns_once_and_falls_back_to_xla(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", fake_compiler(tmp_path, "exit 1"))
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "on")
    assert native.expected("kernel_gradient")  # a compiler is there and nothing was tried yet
    rng = np.random.default_rng(0)
    x, dy = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32), jnp.asarray(rng.normal(size=(2, 6, 6, 16)),
                                                                                jnp.float32)
    with pytest.warns(RuntimeWarning, match=r"^cpu_kernel_gradient.cc: fake-c\+\+ exited with 1: .*; using XLA's"):
        got = native_kernel_gradient(x, dy, (3, 3, 3, 16), 1, 1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(xla_kernel_gradient(x, dy, (3, 3, 3, 16), 1, 1)))
    assert native.target("kernel_gradient") is None  # no second build, no second warning
    assert not native.expected("kernel_gradient")  # conv2d now takes the previous kernel gradients
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "require")
    with pytest.raises(native.NativeBuildError, match=r"^cpu_kernel_gradient.cc: not available"):
        native.target("kernel_gradient")


def sampling_args():
    shapes, points = ((4, 4), (2, 2)), (2, 2)
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.normal(size=(2, 20, 2, 8)), jnp.float32), shapes,
            jnp.asarray(rng.uniform(size=(2, 3, 2, 4, 2)), jnp.float32),
            jnp.asarray(rng.dirichlet(np.ones(4), size=(2, 3, 2)), jnp.float32), points)


def xla_sampling(monkeypatch):
    from rtdetr_jax.modeling.deformable import multi_scale_deformable_sampling

    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")
    jax.clear_caches()
    return np.asarray(multi_scale_deformable_sampling(*sampling_args()))


@pytest.mark.skipif(jax.default_backend() != "cpu" or native.compiler() is None,
                    reason="a CPU kernel, built with a C++ compiler")
def test_the_sampling_kernel_registers_its_two_handlers(monkeypatch):
    """Its forward and gradient handlers register as two targets, once per process (a second registration under
    a name would be refused by XLA, also after `_targets` was reset)."""
    from rtdetr_jax.modeling.deformable import multi_scale_deformable_sampling

    xla = xla_sampling(monkeypatch)
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "require")
    both = ("rtdetr_jax_deformable_sampling", "rtdetr_jax_deformable_sampling_1")
    assert native.targets("deformable_sampling") == both
    assert native.target("deformable_sampling") == both[0]
    monkeypatch.setattr(native, "_targets", {})
    assert native.targets("deformable_sampling") == both
    jax.clear_caches()
    np.testing.assert_allclose(np.asarray(multi_scale_deformable_sampling(*sampling_args())), xla, atol=1e-6)
    jax.clear_caches()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fallback of a CPU kernel")
def test_on_a_failed_sampling_build_the_attention_keeps_xlas_gathers(cache, tmp_path, monkeypatch):
    from rtdetr_jax.modeling.deformable import multi_scale_deformable_sampling
    from rtdetr_jax.ops.deformable_sampling import sampling_targets

    xla = xla_sampling(monkeypatch)
    monkeypatch.setenv("CXX", fake_compiler(tmp_path, "exit 1"))
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "on")
    jax.clear_caches()
    with pytest.warns(RuntimeWarning, match=r"^cpu_deformable_sampling.cc: fake-c\+\+ exited with 1: .*; using XLA's"):
        assert sampling_targets(jnp.float32) is None
    assert native.targets("deformable_sampling") is None  # no second build, no second warning
    np.testing.assert_array_equal(np.asarray(multi_scale_deformable_sampling(*sampling_args())), xla)
    jax.clear_caches()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fallback of a CPU kernel")
def test_on_a_failed_moments_build_the_norm_keeps_its_matrix_vector_sums(cache, tmp_path, monkeypatch):
    from rtdetr_jax.ops.batch_norm import batch_norm_train, moments_targets

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 8)), jnp.float32)
    w, b = jnp.asarray(rng.normal(size=8), jnp.float32), jnp.asarray(rng.normal(size=8), jnp.float32)

    def outputs():
        jax.clear_caches()
        value = jax.jit(lambda x: batch_norm_train(x, w, b, 1e-5))(x)
        grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(batch_norm_train(x, w, b, 1e-5)[0]))))(x)
        return [np.asarray(a) for a in (*value, grad)]

    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")
    want = outputs()
    monkeypatch.setenv("CXX", fake_compiler(tmp_path, "exit 1"))
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "on")
    with pytest.warns(RuntimeWarning, match=r"^cpu_channel_moments.cc: fake-c\+\+ exited with 1: .*; using XLA's"):
        assert moments_targets(jnp.float32) is None
    assert native.targets("channel_moments") is None  # no second build, no second warning
    for got, expected in zip(outputs(), want):
        np.testing.assert_array_equal(got, expected)
    jax.clear_caches()


def test_require_raises_and_off_never_builds(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", fake_compiler(tmp_path, "exit 1"))
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "require")
    assert native.expected("kernel_gradient")
    with pytest.raises(native.NativeBuildError, match=r"^cpu_kernel_gradient.cc: fake-c\+\+ exited with 1"):
        native.target("kernel_gradient")
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "off")

    def no_build(name, cxx=None):
        raise AssertionError("built although off")

    monkeypatch.setattr(native, "build", no_build)
    assert native.target("kernel_gradient") is None and not native.expected("kernel_gradient")


def test_training_gradients_equal_those_without_the_native_kernels(monkeypatch):
    """The small detector's float32 loss gradients with the C++ kernel gradients and without them: equal to float32
    rounding, leaf by leaf.

    The batch norm statistics' kernel (ops/cpu_channel_moments.cc) is left out on both sides: it changes the
    forward's float32 rounding (its sums are the more exact ones), and any such change moves this model's gradients
    by more than this comparison's bound (summing the same rows in reverse order moved them by 1.5e-4 at the median
    leaf, up to 9e-3, measured); the kernel is compared with float64 in test_native_channel_moments.py."""
    if native.compiler() is None:
        pytest.skip("needs a C++ compiler")
    from flax import traverse_util

    from conftest import small_config
    from rtdetr_jax.loss.criterion import pad_targets, rtdetr_loss
    from rtdetr_jax.modeling.detector import RTDetrV2Detector
    from rtdetr_jax.ops import batch_norm
    from rtdetr_jax.train.loop import fresh_model

    monkeypatch.setattr(batch_norm, "moments_targets", lambda dtype: None)

    config = small_config()
    model = fresh_model(config, seed=0)
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.random((2, 3, 64, 64)), jnp.float32)
    targets = jax.tree_util.tree_map(jnp.asarray, pad_targets(
        [{"class_labels": np.array([1, 2]), "boxes": np.array([[.4, .5, .2, .3], [.6, .4, .1, .2]])},
         {"class_labels": np.array([3]), "boxes": np.array([[.5, .5, .3, .3]])}], 4))
    module = RTDetrV2Detector(config, jnp.float32)

    def grads(mode):
        monkeypatch.setenv("RTDETR_JAX_NATIVE", mode)
        jax.clear_caches()

        def loss(params):
            out, _ = module.apply({"params": params, "batch_stats": model.variables["batch_stats"]}, pixels,
                                  mutable=["batch_stats"])
            return rtdetr_loss(out, targets, config)[0]

        lowered = jax.jit(jax.grad(loss)).lower(model.params)
        text = lowered.as_text()
        assert ("@rtdetr_jax_kernel_gradient(" in text) is (mode == "require"), mode
        # the deformable sampling's derivatives keep XLA's gathers (ops/deformable_sampling.py)
        assert "@rtdetr_jax_deformable_sampling" not in text
        return traverse_util.flatten_dict(jax.device_get(lowered.compile()(model.params)))

    with_native, without = grads("require"), grads("off")
    jax.clear_caches()
    # leaves whose gradient is zero but for float noise (biases ahead of a training batch norm, the key
    # projections' biases under the softmax) are compared on the scale of the largest gradient
    floor = 1e-5 * max(np.abs(g).max() for g in without.values())
    compared = 0
    for key, want in without.items():
        scale = max(np.abs(want).max(), floor)
        err = np.abs(with_native[key] - want).max() / scale
        assert err <= 1e-4, (key, err, np.abs(want).max())
        compared += np.abs(want).max() >= floor
    assert compared >= 0.9 * len(without)
