"""rtdetr-jax's C++ CPU kernels: built once per machine with the host's C++ compiler, cached, and registered with
XLA as FFI custom calls.

Four so far: `cpu_kernel_gradient.cc` (a convolution's kernel gradient, used by ops/kernel_gradient.py),
`cpu_channel_moments.cc` (training batch norm's per-channel sums, forward and backward, used by ops/batch_norm.py),
`cpu_deformable_sampling.cc` (the deformable attention's weighted gather and its gradient, used by
ops/deformable_sampling.py) and `cpu_winograd_transforms.cc` (Winograd's input and output transforms, used by
ops/winograd.py). Each source is compiled at `-O3 -march=native` into

    $RTDETR_JAX_CACHE   (else $XDG_CACHE_HOME/rtdetr_jax, else ~/.cache/rtdetr_jax)  /native/NAME-KEY.so

where KEY hashes the source, the shared headers beside it (`cpu_tasks.h`, `cpu_vectors.h`), the compiler's
version, the flags, jaxlib's version (whose headers it includes) and the CPU's model and feature flags, so a shared
home folder never hands one machine's instructions to another. The build takes ~5 seconds, the first time the
kernel is traced (the kernel gradient and the moments: a training step; the sampling and Winograd's transforms: the
first CPU forward in float32); the library is written under a temporary name and renamed, so a failed or
interrupted build leaves nothing behind. With `RTDETR_JAX_CACHE=off` it is built into a temporary folder for this
process.

`RTDETR_JAX_NATIVE` chooses: `on` (the default) uses the kernels where they apply; without a C++ compiler they are
not expected (`expected`) and `conv2d` keeps its previous forms, batch norm its matrix-vector sums, the deformable
attention XLA's gathers and Winograd's transforms XLA's forms, after one warning the first time a kernel would
have applied (the r18vd batch-4 training step ran 10-13% longer so, benchmarks/README.md); when a build fails (no
jaxlib headers, a compile error, an unwritable cache) it warns once, the gradients being traced fall back to XLA's
own computation and later traces to the previous forms (batch norm: the matrix-vector sums at once; the sampling
and the transforms: XLA's forms). `off` never uses them; `require` raises instead of falling back (CI sets it, so
that a broken build fails the tests instead of passing them on the fallback).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

NATIVE_ENV = "RTDETR_JAX_NATIVE"
CHOICES = ("on", "off", "require")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-fPIC", "-shared")
HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = {  # name -> (source file, its FFI handler symbols; each registered as rtdetr_jax_<name>[_<i>])
    "kernel_gradient": ("cpu_kernel_gradient.cc", ("RtdetrKernelGradientF32",)),
    "deformable_sampling": ("cpu_deformable_sampling.cc",
                            ("RtdetrDeformableSamplingF32", "RtdetrDeformableSamplingGradF32")),
    "channel_moments": ("cpu_channel_moments.cc", ("RtdetrChannelMomentsF32", "RtdetrChannelGradMomentsF32")),
    "winograd_transforms": ("cpu_winograd_transforms.cc",
                            ("RtdetrWinogradInputTransformF32", "RtdetrWinogradOutputTransformF32")),
}

_lock = threading.Lock()
_targets: dict[str, tuple[str, ...] | None] = {}  # name -> registered targets, or None after a failed build
_registered: dict[str, tuple[str, ...]] = {}  # name -> targets registered with XLA (once per process: XLA refuses
                                              # a second handler under a registered name)
_temp_dirs: list[str] = []
_libraries: list = []
_warned_no_compiler = False


class NativeBuildError(RuntimeError):
    """A kernel could not be built or loaded (one line, naming the source file and the cause)."""


def choice(environ=None) -> str:
    environ = os.environ if environ is None else environ
    value = environ.get(NATIVE_ENV, "on").strip().lower() or "on"
    if value not in CHOICES:
        raise ValueError(f"{NATIVE_ENV}={environ[NATIVE_ENV]!r}: use one of {', '.join(CHOICES)}")
    return value


def compiler(environ=None) -> str | None:
    """The C++ compiler: `$CXX`, else c++ or g++ or clang++ on the PATH; None when there is none."""
    environ = os.environ if environ is None else environ
    if environ.get("CXX"):
        return shutil.which(environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        if path := shutil.which(name):
            return path
    return None


def _cpu_identity() -> str:
    """The CPU's model and feature flags (what -march=native compiles for), or the platform where /proc is absent."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            first = fh.read().split("\n\n")[0]
        return "\n".join(line for line in first.splitlines()
                         if line.split(":")[0].strip() in ("vendor_id", "cpu family", "model", "flags", "Features"))
    except OSError:
        return platform.processor() + platform.machine()


def _build_dir() -> str:
    from rtdetr_jax.convert.cache import cache_root

    root = cache_root()
    if root is not None:
        return os.path.join(root, "native")
    if not _temp_dirs:
        _temp_dirs.append(tempfile.mkdtemp(prefix="rtdetr-jax-native-"))
        import atexit

        atexit.register(shutil.rmtree, _temp_dirs[0], ignore_errors=True)
    return _temp_dirs[0]


def _headers() -> list[bytes]:
    """The contents of the kernels' shared headers (ops/*.h, e.g. cpu_tasks.h), in name order: part of every
    kernel's cache key, so that a changed header rebuilds them."""
    found = []
    for entry in sorted(os.listdir(HERE)):
        if entry.endswith(".h"):
            with open(os.path.join(HERE, entry), "rb") as fh:
                found.append(entry.encode() + b"\0" + fh.read())
    return found


def build(name: str, cxx: str | None = None) -> str:
    """Compile kernel `name` (or find it in the cache); returns the shared library's path. Raises NativeBuildError."""
    import jax
    import jaxlib

    source_file, _ = KERNELS[name]
    source_path = os.path.join(HERE, source_file)
    cxx = cxx or compiler()
    if cxx is None:
        if os.environ.get("CXX"):
            raise NativeBuildError(f"{source_file}: CXX={os.environ['CXX']!r} is not an executable")
        raise NativeBuildError(f"{source_file}: no C++ compiler found (install g++, or set CXX)")
    try:
        with open(source_path, "rb") as fh:
            source = fh.read()
    except OSError as err:
        raise NativeBuildError(f"{source_path}: {err.strerror}") from None
    include = jax.ffi.include_dir()
    if not os.path.isfile(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
        raise NativeBuildError(f"{source_file}: jaxlib's FFI headers are missing from {include}")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise NativeBuildError(f"{source_file}: cannot run the compiler {cxx}: {err}") from None
    key = hashlib.sha256(b"\0".join([source, *_headers(), version.encode(), " ".join(FLAGS).encode(),
                                     jaxlib.__version__.encode(), _cpu_identity().encode()])).hexdigest()[:20]
    folder = _build_dir()
    target = os.path.join(folder, f"{name}-{key}.so")
    if os.path.isfile(target):
        return target
    from rtdetr_jax.io_utils import atomic_path

    try:
        with atomic_path(target) as tmp:
            command = [cxx, *FLAGS, "-I", HERE, "-I", include, source_path, "-o", tmp]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as err:
                raise NativeBuildError(f"{source_file}: the compiler {cxx} failed to run: {err}") from None
            if done.returncode != 0:
                lines = done.stderr.splitlines()
                first = next((line for line in lines if "error" in line), " ".join(lines)[:300])
                raise NativeBuildError(f"{source_file}: {os.path.basename(cxx)} exited with {done.returncode}: "
                                       f"{first.strip()}")
    except OSError as err:  # the cache folder: not creatable or not writable
        raise NativeBuildError(f"{folder}: {err.strerror or err}") from None
    return target


def applies(name: str, *dtypes) -> bool:
    """Whether kernel `name` is to run for operands of `dtypes`: on the CPU with a single device (under a mesh XLA
    would gather a sharded batch to run an opaque custom call, and a sum would not run over the global batch), every
    dtype float32, and the kernel `expected` (checked last: it warns once where no compiler is there). Each caller
    (ops/conv.py, batch_norm.py, deformable_sampling.py, winograd.py) says why its kernel is worth it."""
    import jax
    import jax.numpy as jnp

    return (jax.default_backend() == "cpu" and jax.device_count() == 1
            and all(jnp.dtype(dtype) == jnp.float32 for dtype in dtypes) and expected(name))


def expected(name: str) -> bool:
    """Whether kernel `name` is to be used, without building it: native kernels are not off, and it is registered
    or, not tried yet, a C++ compiler is there (under `require`, always: `target` then raises if it fails)."""
    mode = choice()
    if mode == "off":
        return False
    if mode == "require":
        return True
    if name in _targets:
        return _targets[name] is not None
    if compiler() is not None:
        return True
    _warn_no_compiler()
    return False


def _warn_no_compiler() -> None:
    """Once a process: the kernels will not be built here, and what that costs."""
    global _warned_no_compiler
    with _lock:
        if _warned_no_compiler:
            return
        _warned_no_compiler = True
    if os.environ.get("CXX"):
        cause = f"CXX={os.environ['CXX']!r} is not an executable"
    else:
        cause = "no C++ compiler found (c++, g++ or clang++ on the PATH, or $CXX)"
    warnings.warn(f"rtdetr-jax's C++ CPU kernels: {cause}; XLA's slower forms run instead (install g++, or set "
                  f"{NATIVE_ENV}=off to hide this)", RuntimeWarning, stacklevel=4)


def target(name: str) -> str | None:
    """The XLA custom-call target of kernel `name` (its first handler), built and registered on first use; None
    when native kernels are off or (under `on`) could not be built. Raises NativeBuildError under `require`."""
    found = _lookup(name)
    return None if found is None else found[0]


def targets(name: str) -> tuple[str, ...] | None:
    """The XLA custom-call targets of all of kernel `name`'s handlers, in `KERNELS` order; as `target`."""
    return _lookup(name)


def _lookup(name: str) -> tuple[str, ...] | None:
    mode = choice()
    if mode == "off":
        return None
    with _lock:
        if name not in _targets:
            try:
                _targets[name] = _register(name)
            except NativeBuildError as err:
                if mode == "require":
                    raise
                warnings.warn(f"{err}; using XLA's computation instead ({NATIVE_ENV}=off hides this)",
                              RuntimeWarning, stacklevel=4)
                _targets[name] = None
        if _targets[name] is None and mode == "require":
            raise NativeBuildError(f"{KERNELS[name][0]}: not available ({NATIVE_ENV}=require)")
        return _targets[name]


def _register(name: str) -> tuple[str, ...]:
    import ctypes

    import jax

    if name in _registered:
        return _registered[name]
    path = build(name)
    _, symbols = KERNELS[name]
    try:
        library = ctypes.cdll.LoadLibrary(path)
        handlers = [getattr(library, symbol) for symbol in symbols]
    except (OSError, AttributeError) as err:
        raise NativeBuildError(f"{path}: cannot load {', '.join(symbols)}: {err}") from None
    registered = tuple(f"rtdetr_jax_{name}" + (f"_{i}" if i else "") for i in range(len(symbols)))
    for target_name, handler in zip(registered, handlers):
        jax.ffi.register_ffi_target(target_name, jax.ffi.pycapsule(handler), platform="cpu")
    _libraries.append(library)  # keep it loaded for the process's lifetime
    _registered[name] = registered
    return registered

