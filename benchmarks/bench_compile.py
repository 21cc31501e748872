"""First-call cost: how long the first r18vd forward takes in a fresh process, ours (trace + XLA compile + run)
against transformers' (eager first call, and `torch.compile`'s first call). Each figure comes from its own fresh
child process, so nothing is warm.

    python benchmarks/bench_compile.py [--size 640] [--train-batch 4] [--no-torch-compile] [--no-train-step]

Rows: jax first call in all (with its trace, lowering and XLA-compile phases from jax.monitoring); the same
first call with jax's persistent compilation cache already filled by an earlier process
(`JAX_COMPILATION_CACHE_DIR`); torch eager first call; torch.compile first call; and our training step
(forward + loss + backward + AdamW + EMA, batch `--train-batch` at `--size`): trace, lowering and XLA compile,
without running it. Writes benchmarks/results/compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import machine_info, scratch_dir, run_json_child, start_like_the_cli, write_result  # noqa: E402


def train_step_compile(folder: str, size: int, batch: int) -> dict:
    """Ahead-of-time trace, lower and compile of our r18vd train step; nothing is run."""
    from common import our_train_step, synthetic_detection_batch
    from rtdetr_jax import RTDetrV2ForObjectDetection

    model = RTDetrV2ForObjectDetection.from_pretrained(folder)
    steps, state, inputs = our_train_step(model, *synthetic_detection_batch(batch, size, model.config.num_labels))
    t0 = time.perf_counter()
    traced = steps.train_step.trace(state, *inputs)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return {"first_call_s": t3 - t0,
            "phases_s": {"trace": t1 - t0, "lower": t2 - t1, "backend_compile": t3 - t2}}


def child(kind: str, folder: str, size: int, train_batch: int) -> dict:
    from images import synthetic_batch

    if kind == "jax_train_step":
        return train_step_compile(folder, size, train_batch)
    pixels = synthetic_batch(1, size, size, seed=1)
    if kind.startswith("jax"):
        import jax
        import jax.monitoring

        from rtdetr_jax import RTDetrV2ForObjectDetection

        model = RTDetrV2ForObjectDetection.from_pretrained(folder)
        phases = {}

        def listener(event, duration, **kwargs):
            if event.startswith("/jax/core/compile/"):
                key = event.rsplit("/", 1)[-1]
                phases[key] = phases.get(key, 0.0) + duration

        jax.monitoring.register_event_duration_secs_listener(listener)
        t0 = time.perf_counter()
        jax.block_until_ready(model(pixel_values=pixels).logits)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(model(pixel_values=pixels).logits)
        return {"first_call_s": first, "second_call_s": time.perf_counter() - t0, "phases_s": phases}
    import torch
    from transformers import RTDetrV2ForObjectDetection as TorchModel

    model = TorchModel.from_pretrained(folder).eval()
    x = torch.from_numpy(pixels)
    if kind == "torch_compile":
        model = torch.compile(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(pixel_values=x)
    return {"first_call_s": time.perf_counter() - t0}


def run_child(kind: str, folder: str, size: int, env: dict | None = None, train_batch: int = 4) -> dict:
    try:
        return run_json_child(__file__, ["--child", kind, "--folder", folder, "--size", str(size),
                                         "--train-batch", str(train_batch)], env)
    except RuntimeError as err:
        return {"error": str(err)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--no-train-step", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compile.json"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.size, args.train_batch)))
        return {}

    from conftest import build_reference, r18vd_config

    folder = scratch_dir("rtdetr-compile-")
    build_reference(folder, r18vd_config(), seed=0)
    no_cache = {"JAX_ENABLE_COMPILATION_CACHE": "false"}
    cache_dir = scratch_dir("rtdetr-xla-cache-")
    with_cache = {"JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    rows = {
        "jax_cold": run_child("jax", folder, args.size, no_cache),
        "jax_fill_persistent_cache": run_child("jax", folder, args.size, with_cache),
        "jax_from_persistent_cache": run_child("jax", folder, args.size, with_cache),
        "torch_eager": run_child("torch", folder, args.size),
    }
    if not args.no_torch_compile:
        rows["torch_compile"] = run_child("torch_compile", folder, args.size)
    if not args.no_train_step:
        rows["jax_train_step_compile"] = run_child("jax_train_step", folder, args.size, no_cache, args.train_batch)
    result = {"model": "r18vd (random weights)", "input": [1, 3, args.size, args.size],
              "train_step_input": [args.train_batch, 3, args.size, args.size], "rows": rows,
              "machine": machine_info()}
    print(f"r18vd, 1x3x{args.size}x{args.size} ({args.train_batch}x3x{args.size}x{args.size} for the train step), "
          f"first call in a fresh process")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:28} failed: {r['error']}")
            continue
        phases = "".join(f"  {k.replace('_duration', '')} {v:.1f} s" for k, v in r.get("phases_s", {}).items())
        print(f"{name:28}{r['first_call_s']:>8.1f} s{phases}")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    start_like_the_cli()
    main()
