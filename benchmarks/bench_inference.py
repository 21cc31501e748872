"""Side-by-side inference: our jit forward vs transformers' eager PyTorch forward, same weights, same input.

Builds r18vd with seeded random weights in transformers (no Hub access needed) and saves it; for each batch size,
one worker process per side (`common.Worker`) loads it (ours through `RTDetrV2ForObjectDetection.from_pretrained`)
and runs one first forward (which compiles, for jax) on the same (batch, 3, 640, 640) input. The parent then
alternates blocks of `--block` consecutive forwards (ours, PyTorch, PyTorch, ours, ...) for `--rounds` rounds, so
that a shared machine's drifting speed hits both alike, and times the forwards after the first of each block
(median latency, images/s); "paired" is the median over rounds of our block mean / PyTorch's.

Each side runs on its own malloc: ours on the one the `rtdetr-jax` command line starts with
(rtdetr_jax/host_memory.py: tcmalloc where it is installed, else glibc malloc on transparent huge pages;
`RTDETR_JAX_MALLOC` chooses another), PyTorch's on `--torch-malloc`: `tcmalloc` (the default; where it is not
installed, glibc's huge pages), PyTorch's fastest measured here (its batch-8 forward 4.6-5.6 s on tcmalloc, 7.0 s
on glibc's huge pages, 8.1-8.2 s on glibc's defaults), `glibc` (huge pages) or `off` (glibc's defaults, as a plain
`python` starts it). Prints a table and writes JSON to benchmarks/results/inference.json.

    python benchmarks/bench_inference.py [--batches 1 8] [--rounds 5] [--block 3] [--torch-malloc tcmalloc]

Peak inference memory: in a fresh child process per side, on that side's malloc, that has loaded the model and run
one warm-up forward (which compiles, for jax), the kernel's resident-set high-water mark is reset
(/proc/self/clear_refs), `--memory-iters` forwards run, and the figures are the new high-water mark (the process
peak while forwarding) and that minus the resident set before them (the memory the forward itself needs on top of
the loaded model and libraries).
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
sys.path.insert(0, os.path.join(HERE, ".."))

from common import (machine_info, paired_query_differences, paired_ratio, run_json_child, scratch_dir,  # noqa: E402
                    serve_worker, side_by_side, steady_state, write_result)

TORCH_MALLOCS = ("tcmalloc", "glibc", "off")


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def side_env(side: str, torch_malloc: str) -> dict[str, str | None]:
    """The malloc variables for one side's processes (module docstring): ours as the command line starts (the
    user's `RTDETR_JAX_MALLOC` respected), PyTorch's as `torch_malloc` says. None unsets a variable."""
    from rtdetr_jax.host_memory import MARKER, SWITCH, malloc_env

    if side == "jax":
        return {**malloc_env(), MARKER: "1"}
    if torch_malloc == "off":  # glibc's defaults: nothing of ours, whatever this process runs on
        return {"LD_PRELOAD": None, "GLIBC_TUNABLES": None, SWITCH: "off", MARKER: "1"}
    clean = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", "GLIBC_TUNABLES", MARKER)}
    switch = "on" if torch_malloc == "tcmalloc" else "glibc"  # on: tcmalloc where found, else glibc's huge pages
    added = malloc_env({**clean, SWITCH: switch})
    return {"LD_PRELOAD": None, "GLIBC_TUNABLES": None, **added, SWITCH: switch, MARKER: "1"}


def load_forward(framework: str, folder: str, pixels: np.ndarray):
    """A forward of `framework`'s model loaded from `folder` on `pixels`, returning its outputs as numpy arrays
    (logits, pred_boxes, and for ours enc_outputs_class)."""
    if framework == "torch":
        import torch
        from transformers import RTDetrV2ForObjectDetection as TorchModel

        model = TorchModel.from_pretrained(folder).eval()
        x = torch.from_numpy(pixels)

        def forward():
            with torch.no_grad():
                out = model(pixel_values=x)
            return {"logits": out.logits.numpy(), "pred_boxes": out.pred_boxes.numpy()}
    else:
        import jax

        from rtdetr_jax import RTDetrV2ForObjectDetection

        model = RTDetrV2ForObjectDetection.from_pretrained(folder)

        def forward():
            out = model(pixel_values=pixels)
            jax.block_until_ready(out.logits)
            return {"logits": np.asarray(out.logits), "pred_boxes": np.asarray(out.pred_boxes),
                    "enc_outputs_class": np.asarray(out.enc_outputs_class)}
    return forward


def memory_child(framework: str, folder: str, batch: int, iters: int) -> None:
    """Runs in a fresh process: prints JSON {baseline_mb, peak_mb, forward_peak_mb, load_and_first_call_peak_mb}."""
    from images import synthetic_batch

    forward = load_forward(framework, folder, synthetic_batch(batch, 640, 640, seed=1))
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


def measure_memory(framework: str, folder: str, batch: int, iters: int, env: dict) -> dict:
    args = ["--memory-child", framework, "--folder", folder, "--batches", str(batch), "--memory-iters", str(iters)]
    try:
        return run_json_child(__file__, args, env)
    except RuntimeError as err:
        raise RuntimeError(f"memory child for {framework} failed: {err}") from None


def serve_side(framework: str, folder: str, batch: int) -> None:
    """The worker process of one side: loads the model, runs and times the first forward, saves its outputs to
    `folder`/outputs-{framework}-{batch}.npz for the parent to compare, then serves timed forwards."""
    def setup():
        from images import synthetic_batch

        forward = load_forward(framework, folder, synthetic_batch(batch, 640, 640, seed=1))
        t = time.perf_counter()
        outputs = forward()
        first_call = time.perf_counter() - t
        np.savez(os.path.join(folder, f"outputs-{framework}-{batch}.npz"), **outputs)
        info = {"first_call_s": first_call, "ld_preload": os.environ.get("LD_PRELOAD", ""),
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
        if framework == "jax":
            info["machine"] = machine_info()
        else:
            import torch

            info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        return forward, info

    serve_worker(setup)


def compare_outputs(ours: dict, theirs: dict, num_queries: int) -> dict:
    """Max |difference| of (boxes, logits) between the two outputs, queries paired one-to-one per image (the
    decoder's query order follows the encoder's top-k, which float noise may reorder among near-tied scores).
    Images whose k-th and (k+1)-th encoder scores are closer than 1e-4 select different queries, so they are
    counted, not compared."""
    worst, ties = 0.0, 0
    for i in range(ours["logits"].shape[0]):
        scores = np.sort(ours["enc_outputs_class"][i].max(-1))[::-1]
        if scores[num_queries - 1] - scores[num_queries] < 1e-4:
            ties += 1
            continue
        a = np.concatenate([ours["pred_boxes"][i], ours["logits"][i]], -1)
        b = np.concatenate([theirs["pred_boxes"][i], theirs["logits"][i]], -1)
        worst = max(worst, float(paired_query_differences(a, b)[0].max()))
    return {"max_abs_diff_boxes_logits_query_matched": worst, "images_with_topk_ties_not_compared": ties}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --block forwards per side")
    parser.add_argument("--block", type=int, default=3,
                        help="consecutive forwards per side in a round, the first untimed (at least 2)")
    parser.add_argument("--torch-malloc", choices=TORCH_MALLOCS, default="tcmalloc",
                        help="PyTorch's malloc (module docstring); ours is the command line's")
    parser.add_argument("--memory-iters", type=int, default=3, help="forwards per memory child")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--memory-child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "inference.json"))
    args = parser.parse_args(argv)
    for name, value in (("--batches", min(args.batches)), ("--rounds", args.rounds),
                        ("--memory-iters", args.memory_iters)):
        if value < 1:
            parser.error(f"{name} {value}: at least 1")
    if args.block < 2:
        parser.error(f"--block {args.block}: at least 2 (the first forward of a block follows the other side's)")
    if args.memory_child:
        memory_child(args.memory_child, args.folder, args.batches[0], args.memory_iters)
        return {}
    if args.worker:
        serve_side(args.worker, args.folder, args.batches[0])
        return {}

    from conftest import build_reference, r18vd_config

    folder = scratch_dir("rtdetr-bench-")
    num_queries = build_reference(folder, r18vd_config(), seed=0).config.num_queries
    envs = {side: side_env(side, args.torch_malloc) for side in ("jax", "torch")}
    rows, ready = [], {}
    for batch in args.batches:
        rounds, ours, theirs = side_by_side(__file__, ["--folder", folder, "--batches", str(batch)], args.rounds,
                                            args.block, envs)
        ready = {"jax": ours.ready, "torch": theirs.ready}
        jax_times, torch_times = steady_state(rounds, "jax"), steady_state(rounds, "torch")
        paired = paired_ratio(rounds, "jax", "torch")
        ours_out, theirs_out = (dict(np.load(os.path.join(folder, f"outputs-{side}-{batch}.npz")))
                                for side in ("jax", "torch"))
        ours_s, theirs_s = statistics.median(jax_times), statistics.median(torch_times)
        row = {"batch": batch, "jax_median_s": ours_s, "torch_median_s": theirs_s,
               "time_ratio_jax_over_torch": ours_s / theirs_s, "paired_time_ratio_jax_over_torch": paired,
               "jax_images_per_s": batch / ours_s, "torch_images_per_s": batch / theirs_s,
               "throughput_ratio_jax_over_torch": theirs_s / ours_s, "rounds": rounds,
               "jax_first_call_s": ours.ready["first_call_s"], "torch_first_call_s": theirs.ready["first_call_s"],
               **compare_outputs(ours_out, theirs_out, num_queries)}
        if not args.no_memory:
            row["jax_memory"] = measure_memory("jax", folder, batch, args.memory_iters, envs["jax"])
            row["torch_memory"] = measure_memory("torch", folder, batch, args.memory_iters, envs["torch"])
        rows.append(row)
    result = {"model": "r18vd (random weights)", "input": "(batch, 3, 640, 640) float32",
              "settings": vars(args) | {"out": None, "processes": "one per framework and batch"},
              "rows": rows, "machine": ready["jax"]["machine"],
              "malloc": {side: {k: ready[side][k] for k in ("ld_preload", "glibc_tunables")} for side in ready},
              "torch": ready["torch"]["torch"], "torch_threads": ready["torch"]["torch_threads"]}

    n = args.rounds * (args.block - 1)
    print(f"r18vd, 640x640, float32, median of {n} forwards per side (blocks of {args.block} alternated, the first "
          f"of each untimed); {result['machine']['cpus']} cpus")
    for side in ("jax", "torch"):
        m = result["malloc"][side]
        tunables = f" {m['glibc_tunables']}" if m["glibc_tunables"] else ""
        print(f"  {side} malloc: {m['ld_preload'] or 'glibc'}{tunables}")
    print(f"{'batch':>5}{'jax [s]':>10}{'torch [s]':>11}{'jax/torch':>11}{'paired':>8}{'jax img/s':>11}"
          f"{'torch img/s':>13}{'first call [s]':>16}{'max |diff|':>12}")
    for r in rows:
        print(f"{r['batch']:>5}{r['jax_median_s']:>10.3f}{r['torch_median_s']:>11.3f}"
              f"{r['time_ratio_jax_over_torch']:>11.2f}{r['paired_time_ratio_jax_over_torch']:>8.2f}"
              f"{r['jax_images_per_s']:>11.2f}{r['torch_images_per_s']:>13.2f}"
              f"{r['jax_first_call_s']:>16.1f}{r['max_abs_diff_boxes_logits_query_matched']:>12.2e}")
    if not args.no_memory:
        print("memory [MB], each side in a fresh process on its malloc: resident after load and first call / "
              "forward peak on top / process peak while forwarding / process peak while loading and compiling")
        for r in rows:
            for side in ("jax", "torch"):
                m = r[f"{side}_memory"]
                print(f"{r['batch']:>5} {side:>6}{m['baseline_mb']:>8.0f}{m['forward_peak_mb']:>8.0f}"
                      f"{m['peak_mb']:>8.0f}{m['load_and_first_call_peak_mb']:>8.0f}")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()  # no re-execution: each side's processes get their own malloc (side_env)
