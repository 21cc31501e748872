"""A cache of converted weights, so loading a transformers checkpoint converts it once.

`from_pretrained` on a folder or Hub repo with only `model.safetensors` converts the PyTorch layout into flax
variables. The result is stored as `flax_model.msgpack` under

    $RTDETR_JAX_CACHE   (else $XDG_CACHE_HOME/rtdetr_jax, else ~/.cache/rtdetr_jax)  /converted/KEY.msgpack

KEY hashes the weight files' real paths, sizes and modification times (a Hub blob's real path is its content hash)
together with the config, so a changed checkpoint or config is converted again. `RTDETR_JAX_CACHE=off` disables
the cache. A cache file that cannot be read is ignored and rewritten; writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence

CACHE_ENV = "RTDETR_JAX_CACHE"


def cache_root(environ: Mapping[str, str] | None = None) -> str | None:
    """The cache folder, or None when disabled; read from `environ` (default `os.environ`)."""
    environ = os.environ if environ is None else environ
    value = environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "false", "no") else value
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rtdetr_jax")


def cache_key(weight_files: Sequence[str], config_json: str) -> str:
    h = hashlib.sha256()
    for path in weight_files:
        real = os.path.realpath(path)
        st = os.stat(real)
        h.update(f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(config_json.encode())
    return h.hexdigest()[:32]


def weight_files(weights_path: str) -> list[str]:
    """The files a checkpoint consists of: the safetensors file, or an index plus its shards."""
    if not weights_path.endswith(".index.json"):
        return [weights_path]
    with open(weights_path, encoding="utf-8") as fh:
        shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
    folder = os.path.dirname(weights_path)
    return [weights_path] + [os.path.join(folder, s) for s in shards]


def load_or_convert(weights_path: str, config, convert: Callable[[], dict], load: Callable[[str], dict],
                    save: Callable[[dict, str], None]) -> tuple[dict, str | None, bool]:
    """Variables for `weights_path`: from the cache when present, else `convert()` then cached.

    Returns (variables, cache file or None, whether it came from the cache).
    """
    root = cache_root()
    if root is None:
        return convert(), None, False
    key = cache_key(weight_files(weights_path), config.to_json_string())
    path = os.path.join(root, "converted", key + ".msgpack")
    if os.path.isfile(path):
        try:
            return load(path), path, True
        except ValueError as err:
            warnings.warn(f"ignoring unreadable converted-weights cache entry ({err})", stacklevel=3)
    variables = convert()
    try:
        save(variables, path)
    except OSError as err:  # a read-only home must not stop loading
        warnings.warn(f"could not cache converted weights at {path} ({err})", stacklevel=3)
        return variables, None, False
    return variables, path, False
