"""Side-by-side inference: our jit forward vs transformers' eager PyTorch forward, same weights, same input.

Builds r18vd with seeded random weights in transformers (no Hub access needed), saves it, loads it through
`RTDetrV2ForObjectDetection.from_pretrained`, then times both on the same (batch, 3, 640, 640) input.
Prints a table and writes JSON to benchmarks/results/inference.json.

    python benchmarks/bench_inference.py [--batch 1] [--iters 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()

    import jax
    import torch
    from conftest import build_reference, r18vd_config
    from images import synthetic_batch

    from rtdetr_jax import RTDetrImageProcessor, RTDetrV2ForObjectDetection

    folder = tempfile.mkdtemp(prefix="rtdetr-bench-")
    reference = build_reference(folder, r18vd_config(), seed=0)
    pixels = synthetic_batch(args.batch, 640, 640, seed=1)
    x_torch = torch.from_numpy(pixels)

    with torch.no_grad():
        reference(pixel_values=x_torch)  # warm-up
        torch_times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            reference(pixel_values=x_torch)
            torch_times.append(time.perf_counter() - t)
    rss_after_torch = rss_mb()

    model = RTDetrV2ForObjectDetection.from_pretrained(folder)
    t = time.perf_counter()
    jax.block_until_ready(model(pixel_values=pixels).logits)
    compile_s = time.perf_counter() - t
    jax_times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        jax.block_until_ready(model(pixel_values=pixels).logits)
        jax_times.append(time.perf_counter() - t)

    out = model(pixel_values=pixels)
    detections = RTDetrImageProcessor().post_process_object_detection(out, threshold=0.5,
                                                                      target_sizes=[(640, 640)] * args.batch)
    ours, theirs = statistics.median(jax_times), statistics.median(torch_times)
    result = {
        "model": "r18vd (random weights)", "input": [args.batch, 3, 640, 640], "iters": args.iters,
        "jax_median_s": ours, "torch_median_s": theirs, "ratio_jax_over_torch": ours / theirs,
        "jax_first_call_s (compile + run)": compile_s, "peak_rss_mb_after_torch": rss_after_torch,
        "peak_rss_mb_end": rss_mb(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus", "jax": jax.__version__, "torch": torch.__version__,
        "detections_above_0.5_image0": int(len(detections[0]["scores"])),
    }
    print(f"{'':28}{'rtdetr-jax (jit)':>18}{'transformers (eager)':>22}")
    print(f"{'median latency [s]':28}{ours:>18.3f}{theirs:>22.3f}")
    print(f"ratio jax/torch: {ours / theirs:.2f}   first call (compile): {compile_s:.1f} s   "
          f"peak RSS: {rss_after_torch:.0f} MB after torch, {rss_mb():.0f} MB at end")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "inference.json"), "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
