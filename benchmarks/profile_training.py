"""Where training time goes, for both implementations: the backbone, the encoder (input projections + hybrid
encoder), the rest of forward + loss + backward (query selection, decoder, heads, denoising, matcher, loss), and
the optimizer update, each forward and backward together.

Each stage is timed cumulatively, as its own gradient computation: the backbone alone (the gradient of a fixed
random projection of its output maps), backbone + encoder (the same of the encoder's maps), the whole loss's value
and gradient, and the whole training step (AdamW, EMA for ours; AdamW with gradient clipping for PyTorch, as
bench_training.py). A stage's time is the median over rounds of its call's time less the call before it in the
same round (`common.stage_medians`). Ours are jit-compiled functions (encoder batch norms in training mode, as in
the step), PyTorch's the same sub-modules in train mode, eager. Each side runs in a process of its own, the
stages' calls interleaved round by round (`common.interleaved_times`).

    python benchmarks/profile_training.py [--preset r18vd] [--batch 4] [--size 640] [--iters 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    interleaved_times,
    machine_info,
    our_train_step,
    run_json_child,
    scratch_dir,
    stage_medians,
    start_like_the_cli,
    synthetic_detection_batch,
    torch_train_step,
    write_result,
)
from rtdetr_jax.config import PRESETS  # noqa: E402

STAGES = ("backbone", "encoder", "decoder, matcher and loss", "optimizer")


CUMULATIVE = dict(zip(STAGES, ("backbone", "encoder", "loss", "step")))  # stage -> the call that ends with it


def stage_times(times: dict) -> dict:
    """The cumulative calls' times per round (backbone, encoder, loss, step) -> each stage's own median time
    (`common.stage_medians`) and the whole step's median."""
    return stage_medians(times, CUMULATIVE) | {"training step": statistics.median(times["step"])}


def jax_side(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rtdetr_jax.config import RTDetrV2Config
    from rtdetr_jax.loss.criterion import pad_targets, rtdetr_loss
    from rtdetr_jax.model import RTDetrV2ForObjectDetection
    from rtdetr_jax.modeling.denoising import contrastive_denoising_group
    from rtdetr_jax.modeling.detector import RTDetrV2Detector, RTDetrV2Model

    config = RTDetrV2Config.from_preset(args.preset)
    pixels, labels = synthetic_detection_batch(args.batch, args.size, config.num_labels)
    model = RTDetrV2ForObjectDetection.from_pretrained(args.folder)
    params, stats = model.variables["params"], model.variables["batch_stats"]
    detector, whole = RTDetrV2Model(config), RTDetrV2Detector(config)
    x = jnp.asarray(pixels)
    targets = pad_targets(labels, 16)

    def projected(method):
        """The gradient of sum(map * r) over the maps `method` returns, r fixed random: (batch, H, W, C) each."""
        shapes = jax.eval_shape(lambda p: detector.apply({"params": p["model"], "batch_stats": stats["model"]}, x,
                                                         method=method, mutable=["batch_stats"])[0], params)
        rs = [jnp.asarray(np.random.default_rng(i).standard_normal(s.shape, np.float32)) for i, s in
              enumerate(shapes)]

        def loss(p):
            maps, _ = detector.apply({"params": p["model"], "batch_stats": stats["model"]}, x, method=method,
                                     mutable=["batch_stats"])
            return sum(jnp.vdot(m, r) for m, r in zip(maps, rs))

        return jax.jit(jax.grad(loss))

    def full_loss(p, key):
        denoising = contrastive_denoising_group(
            key, targets.labels, targets.boxes, targets.mask, num_classes=config.num_labels,
            num_queries=config.num_queries, num_denoising=config.num_denoising,
            label_noise_ratio=config.label_noise_ratio, box_noise_scale=config.box_noise_scale)
        outputs, _ = whole.apply({"params": p, "batch_stats": stats}, x, denoising, mutable=["batch_stats"])
        return rtdetr_loss(outputs, targets, config)[0]

    grad_backbone = projected(RTDetrV2Model.backbone_features)
    grad_encoder = projected(RTDetrV2Model.encode)
    grad_loss = jax.jit(jax.value_and_grad(full_loss))
    key = jax.random.PRNGKey(0)
    steps, state, batch = our_train_step(model, pixels, labels)
    holder = {"state": state}

    def train_step():
        holder["state"], metrics = steps.train_step(holder["state"], *batch)
        jax.block_until_ready(metrics)

    fns = {"backbone": lambda: jax.block_until_ready(grad_backbone(params)),
           "encoder": lambda: jax.block_until_ready(grad_encoder(params)),
           "loss": lambda: jax.block_until_ready(grad_loss(params, key)),
           "step": train_step}
    return interleaved_times(fns, args.iters)


def torch_side(args) -> dict:
    import torch

    from rtdetr_jax.config import RTDetrV2Config

    config = RTDetrV2Config.from_preset(args.preset)
    pixels, labels = synthetic_detection_batch(args.batch, args.size, config.num_labels)
    reference, x, targets, step = torch_train_step(args.folder, pixels, labels)
    m = reference.model
    mask = torch.ones_like(x[:, 0], dtype=torch.long)

    def backbone_maps():
        return [f for f, _ in m.backbone(x, mask)]

    def encoder_maps():
        proj = [m.encoder_input_proj[i](f) for i, f in enumerate(backbone_maps())]
        return list(m.encoder(proj).last_hidden_state)

    def projected(maps_fn):
        with torch.no_grad():
            shapes = [t.shape for t in maps_fn()]
        gen = torch.Generator().manual_seed(0)
        rs = [torch.randn(s, generator=gen) for s in shapes]

        def run():
            reference.zero_grad(set_to_none=True)
            sum((f * r).sum() for f, r in zip(maps_fn(), rs)).backward()

        return run

    def loss():
        reference.zero_grad(set_to_none=True)
        reference(pixel_values=x, labels=targets).loss.backward()

    fns = {"backbone": projected(backbone_maps), "encoder": projected(encoder_maps), "loss": loss, "step": step}
    return interleaved_times(fns, args.iters)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r18vd", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "profile_training.json"))
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.iters < 1:
        ap.error(f"--iters {args.iters}: must be at least 1")
    if args.side:
        print(json.dumps((jax_side if args.side == "jax" else torch_side)(args)))
        return {}

    from rtdetr_jax.config import RTDetrV2Config
    from rtdetr_jax.model import RTDetrV2ForObjectDetection

    folder = scratch_dir("rtdetr-profile-training-")
    RTDetrV2ForObjectDetection(RTDetrV2Config.from_preset(args.preset)).save_pretrained(folder)
    shared = ["--preset", args.preset, "--batch", str(args.batch), "--size", str(args.size),
              "--iters", str(args.iters), "--folder", folder]
    times = {side: run_json_child(__file__, ["--side", side, *shared]) for side in ("jax", "torch")}
    ours, theirs = stage_times(times["jax"]), stage_times(times["torch"])
    print(f"{args.preset}, batch {args.batch} at {args.size}x{args.size}, float32, forward + backward per stage, "
          f"medians of {args.iters}")
    print("| stage | rtdetr-jax | transformers (PyTorch) | ratio (ours / theirs) |")
    print("|---|---|---|---|")
    for k in ours:
        print(f"| {k} | {ours[k]:.3f} s | {theirs[k]:.3f} s | {ours[k] / theirs[k]:.2f} |")
    result = {"machine": machine_info(), "settings": vars(args) | {"out": None, "folder": None},
              "times_s": times, "jax_s": ours, "torch_s": theirs}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    start_like_the_cli()
    main()
