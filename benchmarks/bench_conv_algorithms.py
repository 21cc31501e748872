"""Winograd F(2x2, 3x3) (rtdetr_jax/ops/winograd.py) against XLA's direct convolution: per 3x3 stride-1
convolution shape of r18vd and of the `tiny` preset, and for the whole r18vd detector with every convolution
left to the automatic choice (ops/conv.py) or forced direct, both graphs built in one process and their calls
alternated (paired). Prints tables and writes JSON to benchmarks/results/conv_algorithms.json.

    python benchmarks/bench_conv_algorithms.py [--iters 21] [--model-iters 15] [--train-step]

`--train-step` adds the r18vd batch-4 training step (forward + loss + backward + AdamW) at 640, direct vs
automatic, with each one's first-step (compile) time; it takes several minutes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import (machine_info, our_train_step, paired_times, scratch_dir, start_like_the_cli,  # noqa: E402
                    synthetic_detection_batch, write_result)

# (batch, height, width, in, out): r18vd's stride-1 3x3 convolutions at 640 (stem, stages 1-4, the encoder's
# folded RepVGG blocks at 80/40/20), then the tiny preset's at 160 with batch 16, then r18vd's at training batch 4
SHAPES = [(1, 320, 320, 32, 32), (1, 320, 320, 32, 64), (1, 160, 160, 64, 64), (1, 80, 80, 128, 128),
          (1, 40, 40, 256, 256), (1, 20, 20, 512, 512), (1, 40, 40, 128, 128), (1, 20, 20, 128, 128),
          (16, 20, 20, 32, 64), (16, 20, 20, 64, 64), (16, 10, 10, 128, 128), (16, 5, 5, 256, 256),
          (4, 160, 160, 64, 64), (4, 80, 80, 128, 128)]


def time_shapes(iters: int) -> list[dict]:
    import jax

    from rtdetr_jax.ops.conv import uses_winograd
    from rtdetr_jax.ops.xla_conv import plain_conv2d
    from rtdetr_jax.ops.winograd import winograd_conv3x3

    direct = jax.jit(lambda x, k: plain_conv2d(x, k, 1, 1))
    winograd = jax.jit(winograd_conv3x3)
    rows = []
    for n, h, w, cin, cout in SHAPES:
        x = jax.random.normal(jax.random.PRNGKey(0), (n, h, w, cin))
        k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, cin, cout))
        for f in (direct, winograd):
            f(x, k).block_until_ready()
        t_direct, t_winograd, paired = paired_times(lambda: direct(x, k).block_until_ready(),
                                                    lambda: winograd(x, k).block_until_ready(), iters)
        gflop = 18 * n * h * w * cin * cout / 1e9
        d, wi = statistics.median(t_direct), statistics.median(t_winograd)
        rows.append({"shape": [n, h, w, cin, cout], "gflop_direct": gflop, "direct_ms": d * 1e3,
                     "winograd_ms": wi * 1e3, "speedup": d / wi, "paired_speedup": 1 / paired,
                     "direct_gflop_per_s": gflop / d, "chosen": "winograd" if uses_winograd(
                         x.shape, k.shape, x.dtype, 1, 1) else "direct"})
    return rows


def time_model(folder: str, batch: int, iters: int) -> dict:
    import jax

    from images import synthetic_batch
    from rtdetr_jax import RTDetrV2ForObjectDetection
    from rtdetr_jax.ops.conv import conv_algorithm

    model = RTDetrV2ForObjectDetection.from_pretrained(folder)
    x = synthetic_batch(batch, 640, 640, seed=1)
    forward = {}
    for name in ("direct", "auto"):
        with conv_algorithm(name):  # a fresh function per algorithm: jax caches traces per function
            forward[name] = jax.jit(lambda v, x_: model.module.apply(v, x_))
            jax.block_until_ready(forward[name](model.variables, x).logits)
    run = {name: (lambda f=f: jax.block_until_ready(f(model.variables, x).logits)) for name, f in forward.items()}
    t_direct, t_auto, paired = paired_times(run["direct"], run["auto"], iters)
    return {"batch": batch, "direct_s": statistics.median(t_direct), "auto_s": statistics.median(t_auto),
            "paired_time_ratio_auto_over_direct": paired}


def time_train_step(folder: str, iters: int) -> dict:
    import jax

    from rtdetr_jax import RTDetrV2ForObjectDetection
    from rtdetr_jax.ops.conv import conv_algorithm

    model = RTDetrV2ForObjectDetection.from_pretrained(folder)
    pixels, labels = synthetic_detection_batch(4, 640, model.config.num_labels)
    runs, first = {}, {}
    for name in ("direct", "auto"):
        steps, state, batch = our_train_step(model, pixels, labels)
        with conv_algorithm(name):
            t = time.perf_counter()
            state, _ = steps.train_step(state, *batch)
            jax.block_until_ready(state)
            first[name] = time.perf_counter() - t
        runs[name] = [steps, state, batch]

    def step(name):
        steps, state, batch = runs[name]
        runs[name][1], _ = steps.train_step(state, *batch)  # the state is donated: keep the new one
        jax.block_until_ready(runs[name][1])

    t_direct, t_auto, paired = paired_times(lambda: step("direct"), lambda: step("auto"), iters)
    return {"batch": 4, "direct_s": statistics.median(t_direct), "auto_s": statistics.median(t_auto),
            "paired_time_ratio_auto_over_direct": paired, "direct_first_step_s": first["direct"],
            "auto_first_step_s": first["auto"], "direct_times_s": t_direct, "auto_times_s": t_auto}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=21, help="alternating rounds per convolution shape")
    ap.add_argument("--model-iters", type=int, default=15, help="alternating rounds per whole-model batch size")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--train-step", action="store_true", help="also the r18vd batch-4 training step (minutes)")
    ap.add_argument("--train-iters", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "conv_algorithms.json"))
    args = ap.parse_args(argv)

    from conftest import build_reference, r18vd_config

    shapes = time_shapes(args.iters)
    print(f"3x3 stride-1 convolution, float32, median of {args.iters} alternating rounds; "
          f"{machine_info()['cpus']} cpus")
    print(f"{'(batch, H, W, in, out)':>26}{'GFLOP':>7}{'direct ms':>11}{'winograd ms':>13}{'speed-up':>10}"
          f"{'paired':>8}  chosen")
    for r in shapes:
        print(f"{str(tuple(r['shape'])):>26}{r['gflop_direct']:>7.2f}{r['direct_ms']:>11.2f}{r['winograd_ms']:>13.2f}"
              f"{r['speedup']:>10.2f}{r['paired_speedup']:>8.2f}  {r['chosen']}")

    folder = scratch_dir("rtdetr-conv-")
    build_reference(folder, r18vd_config(), seed=0)
    models = [time_model(folder, b, args.model_iters) for b in args.batches]
    print(f"r18vd forward at 640, every convolution direct vs the automatic choice, median of {args.model_iters}")
    for r in models:
        print(f"batch {r['batch']}: direct {r['direct_s']:.3f} s, automatic {r['auto_s']:.3f} s, "
              f"ratio {r['auto_s'] / r['direct_s']:.3f} (paired {r['paired_time_ratio_auto_over_direct']:.3f})")
    result = {"shapes": shapes, "model_forward": models, "machine": machine_info()}
    if args.train_step:
        train = time_train_step(folder, args.train_iters)
        result["train_step"] = train
        print(f"r18vd train step, batch 4 at 640: direct {train['direct_s']:.3f} s, automatic {train['auto_s']:.3f} "
              f"s, ratio {train['auto_s'] / train['direct_s']:.3f} (paired "
              f"{train['paired_time_ratio_auto_over_direct']:.3f}); first step {train['direct_first_step_s']:.1f} "
              f"s vs {train['auto_first_step_s']:.1f} s")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    start_like_the_cli()
    main()
