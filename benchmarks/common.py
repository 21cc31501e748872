"""What every benchmark script shares: the machine description, timing, fresh child processes, the result JSON."""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def start_like_the_cli() -> None:
    """Re-execute this script once with the malloc the `rtdetr-jax` command line starts with (tcmalloc where it is
    installed, else glibc malloc on transparent huge pages: rtdetr_jax/host_memory.py), so that a benchmark
    measures what the command line gives; `RTDETR_JAX_MALLOC=glibc` measures with glibc's, `RTDETR_JAX_MALLOC=off`
    with glibc's defaults. Both sides of a benchmark get it: they share the process, or their worker processes
    inherit its environment. Call it first in `__main__`, before jax or torch start any thread."""
    from rtdetr_jax.host_memory import reexec_with_tuned_malloc

    try:
        reexec_with_tuned_malloc()
    except ValueError as err:  # a bad RTDETR_JAX_MALLOC value
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {err}")


def scratch_dir(prefix: str) -> str:
    """A new temporary folder (the reference checkpoint, a compilation cache), removed when this process exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def cpu_info() -> dict:
    """The CPU's model name, family and model numbers and its widest vector extension (Linux; {} elsewhere): the
    development machine changed from AVX2 to AVX-512 between sessions, which moves every time."""
    try:
        with open("/proc/cpuinfo") as fh:
            first = fh.read().split("\n\n")[0]
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    vector = next((name for name in ("avx512f", "avx2", "avx", "sse4_2") if name in flags), "")
    return {"cpu": fields.get("model name", ""), "cpu_family": fields.get("cpu family", ""),
            "cpu_model": fields.get("model", ""), "vector": vector}


def machine_info() -> dict:
    import jax

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            **cpu_info(), "devices": str(jax.devices()), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "tcmalloc_max_total_thread_cache_bytes": os.environ.get("TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES", "")}


def synthetic_detection_batch(batch: int, size: int, num_labels: int, seed: int = 0):
    """Random (batch, 3, size, size) float32 pixels and 3-9 random labelled boxes (cx, cy, w, h) per image."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pixels = rng.random((batch, 3, size, size), dtype=np.float32)
    labels = []
    for _ in range(batch):
        n = int(rng.integers(3, 10))
        labels.append({"class_labels": rng.integers(0, num_labels, n),
                       "boxes": np.concatenate([rng.uniform(.2, .8, (n, 2)), rng.uniform(.05, .3, (n, 2))], 1)})
    return pixels, labels


def our_train_step(model, pixels, labels):
    """Our jit train step as every benchmark runs it: the recipe's AdamW without warm-up, float32, at most 16 boxes
    per image. Returns (steps, state, batch), the state and the batch already placed on the device mesh."""
    from rtdetr_jax.loss.criterion import pad_targets
    from rtdetr_jax.train.optim import OptimConfig, make_optimizer
    from rtdetr_jax.train.state import create_train_state
    from rtdetr_jax.train.step import make_steps

    optim = OptimConfig(warmup_steps=0)
    tx = make_optimizer(optim, model.params)
    steps = make_steps(model.config, optim, tx)
    state = steps.replicate(create_train_state(model.variables, tx))
    return steps, state, steps.shard_batch((pixels, pad_targets(labels, 16)))


def torch_train_step(folder: str, pixels, labels):
    """transformers' PyTorch training step as every benchmark runs it, on the checkpoint in `folder` in train mode:
    forward with the labels, backward, gradient clipping at 0.1, AdamW (lr 1e-4, weight decay 1e-4).
    Returns (reference, x, targets, step): the model, the pixels and targets as torch tensors, and `step()`."""
    import torch
    from transformers import RTDetrV2ForObjectDetection as HF

    torch.manual_seed(0)
    reference = HF.from_pretrained(folder).train()
    opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    x = torch.from_numpy(pixels)
    targets = [{"class_labels": torch.as_tensor(t["class_labels"]), "boxes": torch.as_tensor(t["boxes"]).float()}
               for t in labels]

    def step():
        opt.zero_grad()
        reference(pixel_values=x, labels=targets).loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        opt.step()

    return reference, x, targets, step


def build_checkpoint(folder: str, preset: str, seed: int = 0):
    """A transformers checkpoint of `preset` in `folder`, made as the parity tests' `build_reference` makes theirs
    (seeded, perturbed, batch norms calibrated, so that queries are not near-identical); returns the torch model
    (CPU, eval mode)."""
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from conftest import build_reference
    from transformers import RTDetrV2Config as TorchConfig

    from rtdetr_jax import RTDetrV2Config

    RTDetrV2Config.from_preset(preset).save_pretrained(folder)
    return build_reference(folder, TorchConfig.from_pretrained(folder), seed)


def paired_query_differences(a, b):
    """a, b: (queries, features) of one image from two runs, whose query order may differ (the decoder's follows
    the encoder's top-k, which float noise may reorder among near-tied scores). Each query of `a` is paired with one
    of `b` by a Hungarian assignment on the largest |difference| over the features. Returns (each pair's largest
    |difference| (queries,), the pairs' |differences| (queries, features))."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    cost = np.max(np.abs(a[:, None] - b[None]), -1)  # (queries, queries)
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols], np.abs(a[rows] - b[cols])


def write_result(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)


def median_time(fn, iters: int, warmup: bool = True) -> float:
    """Median wall time of `iters` calls of `fn` (after one untimed call when `warmup`: jax compiles there)."""
    if warmup:
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_times(fns: dict, iters: int) -> dict[str, list[float]]:
    """Wall times of each of `fns` (name -> zero-argument call that blocks until done): one untimed call each first
    (jax compiles there), then `iters` rounds calling each once, in the dict's order, so that a drift of a shared
    machine's speed falls on every function alike. Returns name -> the `iters` times."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def stage_medians(times: dict[str, list[float]], cumulative: dict[str, str]) -> dict[str, float]:
    """Each stage's median time from cumulative measurements: `cumulative` maps stage name -> the function (a key of
    `times`, as `interleaved_times` returns) that runs every stage up to and including that one, in stage order.
    A stage's time is the median over rounds of (its function's time - the previous function's time) in that round:
    the difference of two calls made moments apart, so a slow phase of the machine spanning rounds cancels. It can
    come out negative where a stage is shorter than the calls' noise."""
    stages, previous = {}, None
    for stage, name in cumulative.items():
        if previous is None:
            stages[stage] = statistics.median(times[name])
        else:
            stages[stage] = statistics.median(t - p for t, p in zip(times[name], times[previous], strict=True))
        previous = name
    return stages


def paired_times(fn_a, fn_b, iters: int) -> tuple[list[float], list[float], float]:
    """Time `fn_a` and `fn_b` alternately, `iters` rounds, swapping which goes first every round (AB, BA, AB...),
    so that a shared machine's drifting speed hits both sides alike. Returns both lists of wall times and the
    median over rounds of time_b / time_a (the paired ratio). Warm both up before calling this."""
    times_a, times_b = [], []
    for i in range(iters):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)) if i % 2 == 0 else ((fn_b, times_b), (fn_a, times_a)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times_a, times_b, statistics.median(b / a for a, b in zip(times_a, times_b))


_REPLY = "@@ "  # a worker's protocol lines on stdout start with this; anything else there is passed through


class Worker:
    """One side of a side-by-side benchmark in a process of its own: `python script --worker NAME *args`, whose
    `serve_worker(setup)` builds the step and answers `step` requests with the step's time, measured in the
    worker. Each framework then runs without the other's thread pools and allocator in its process."""

    def __init__(self, script: str, name: str, args: list[str], env: dict[str, str | None] | None = None):
        """`env`: variables to set in the worker's environment (ours otherwise), None to unset one."""
        self.name = name
        environ = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(script), "--worker", name, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env={key: value for key, value in environ.items() if value is not None})
        self.ready = self._reply()  # what setup reported (first-step time, machine info)
        self.usage: list[dict] = []

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
            sys.stdout.write(line)
        code = self.proc.wait()
        raise RuntimeError(f"{self.name} worker exited with status {code} (its stderr is above)")

    def step(self) -> float:
        """Run one step in the worker; its wall time there, in seconds. What the worker's process used during
        the step is appended to `self.usage`: page faults {"major": ..., "minor": ...} and CPU seconds
        {"user_s": ..., "kernel_s": ...} (kernel: system time, e.g. zeroing the pages it faults in)."""
        self.proc.stdin.write("step\n")
        reply = self._reply()
        self.usage.append({key: reply[key] for key in ("major", "minor", "user_s", "kernel_s")})
        return float(reply["s"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def steady_state(rounds: list[dict], side: str) -> list[float]:
    """`side`'s steady-state times: every step (or forward) of a block but its first (which follows a pause)."""
    return [t for r in rounds for t in r[side][1:]]


def paired_ratio(rounds: list[dict], numerator: str, denominator: str) -> float:
    """Median over rounds of the ratio of the two sides' steady-state block means (numerator's / denominator's)."""
    return statistics.median(statistics.mean(r[numerator][1:]) / statistics.mean(r[denominator][1:]) for r in rounds)


def alternate_blocks(ours, theirs, rounds: int, block: int) -> list[dict]:
    """`rounds` rounds of `block` consecutive steps (`Worker.step`: a train step, a forward) per side, the side
    going first alternating (ours first in even rounds); per round {"jax": [step times], "torch": [step times]}."""
    out = []
    for i in range(rounds):
        order = (("jax", ours), ("torch", theirs)) if i % 2 == 0 else (("torch", theirs), ("jax", ours))
        out.append({name: [worker.step() for _ in range(block)] for name, worker in order})
    return out


def side_by_side(script: str, args: list[str], rounds: int, block: int,
                 envs: dict[str, dict] | None = None) -> tuple[list[dict], Worker, Worker]:
    """Start the "jax" worker of `script`, then (once it is ready) the "torch" one, both with `args` and each with
    its `envs` entry added to its environment; run `alternate_blocks` on them and close both. Returns (rounds,
    ours, theirs): the closed workers keep what they reported (`ready`, `usage`)."""
    envs = envs or {}
    ours = Worker(script, "jax", args, envs.get("jax"))
    try:
        theirs = Worker(script, "torch", args, envs.get("torch"))
        try:
            return alternate_blocks(ours, theirs, rounds, block), ours, theirs
        finally:
            theirs.close()
    finally:
        ours.close()


def serve_worker(setup) -> None:
    """The worker side of `Worker`: `setup()` returns (step, info); `info` (JSON-able) goes back at once, then
    each `step` line on stdin runs `step()` and answers its wall time, the page faults it took (major: read back
    from disk) and the CPU time its process used, user and kernel, until stdin closes."""
    import resource

    step, info = setup()
    print(_REPLY + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            before = resource.getrusage(resource.RUSAGE_SELF)
            t = time.perf_counter()
            step()
            s = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_SELF)
            print(_REPLY + json.dumps({"s": s, "major": after.ru_majflt - before.ru_majflt,
                                       "minor": after.ru_minflt - before.ru_minflt,
                                       "user_s": after.ru_utime - before.ru_utime,
                                       "kernel_s": after.ru_stime - before.ru_stime}), flush=True)


def run_json_child(script: str, args: list[str], env: dict[str, str | None] | None = None) -> dict:
    """Run `python script *args` in a fresh process (`env` added to ours, a None in it unsetting the variable, as
    for `Worker`) and parse the JSON on its last stdout line; a failed child raises RuntimeError carrying the last
    line of its stderr."""
    cmd = [sys.executable, os.path.abspath(script), *args]
    environ = {key: value for key, value in {**os.environ, **(env or {})}.items() if value is not None}
    done = subprocess.run(cmd, capture_output=True, text=True, env=environ, check=False)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])
