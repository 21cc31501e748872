"""The accelerator rows of issue 5: our jit forward against transformers' PyTorch forward, eager and
`torch.compile`, on one GPU (or any jax/torch device pair), per preset, dtype and batch size, plus how far
bfloat16 moves each side's outputs from its own float32 ones.

    python benchmarks/bench_gpu.py                                  # r18vd, r50vd; batch 1, 32; float32, bfloat16
    python benchmarks/bench_gpu.py --batches 1 32 64 --budget-s 420 # stop starting new rows after 7 minutes
    python benchmarks/bench_gpu.py --device cpu --presets tiny --size 128 --batches 1 2 --iters 2 \\
        --torch-compile-backend eager                               # a smoke run on the CPU

What is run, per preset (random weights, made as the parity tests make theirs: transformers' seeded
initialisation, every parameter perturbed by N(0, 0.1) and the batch-norm statistics calibrated, so that queries
are not near-identical and the bfloat16 comparison is not decided by ties):

1. for each dtype and batch: our forward (`RTDetrV2ForObjectDetection.from_pretrained(..., dtype=...)`, input
   already on the device) and transformers' eager forward, timed alternately (`common.paired_times`), median of
   `--iters` after one untimed call (the first call's time, compile included, is reported);
2. then, while the budget lasts, the same rows for `torch.compile(model, dynamic=False)` (one compile per shape
   and dtype, like our jit), against the medians of step 1.

float32 means float32 arithmetic on both sides: jax's default matmul precision is set to "highest" and
PyTorch's TF32 switches off (`torch.backends.cuda.matmul.allow_tf32`, `torch.backends.cudnn.allow_tf32`), since
both frameworks would otherwise use TF32 on Ampere and later GPUs. `--dtypes tf32` measures that mode (both on).
bfloat16: ours computes in bfloat16 with float32 parameters; PyTorch runs under
`torch.autocast(dtype=torch.bfloat16)`, its usual mixed precision; what stays in float32 uses each framework's
default precision.

bfloat16 accuracy, per preset and side, at the first batch size: each output query is paired with one float32
query of the same image (Hungarian assignment on the max |difference| of (boxes, class probabilities)), and the
largest, the mean and the 99th percentile of the pairs' |difference| are reported with the share of pairs within
0.01 and 0.05, along with how many images' k-th and (k+1)-th float32 encoder scores lie closer than the bfloat16
error seen there (there the two may select different queries).

Rows are printed as they finish and the JSON (default benchmarks/results/gpu.json) is rewritten after each, so
that a run stopped by its time limit keeps what it measured. A row whose side fails (e.g. an out-of-memory batch)
records the error and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import numpy as np

# jax would otherwise take 75% of the GPU's memory at start, leaving PyTorch's side too little
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import (build_checkpoint, machine_info, paired_query_differences, paired_times, scratch_dir,  # noqa: E402
                    write_result)

DTYPES = ("float32", "tf32", "bfloat16")
DEVICES = {"gpu": "cuda", "cpu": "cpu"}  # jax platform -> torch device type


class BudgetSpent(Exception):
    pass


def set_precision(dtype: str) -> None:
    """float32 arithmetic for "float32" on both sides, TF32 for "tf32"; for "bfloat16" each framework's defaults
    (for the operations that stay in float32 there)."""
    import jax
    import torch

    precision = {"float32": "highest", "tf32": "tensorfloat32", "bfloat16": None}[dtype]
    jax.config.update("jax_default_matmul_precision", precision)
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"  # PyTorch's default: off
    torch.backends.cudnn.allow_tf32 = dtype != "float32"  # PyTorch's default: on


@contextlib.contextmanager
def _precision_restored():
    """Put back jax's default matmul precision and PyTorch's TF32 switches as they were (`set_precision` changes
    them process-wide)."""
    import jax
    import torch

    saved = (jax.config.jax_default_matmul_precision, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


def torch_forward_fn(model, x, dtype: str, device_type: str):
    """A no-grad forward of `model` on `x` (under bfloat16 autocast for "bfloat16") that waits for the device and
    returns the model's output."""
    import torch

    def forward():
        autocast = (torch.autocast(device_type=device_type, dtype=torch.bfloat16) if dtype == "bfloat16"
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            out = model(pixel_values=x)
        if device_type == "cuda":
            torch.cuda.synchronize()
        return out

    return forward


def to_numpy(out, side: str) -> dict[str, np.ndarray]:
    """pred_boxes, class probabilities and encoder scores of one side's output as float32 numpy arrays."""
    def arr(v):
        if side == "torch":
            return v.detach().float().cpu().numpy()
        return np.asarray(v, np.float32)

    logits = arr(out.logits)
    return {"boxes": arr(out.pred_boxes), "probs": 1.0 / (1.0 + np.exp(-logits)),
            "enc_scores": arr(out.enc_outputs_class).max(-1)}


def query_matched_error(reduced: dict, full: dict, num_queries: int) -> dict:
    """|reduced - full| over (boxes, class probabilities), each reduced-precision query paired with one
    full-precision query of its image: the largest, the mean, the 99th percentile of each pair's largest, and
    the share of pairs whose largest is within 0.01 and 0.05; and how many images have a k-th/(k+1)-th
    encoder-score gap below their largest encoder-score error (there the two may select different queries, and
    a few pairs then differ by much more than rounding)."""
    per_query, means, close = [], [], 0
    for i in range(full["boxes"].shape[0]):
        pair_max, differences = paired_query_differences(
            np.concatenate([reduced["boxes"][i], reduced["probs"][i]], -1),
            np.concatenate([full["boxes"][i], full["probs"][i]], -1))
        per_query.append(pair_max)
        means.append(float(differences.mean()))
        score_error = float(np.abs(reduced["enc_scores"][i] - full["enc_scores"][i]).max())
        ranked = np.sort(full["enc_scores"][i])[::-1]
        close += int(ranked[num_queries - 1] - ranked[num_queries] < score_error)
    per_query = np.concatenate(per_query)  # each pair's largest |difference|
    return {"max_abs_diff_boxes_probs": float(per_query.max()), "mean_abs_diff_boxes_probs": float(np.mean(means)),
            "p99_query_max_abs_diff": float(np.quantile(per_query, 0.99)),
            "queries_within_0.01": float(np.mean(per_query <= 0.01)),
            "queries_within_0.05": float(np.mean(per_query <= 0.05)),
            "images_with_topk_gap_below_score_error": close, "images": int(full["boxes"].shape[0])}


def main(argv=None) -> dict:
    from rtdetr_jax.config import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=sorted(DEVICES), default="gpu", help="jax platform (torch: cuda/cpu)")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["r18vd", "r50vd"])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["float32", "bfloat16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--size", type=int, default=640, help="input height and width")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per side and row")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="no new row starts after this many seconds (the rows not run are listed)")
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--torch-compile-backend", default="inductor",
                        help="torch.compile's backend ('eager' checks the path quickly on a CPU)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu.json"))
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f"--iters {args.iters}: need at least 1 timed call")
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches {args.batches}: every batch size must be at least 1")

    import jax
    import torch

    from images import synthetic_batch

    from rtdetr_jax import RTDetrV2ForObjectDetection

    try:
        jax_device = jax.devices(args.device)[0]
    except RuntimeError as err:
        sys.exit(f"bench_gpu.py: error: jax sees no {args.device} device ({err}); --device cpu for a smoke run")
    device_type = DEVICES[args.device]
    if device_type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: error: torch sees no CUDA device (torch.cuda.is_available() is False)")
    start = time.perf_counter()
    result = {"machine": {**machine_info(), "jax_device": str(jax_device),
                          "torch_device": (torch.cuda.get_device_name(0) if device_type == "cuda" else "cpu")},
              "jax": jax.__version__, "torch": torch.__version__, "size": args.size, "iters": args.iters,
              "rows": [], "torch_compile_rows": [], "bfloat16_error": [], "not_run": []}

    def check_budget(what: str) -> None:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            result["not_run"].append(what)
            raise BudgetSpent(what)

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - start
        write_result(args.out, result)

    outputs, torch_models = {}, {}
    with jax.default_device(jax_device), _precision_restored():
        for preset in args.presets:
            try:
                check_budget(f"{preset} (every row)")
            except BudgetSpent:
                continue
            folder = scratch_dir(f"rtdetr-gpu-{preset}-")
            reference = build_checkpoint(folder, preset).to(device_type)
            torch_models[preset] = reference
            for dtype in args.dtypes:
                set_precision(dtype)
                ours = RTDetrV2ForObjectDetection.from_pretrained(folder, dtype="bfloat16" if dtype == "bfloat16"
                                                                  else "float32")
                for batch in args.batches:
                    name = f"{preset} {dtype} batch {batch}"
                    try:
                        check_budget(name)
                    except BudgetSpent:
                        continue
                    pixels = synthetic_batch(batch, args.size, args.size, seed=1)
                    x_jax = jax.device_put(pixels, jax_device)
                    x_torch = torch.from_numpy(pixels).to(device_type)
                    row = {"preset": preset, "dtype": dtype, "batch": batch}
                    try:
                        t = time.perf_counter()
                        out = ours(pixel_values=x_jax)
                        jax.block_until_ready(out.logits)
                        row["jax_first_call_s"] = time.perf_counter() - t
                        eager = torch_forward_fn(reference, x_torch, dtype, device_type)
                        t = time.perf_counter()
                        theirs = eager()
                        row["torch_first_call_s"] = time.perf_counter() - t
                        torch_times, jax_times, paired = paired_times(  # paired: median of jax / torch
                            eager, lambda: jax.block_until_ready(ours(pixel_values=x_jax).logits), args.iters)
                        row.update(_timing("torch_eager", jax_times, torch_times, paired, batch))
                        if batch == args.batches[0]:
                            outputs[(preset, dtype)] = to_numpy(out, "jax")
                            outputs[(preset, dtype, "torch")] = to_numpy(theirs, "torch")
                    except Exception as err:  # one failing row (e.g. out of memory) does not end the run
                        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    result["rows"].append(row)
                    _print_row(row)
                    save()
            _bfloat16_error(result, outputs, preset, reference.config.num_queries)
            save()

        if not args.no_torch_compile:
            for preset, reference in torch_models.items():
                compiled = torch.compile(reference, dynamic=False, backend=args.torch_compile_backend)
                for dtype in args.dtypes:
                    set_precision(dtype)
                    for batch in args.batches:
                        name = f"{preset} {dtype} batch {batch} torch.compile"
                        try:
                            check_budget(name)
                        except BudgetSpent:
                            continue
                        base = next((r for r in result["rows"] if (r["preset"], r["dtype"], r["batch"])
                                     == (preset, dtype, batch) and "jax_median_s" in r), None)
                        row = {"preset": preset, "dtype": dtype, "batch": batch,
                               "backend": args.torch_compile_backend}
                        try:
                            pixels = synthetic_batch(batch, args.size, args.size, seed=1)
                            x_torch = torch.from_numpy(pixels).to(device_type)
                            forward = torch_forward_fn(compiled, x_torch, dtype, device_type)
                            t = time.perf_counter()
                            forward()
                            row["torch_compile_first_call_s"] = time.perf_counter() - t
                            times = [_timed(forward) for _ in range(args.iters)]
                            row["torch_compile_median_s"] = statistics.median(times)
                            row["torch_compile_times_s"] = times
                            if base is not None:
                                row["jax_median_s"] = base["jax_median_s"]
                                row["time_ratio_jax_over_torch_compile"] = (base["jax_median_s"]
                                                                            / row["torch_compile_median_s"])
                        except Exception as err:
                            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                        result["torch_compile_rows"].append(row)
                        _print_row(row, "torch.compile")
                        save()
    save()
    if result["not_run"]:
        print(f"not run (budget of {args.budget_s:.0f} s spent): {', '.join(result['not_run'])}")
    return result


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _timing(side: str, jax_times, torch_times, paired, batch: int) -> dict:
    ours, theirs = statistics.median(jax_times), statistics.median(torch_times)
    return {"jax_median_s": ours, f"{side}_median_s": theirs, f"time_ratio_jax_over_{side}": ours / theirs,
            f"paired_time_ratio_jax_over_{side}": paired, "jax_images_per_s": batch / ours,
            f"{side}_images_per_s": batch / theirs, "jax_times_s": jax_times, f"{side}_times_s": torch_times}


def _bfloat16_error(result: dict, outputs: dict, preset: str, num_queries: int) -> None:
    """Each side's bfloat16 outputs against its own float32 ones, where both rows ran."""
    for side, key in (("jax", ()), ("torch", ("torch",))):
        full, reduced = outputs.get((preset, "float32", *key)), outputs.get((preset, "bfloat16", *key))
        if full is None or reduced is None:
            continue
        error = {"preset": preset, "side": side, **query_matched_error(reduced, full, num_queries)}
        result["bfloat16_error"].append(error)
        print(f"{preset} bfloat16 vs float32, {side}: max |diff| of boxes and probabilities "
              f"{error['max_abs_diff_boxes_probs']:.4f}, mean {error['mean_abs_diff_boxes_probs']:.5f}, 99th "
              f"percentile of the queries' {error['p99_query_max_abs_diff']:.4f}, queries within 0.01 "
              f"{error['queries_within_0.01']:.1%}, within 0.05 {error['queries_within_0.05']:.1%}, images "
              f"with a top-k gap below the score error {error['images_with_topk_gap_below_score_error']} of "
              f"{error['images']}", flush=True)


def _print_row(r: dict, torch_side: str = "torch eager") -> None:
    """One finished row: ours against `torch_side` ("torch eager" or "torch.compile"), or its error."""
    head = f"{r['preset']:>7} {r['dtype']:>9} batch {r['batch']:>3}"
    if "error" in r:
        print(f"{head}  {torch_side} row error: {r['error']}", flush=True)
    elif torch_side == "torch eager":
        print(f"{head}  jax {r['jax_median_s'] * 1e3:9.2f} ms  torch eager {r['torch_eager_median_s'] * 1e3:9.2f} ms"
              f"  jax/torch {r['time_ratio_jax_over_torch_eager']:.2f} (paired "
              f"{r['paired_time_ratio_jax_over_torch_eager']:.2f})  jax {r['jax_images_per_s']:8.1f} img/s  first "
              f"calls {r['jax_first_call_s']:.1f} / {r['torch_first_call_s']:.1f} s", flush=True)
    else:
        ratio = (f"  jax/torch.compile {r['time_ratio_jax_over_torch_compile']:.2f}"
                 if "time_ratio_jax_over_torch_compile" in r else "")
        print(f"{head}  torch.compile ({r['backend']}) {r['torch_compile_median_s'] * 1e3:9.2f} ms{ratio}  first "
              f"call {r['torch_compile_first_call_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
