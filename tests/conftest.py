"""Reference checkpoints built with transformers: seeded random weights, perturbed, saved with `save_pretrained`.

A freshly initialised transformers RT-DETRv2 is nearly degenerate (encoder batch-norm weights ~N(0, 0.01) shrink
every feature to ~1e-8, so all encoder scores tie and top-k order is float noise). `perturb_` adds N(0, 0.1) to
every parameter (scaled by fan-in for matrices), calibrates batch-norm statistics on an image, and the tests check
that the k-th and (k+1)-th encoder scores are well separated before trusting a comparison.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
# converted-weights cache (rtdetr_jax/convert/cache.py) in a throw-away folder, not the user's ~/.cache;
# subprocesses started by tests inherit it; removed when this process (each pytest-xdist worker has its own) ends
os.environ["RTDETR_JAX_CACHE"] = _CONVERSION_CACHE = tempfile.mkdtemp(prefix="rtdetr-jax-test-cache-")
atexit.register(shutil.rmtree, _CONVERSION_CACHE, ignore_errors=True)

from images import synthetic_batch  # noqa: E402

TINY_BASIC = dict(
    backbone=dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 2, 1, 1], layer_type="basic"),
    encoder_in_channels=[32, 64, 128],
)
TINY_BOTTLENECK = dict(
    backbone=dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 1, 1], layer_type="bottleneck"),
    encoder_in_channels=[64, 128, 256],
)


def tiny_config(layout=TINY_BASIC, **overrides):
    """A reduced-width transformers RTDetrV2Config (all code paths, a fraction of the cost)."""
    from transformers import RTDetrResNetConfig, RTDetrV2Config

    backbone = RTDetrResNetConfig(out_indices=[2, 3, 4], **layout["backbone"])
    kwargs = dict(
        backbone_config=backbone,
        encoder_in_channels=layout["encoder_in_channels"],
        encoder_hidden_dim=32,
        d_model=32,
        decoder_in_channels=[32, 32, 32],
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=20,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_labels=5,
        hidden_expansion=0.5,
    )
    kwargs.update(overrides)
    return RTDetrV2Config(**kwargs)


def r18vd_config(**overrides):
    """transformers' config for PekingU/rtdetr_v2_r18vd (80 COCO classes), at full size."""
    from transformers import RTDetrResNetConfig, RTDetrV2Config

    backbone = RTDetrResNetConfig(hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                                  out_indices=[2, 3, 4])
    return RTDetrV2Config(backbone_config=backbone, encoder_in_channels=[128, 256, 512], hidden_expansion=0.5,
                          decoder_layers=3, num_labels=80, **overrides)


def small_config(**overrides):
    """Our own config (not transformers'): the `tiny` preset, narrower still, for the training tests."""
    from rtdetr_jax.config import RTDetrV2Config

    kw = dict(id2label={i: str(i) for i in range(4)}, num_queries=30, num_denoising=20, decoder_layers=2,
              backbone_config=dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128]),
              encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32, d_model=32, decoder_in_channels=[32] * 3,
              encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2)
    kw.update(overrides)
    return RTDetrV2Config.from_preset("tiny", **kw)


def perturb_(model, seed: int = 0, scale: float = 0.1):
    """Add noise to every float parameter: N(0, scale) to vectors (norm scales become 1 + N(0, scale)), and
    N(0, 5 * scale / sqrt(fan_in)) to matrices and kernels, so a 256-wide layer is not pushed into saturation."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.dtype.is_floating_point or name.endswith("n_points_scale"):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.add_(noise * 5 * scale / fan_in**0.5)
            elif name.endswith(("running_var", "running_mean")):
                continue  # set by calibrate_batch_norms_
            elif name.endswith("weight") and _is_norm(name):
                p.copy_(1.0 + noise * scale)
            else:
                p.add_(noise * scale)
    return model


def _is_norm(name: str) -> bool:
    return any(s in name for s in ("norm", "normalization", "input_proj", "enc_output.1", "layer_norm"))


def calibrate_batch_norms_(model, pixel_values: np.ndarray):
    """Set every batch norm's running mean/variance to the statistics of its input on `pixel_values`.

    Random weights plus noise make activations grow layer after layer (to ~1e12 at r18 size), where float32
    rounding decides the query ranking. Calibrated statistics keep every layer O(1), as in a trained model.
    """
    import torch

    def hook(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if "BatchNorm" in type(m).__name__]
    try:
        with torch.no_grad():
            model(pixel_values=torch.from_numpy(pixel_values))
    finally:
        for h in handles:
            h.remove()
    return model


def build_reference(folder, config, seed: int = 0, calibration: np.ndarray | None = None):
    """Make, perturb, calibrate, save (transformers `save_pretrained`) and return an eval-mode torch model."""
    import torch
    from transformers import RTDetrV2ForObjectDetection

    torch.manual_seed(seed)
    model = RTDetrV2ForObjectDetection(config).eval()
    perturb_(model, seed)
    if calibration is None:
        calibration = synthetic_batch(2, 128, 160, seed=seed + 100)
    calibrate_batch_norms_(model, calibration)
    model.save_pretrained(folder)
    return model


def torch_forward(model, pixel_values: np.ndarray):
    import torch

    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixel_values))


def topk_margin(enc_outputs_class: np.ndarray, k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th best encoder score over the batch."""
    scores = np.sort(enc_outputs_class.max(-1), axis=-1)[:, ::-1]
    return float(np.min(scores[:, k - 1] - scores[:, k]))


OUTPUT_FIELDS = [
    "logits",
    "pred_boxes",
    "last_hidden_state",
    "intermediate_hidden_states",
    "intermediate_logits",
    "intermediate_reference_points",
    "init_reference_points",
    "enc_topk_logits",
    "enc_topk_bboxes",
    "enc_outputs_class",
    "enc_outputs_coord_logits",
]


QUERY_AXIS = {
    "logits": 1,
    "pred_boxes": 1,
    "last_hidden_state": 1,
    "intermediate_hidden_states": 2,
    "intermediate_logits": 2,
    "intermediate_reference_points": 2,
    "init_reference_points": 1,
    "enc_topk_logits": 1,
    "enc_topk_bboxes": 1,
}


def query_alignment(ours, reference) -> np.ndarray:
    """(batch, queries) permutation taking our query rows to the reference's.

    Both sides select the same top-k proposals (checked by the caller through `topk_margin`), but two proposals
    whose scores differ by less than float32 noise may come out in swapped order. The decoder is permutation
    equivariant over queries, so such a swap only permutes rows; each row is matched by its proposal box.
    """
    a = np.asarray(ours.init_reference_points, np.float64)
    b = reference.init_reference_points.numpy().astype(np.float64)
    perms = []
    for i in range(a.shape[0]):
        dist = np.abs(b[i][:, None, :] - a[i][None, :, :]).max(-1)  # (ref queries, our queries)
        perm = dist.argmin(1)
        assert len(set(perm.tolist())) == len(perm), "query sets differ: the top-k selection disagrees"
        assert dist[np.arange(len(perm)), perm].max() < 1e-3, "a reference proposal has no counterpart"
        perms.append(perm)
    return np.stack(perms)


def max_abs_diffs(ours, reference) -> dict[str, float]:
    """Max |ours - reference| per output field, query rows aligned by `query_alignment`.

    Huge sentinel values (invalid anchors) must match exactly.
    """
    diffs = {}
    perm = query_alignment(ours, reference)
    for field in OUTPUT_FIELDS:
        a = np.asarray(getattr(ours, field), np.float64)
        b = getattr(reference, field).numpy().astype(np.float64)
        if field in QUERY_AXIS:
            a = np.stack([np.take(a[i], perm[i], axis=QUERY_AXIS[field] - 1) for i in range(a.shape[0])])
        assert a.shape == b.shape, f"{field}: shape {a.shape} vs {b.shape}"
        sentinel = np.abs(b) > 1e30
        assert np.array_equal(np.abs(a) > 1e30, sentinel), f"{field}: invalid-anchor positions differ"
        diffs[field] = float(np.abs(a[~sentinel] - b[~sentinel]).max()) if (~sentinel).any() else 0.0
    for i, (a, b) in enumerate(zip(ours.encoder_last_hidden_state, reference.encoder_last_hidden_state)):
        a, b = np.asarray(a), b.numpy()
        assert a.shape == b.shape, f"encoder_last_hidden_state[{i}]: shape {a.shape} vs {b.shape}"
        diffs[f"encoder_last_hidden_state[{i}]"] = float(np.abs(a - b).max())
    return diffs


@pytest.fixture(scope="session")
def images_2x96x128():
    return synthetic_batch(2, 96, 128, seed=3)


def assert_parity(reference, model, pixel_values: np.ndarray, tol: float = 1e-4) -> dict[str, float]:
    """Our model vs transformers' on `pixel_values`, in two parts:

    1. Implementation: both sides in float64 (JAX x64, torch `.double()`), every output within `tol`.
    2. Float32 accuracy: each of our float32 outputs is within `tol` of the float64 truth, or, where float32
       cannot get that close, no further from it than twice PyTorch's own float32 error. At r18 depth float32
       noise alone is ~5e-4 on the logits, so a float32-vs-float32 bound of 1e-4 would test rounding, not the
       implementation.
    Returns the float64 differences.
    """
    import copy

    import jax
    import jax.numpy as jnp
    import torch

    from rtdetr_jax import RTDetrV2Detector

    expected32 = torch_forward(reference, pixel_values)
    assert topk_margin(expected32.enc_outputs_class.numpy(), model.config.num_queries) > 1e-4, "top-k near a tie"
    with torch.no_grad():
        expected64 = copy.deepcopy(reference).double()(pixel_values=torch.from_numpy(pixel_values).double())
    ours32 = model(pixel_values=pixel_values)
    with jax.enable_x64(True):
        variables64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), model.variables)
        apply64 = jax.jit(RTDetrV2Detector(model.config, jnp.float64).apply)
        ours64 = apply64(variables64, jnp.asarray(pixel_values, jnp.float64))
        diffs64 = max_abs_diffs(ours64, expected64)
    assert max(diffs64.values()) <= tol, f"float64 parity: {diffs64}"
    ours_err = max_abs_diffs(ours32, expected64)
    torch_err = max_abs_diffs(expected32, expected64)
    worse = {k: (ours_err[k], torch_err[k]) for k in ours_err if ours_err[k] > max(tol, 2 * torch_err[k])}
    assert not worse, f"float32 error vs float64 (ours, torch): {worse}"
    return diffs64


def torch_conv_with_gradients(x, kernel, probe, stride: int = 1, padding: int = 0):
    """PyTorch's reference for the convolution tests: output, input gradient and kernel gradient of
    sum(conv2d(x, kernel, stride, padding) * probe), with NHWC inputs and outputs and an HWIO kernel."""
    import torch

    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    kt = torch.tensor(kernel.transpose(3, 2, 0, 1), requires_grad=True)
    y = torch.nn.functional.conv2d(xt, kt, stride=stride, padding=padding)
    (y * torch.tensor(probe.transpose(0, 3, 1, 2))).sum().backward()
    return (y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
            kt.grad.numpy().transpose(2, 3, 1, 0))


def one_thread_outputs(code: str, tmp_path) -> list[np.ndarray]:
    """Run `code` (Python that sets `outs`, a list of arrays; this folder is importable) in a process that may use
    one core only (`taskset -c 0`, so XLA's thread pool has one thread) under `RTDETR_JAX_NATIVE=require`, and
    return its `outs`. Skips the calling test without taskset or a second core to compare with."""
    taskset = shutil.which("taskset")
    if taskset is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs taskset and two cores to compare with a one-thread process")
    here = os.path.dirname(os.path.abspath(__file__))
    path = str(tmp_path / "one_thread.npz")
    script = (f"import sys\nsys.path.insert(0, {here!r})\nimport numpy as np\n{textwrap.dedent(code)}\n"
              f"np.savez({path!r}, *[np.asarray(a) for a in outs])\n")
    env = dict(os.environ, RTDETR_JAX_NATIVE="require",
               PYTHONPATH=os.path.dirname(here) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([taskset, "-c", "0", sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = np.load(path)
    return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def assert_kernel_refuses(target: str, outs, operands, message: str, **attributes) -> None:
    """An XLA FFI call of the C++ kernel `target` on `operands` (results shaped as `outs`, `attributes` passed as
    the call's attributes) fails with the whole error `INVALID_ARGUMENT: <message>`, one line (`message` a regex)."""
    import jax

    with pytest.raises(Exception, match=message) as err:
        jax.block_until_ready(jax.ffi.ffi_call(target, outs)(*operands, **attributes))
    assert re.fullmatch("INVALID_ARGUMENT: " + message, str(err.value)), str(err.value)
