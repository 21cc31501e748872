"""Training throughput side by side: our jit train step vs transformers' PyTorch forward + loss + backward + AdamW
step, same weights, same batch, same targets, same machine, one run. Each side runs in a process of its own (a
`common.Worker`), so that neither shares its process with the other's thread pools and allocator. The parent
alternates blocks of `--block` consecutive steps (ours, PyTorch, PyTorch, ours, ...), so that the shared
machine's drifting speed hits both alike, and reports two figures per side:

- steady state: the steps after the first of each block, i.e. steps that follow a step of the same side, as in a
  training loop. This is the training throughput.
- after a pause: the first step of each block, which follows ~10 s in which that process sat idle while the other
  side ran. On the development VM (virtio-balloon free page reporting: memory the guest frees is handed back to
  the host after ~2 s, and faulting it in again costs a host page fault per page) our step pays several seconds
  there, as kernel time: XLA:CPU frees its 3.4 GB scratch block at the end of every step and maps it afresh at
  the next (9-10 s of kernel CPU time in such a step, ~0.5 s in a steady one). PyTorch's steps take kernel time
  too (0.4-3.5 s each), but no more after a pause.

    python benchmarks/bench_training.py                         # r18vd, batch 4 at 640x640 (the issue's setting)
    python benchmarks/bench_training.py --size 320 --batch 2    # quicker

Both sides train in float32 with denoising on and the same optimizer settings. Prints a table, each side's step
times block by block and the kernel (system) CPU time of each step, the part that moves with how the step's
memory is mapped and faulted in, and writes JSON (with each step's page faults and user and kernel CPU time) to
benchmarks/results/training.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import (  # noqa: E402
    machine_info,
    our_train_step,
    paired_ratio,
    scratch_dir,
    serve_worker,
    side_by_side,
    start_like_the_cli,
    steady_state,
    synthetic_detection_batch,
    torch_train_step,
    write_result,
)


def jax_worker(args):
    """Save a randomly initialised model to `args.folder`, load it, compile our train step (the first step)."""
    import jax

    from rtdetr_jax.config import RTDetrV2Config
    from rtdetr_jax.model import RTDetrV2ForObjectDetection

    config = RTDetrV2Config.from_preset(args.preset)
    pixels, labels = synthetic_detection_batch(args.batch, args.size, config.num_labels)
    RTDetrV2ForObjectDetection(config).save_pretrained(args.folder)
    steps, state, batch = our_train_step(RTDetrV2ForObjectDetection.from_pretrained(args.folder), pixels, labels)
    t = time.perf_counter()
    state, metrics = steps.train_step(state, *batch)
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - t

    def step():
        nonlocal state
        new_state, new_metrics = steps.train_step(state, *batch)
        jax.block_until_ready(new_metrics)
        state = new_state

    return step, {"first_step_s": first_step_s, "machine": machine_info()}


def torch_worker(args):
    """transformers' model from the checkpoint the jax worker saved; one warm-up step."""
    import torch

    from rtdetr_jax.config import RTDetrV2Config

    config = RTDetrV2Config.from_preset(args.preset)
    pixels, labels = synthetic_detection_batch(args.batch, args.size, config.num_labels)
    _, _, _, step = torch_train_step(args.folder, pixels, labels)
    step()  # warm-up
    return step, {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r18vd")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3, help="rounds; each runs --block steps per side")
    ap.add_argument("--block", type=int, default=3, help="consecutive steps per side in a round (at least 2)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "training.json"))
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.block < 2:
        ap.error(f"--block {args.block}: at least 2 (the first step of a block follows a pause)")
    if args.worker:
        serve_worker(lambda: (jax_worker if args.worker == "jax" else torch_worker)(args))
        return None

    shared = ["--preset", args.preset, "--size", str(args.size), "--batch", str(args.batch),
              "--folder", scratch_dir("rtdetr-bench-training-")]
    # ours saves the checkpoint and compiles before PyTorch's side starts
    rounds, ours, theirs = side_by_side(__file__, shared, args.iters, args.block)

    jax_steady, torch_steady = steady_state(rounds, "jax"), steady_state(rounds, "torch")
    jax_paused, torch_paused = [r["jax"][0] for r in rounds], [r["torch"][0] for r in rounds]
    tj, tt = statistics.median(jax_steady), statistics.median(torch_steady)
    pj, pt = statistics.median(jax_paused), statistics.median(torch_paused)
    paired = paired_ratio(rounds, "torch", "jax")
    compile_s = ours.ready["first_step_s"]
    result = {
        "machine": ours.ready["machine"] | theirs.ready,
        "settings": vars(args) | {"out": None, "processes": "one per framework"},
        "jax_step_s": tj, "torch_step_s": tt,
        "jax_images_per_s": args.batch / tj, "torch_images_per_s": args.batch / tt,
        "throughput_ratio": tt / tj, "paired_throughput_ratio": paired, "jax_first_step_s": compile_s,
        "jax_step_after_pause_s": pj, "torch_step_after_pause_s": pt, "after_pause_ratio": pt / pj,
        "rounds": rounds, "jax_step_usage": ours.usage, "torch_step_usage": theirs.usage,
    }
    n = len(jax_steady)
    print(f"| {args.preset} batch {args.batch} at {args.size} | rtdetr-jax | transformers (PyTorch) | ratio |")
    print("|---|---|---|---|")
    print(f"| step, steady state (median of {n}) | {tj:.3f} s | {tt:.3f} s | {tt / tj:.2f} (paired {paired:.2f}) |")
    print(f"| images/s, steady state | {args.batch / tj:.2f} | {args.batch / tt:.2f} | |")
    print(f"| step after a pause (median of {len(rounds)}) | {pj:.3f} s | {pt:.3f} s | {pt / pj:.2f} |")
    print(f"| first step (compile) | {compile_s:.1f} s | - | |")
    print("ratio: PyTorch's time / ours (our throughput / PyTorch's); paired: median over rounds of the blocks' "
          "steady-state means")
    for side, worker in (("jax", ours), ("torch", theirs)):
        print(f"{side} blocks:", " | ".join(", ".join(f"{t:.2f}" for t in r[side]) for r in rounds))
        kernel = [u["kernel_s"] for u in worker.usage]  # in the order of the steps: block by block
        print(f"{side} kernel CPU s per step:", " | ".join(", ".join(f"{k:.2f}" for k in kernel[i:i + args.block])
                                                            for i in range(0, len(kernel), args.block)))
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    start_like_the_cli()
    main()
