"""benchmarks/ab_training_step.py: its `--set MODULE.NAME=VALUE` settings, parsed or refused in one line. (The A/B
itself is a benchmark: it is run by hand, not here.)"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import ab_training_step  # noqa: E402
from rtdetr_jax.ops import conv  # noqa: E402


def test_a_setting_names_a_module_constant_and_a_literal():
    module, name, value = ab_training_step.parse_setting("rtdetr_jax.ops.conv.WINOGRAD_NARROW_MAX_PIXELS=25600")
    assert (module, name, value) == (conv, "WINOGRAD_NARROW_MAX_PIXELS", 25600)
    assert ab_training_step.parse_setting("rtdetr_jax.ops.conv.WINOGRAD_MIN_FLOP=2.5e8")[2] == 2.5e8


@pytest.mark.parametrize("text, message", [
    ("WINOGRAD_MIN_CHANNELS", "expected MODULE.NAME=VALUE, e.g. rtdetr_jax.ops.conv.WINOGRAD_MIN_CHANNELS=128"),
    ("WINOGRAD_MIN_CHANNELS=128", "expected MODULE.NAME=VALUE, e.g. rtdetr_jax.ops.conv.WINOGRAD_MIN_CHANNELS=128"),
    ("rtdetr_jax.ops.conv.WINOGRAD_MIN_CHANNELS=sixty", "'sixty' is not a Python literal"),
    ("rtdetr_jax.ops.nowhere.X=1", "no module 'rtdetr_jax.ops.nowhere'"),
    ("rtdetr_jax.ops.conv.NO_SUCH_BOUND=1", "rtdetr_jax.ops.conv has no NO_SUCH_BOUND"),
])
def test_bad_settings_are_one_line_errors(text, message):
    with pytest.raises(ValueError) as err:
        ab_training_step.parse_setting(text)
    assert str(err.value) == f"--set {text!r}: {message}"
