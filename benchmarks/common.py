"""What every benchmark script shares: the machine description and writing the result JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time


def machine_info() -> dict:
    import jax

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "devices": str(jax.devices())}


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
