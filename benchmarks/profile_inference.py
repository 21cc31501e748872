"""Where inference time goes, for both implementations: backbone, encoder (input projections + hybrid encoder),
and the rest (decoder input projections, query selection, decoder, heads), plus post-processing.

Each stage is timed cumulatively: the backbone, backbone + encoder, and the whole forward, as separately
jit-compiled functions for JAX (the detector's own `method=` entry points, so the profile cannot drift from the
model) and as the same sub-modules called eagerly for PyTorch. A stage's time is the median over rounds of its
call's time less the call before it in the same round (`common.stage_medians`). Each side runs in a process of its
own, its calls interleaved round by round (`common.interleaved_times`), post-processing among them
(`post_process_object_detection`, threshold 0.5, on that side's forward output). The weights are seeded random
ones made as the parity tests make theirs (`common.build_checkpoint`).

    python benchmarks/profile_inference.py [--preset r18vd] [--batch 1] [--size 640] [--iters 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import (build_checkpoint, interleaved_times, machine_info, run_json_child, scratch_dir,  # noqa: E402
                    stage_medians, start_like_the_cli, write_result)
from rtdetr_jax.config import PRESETS  # noqa: E402

STAGES = ("backbone", "encoder", "decoder and heads")
CUMULATIVE = dict(zip(STAGES, ("backbone", "encoder", "forward")))  # stage -> the call that ends with it


def jax_calls(folder: str, pixels) -> dict:
    import jax
    import jax.numpy as jnp

    from rtdetr_jax import RTDetrImageProcessor, RTDetrV2ForObjectDetection
    from rtdetr_jax.modeling.detector import RTDetrV2Model

    model = RTDetrV2ForObjectDetection.from_pretrained(folder)
    variables = {"params": model.variables["params"]["model"], "batch_stats": model.variables["batch_stats"]["model"]}
    detector = RTDetrV2Model(model.config, model.dtype)
    backbone = jax.jit(lambda x: detector.apply(variables, x, method=RTDetrV2Model.backbone_features))
    encoder = jax.jit(lambda x: detector.apply(variables, x, method=RTDetrV2Model.encode))
    x = jnp.asarray(pixels)
    outputs = model(pixel_values=pixels)
    processor, sizes = RTDetrImageProcessor(), [pixels.shape[2:]] * pixels.shape[0]
    return {"backbone": lambda: jax.block_until_ready(backbone(x)),
            "encoder": lambda: jax.block_until_ready(encoder(x)),
            # as users call it: numpy pixels in, the model's jit forward
            "forward": lambda: jax.block_until_ready(model(pixel_values=pixels).logits),
            "post-processing": lambda: processor.post_process_object_detection(outputs, threshold=0.5,
                                                                               target_sizes=sizes)}


def torch_calls(folder: str, pixels) -> dict:
    import torch
    from transformers import RTDetrImageProcessor as TorchProcessor
    from transformers import RTDetrV2ForObjectDetection as TorchModel

    reference = TorchModel.from_pretrained(folder).eval()
    m = reference.model
    x = torch.from_numpy(pixels)
    mask = torch.ones_like(x[:, 0], dtype=torch.long)
    no_grad = torch.no_grad()  # as a decorator: each call runs without autograd

    def backbone():
        return m.backbone(x, mask)

    def encoder():
        proj = [m.encoder_input_proj[i](f) for i, (f, _) in enumerate(backbone())]
        return m.encoder(proj)

    outputs = no_grad(lambda: reference(pixel_values=x))()
    processor, sizes = TorchProcessor(), [pixels.shape[2:]] * pixels.shape[0]
    return {"backbone": no_grad(backbone), "encoder": no_grad(encoder),
            "forward": no_grad(lambda: reference(pixel_values=x)),
            "post-processing": lambda: processor.post_process_object_detection(outputs, threshold=0.5,
                                                                               target_sizes=sizes)}


def side_times(side: str, folder: str, batch: int, size: int, iters: int) -> dict[str, list[float]]:
    """One side's calls' times, round by round (run in a process of its own)."""
    from images import synthetic_batch

    pixels = synthetic_batch(batch, size, size, seed=1)
    calls = (jax_calls if side == "jax" else torch_calls)(folder, pixels)
    return interleaved_times(calls, iters)


def stage_times(times: dict[str, list[float]]) -> dict[str, float]:
    """One side's per-round call times -> each stage's median time, the whole forward's and post-processing's."""
    return stage_medians(times, CUMULATIVE) | {"forward": statistics.median(times["forward"]),
                                                "post-processing": statistics.median(times["post-processing"])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r18vd", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "profile_inference.json"))
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.iters < 1:
        ap.error(f"--iters {args.iters}: must be at least 1")
    if args.side:
        print(json.dumps(side_times(args.side, args.folder, args.batch, args.size, args.iters)))
        return {}

    folder = scratch_dir("rtdetr-profile-")
    build_checkpoint(folder, args.preset)
    shared = ["--batch", str(args.batch), "--size", str(args.size), "--iters", str(args.iters), "--folder", folder]
    times = {side: run_json_child(__file__, ["--side", side, *shared]) for side in ("jax", "torch")}
    ours, theirs = stage_times(times["jax"]), stage_times(times["torch"])
    print(f"{args.preset}, {args.batch}x3x{args.size}x{args.size}, float32, medians of {args.iters}")
    print("| stage | rtdetr-jax | transformers (PyTorch) | ratio (ours / theirs) |")
    print("|---|---|---|---|")
    for k in ours:
        digits = 4 if k == "post-processing" else 3
        print(f"| {k} | {ours[k]:.{digits}f} s | {theirs[k]:.{digits}f} s | {ours[k] / theirs[k]:.2f} |")
    result = {"machine": machine_info(), "settings": vars(args) | {"out": None, "folder": None},
              "times_s": times, "jax_s": ours, "torch_s": theirs}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    start_like_the_cli()
    main()
