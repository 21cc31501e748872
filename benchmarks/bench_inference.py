"""Side-by-side inference: our jit forward vs transformers' eager PyTorch forward, same weights, same input.

Builds r18vd with seeded random weights in transformers (no Hub access needed), saves it, loads it through
`RTDetrV2ForObjectDetection.from_pretrained`, then for each batch size times both on the same
(batch, 3, 640, 640) input (median latency, images/s), and measures each one's peak inference memory in a fresh
child process. The two sides' forwards alternate (ours, PyTorch, PyTorch, ours, ...) so that a shared machine's
drifting speed hits both alike; "paired" is the median over rounds of our time / PyTorch's. Prints a table and
writes JSON to benchmarks/results/inference.json.

    python benchmarks/bench_inference.py [--batches 1 8] [--iters 10]

Peak inference memory: in a child process that has loaded the model and run one warm-up forward (which compiles,
for jax), the kernel's resident-set high-water mark is reset (/proc/self/clear_refs), `--iters` forwards run, and
the figure is the new high-water mark minus the resident set before them: the memory the forward itself needs
on top of the loaded model and libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import (machine_info, paired_query_differences, paired_times, run_json_child, scratch_dir,  # noqa: E402
                    start_like_the_cli, write_result)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(framework: str, folder: str, batch: int, iters: int) -> None:
    """Runs in a fresh process: prints JSON {baseline_mb, peak_mb, forward_peak_mb, load_and_first_call_peak_mb}."""
    from images import synthetic_batch

    pixels = synthetic_batch(batch, 640, 640, seed=1)
    if framework == "torch":
        import torch
        from transformers import RTDetrV2ForObjectDetection as TorchModel

        model = TorchModel.from_pretrained(folder).eval()
        x = torch.from_numpy(pixels)

        def forward():
            with torch.no_grad():
                return model(pixel_values=x).logits
    else:
        import jax

        from rtdetr_jax import RTDetrV2ForObjectDetection

        model = RTDetrV2ForObjectDetection.from_pretrained(folder)

        def forward():
            return jax.block_until_ready(model(pixel_values=pixels).logits)

    out = forward()
    del out
    load_and_compile_peak = _proc_status_kb("VmHWM")  # loading, the first call (compiling, for jax)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the resident-set high-water mark
    baseline = _proc_status_kb("VmRSS")
    for _ in range(iters):
        out = forward()
        del out
    peak = _proc_status_kb("VmHWM")
    print(json.dumps({"baseline_mb": baseline / 1024, "peak_mb": peak / 1024,
                      "forward_peak_mb": (peak - baseline) / 1024,
                      "load_and_first_call_peak_mb": load_and_compile_peak / 1024}))


def measure_memory(framework: str, folder: str, batch: int, iters: int) -> dict:
    args = ["--memory-child", framework, "--folder", folder, "--batches", str(batch), "--iters", str(iters)]
    try:
        return run_json_child(__file__, args)
    except RuntimeError as err:
        raise RuntimeError(f"memory child for {framework} failed: {err}") from None


def compare_outputs(ours, theirs, num_queries: int) -> dict:
    """Max |difference| of (boxes, logits) between the two outputs, queries paired one-to-one per image (the
    decoder's query order follows the encoder's top-k, which float noise may reorder among near-tied scores).
    Images whose k-th and (k+1)-th encoder scores are closer than 1e-4 select different queries, so they are
    counted, not compared."""
    worst, ties = 0.0, 0
    for i in range(ours.logits.shape[0]):
        scores = np.sort(np.asarray(ours.enc_outputs_class[i]).max(-1))[::-1]
        if scores[num_queries - 1] - scores[num_queries] < 1e-4:
            ties += 1
            continue
        a = np.concatenate([np.asarray(ours.pred_boxes[i]), np.asarray(ours.logits[i])], -1)
        b = np.concatenate([theirs.pred_boxes[i].numpy(), theirs.logits[i].numpy()], -1)
        worst = max(worst, float(paired_query_differences(a, b)[0].max()))
    return {"max_abs_diff_boxes_logits_query_matched": worst, "images_with_topk_ties_not_compared": ties}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--memory-child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "inference.json"))
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.folder, args.batches[0], args.iters)
        return {}

    import jax
    import torch
    from conftest import build_reference, r18vd_config
    from images import synthetic_batch

    from rtdetr_jax import RTDetrImageProcessor, RTDetrV2ForObjectDetection

    folder = scratch_dir("rtdetr-bench-")
    reference = build_reference(folder, r18vd_config(), seed=0)
    model = RTDetrV2ForObjectDetection.from_pretrained(folder)
    rows = []
    for batch in args.batches:
        pixels = synthetic_batch(batch, 640, 640, seed=1)
        x_torch = torch.from_numpy(pixels)
        with torch.no_grad():
            reference(pixel_values=x_torch)  # warm-up
        t = time.perf_counter()
        out = model(pixel_values=pixels)
        jax.block_until_ready(out.logits)
        first_call = time.perf_counter() - t

        def torch_forward():
            with torch.no_grad():
                reference(pixel_values=x_torch)

        torch_times, jax_times, paired = paired_times(
            torch_forward, lambda: jax.block_until_ready(model(pixel_values=pixels).logits), args.iters)
        ours, theirs = statistics.median(jax_times), statistics.median(torch_times)
        with torch.no_grad():
            expected = reference(pixel_values=x_torch)
        agreement = compare_outputs(out, expected, reference.config.num_queries)
        row = {"batch": batch, "jax_median_s": ours, "torch_median_s": theirs,
               "time_ratio_jax_over_torch": ours / theirs, "paired_time_ratio_jax_over_torch": paired,
               "jax_images_per_s": batch / ours, "torch_images_per_s": batch / theirs,
               "throughput_ratio_jax_over_torch": theirs / ours,
               "jax_times_s": jax_times, "torch_times_s": torch_times, "jax_first_call_s": first_call,
               **agreement}
        if not args.no_memory:
            row["jax_memory"] = measure_memory("jax", folder, batch, 3)
            row["torch_memory"] = measure_memory("torch", folder, batch, 3)
        rows.append(row)
    detections = RTDetrImageProcessor().post_process_object_detection(out, threshold=0.5,
                                                                      target_sizes=[(640, 640)] * args.batches[-1])
    result = {"model": "r18vd (random weights)", "input": "(batch, 3, 640, 640) float32", "iters": args.iters,
              "rows": rows, "machine": machine_info(), "jax": jax.__version__, "torch": torch.__version__,
              "detections_above_0.5_image0": int(len(detections[0]["scores"]))}

    print(f"r18vd, 640x640, float32, median of {args.iters} (the two sides timed alternately); "
          f"{machine_info()['cpus']} cpus")
    print(f"{'batch':>5}{'jax [s]':>10}{'torch [s]':>11}{'jax/torch':>11}{'paired':>8}{'jax img/s':>11}"
          f"{'torch img/s':>13}{'first call [s]':>16}{'jax mem [MB]':>14}{'torch mem [MB]':>16}")
    for r in rows:
        mem = ("", "") if args.no_memory else (f"{r['jax_memory']['forward_peak_mb']:.0f}",
                                               f"{r['torch_memory']['forward_peak_mb']:.0f}")
        print(f"{r['batch']:>5}{r['jax_median_s']:>10.3f}{r['torch_median_s']:>11.3f}"
              f"{r['time_ratio_jax_over_torch']:>11.2f}{r['paired_time_ratio_jax_over_torch']:>8.2f}"
              f"{r['jax_images_per_s']:>11.2f}{r['torch_images_per_s']:>13.2f}"
              f"{r['jax_first_call_s']:>16.1f}{mem[0]:>14}{mem[1]:>16}")
    if not args.no_memory:
        print("memory [MB], each side in a fresh process: resident after load and first call / forward peak on "
              "top / process peak while forwarding / process peak while loading and compiling")
        for r in rows:
            for side in ("jax", "torch"):
                m = r[f"{side}_memory"]
                print(f"{r['batch']:>5} {side:>6}{m['baseline_mb']:>8.0f}{m['forward_peak_mb']:>8.0f}"
                      f"{m['peak_mb']:>8.0f}{m['load_and_first_call_peak_mb']:>8.0f}")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    start_like_the_cli()
    main()
