"""`RTDetrV2ForObjectDetection`: the transformers-style front of the flax detector.

    model = RTDetrV2ForObjectDetection.from_pretrained("PekingU/rtdetr_v2_r18vd")
    outputs = model(pixel_values=inputs["pixel_values"])      # (batch, 3, H, W) float32, H and W multiples of 32
    outputs = model(pixel_values=..., output_fields=DETECTION_FIELDS)  # logits and pred_boxes only: faster

The object holds `.config`, `.module` (the flax module), `.variables` (`{"params", "batch_stats"}`, what
`module.apply` takes) and `.params` (the trainable part). `__call__` is jit-compiled once per input shape and dtype
(and per `output_fields` selection).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from rtdetr_jax.config import RTDetrV2Config
from rtdetr_jax.convert.transformers import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    ConversionError,
    load_transformers_checkpoint,
    save_transformers_checkpoint,
)
from rtdetr_jax.host_memory import release_free_heap, release_surplus_heap
from rtdetr_jax.hub import ModelNotFoundError, resolve_file
from rtdetr_jax.io_utils import atomic_path
from rtdetr_jax.jax_caches import drop_tracing_caches
from rtdetr_jax.modeling.detector import (
    RTDetrV2Detector,
    RTDetrV2ObjectDetectionOutput,
    init_input_size,
    input_stride,
    num_tokens,
)

FLAX_WEIGHTS = "flax_model.msgpack"
# what `post_process_object_detection` reads: with only these the compiled forward drops the encoder's dense box
# head over every anchor (`enc_outputs_coord_logits`; the score head stays, the query selection reads it) and the
# NCHW copies of the encoder's maps (`encoder_last_hidden_state`);
# r18vd at 640 on the 2-core CPU: 0.94-0.97 of the whole forward's time at batch 1, 0.94-0.95 at batch 8
# (benchmarks/README.md, `ab_step.py --step forward --b-output-fields logits,pred_boxes`)
DETECTION_FIELDS = ("logits", "pred_boxes")
_OUTPUT_FIELDS = tuple(RTDetrV2ObjectDetectionOutput.__dataclass_fields__)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _as_dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type if dtype is not None else jnp.float32


def check_output_fields(output_fields) -> tuple[str, ...] | None:
    """`output_fields` as a sorted tuple of known field names (None: all of them); a one-line error otherwise."""
    if output_fields is None:
        return None
    if isinstance(output_fields, str):
        output_fields = (output_fields,)
    fields = tuple(output_fields)
    unknown = [f for f in fields if f not in _OUTPUT_FIELDS]
    if unknown or not fields:
        raise ValueError(f"output_fields {fields!r}: {'unknown field ' + repr(unknown[0]) if unknown else 'empty'}; "
                         f"choose from {', '.join(_OUTPUT_FIELDS)}")
    return tuple(sorted(set(fields)))


def _keep_fields(out: RTDetrV2ObjectDetectionOutput, fields: tuple[str, ...]) -> RTDetrV2ObjectDetectionOutput:
    """`out` with every field not in `fields` set to None (inside jit: XLA then drops what only those needed)."""
    return out.replace(**{name: None for name in _OUTPUT_FIELDS if name not in fields})


class RTDetrV2ForObjectDetection:
    """RT-DETRv2 detector with transformers' loading and calling conventions."""

    def __init__(self, config: RTDetrV2Config, variables: dict | None = None, dtype="float32", seed: int = 0):
        self.config = config
        self.dtype = _as_dtype(dtype)
        self.module = RTDetrV2Detector(config, self.dtype)
        if variables is None:
            size = init_input_size(config)
            dummy = jnp.zeros((1, config.backbone_config.num_channels, size, size), jnp.float32)
            variables = jax.jit(self.module.init)(jax.random.PRNGKey(seed), dummy)
        self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
        self._forwards: dict[tuple[str, ...] | None, Any] = {}  # output_fields -> its jit forward
        self._forwards_with_loss: dict[tuple[str, ...] | None, Any] = {}
        self.conversion_cache: str | None = None  # where that conversion is cached (convert/cache.py)
        self.loaded_from_cache = False

    # ------------------------------------------------------------------ properties
    @property
    def params(self):
        return self.variables["params"]

    @property
    def compiled_shapes(self) -> int:
        """How many forwards have been compiled so far: one per distinct input shape and dtype (and per
        `output_fields` selection)."""
        return sum(f._cache_size() for f in self._forwards.values())

    # ------------------------------------------------------------------ calling
    def check_pixel_values(self, pixel_values) -> None:
        shape = tuple(np.shape(pixel_values))
        channels = self.config.backbone_config.num_channels
        if len(shape) != 4 or shape[1] != channels:
            raise ValueError(f"pixel_values has shape {shape}; expected (batch, {channels}, height, width)")
        stride = input_stride(self.config)
        if shape[2] % stride or shape[3] % stride or shape[2] == 0 or shape[3] == 0:
            raise ValueError(f"pixel_values has height x width {shape[2]}x{shape[3]}; both must be positive "
                             f"multiples of {stride}")
        tokens = num_tokens(self.config, shape[2], shape[3])
        if tokens < self.config.num_queries:
            raise ValueError(f"pixel_values of {shape[2]}x{shape[3]} give {tokens} encoder tokens, fewer than "
                             f"num_queries={self.config.num_queries}; use a larger input")

    def __call__(self, pixel_values=None, variables=None, labels=None, output_fields=None,
                 **kwargs) -> RTDetrV2ObjectDetectionOutput:
        """Forward pass; with `labels` (transformers' list of `{"class_labels": (n,), "boxes": (n, 4) normalised
        cxcywh}`) also `loss` and `loss_dict`, computed as transformers does in eval mode (running batch-norm
        statistics, no denoising). Training uses `rtdetr_jax.train` (batch statistics, denoising, jit step).

        `output_fields`: names of the output's fields to compute, the others left None (default: all, as
        transformers returns them); e.g. `DETECTION_FIELDS`, what `post_process_object_detection` reads, which
        spares the work only the other fields need. `loss` and `loss_dict` come with `labels` either way."""
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        unused = sorted(k for k, v in kwargs.items() if v is not None and k not in ("pixel_mask",))
        if unused:
            raise TypeError(f"unsupported argument(s) for inference: {', '.join(unused)}")
        fields = check_output_fields(output_fields)
        self.check_pixel_values(pixel_values)
        variables = self.variables if variables is None else variables
        pixel_values = jnp.asarray(pixel_values, jnp.float32)
        if labels is None:
            return self._run(self._forward(fields), variables, pixel_values)
        from rtdetr_jax.loss.criterion import pad_targets

        if len(labels) != pixel_values.shape[0]:
            raise ValueError(f"labels has {len(labels)} entries for a batch of {pixel_values.shape[0]} images")
        targets = pad_targets(labels)
        if targets.max_boxes > self.config.num_queries:
            raise ValueError(f"an image has {targets.max_boxes} boxes, more than num_queries="
                             f"{self.config.num_queries}")
        return self._run(self._forward_with_loss(fields), variables, pixel_values,
                         jax.tree_util.tree_map(jnp.asarray, targets))

    def _forward(self, fields: tuple[str, ...] | None):
        """The jit forward returning `fields` of the output (all for None), made once per selection."""
        if fields not in self._forwards:
            if fields is None:
                self._forwards[fields] = jax.jit(self.module.apply)
            else:
                module = self.module

                def apply_fields(variables, pixel_values):
                    return _keep_fields(module.apply(variables, pixel_values), fields)

                self._forwards[fields] = jax.jit(apply_fields)
        return self._forwards[fields]

    def _forward_with_loss(self, fields: tuple[str, ...] | None):
        """The jit forward with the eval-mode loss, returning `fields` (all for None) plus `loss` and `loss_dict`."""
        if fields not in self._forwards_with_loss:
            from rtdetr_jax.loss.criterion import rtdetr_loss

            module, config = self.module, self.config

            def forward_with_loss(variables, pixel_values, targets):
                out = module.apply(variables, pixel_values)
                loss, terms = rtdetr_loss(out, targets, config)
                if fields is not None:
                    out = _keep_fields(out, fields)
                return out.replace(loss=loss, loss_dict=terms)

            self._forwards_with_loss[fields] = jax.jit(forward_with_loss)
        return self._forwards_with_loss[fields]

    @staticmethod
    def _run(jitted, *args):
        """Call a jit function; after it compiled for a new signature, drop jax's tracing caches, which a compiled
        signature no longer needs (jax_caches.drop_tracing_caches: ~50 MB at r18vd), and hand the freed memory
        back to the system (host_memory.release_free_heap: ~200 MB at r18vd, which glibc would keep resident):
        once as the call starts running (asynchronously), before its scratch memory adds to the compiler's
        leftovers, and again once its outputs are ready, for the scratch memory it freed at its end (r18vd batch
        1: 60-80 MB). Calls of a compiled signature return at once, once tcmalloc's surplus free pages (a second
        scratch block taken by a call issued before the last one's was freed) are handed back
        (host_memory.release_surplus_heap; r18vd batch 8, forwards back to back: process peak 1660-1707 ->
        1135-1225 MB)."""
        compiled = jitted._cache_size()
        out = jitted(*args)
        if jitted._cache_size() != compiled:
            drop_tracing_caches()
            release_free_heap()
            jax.block_until_ready(out)
            release_free_heap()
        else:
            release_surplus_heap()
        return out

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None, dtype="float32",
                        config: RTDetrV2Config | None = None) -> "RTDetrV2ForObjectDetection":
        """Load from a folder or Hub repo holding `config.json` plus `flax_model.msgpack` (written by
        `save_pretrained` / the port CLI) or transformers' `model.safetensors` (sharded index too). A converted
        safetensors checkpoint is cached (`rtdetr_jax/convert/cache.py`), so the next load skips the conversion."""
        if config is None:
            config = RTDetrV2Config.from_pretrained(name_or_path, revision=revision)
        flax_file = resolve_file(name_or_path, FLAX_WEIGHTS, revision=revision, required=False)
        if flax_file is not None:
            model = cls(config, load_flax_variables(flax_file, config), dtype=dtype)
        else:
            model = cls._from_transformers_weights(name_or_path, config, revision, dtype)
        drop_tracing_caches()  # the shape check's trace of the model's init (~50 MB at r18vd)
        release_free_heap()  # the host copies of the weights and the conversion's temporaries
        return model

    @classmethod
    def _from_transformers_weights(cls, name_or_path, config: RTDetrV2Config, revision: str | None,
                                   dtype) -> "RTDetrV2ForObjectDetection":
        """`from_pretrained` for a folder or repo with transformers' safetensors only: converted, or read from the
        conversion cache."""
        weights = resolve_file(name_or_path, SAFE_WEIGHTS, revision=revision, required=False)
        if weights is None:
            index = resolve_file(name_or_path, SAFE_INDEX, revision=revision, required=False)
            if index is None:
                raise ModelNotFoundError(
                    f"{os.fspath(name_or_path)}: no {FLAX_WEIGHTS}, {SAFE_WEIGHTS} or {SAFE_INDEX} found"
                )
            with open(index, encoding="utf-8") as fh:
                shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
            for shard in shards:  # make sure every shard is downloaded next to the index
                resolve_file(name_or_path, shard, revision=revision)
            weights = index
        from rtdetr_jax.convert.cache import load_or_convert

        variables, cache_file, cached = load_or_convert(
            weights, config, convert=lambda: load_transformers_checkpoint(weights, config),
            load=lambda path: load_flax_variables(path, config), save=save_flax_variables)
        model = cls(config, variables, dtype=dtype)
        model.conversion_cache = cache_file
        model.loaded_from_cache = cached
        return model

    def save_pretrained(self, directory: str | os.PathLike, flax_weights: bool = True) -> None:
        """Write transformers-loadable `model.safetensors` + `config.json` + `preprocessor_config.json`, and
        (unless `flax_weights=False`) `flax_model.msgpack` so our loader skips the conversion."""
        from rtdetr_jax.processing import RTDetrImageProcessor

        os.makedirs(directory, exist_ok=True)
        save_transformers_checkpoint(self.variables, self.config, directory)
        if flax_weights:
            save_flax_variables(self.variables, os.path.join(directory, FLAX_WEIGHTS))
        if not os.path.exists(os.path.join(directory, "preprocessor_config.json")):
            RTDetrImageProcessor().save_pretrained(directory)


def save_flax_variables(variables, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(serialization.msgpack_serialize(jax.device_get(variables)))


def load_flax_variables(path: str | os.PathLike, config: RTDetrV2Config):
    """Read `flax_model.msgpack` and check every entry against the shapes `config` implies."""
    from flax.traverse_util import flatten_dict

    from rtdetr_jax.convert.transformers import variable_shapes

    try:
        with open(path, "rb") as fh:
            variables = serialization.msgpack_restore(fh.read())
    except Exception as err:  # msgpack raises several unrelated types on corrupt input
        raise ConversionError(f"{path}: cannot read flax weights ({type(err).__name__}: {err})") from None
    expected = variable_shapes(config)
    flat = flatten_dict(variables) if isinstance(variables, dict) else {}
    for key, shape in expected.items():
        if key not in flat:
            raise ConversionError(f"{path}: missing entry {'/'.join(key)!r}")
        if tuple(np.shape(flat[key])) != shape:
            raise ConversionError(f"{path}: entry {'/'.join(key)!r} has shape {np.shape(flat[key])}, config "
                                  f"expects {shape}")
    extra = sorted(set(flat) - set(expected))
    if extra:
        raise ConversionError(f"{path}: unexpected entry {'/'.join(extra[0])!r} for this config")
    return variables
