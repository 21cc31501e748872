"""jax's persistent compilation cache for the command line (rtdetr_jax/compilation_cache.py): where it goes, when it
is left alone. That a second `rtdetr-jax detect` loads the forward the first one compiled:
tests/test_detect_cli.py."""

import os

import jax
import pytest

from rtdetr_jax.compilation_cache import MAX_BYTES, SUBDIR, command_line_cache_dir, enable_for_command_line


@pytest.mark.parametrize("environ, expected", [
    ({"XDG_CACHE_HOME": "/xdg"}, os.path.join("/xdg", "rtdetr_jax", SUBDIR)),
    ({"RTDETR_JAX_CACHE": "/mine", "XDG_CACHE_HOME": "/xdg"}, os.path.join("/mine", SUBDIR)),
    ({"RTDETR_JAX_CACHE": "off"}, None),
    ({"JAX_COMPILATION_CACHE_DIR": "/theirs", "RTDETR_JAX_CACHE": "/mine"}, None),
])
def test_where_the_command_line_caches(environ, expected):
    assert command_line_cache_dir(environ) == expected


def test_default_is_under_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert command_line_cache_dir({}) == os.path.join(str(tmp_path), ".cache", "rtdetr_jax", SUBDIR)


def test_enable_sets_jax_config_and_leaves_user_choices(tmp_path):
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
    try:
        assert enable_for_command_line({"JAX_COMPILATION_CACHE_DIR": "/theirs"}) is None
        assert enable_for_command_line({"RTDETR_JAX_CACHE": "off"}) is None
        assert (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size) == before
        path = enable_for_command_line({"RTDETR_JAX_CACHE": str(tmp_path)})
        assert path == os.path.join(str(tmp_path), SUBDIR)
        assert jax.config.jax_compilation_cache_dir == path
        assert jax.config.jax_compilation_cache_max_size == MAX_BYTES
        jax.config.update("jax_compilation_cache_max_size", before[1])
        enable_for_command_line({"RTDETR_JAX_CACHE": str(tmp_path), "JAX_COMPILATION_CACHE_MAX_SIZE": "5"})
        assert jax.config.jax_compilation_cache_max_size == before[1]  # the user's size: jax reads it itself
    finally:  # nothing was compiled meanwhile, so jax's cache was never opened
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_compilation_cache_max_size", before[1])


def test_folder_that_cannot_be_created_warns_once_and_leaves_jax_alone(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    before = jax.config.jax_compilation_cache_dir
    with pytest.warns(UserWarning, match=r"^compiled programs are not cached: cannot create .*a_file.*jax_compilation"):
        assert enable_for_command_line({"RTDETR_JAX_CACHE": str(tmp_path / "a_file")}) is None
    assert jax.config.jax_compilation_cache_dir == before
