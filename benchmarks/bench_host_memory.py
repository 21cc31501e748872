"""Our training step under three glibc malloc settings and tcmalloc, each in a fresh process: per-step time, minor
page faults, kernel (system) CPU time and resident memory (rtdetr_jax/host_memory.py says why these differ).

    python benchmarks/bench_host_memory.py                      # r18vd, batch 4 at 640x640, 6 steps each
    python benchmarks/bench_host_memory.py --size 320 --steps 4  # quicker
    python benchmarks/bench_host_memory.py --paired              # the command line's two mallocs, alternated

Settings: glibc's defaults; `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (what the `rtdetr-jax` command line starts
with where tcmalloc is not installed); one malloc arena with no mmap and no trimming (measured, not used); tcmalloc
by `LD_PRELOAD` (what the command line starts with where it is installed; the row is left out where it is not).
The first step (compilation) is reported apart; the table gives medians over the steps after it. Prints a table
and writes JSON to benchmarks/results/host_memory.json. The settings run one after the other, so the machine's
drifting speed lands in their differences.

`--paired` times the command line's two choices against each other instead, glibc with huge pages and tcmalloc,
each in a worker process of its own (bench_training.py's), alternating blocks of `--block` consecutive steps for
`--rounds` rounds as bench_training.py does; it reports the steady-state steps (those after the first of a
block) and the median over rounds of the ratio of the blocks' means, and writes
benchmarks/results/host_memory_paired.json.
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

from common import (  # noqa: E402
    Worker,
    machine_info,
    our_train_step,
    run_json_child,
    scratch_dir,
    synthetic_detection_batch,
    write_result,
)

from rtdetr_jax.host_memory import MARKER, SWITCH, TUNABLE, find_tcmalloc  # noqa: E402

SETTINGS = {
    "glibc defaults": {},
    "glibc, huge pages (the command line's without tcmalloc)": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "one arena, no mmap, no trim": {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                                    "MALLOC_TRIM_THRESHOLD_": str(64 << 30)},
}
TCMALLOC_SETTING = "tcmalloc preloaded (the command line's where installed)"


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
    ap.add_argument("--paired", action="store_true", help="glibc with huge pages vs tcmalloc, alternated")
    ap.add_argument("--rounds", type=int, default=4, help="--paired: rounds of --block steps per side")
    ap.add_argument("--block", type=int, default=3, help="--paired: consecutive steps per side (at least 2)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return None
    if args.paired:
        if args.block < 2:
            ap.error(f"--block {args.block}: at least 2 (the first step of a block follows a pause)")
        if args.out == ap.get_default("out"):
            args.out = os.path.join(os.path.dirname(args.out), "host_memory_paired.json")
        return paired(args)

    forwarded = ["--child", "--preset", args.preset, "--size", str(args.size), "--batch", str(args.batch),
                 "--steps", str(args.steps)]
    # each setting in a fresh process (glibc reads them at start-up), none inherited from ours
    for key in ("GLIBC_TUNABLES", "LD_PRELOAD", *SETTINGS["one arena, no mmap, no trim"]):
        os.environ.pop(key, None)
    settings = dict(SETTINGS)
    tcmalloc = find_tcmalloc()
    if tcmalloc is None:
        print("tcmalloc not found (Debian/Ubuntu: apt-get install libtcmalloc-minimal4): its row left out")
    else:
        settings[TCMALLOC_SETTING] = {"LD_PRELOAD": tcmalloc}
    runs = {name: run_json_child(__file__, forwarded, env=env) for name, env in settings.items()}

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


def paired(args) -> dict:
    """glibc with huge pages against tcmalloc, our training step in a worker process each, alternating blocks."""
    from common import alternate_blocks, paired_ratio, steady_state

    tcmalloc = find_tcmalloc()
    if tcmalloc is None:
        sys.exit("bench_host_memory.py --paired: tcmalloc not found (Debian/Ubuntu: apt-get install "
                 "libtcmalloc-minimal4)")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_training.py")
    shared = ["--preset", args.preset, "--size", str(args.size), "--batch", str(args.batch)]
    # each worker's environment as the command line would make it, the marker set so that none re-executes
    glibc = {"GLIBC_TUNABLES": TUNABLE, "LD_PRELOAD": None, MARKER: "1", SWITCH: None}
    tcmalloc_env = {"GLIBC_TUNABLES": None, "LD_PRELOAD": tcmalloc, MARKER: "1", SWITCH: None}
    first = Worker(script, "jax", [*shared, "--folder", scratch_dir("rtdetr-bench-malloc-")], env=glibc)
    try:
        second = Worker(script, "jax", [*shared, "--folder", scratch_dir("rtdetr-bench-malloc-")], env=tcmalloc_env)
        try:
            # alternate_blocks names its sides "jax" (first) and "torch" (second)
            rounds = [{"glibc": r["jax"], "tcmalloc": r["torch"]}
                      for r in alternate_blocks(first, second, args.rounds, args.block)]
        finally:
            second.close()
    finally:
        first.close()

    steady = {side: steady_state(rounds, side) for side in ("glibc", "tcmalloc")}
    kernel = {side: [u["kernel_s"] for i, u in enumerate(worker.usage) if i % args.block]
              for side, worker in (("glibc", first), ("tcmalloc", second))}
    ratio = paired_ratio(rounds, "glibc", "tcmalloc")
    print(f"| {args.preset} batch {args.batch} at {args.size}, our step, steady state (median of "
          f"{len(steady['glibc'])}) | step | kernel time / step |")
    print("|---|---|---|")
    for side, name in (("glibc", "glibc, huge pages"), ("tcmalloc", f"tcmalloc ({tcmalloc})")):
        print(f"| {name} | {statistics.median(steady[side]):.3f} s | {statistics.median(kernel[side]):.2f} s |")
    print(f"paired: glibc's step / tcmalloc's = {ratio:.3f} (median over {len(rounds)} rounds of the blocks' "
          "steady-state means)")
    for side in ("glibc", "tcmalloc"):
        print(f"{side} blocks:", " | ".join(", ".join(f"{t:.2f}" for t in r[side]) for r in rounds))
    result = {"machine": machine_info(), "settings": vars(args) | {"out": None, "tcmalloc": tcmalloc},
              "rounds": rounds, "paired_step_ratio": ratio,
              "glibc_step_usage": first.usage, "tcmalloc_step_usage": second.usage,
              "first_step_s": {"glibc": first.ready["first_step_s"], "tcmalloc": second.ready["first_step_s"]},
              "worker_machines": {"glibc": first.ready["machine"], "tcmalloc": second.ready["machine"]}}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
