"""`port`: any supported checkpoint -> a folder with flax weights, transformers weights and both configs.

Sources: a folder or Hub repo id with transformers files (`config.json` + `model.safetensors` or its index), a
single `.safetensors` file, or the authors' `.pth`. A bare file carries no architecture, so it needs `config`
(a `config.json` path or a preset name such as `r18vd`) unless a `config.json` lies beside it. The output folder
is written under a temporary name and renamed at the end, so a failed port leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from rtdetr_jax.config import PRESETS, RTDetrV2Config


def _load_config(spec: str | None, source: str) -> RTDetrV2Config:
    if spec is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(source)), "config.json")
        if os.path.isfile(beside):
            return RTDetrV2Config.from_json_file(beside)
        raise ValueError(f"{source}: a bare checkpoint file needs --config (a config.json or one of {sorted(PRESETS)})")
    if os.path.isfile(spec) or os.path.isdir(spec):
        path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
        return RTDetrV2Config.from_json_file(path)
    return RTDetrV2Config.from_preset(spec)


def load_any(source: str, config: str | None = None, revision: str | None = None, dtype: str = "float32"):
    """Load a model from any supported source (see module docstring)."""
    from rtdetr_jax.convert.original import load_original_checkpoint
    from rtdetr_jax.convert.transformers import load_transformers_checkpoint, state_dict_to_variables
    from rtdetr_jax.model import RTDetrV2ForObjectDetection

    lower = source.lower()
    if lower.endswith((".pth", ".pt")):
        cfg = _load_config(config, source)
        variables = state_dict_to_variables(load_original_checkpoint(source), cfg, source=source)
        return RTDetrV2ForObjectDetection(cfg, variables, dtype=dtype)
    if lower.endswith((".safetensors", ".safetensors.index.json")) and os.path.isfile(source):
        cfg = _load_config(config, source)
        return RTDetrV2ForObjectDetection(cfg, load_transformers_checkpoint(source, cfg), dtype=dtype)
    cfg = _load_config(config, source) if config is not None else None
    return RTDetrV2ForObjectDetection.from_pretrained(source, revision=revision, config=cfg, dtype=dtype)


def port(source: str, out: str, config: str | None = None, revision: str | None = None, force: bool = False) -> str:
    """Convert `source` and write `out` (flax_model.msgpack, model.safetensors, config.json,
    preprocessor_config.json). Returns `out`."""
    from rtdetr_jax.processing import RTDetrImageProcessor

    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise FileExistsError(f"{out}: already exists and is not empty (use --force to replace it)")
    model = load_any(source, config=config, revision=revision)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-port-", dir=parent)
    try:
        processor = None
        if os.path.isdir(source) and os.path.isfile(os.path.join(source, "preprocessor_config.json")):
            processor = RTDetrImageProcessor.from_pretrained(source)
        (processor or RTDetrImageProcessor()).save_pretrained(tmp)
        model.save_pretrained(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
