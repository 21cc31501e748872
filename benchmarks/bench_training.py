"""Training throughput side by side: our jit train step vs transformers' PyTorch forward + loss + backward + AdamW
step, same weights, same batch, same targets, same machine, one run. The two sides' steps alternate (ours,
PyTorch, PyTorch, ours, ...) so that the shared machine's drifting speed hits both alike.

    python benchmarks/bench_training.py                         # r18vd, batch 4 at 640x640 (the issue's setting)
    python benchmarks/bench_training.py --size 320 --batch 2    # quicker

Both sides train in float32 with denoising on and the same optimizer settings. Prints a table and writes JSON to
benchmarks/results/training.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import (  # noqa: E402
    machine_info,
    our_train_step,
    paired_times,
    start_like_the_cli,
    synthetic_detection_batch,
    write_result,
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r18vd")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "training.json"))
    args = ap.parse_args(argv)

    import jax
    import torch
    from transformers import RTDetrV2ForObjectDetection as HF

    from rtdetr_jax.config import RTDetrV2Config
    from rtdetr_jax.model import RTDetrV2ForObjectDetection

    config = RTDetrV2Config.from_preset(args.preset)
    pixels, labels = synthetic_detection_batch(args.batch, args.size, config.num_labels)

    with tempfile.TemporaryDirectory() as folder:
        RTDetrV2ForObjectDetection(config).save_pretrained(folder)
        torch.manual_seed(0)
        reference = HF.from_pretrained(folder).train()
        ours = RTDetrV2ForObjectDetection.from_pretrained(folder)

    # PyTorch: forward + loss + backward + AdamW
    opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    x = torch.from_numpy(pixels)
    tl = [{"class_labels": torch.as_tensor(t["class_labels"]), "boxes": torch.as_tensor(t["boxes"]).float()}
          for t in labels]

    def torch_step():
        opt.zero_grad()
        loss = reference(pixel_values=x, labels=tl).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        opt.step()

    steps, state, batch = our_train_step(ours, pixels, labels)
    t = time.perf_counter()
    state, metrics = steps.train_step(state, *batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t

    def jax_step():
        nonlocal state
        new_state, new_metrics = steps.train_step(state, *batch)
        jax.block_until_ready(new_metrics)
        state = new_state

    torch_step()  # warm-up
    jax_times, torch_times, paired = paired_times(jax_step, torch_step, args.iters)

    tj, tt = statistics.median(jax_times), statistics.median(torch_times)
    result = {
        "machine": machine_info(),
        "settings": vars(args) | {"out": None},
        "jax_step_s": tj, "torch_step_s": tt,
        "jax_images_per_s": args.batch / tj, "torch_images_per_s": args.batch / tt,
        "throughput_ratio": tt / tj, "paired_throughput_ratio": paired, "jax_first_step_s": compile_s,
        "jax_step_times_s": jax_times, "torch_step_times_s": torch_times,
    }
    print(f"| {args.preset} batch {args.batch} at {args.size} | rtdetr-jax | transformers (PyTorch) |")
    print("|---|---|---|")
    print(f"| step (median of {args.iters}) | {tj:.3f} s | {tt:.3f} s |")
    print(f"| images/s | {args.batch / tj:.2f} | {args.batch / tt:.2f} |")
    print(f"| first step (compile) | {compile_s:.1f} s | - |")
    print(f"throughput ratio (ours / PyTorch): {tt / tj:.2f} from the medians, {paired:.2f} paired (median over "
          f"rounds of PyTorch's step / ours, the two timed alternately)")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    start_like_the_cli()
    main()
