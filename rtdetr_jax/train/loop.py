"""The training run: data -> jit train step over all devices -> checkpoints, EMA evaluation, logs, export.

    fit(TrainConfig(data_dir="shapes", output_dir="runs/shapes", config="tiny", epochs=12, ...))

Writes into `output_dir`: `train_log.jsonl` (one JSON object per logged step and per evaluation), `checkpoints/`
(orbax: last K and best by AP), `model/` (the EMA weights, transformers-loadable `model.safetensors` plus
`config.json` and our `flax_model.msgpack`), and TensorBoard events when `tensorboardX`/`tensorboard` is installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from rtdetr_jax.config import PRESETS, RTDetrV2Config
from rtdetr_jax.data.coco import load_split
from rtdetr_jax.data.loader import DetectionLoader, LoaderConfig
from rtdetr_jax.model import _as_dtype
from rtdetr_jax.modeling.detector import init_input_size
from rtdetr_jax.train.checkpoint import Checkpointer
from rtdetr_jax.train.evaluate import evaluate
from rtdetr_jax.train.optim import OptimConfig, make_optimizer
from rtdetr_jax.train.state import create_train_state
from rtdetr_jax.train.step import make_steps


@dataclasses.dataclass
class TrainConfig:
    data_dir: str
    output_dir: str
    model: str | None = None  # Hub id or folder to fine-tune from
    config: str | None = None  # preset name (r18vd, ..., tiny) or config.json, when not fine-tuning
    epochs: int = 12
    max_steps: int | None = None  # stop early after this many optimizer steps (smoke runs, benchmarks)
    batch_size: int = 4
    image_size: int = 640
    max_boxes: int = 100
    no_aug_epochs: int = 2  # strong augmentation off for the last epochs
    multi_scale: bool = False
    learning_rate: float = 1e-4
    backbone_lr_multiplier: float = 0.1
    weight_decay: float = 1e-4
    clip_norm: float = 0.1
    warmup_steps: int = 2000
    schedule: str = "constant"
    ema_decay: float = 0.9999
    ema_warmup_steps: int = 2000
    save_every: int = 500
    keep: int = 3
    eval_every: int = 1  # epochs
    log_every: int = 10
    seed: int = 0
    dtype: str = "float32"
    workers: int = 2
    resume: bool = False
    progress: bool = True

    def optim(self, total_steps: int) -> OptimConfig:
        return OptimConfig(learning_rate=self.learning_rate, backbone_lr_multiplier=self.backbone_lr_multiplier,
                           weight_decay=self.weight_decay, clip_norm=self.clip_norm, warmup_steps=self.warmup_steps,
                           schedule=self.schedule, total_steps=total_steps, ema_decay=self.ema_decay,
                           ema_warmup_steps=self.ema_warmup_steps)


def build_model(cfg: TrainConfig, id2label: dict[int, str]):
    """The model to train: fine-tuned from `cfg.model` (class heads re-initialised when the label set differs,
    like transformers' `ignore_mismatched_sizes`), or freshly initialised from a preset / config.json."""
    from flax import traverse_util

    from rtdetr_jax.model import RTDetrV2ForObjectDetection

    if cfg.model:
        pretrained = RTDetrV2ForObjectDetection.from_pretrained(cfg.model)
        if pretrained.config.id2label == id2label:
            return pretrained
        config = dataclasses.replace(pretrained.config, id2label=dict(id2label))
        fresh = fresh_model(config, cfg.seed)
        old = traverse_util.flatten_dict(jax.device_get(pretrained.variables))
        new = traverse_util.flatten_dict(jax.device_get(fresh.variables))
        merged = {k: (old[k] if k in old and np.shape(old[k]) == np.shape(v) else v) for k, v in new.items()}
        return RTDetrV2ForObjectDetection(config, traverse_util.unflatten_dict(merged))
    spec = cfg.config or "r18vd"
    if spec not in PRESETS:  # a preset name wins over a same-named folder in the working directory ("./tiny")
        path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
        config = dataclasses.replace(RTDetrV2Config.from_json_file(path), id2label=dict(id2label))
    else:
        config = RTDetrV2Config.from_preset(spec, id2label=dict(id2label))
    return fresh_model(config, cfg.seed)


def fresh_model(config: RTDetrV2Config, seed: int = 0):
    """A randomly initialised detector with the authors' training initialisation (`modeling/init.py`)."""
    from rtdetr_jax.model import RTDetrV2ForObjectDetection
    from rtdetr_jax.modeling.init import reset_parameters

    model = RTDetrV2ForObjectDetection(config, seed=seed)
    variables = {"params": reset_parameters(model.params, config, seed), "batch_stats": model.variables["batch_stats"]}
    return RTDetrV2ForObjectDetection(config, variables)


class _Log:
    """JSON lines, plus TensorBoard scalars when a writer library is installed."""

    def __init__(self, path: str):
        self.fh = open(path, "a", encoding="utf-8")
        self.tb = None
        try:
            from tensorboardX import SummaryWriter  # type: ignore

            self.tb = SummaryWriter(os.path.join(os.path.dirname(path), "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)


def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Train; returns the final summary (steps, last evaluation, paths)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    train_set = load_split(cfg.data_dir, "train")
    val_set = load_split(cfg.data_dir, "val")
    if val_set.id2label != train_set.id2label:
        raise ValueError(f"{cfg.data_dir}: train and val categories differ")
    model = build_model(cfg, train_set.id2label)
    config = model.config
    if cfg.max_boxes > config.num_queries:
        raise ValueError(f"max_boxes={cfg.max_boxes} exceeds num_queries={config.num_queries}")
    if cfg.image_size < init_input_size(config):
        raise ValueError(f"image_size={cfg.image_size} is too small for num_queries={config.num_queries}")

    n_dev = len(jax.local_devices())
    if cfg.batch_size % n_dev:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {n_dev} local devices")
    stop_epoch = max(cfg.epochs - cfg.no_aug_epochs, 0)
    sizes = tuple(range(cfg.image_size - 160, cfg.image_size + 161, 32)) if cfg.multi_scale else ()
    sizes = tuple(s for s in sizes if s >= init_input_size(config))
    train_loader = DetectionLoader(train_set, LoaderConfig(
        batch_size=cfg.batch_size, image_size=cfg.image_size, max_boxes=cfg.max_boxes, train=True, seed=cfg.seed,
        stop_strong_aug_epoch=stop_epoch, multi_scale_sizes=sizes, workers=cfg.workers))
    val_loader = DetectionLoader(val_set, LoaderConfig(
        batch_size=cfg.batch_size, image_size=cfg.image_size, max_boxes=cfg.max_boxes, train=False,
        workers=cfg.workers))
    per_epoch = train_loader.batches_per_epoch()
    if per_epoch == 0:
        raise ValueError(f"{cfg.data_dir}: {len(train_set)} training images, fewer than batch_size={cfg.batch_size}")
    total_steps = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)

    optim = dataclasses.replace(cfg.optim(total_steps),
                                freeze_backbone_batch_norms=config.freeze_backbone_batch_norms)
    tx = make_optimizer(optim, model.params)
    dtype = _as_dtype(cfg.dtype)
    steps = make_steps(config, optim, tx, dtype=dtype)
    state = steps.replicate(create_train_state(model.variables, tx, cfg.seed))
    ckpt = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), keep=cfg.keep)
    epoch, start_batch = 0, 0
    if cfg.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        epoch, start_batch = int(meta["epoch"]), int(meta["next_batch"])
    config.to_json_file(os.path.join(cfg.output_dir, "config.json"))

    log = _Log(os.path.join(cfg.output_dir, "train_log.jsonl"))
    step = int(state.step)
    position = {"epoch": epoch, "next_batch": start_batch}
    bar = _progress(total_steps, step, cfg.progress, "train")
    metrics_eval: dict[str, float] = {}
    last_eval_step = None

    def run_eval():
        nonlocal metrics_eval, last_eval_step
        metrics_eval = evaluate(steps, state.ema, val_loader)
        last_eval_step = step
        log.write({"step": step, "epoch": position["epoch"], **{f"eval_{k}": v for k, v in metrics_eval.items()}})
        ckpt.save_best(step, state, {**position, "step": step}, metrics_eval)

    t_last = time.perf_counter()
    try:
        while step < total_steps and position["epoch"] < cfg.epochs:
            ep = position["epoch"]
            for batch in train_loader.epoch(ep, position["next_batch"]):
                pixel_values, targets = steps.shard_batch((batch.pixel_values, batch.targets))
                state, metrics = steps.train_step(state, pixel_values, targets)
                step += 1
                done = batch.index + 1 == per_epoch
                position = {"epoch": ep + 1, "next_batch": 0} if done else {"epoch": ep, "next_batch": batch.index + 1}
                if step % cfg.log_every == 0 or step == total_steps:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not np.isfinite(m["loss"]):
                        raise FloatingPointError(f"loss became {m['loss']} at step {step} (epoch {ep})")
                    now = time.perf_counter()
                    log.write({"step": step, "epoch": ep, **m,
                               "images_per_s": cfg.batch_size * cfg.log_every / max(now - t_last, 1e-9)})
                    t_last = now
                    if bar is not None:
                        bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}")
                if bar is not None:
                    bar.update(1)
                if step % cfg.save_every == 0:
                    ckpt.save(step, state, {**position, "step": step})
                if step >= total_steps:
                    break
            if position == {"epoch": ep + 1, "next_batch": 0}:  # finished the epoch
                ckpt.save(step, state, {**position, "step": step})
                if cfg.eval_every and (ep + 1) % cfg.eval_every == 0:
                    run_eval()
        if step > 0:
            ckpt.save(step, state, {**position, "step": step})
            if last_eval_step != step:
                run_eval()
        ckpt.wait()
    finally:
        if bar is not None:
            bar.close()
        log.close()
        ckpt.close()

    from rtdetr_jax.model import RTDetrV2ForObjectDetection

    from rtdetr_jax.processing import RTDetrImageProcessor

    final = RTDetrV2ForObjectDetection(config, jax.device_get(state.ema))
    export_dir = os.path.join(cfg.output_dir, "model")
    # the processor resizes to the size trained at, so detect/evaluate see what training saw
    RTDetrImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size}).save_pretrained(export_dir)
    final.save_pretrained(export_dir)
    skipped = dict(train_loader.skipped) | {f"annotations: {k}": v for k, v in train_set.skipped.items()}
    return {"steps": step, "eval": metrics_eval, "model_dir": export_dir, "skipped": skipped}


def evaluate_model(model: str, data_dir: str, split: str = "val", image_size: int | None = None,
                   batch_size: int = 8, dtype: str = "float32", progress: bool = True,
                   workers: int = 2) -> dict[str, float]:
    """COCO mAP of a saved model (folder or Hub id) on `data_dir`'s `split`; `image_size` None: the size in the
    model's `preprocessor_config.json` (what training wrote), else 640."""
    from rtdetr_jax.hub import resolve_file
    from rtdetr_jax.model import RTDetrV2ForObjectDetection
    from rtdetr_jax.processing import PREPROCESSOR_CONFIG, RTDetrImageProcessor
    from rtdetr_jax.train.step import make_eval_steps

    net = RTDetrV2ForObjectDetection.from_pretrained(model)
    if image_size is None:
        image_size = 640
        if resolve_file(model, PREPROCESSOR_CONFIG, required=False):
            size = RTDetrImageProcessor.from_pretrained(model).size
            if size["height"] != size["width"]:
                raise ValueError(f"{model}: preprocessor size {size} is not square; pass --image-size")
            image_size = int(size["height"])
    dataset = load_split(data_dir, split)
    if net.config.num_labels != dataset.num_classes:
        raise ValueError(f"{model}: the model has {net.config.num_labels} classes, {data_dir} has "
                         f"{dataset.num_classes}")
    n_dev = len(jax.local_devices())
    batch_size = max(n_dev, batch_size - batch_size % n_dev)
    loader = DetectionLoader(dataset, LoaderConfig(batch_size=batch_size, image_size=image_size, train=False,
                                                   max_boxes=max(1, max((len(b) for b in dataset.boxes), default=1)),
                                                   workers=workers))
    steps = make_eval_steps(net.config, dtype=_as_dtype(dtype))
    bar = _progress(loader.batches_per_epoch(), 0, progress, "evaluate")
    try:
        return evaluate(steps, steps.replicate(net.variables), loader, progress=bar)
    finally:
        if bar is not None:
            bar.close()
