"""What every benchmark script shares: the machine description and writing the result JSON."""

from __future__ import annotations

import json
import os
import platform


def machine_info() -> dict:
    import jax

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "devices": str(jax.devices())}


def write_result(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
