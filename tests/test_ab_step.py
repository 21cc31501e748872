"""benchmarks/ab_step.py: its `--set MODULE.NAME=VALUE`, `--env NAME=VALUE` and `--b-output-fields` settings,
parsed or refused in one line, and applied to side b only while it is traced. (The A/B itself is a benchmark: it is
run by hand, not here.)"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import ab_step  # noqa: E402
from rtdetr_jax.ops import conv  # noqa: E402


def test_a_setting_names_a_module_constant_and_a_literal():
    module, name, value = ab_step.parse_setting("rtdetr_jax.ops.conv.WINOGRAD_NARROW_MAX_PIXELS=25600")
    assert (module, name, value) == (conv, "WINOGRAD_NARROW_MAX_PIXELS", 25600)
    assert ab_step.parse_setting("rtdetr_jax.ops.conv.WINOGRAD_MIN_FLOP=2.5e8")[2] == 2.5e8


@pytest.mark.parametrize("text, message", [
    ("WINOGRAD_MIN_CHANNELS", "expected MODULE.NAME=VALUE, e.g. rtdetr_jax.ops.conv.WINOGRAD_MIN_CHANNELS=128"),
    ("WINOGRAD_MIN_CHANNELS=128", "expected MODULE.NAME=VALUE, e.g. rtdetr_jax.ops.conv.WINOGRAD_MIN_CHANNELS=128"),
    ("rtdetr_jax.ops.conv.WINOGRAD_MIN_CHANNELS=sixty", "'sixty' is not a Python literal"),
    ("rtdetr_jax.ops.nowhere.X=1", "no module 'rtdetr_jax.ops.nowhere'"),
    ("rtdetr_jax.ops.conv.NO_SUCH_BOUND=1", "rtdetr_jax.ops.conv has no NO_SUCH_BOUND"),
])
def test_bad_settings_are_one_line_errors(text, message):
    with pytest.raises(ValueError) as err:
        ab_step.parse_setting(text)
    assert str(err.value) == f"--set {text!r}: {message}"


def test_an_environment_setting_names_a_variable():
    assert ab_step.parse_env("RTDETR_JAX_NATIVE=off") == ("RTDETR_JAX_NATIVE", "off")
    assert ab_step.parse_env("XLA_FLAGS=--a=1 --b=2") == ("XLA_FLAGS", "--a=1 --b=2")


@pytest.mark.parametrize("text", ["RTDETR_JAX_NATIVE", "=off", "NOT A NAME=1"])
def test_bad_environment_settings_are_one_line_errors(text):
    with pytest.raises(ValueError) as err:
        ab_step.parse_env(text)
    assert str(err.value) == f"--env {text!r}: expected NAME=VALUE, e.g. RTDETR_JAX_NATIVE=off"


def test_side_b_settings_hold_while_it_is_traced_and_are_restored(monkeypatch):
    monkeypatch.setenv("RTDETR_JAX_AB_PROBE", "before")
    monkeypatch.delenv("RTDETR_JAX_AB_UNSET", raising=False)
    bound = conv.WINOGRAD_MIN_CHANNELS
    setting = ab_step.parse_setting(f"rtdetr_jax.ops.conv.WINOGRAD_MIN_CHANNELS={bound + 1}")
    env = [("RTDETR_JAX_AB_PROBE", "during"), ("RTDETR_JAX_AB_UNSET", "set")]
    with pytest.raises(RuntimeError, match="traced"):  # restored even when tracing fails
        with ab_step.Applied([setting], env):
            assert conv.WINOGRAD_MIN_CHANNELS == bound + 1
            assert os.environ["RTDETR_JAX_AB_PROBE"] == "during" and os.environ["RTDETR_JAX_AB_UNSET"] == "set"
            raise RuntimeError("traced")
    assert conv.WINOGRAD_MIN_CHANNELS == bound
    assert os.environ["RTDETR_JAX_AB_PROBE"] == "before" and "RTDETR_JAX_AB_UNSET" not in os.environ


@pytest.mark.parametrize("argv, message", [
    ([], "side b needs at least one --set, --env or --b-output-fields"),
    (["--env", "RTDETR_JAX_NATIVE=off", "--rounds", "0"], "--rounds 0: must be at least 1"),
    (["--b-output-fields", "logits"], "--b-output-fields logits: only with --step forward"),
    (["--step", "forward", "--b-output-fields", "logits,boxes"], "unknown field 'boxes'"),
])
def test_bad_side_b_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        ab_step.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err
