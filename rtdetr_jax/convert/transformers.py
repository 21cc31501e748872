"""transformers safetensors <-> flax variables, strictly.

The flax module tree mirrors transformers' (see `modeling/layers.py`), so each flax leaf has exactly one
checkpoint key: path components `name_3` become `name.3`, leaves `kernel`/`scale`/`embedding` become `weight`,
conv kernels go (kh, kw, in, out) <-> (out, in, kh, kw) and linear kernels are transposed. Everything else in a
checkpoint is accounted for explicitly:

- `*.num_batches_tracked`: batch-norm step counters, not used at inference; dropped on load, written as 0.
- `*.encoder_attn.n_points_scale`: a buffer derived from `decoder_n_points`; checked against the config.
- top-level `class_embed.N.*` / `bbox_embed.N.*`: tied copies of `model.decoder.*` written by older transformers;
  checked equal to the decoder's copy.

Any other unknown key, any missing key and any shape mismatch is an error naming the key. Only numpy and
safetensors are needed (no torch).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from rtdetr_jax.config import RTDetrV2Config
from rtdetr_jax.io_utils import atomic_path


class ConversionError(ValueError):
    """A checkpoint does not match the model described by its config."""


_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_INDEXED = re.compile(r"^(.+)_(\d+)$")


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """('model', 'decoder', 'layers_0', 'fc1', 'kernel') -> 'model.decoder.layers.0.fc1.weight'."""
    parts = []
    for component in path[:-1]:
        m = _INDEXED.match(component)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else component)
    parts.append(_LEAF_TO_TORCH.get(path[-1], path[-1]))
    return ".".join(parts)


def _to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:
        return np.transpose(array)
    return array


def _to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if leaf == "kernel" and array.ndim == 2:
        return np.transpose(array)
    return array


def variable_shapes(config: RTDetrV2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened (collection, *path) -> shape of the flax variables for `config`, without allocating them."""
    from rtdetr_jax.modeling.detector import RTDetrV2Detector, init_input_size

    module = RTDetrV2Detector(config)
    size = init_input_size(config)
    dummy = jax.ShapeDtypeStruct((1, config.backbone_config.num_channels, size, size), jnp.float32)
    shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), dummy)
    return {k: tuple(v.shape) for k, v in flatten_dict(shapes).items()}


def expected_torch_keys(config: RTDetrV2Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torch key -> ((collection, *flax path), torch shape) for every variable of the model."""
    table = {}
    for path, shape in variable_shapes(config).items():
        leaf = path[-1]
        torch_shape = _to_torch(np.empty(shape, np.uint8), leaf).shape
        table[flax_path_to_torch_key(path[1:])] = (path, tuple(torch_shape))
    return table


def _n_points_scale(config: RTDetrV2Config) -> np.ndarray:
    return np.array([1.0 / n for n in config.decoder_n_points_list for _ in range(n)], np.float32)


def _tied_alias(key: str) -> str | None:
    m = re.match(r"^(class_embed|bbox_embed)\.(.+)$", key)
    return f"model.decoder.{m.group(1)}.{m.group(2)}" if m else None


def state_dict_to_variables(state_dict: dict[str, np.ndarray], config: RTDetrV2Config, source: str = "checkpoint"):
    """transformers state dict (numpy arrays) -> flax variables `{"params": ..., "batch_stats": ...}`.

    Raises `ConversionError` naming `source` and the first offending key.
    """
    expected = expected_torch_keys(config)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unknown = []
    points_scale = _n_points_scale(config)
    for key, value in state_dict.items():
        value = np.asarray(value)
        if key in expected:
            path, shape = expected[key]
            if tuple(value.shape) != shape:
                raise ConversionError(
                    f"{source}: key {key!r} has shape {tuple(value.shape)}, the config expects {shape}"
                )
            if not np.issubdtype(value.dtype, np.floating):
                raise ConversionError(f"{source}: key {key!r} has dtype {value.dtype}, expected a float tensor")
            flat[path] = _to_flax(value, path[-1]).astype(np.float32)
        elif key.endswith(".num_batches_tracked"):
            if key.replace(".num_batches_tracked", ".running_mean") not in expected:
                unknown.append(key)
        elif key.endswith(".encoder_attn.n_points_scale"):
            if key.replace(".n_points_scale", ".value_proj.weight") not in expected:
                unknown.append(key)
            elif value.shape != points_scale.shape or not np.allclose(value, points_scale, rtol=1e-6):
                raise ConversionError(
                    f"{source}: key {key!r} = {np.round(value, 4).tolist()} does not match decoder_n_points="
                    f"{config.decoder_n_points} (expected {np.round(points_scale, 4).tolist()})"
                )
        elif _tied_alias(key) in expected:
            twin = state_dict.get(_tied_alias(key))
            if twin is not None and not np.array_equal(np.asarray(twin), value):
                raise ConversionError(f"{source}: tied key {key!r} differs from {_tied_alias(key)!r}")
            if twin is None:
                path, shape = expected[_tied_alias(key)]
                if tuple(value.shape) != shape:
                    raise ConversionError(
                        f"{source}: key {key!r} has shape {tuple(value.shape)}, the config expects {shape}"
                    )
                flat[path] = _to_flax(value, path[-1]).astype(np.float32)
        else:
            unknown.append(key)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConversionError(f"{source}: unexpected key {sorted(unknown)[0]!r}{more} for this config")
    missing = sorted(k for k, (path, _) in expected.items() if path not in flat)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{source}: missing key {missing[0]!r}{more}")
    return unflatten_dict(flat)


def variables_to_state_dict(variables: dict[str, Any], config: RTDetrV2Config) -> dict[str, np.ndarray]:
    """flax variables -> transformers state dict (numpy float32), including the buffers transformers expects."""
    expected = expected_torch_keys(config)
    flat = flatten_dict(jax.device_get(variables))
    by_path = {path: key for key, (path, _) in expected.items()}
    state = {}
    for path, value in flat.items():
        if path not in by_path:
            raise ConversionError(f"variables: unexpected entry {'/'.join(path)!r} for this config")
        state[by_path[path]] = np.ascontiguousarray(_to_torch(np.asarray(value, np.float32), path[-1]))
    missing = sorted(set(by_path.values()) - set(state))
    if missing:
        raise ConversionError(f"variables: missing entry for {missing[0]!r}")
    for key in list(state):
        if key.endswith(".running_mean") and (
            not key.startswith("model.backbone.") or not config.freeze_backbone_batch_norms
        ):
            # non-frozen BatchNorm2d in transformers carries a step counter
            state[key.replace(".running_mean", ".num_batches_tracked")] = np.zeros((), np.int64)
        if key.endswith(".encoder_attn.value_proj.weight"):
            state[key.replace(".value_proj.weight", ".n_points_scale")] = _n_points_scale(config)
    return state


# --------------------------------------------------------------------------- files

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `model.safetensors` file, or a sharded checkpoint through its `model.safetensors.index.json`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                index = json.load(fh)
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConversionError(f"{path}: not a safetensors index ({type(err).__name__}: {err})") from None
        folder = os.path.dirname(path)
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_state = read_safetensors(os.path.join(folder, shard))
            state.update(shard_state)
        listed = set(weight_map)
        if listed != set(state):
            extra = sorted(set(state) ^ listed)[0]
            raise ConversionError(f"{path}: index and shards disagree about key {extra!r}")
        return state
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ConversionError(f"{path}: cannot read as safetensors ({err})") from None


def find_weights_file(folder: str | os.PathLike) -> str:
    for name in (SAFE_WEIGHTS, SAFE_INDEX):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"{folder}: no {SAFE_WEIGHTS} or {SAFE_INDEX} in this folder")


def load_transformers_checkpoint(weights_path: str | os.PathLike, config: RTDetrV2Config):
    """A transformers safetensors file (or index) -> flax variables for `config`."""
    state = read_safetensors(weights_path)
    return state_dict_to_variables(state, config, source=os.fspath(weights_path))


def save_transformers_checkpoint(variables, config: RTDetrV2Config, folder: str | os.PathLike) -> None:
    """Write `model.safetensors` + `config.json` that transformers' `from_pretrained` loads."""
    from safetensors.numpy import save_file

    state = variables_to_state_dict(variables, config)
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, SAFE_WEIGHTS)) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    config.save_pretrained(folder)
