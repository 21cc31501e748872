"""rtdetr_jax/xla_flags.py: the CPU flag is appended once, never over the user's own setting, and can be turned off."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rtdetr_jax.xla_flags import CPU_FLAGS, apply_default_xla_flags

FLAG = CPU_FLAGS[0]


def test_appends_to_existing_flags_once():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert apply_default_xla_flags(env, (0, 10)) == [FLAG]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert apply_default_xla_flags(env, (0, 10)) == []  # idempotent
    assert env["XLA_FLAGS"].count(FLAG) == 1


def test_sets_flags_when_none_and_respects_user_choice():
    env = {}
    apply_default_xla_flags(env, (0, 11))
    assert env["XLA_FLAGS"] == FLAG
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    assert apply_default_xla_flags(mine, (0, 10)) == []
    assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def test_off_switch_and_old_jaxlib_leave_environment_alone():
    env = {"RTDETR_JAX_XLA_FLAGS": "off"}
    assert apply_default_xla_flags(env, (0, 10)) == [] and "XLA_FLAGS" not in env
    env = {"XLA_FLAGS": "--a=1"}
    assert apply_default_xla_flags(env, (0, 9)) == [] and env["XLA_FLAGS"] == "--a=1"


def test_import_sets_the_flag_before_jax_starts():
    code = ("import os, rtdetr_jax, jax, jax.numpy as jnp; jnp.ones(2).block_until_ready(); "
            "print(os.environ['XLA_FLAGS'])")
    env_out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})
    assert env_out.stdout.split() == ["--xla_cpu_enable_fast_math=false", FLAG]


def test_on_is_the_default_and_other_values_are_refused():
    env = {"RTDETR_JAX_XLA_FLAGS": " On "}
    assert apply_default_xla_flags(env, (0, 10)) == [FLAG]
    env = {"RTDETR_JAX_XLA_FLAGS": "false"}
    with pytest.raises(ValueError, match="RTDETR_JAX_XLA_FLAGS='false': use 'on'"):
        apply_default_xla_flags(env, (0, 10))
    assert "XLA_FLAGS" not in env
