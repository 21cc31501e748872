"""XLA:CPU settings that rtdetr-jax applies when it is imported, before JAX starts its CPU backend.

jaxlib 0.10's CPU compiler hands convolutions and matmuls to YNNPACK and fuses whole chains of them (conv, batch
norm, ReLU, the next conv...) into single YNNPACK subgraphs. On the 2-core development CPU that made the r18vd
forward at 640x640 *slower*: 0.778 s with those fusions, 0.493 s with them off (XLA's own convolution and dot
kernels), batch 8: 6.75 s vs 4.89 s. Training gains too: without the fusions XLA's own convolution kernel
gradient runs ~2x faster than per-tap matmuls, ~3x faster than with the fusions (benchmarks/README.md). So, on
import, `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions) is appended to `XLA_FLAGS`, unless:

- `RTDETR_JAX_XLA_FLAGS=off` is set (then nothing is touched; `on` or unset is the default, any other value is an
  error),
- `XLA_FLAGS` already sets that flag (the user's choice wins),
- jaxlib is older than 0.10 (versions we have not measured, which may not know the flag and would abort on it).

XLA reads `XLA_FLAGS` once, when the first computation starts the backend: import rtdetr_jax before running any
JAX computation for the setting to take effect. The flag only concerns the CPU backend; GPU and TPU ignore it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
MIN_JAXLIB = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("jaxlib")
    except PackageNotFoundError:
        return (0,)
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def apply_default_xla_flags(environ: MutableMapping[str, str] | None = None,
                            jaxlib_version: tuple[int, ...] | None = None) -> list[str]:
    """Append our CPU flags to `environ["XLA_FLAGS"]` (default `os.environ`); returns the flags it added."""
    environ = os.environ if environ is None else environ
    choice = environ.get("RTDETR_JAX_XLA_FLAGS", "").strip().lower()
    if choice not in ("", "on", "off"):
        raise ValueError(f"RTDETR_JAX_XLA_FLAGS={environ['RTDETR_JAX_XLA_FLAGS']!r}: use 'on' (the default) or 'off'")
    if choice == "off":
        return []
    if (jaxlib_version or _jaxlib_version()) < MIN_JAXLIB:
        return []
    current = environ.get("XLA_FLAGS", "")
    present = {token.split("=", 1)[0] for token in current.split()}
    added = [flag for flag in CPU_FLAGS if flag.split("=", 1)[0] not in present]
    if added:
        environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added
