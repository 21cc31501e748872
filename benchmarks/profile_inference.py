"""Where inference time goes, for both implementations: backbone, encoder (input projections + hybrid encoder),
and the rest (decoder input projections, query selection, decoder, heads), plus post-processing.

Each stage is timed cumulatively (backbone; backbone + encoder; whole forward) as separately jit-compiled
functions for JAX and as the same sub-modules called eagerly for PyTorch; a stage's time is the difference.

    python benchmarks/profile_inference.py [--batch 1] [--size 640] [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import machine_info, scratch_dir, median_time, start_like_the_cli, write_result  # noqa: E402


def jax_stages(model, pixels, iters: int) -> dict:
    import jax
    import jax.numpy as jnp

    from rtdetr_jax.modeling.detector import RTDetrV2Model

    variables = {"params": model.variables["params"]["model"], "batch_stats": model.variables["batch_stats"]["model"]}
    detector = RTDetrV2Model(model.config, model.dtype)

    def backbone(x):
        return detector.apply(variables, x, method=RTDetrV2Model.backbone_features)

    def encoder(x):
        return detector.apply(variables, x, method=RTDetrV2Model.encode)

    x = jnp.asarray(pixels)
    run = lambda f: (lambda: jax.block_until_ready(f(x)))  # noqa: E731
    t_backbone = median_time(run(jax.jit(backbone)), iters)
    t_encoder = median_time(run(jax.jit(encoder)), iters)
    t_full = median_time(lambda: jax.block_until_ready(model(pixel_values=pixels).logits), iters)
    return {"backbone": t_backbone, "encoder": t_encoder - t_backbone, "decoder and heads": t_full - t_encoder,
            "forward": t_full}


def torch_stages(reference, pixels, iters: int) -> dict:
    import torch

    x = torch.from_numpy(pixels)
    m = reference.model

    def backbone():
        return m.backbone(x, torch.ones_like(x[:, 0], dtype=torch.long))

    def encoder():
        features = backbone()
        proj = [m.encoder_input_proj[i](f) for i, (f, _) in enumerate(features)]
        return m.encoder(proj)

    with torch.no_grad():
        t_backbone = median_time(backbone, iters)
        t_encoder = median_time(encoder, iters)
        t_full = median_time(lambda: reference(pixel_values=x), iters)
    return {"backbone": t_backbone, "encoder": t_encoder - t_backbone, "decoder and heads": t_full - t_encoder,
            "forward": t_full}


def postprocess_times(model, reference, pixels, iters: int) -> dict:
    import torch
    from transformers import RTDetrImageProcessor as TorchProcessor

    from rtdetr_jax import RTDetrImageProcessor

    sizes = [(pixels.shape[2], pixels.shape[3])] * pixels.shape[0]
    ours = model(pixel_values=pixels)
    with torch.no_grad():
        theirs = reference(pixel_values=torch.from_numpy(pixels))
    jp, tp = RTDetrImageProcessor(), TorchProcessor()
    return {
        "jax": median_time(lambda: jp.post_process_object_detection(ours, threshold=0.5, target_sizes=sizes), iters),
        "torch": median_time(lambda: tp.post_process_object_detection(theirs, threshold=0.5, target_sizes=sizes),
                             iters),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "profile_inference.json"))
    args = ap.parse_args(argv)

    from conftest import build_reference, r18vd_config
    from images import synthetic_batch

    from rtdetr_jax import RTDetrV2ForObjectDetection

    folder = scratch_dir("rtdetr-profile-")
    reference = build_reference(folder, r18vd_config(), seed=0)
    model = RTDetrV2ForObjectDetection.from_pretrained(folder)
    pixels = synthetic_batch(args.batch, args.size, args.size, seed=1)

    ours = jax_stages(model, pixels, args.iters)
    theirs = torch_stages(reference, pixels, args.iters)
    post = postprocess_times(model, reference, pixels, args.iters)
    print(f"r18vd, {args.batch}x3x{args.size}x{args.size}, float32, median of {args.iters}")
    print(f"{'stage':22}{'rtdetr-jax [s]':>16}{'transformers [s]':>18}{'ratio':>8}")
    for k in ours:
        print(f"{k:22}{ours[k]:>16.3f}{theirs[k]:>18.3f}{ours[k] / theirs[k]:>8.2f}")
    print(f"{'post-processing':22}{post['jax']:>16.4f}{post['torch']:>18.4f}{post['jax'] / post['torch']:>8.2f}")
    result = {"machine": machine_info(), "settings": vars(args) | {"out": None}, "jax_s": ours, "torch_s": theirs,
              "postprocess_s": post}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    start_like_the_cli()
    main()
