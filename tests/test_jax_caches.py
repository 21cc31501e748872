"""`drop_tracing_caches` (rtdetr_jax/jax_caches.py): it empties jax's tracing caches, keeps every compiled
executable (no retrace, no recompile for a signature that ran), and follows the `RTDETR_JAX_MALLOC` switch. That
the model drops them after loading and after compiling: tests/test_hub_and_api.py."""

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

from rtdetr_jax.host_memory import SWITCH
from rtdetr_jax.jax_caches import drop_tracing_caches


class _Traces:
    """A jit function `inner` that counts its traces, and fresh outer jit functions that call it."""

    def __init__(self):
        self.inner_traces = 0

        @jax.jit
        def inner(x):
            self.inner_traces += 1
            return jnp.sin(x) * 2.0

        self.inner = inner

    def outer(self):
        return jax.jit(lambda x: self.inner(x) + 1.0)  # a new function each time: traced afresh


def _compile_listener(compiles):
    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name", "?"))
    return listener


def test_drop_clears_tracing_but_keeps_compiled_functions(monkeypatch):
    monkeypatch.delenv(SWITCH, raising=False)
    t = _Traces()
    x = np.linspace(0, 1, 7, dtype=np.float32)
    first = t.outer()
    expected = np.asarray(first(x))
    t.outer()(x)
    assert t.inner_traces == 1  # the second outer function found `inner`'s trace in jax's cache

    assert drop_tracing_caches() is True

    compiles = []
    listener = _compile_listener(compiles)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        np.testing.assert_array_equal(np.asarray(first(x * 1.0)), expected)  # compiled: neither traced nor compiled
        assert compiles == [] and t.inner_traces == 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    t.outer()(x)
    assert t.inner_traces == 2  # the cached trace is gone: a new outer function traces `inner` again


def test_switched_off_keeps_the_caches(monkeypatch):
    monkeypatch.setenv(SWITCH, "off")
    t = _Traces()
    x = np.ones(3, np.float32)
    t.outer()(x)
    assert drop_tracing_caches() is False
    t.outer()(x)
    assert t.inner_traces == 1


def test_bad_switch_value_is_one_line_error(monkeypatch):
    monkeypatch.setenv(SWITCH, "maybe")
    with pytest.raises(ValueError, match=r"^RTDETR_JAX_MALLOC='maybe': use 'on' \(the default\), 'glibc' or 'off'$"):
        drop_tracing_caches()

