"""ops/native.py: building, caching and choosing the C++ kernels, and every way a build can fail: one-line errors
that name the file or value at fault, nothing half-written left in the cache, and under the default `on` one
warning and XLA's computation instead."""

from __future__ import annotations

import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdetr_jax.ops import native
from rtdetr_jax.ops.kernel_gradient import native_kernel_gradient
from rtdetr_jax.ops.xla_conv import xla_kernel_gradient


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of this test's own, and no kernel registered or failed yet as far as `target` knows."""
    monkeypatch.setenv("RTDETR_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_targets", {})
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
    """Built once into the cache folder, found there the next time; another CPU gets a library of its own."""
    path = native.build("kernel_gradient")
    assert os.path.dirname(path) == str(cache) and os.path.isfile(path)
    mtime = os.stat(path).st_mtime_ns
    assert native.build("kernel_gradient") == path and os.stat(path).st_mtime_ns == mtime
    assert [p for p in os.listdir(cache) if p.startswith(".tmp")] == []
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another CPU")
    other = native.build("kernel_gradient")
    assert other != path and os.path.isfile(other)


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


def test_without_a_compiler_the_kernel_is_not_expected(cache, monkeypatch):
    monkeypatch.setenv("RTDETR_JAX_NATIVE", "on")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert not native.expected("kernel_gradient")
