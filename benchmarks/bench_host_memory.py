"""Our training step under three glibc malloc settings, each in a fresh process: per-step time, minor page faults,
kernel (system) CPU time and resident memory (rtdetr_jax/host_memory.py says why these differ).

    python benchmarks/bench_host_memory.py                      # r18vd, batch 4 at 640x640, 6 steps each
    python benchmarks/bench_host_memory.py --size 320 --steps 4  # quicker

Settings: glibc's defaults; `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (what the `rtdetr-jax` command line starts
with); one malloc arena with no mmap and no trimming (measured, not used). The first step (compilation) is
reported apart; the table gives medians over the steps after it. Prints a table and writes JSON to
benchmarks/results/host_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine_info, our_train_step, run_json_child, synthetic_detection_batch, write_result  # noqa: E402

SETTINGS = {
    "glibc defaults": {},
    "huge pages (the command line's)": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "one arena, no mmap, no trim": {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                                    "MALLOC_TRIM_THRESHOLD_": str(64 << 30)},
}


def _rss_mb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


def child(args) -> dict:
    """The training steps in this process, as they come (no malloc setting of our own)."""
    import jax

    from rtdetr_jax.config import RTDetrV2Config
    from rtdetr_jax.train.loop import fresh_model

    config = RTDetrV2Config.from_preset(args.preset)
    pixels, labels = synthetic_detection_batch(args.batch, args.size, config.num_labels)
    steps, state, batch = our_train_step(fresh_model(config), pixels, labels)
    rows = []
    for _ in range(args.steps + 1):
        before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, metrics = steps.train_step(state, *batch)
        jax.block_until_ready(metrics)
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"step_s": time.perf_counter() - t, "minor_faults": after.ru_minflt - before.ru_minflt,
                     "system_s": after.ru_stime - before.ru_stime, "rss_mb": _rss_mb()})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    return {"first": rows[0], "steps": rows[1:], "peak_rss_mb": peak_mb}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r18vd")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed steps after the first (compiling) one")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "host_memory.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return None

    forwarded = ["--child", "--preset", args.preset, "--size", str(args.size), "--batch", str(args.batch),
                 "--steps", str(args.steps)]
    # each setting in a fresh process (glibc reads them at start-up), none inherited from ours
    for key in ("GLIBC_TUNABLES", *SETTINGS["one arena, no mmap, no trim"]):
        os.environ.pop(key, None)
    runs = {name: run_json_child(__file__, forwarded, env=env) for name, env in SETTINGS.items()}

    print(f"| {args.preset} batch {args.batch} at {args.size}, our step | median step | minor faults / step | "
          f"kernel time / step | peak RSS | first step |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        med = {key: statistics.median(row[key] for row in run["steps"])
               for key in ("step_s", "minor_faults", "system_s")}
        print(f"| {name} | {med['step_s']:.2f} s | {med['minor_faults']:,.0f} | {med['system_s']:.2f} s | "
              f"{run['peak_rss_mb']} MB | {run['first']['step_s']:.1f} s |")
    write_result(args.out, {"machine": machine_info(), "settings": vars(args) | {"out": None}, "runs": runs})
    return runs


if __name__ == "__main__":
    main()
