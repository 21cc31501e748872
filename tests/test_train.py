"""Training through the command line: a smoke run (loss finite and falling, export loadable by transformers with
equal outputs, evaluation), and a run killed and resumed that ends equal to an uninterrupted one. Optimizer:
test_optim.py; the train step itself: test_train_step.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import traverse_util

from rtdetr_jax.data.synthetic import write_shapes_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Subprocesses share a persistent XLA cache, so the second and third runs skip most compilation."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shapes"))
    write_shapes_dataset(folder, train=24, val=4, size=96, seed=1)
    return folder


TRAIN_ARGS = ["--config", "tiny", "--image-size", "96", "--batch-size", "4", "--max-boxes", "6", "--lr", "1e-3",
              "--warmup-steps", "2", "--ema-warmup-steps", "2", "--no-progress", "--workers", "1"]


def run_cli(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "rtdetr_jax", *args], env=env, capture_output=True, text=True,
                          **kw)


def test_train_smoke_via_cli_and_export(shapes, tmp_path, compile_cache):
    """A few steps: finite loss, falling; EMA model exported and loadable by transformers with equal outputs."""
    out = tmp_path / "run"
    res = run_cli(["train", "--data", shapes, "--out", str(out), *TRAIN_ARGS, "--max-steps", "12",
                   "--log-every", "1", "--epochs", "3"], compile_cache, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trained 12 steps" in res.stdout
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert any("eval_AP" in r for r in records)
    assert {"loss_vfl_dn_0", "loss_giou_aux_0", "lr", "grad_norm"} <= set(records[0])

    torch = pytest.importorskip("torch")
    from transformers import RTDetrV2ForObjectDetection as HF

    from rtdetr_jax import RTDetrV2ForObjectDetection

    ours = RTDetrV2ForObjectDetection.from_pretrained(out / "model")
    theirs = HF.from_pretrained(out / "model").eval()
    x = np.random.default_rng(0).random((1, 3, 96, 96), np.float32)
    with torch.no_grad():
        expected = theirs(pixel_values=torch.from_numpy(x))
    got = ours(pixel_values=x)
    # the encoder involves no ranking: map for map, value for value
    for a, b in zip(got.encoder_last_hidden_state, expected.encoder_last_hidden_state):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=2e-4)
    # after 12 steps some queries are near-duplicates whose top-k order is float noise: compare the decoded
    # queries as a set (each of ours paired one-to-one with the closest reference query)
    from scipy.optimize import linear_sum_assignment

    ours_q = np.concatenate([np.asarray(got.pred_boxes[0]), np.asarray(got.logits[0])], -1)
    ref_q = np.concatenate([expected.pred_boxes[0].numpy(), expected.logits[0].numpy()], -1)
    cost = np.max(np.abs(ours_q[:, None] - ref_q[None]), -1)
    rows, cols = linear_sum_assignment(cost)
    assert cost[rows, cols].max() <= 2e-4, cost[rows, cols].max()

    res = run_cli(["evaluate", "--model", str(out / "model"), "--data", shapes, "--image-size", "96",
                   "--no-progress"], compile_cache, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("AP ")


def _finalized_steps(folder):
    last = os.path.join(folder, "checkpoints", "last")
    return sorted(int(d) for d in os.listdir(last) if d.isdigit()) if os.path.isdir(last) else []


def test_resume_after_kill_matches_uninterrupted_run(shapes, tmp_path, compile_cache):
    args = [*TRAIN_ARGS, "--epochs", "4", "--save-every", "3", "--eval-every", "0", "--log-every", "1"]
    # 24 images / batch 4 = 6 steps per epoch, 24 steps; killed after the first checkpoint lands
    full, killed = tmp_path / "full", tmp_path / "killed"
    res = run_cli(["train", "--data", shapes, "--out", str(full), *args], compile_cache, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]

    cmd = [sys.executable, "-m", "rtdetr_jax", "train", "--data", shapes, "--out", str(killed), *args]
    proc = subprocess.Popen(cmd, env=compile_cache, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            done = _finalized_steps(killed)
            if done and done[-1] < 24:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    steps_at_kill = _finalized_steps(killed)
    assert steps_at_kill and steps_at_kill[-1] < 24

    res = run_cli(["train", "--data", shapes, "--out", str(killed), *args, "--resume"], compile_cache, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trained 24 steps" in res.stdout
    a = (full / "model" / "flax_model.msgpack").read_bytes()
    b = (killed / "model" / "flax_model.msgpack").read_bytes()
    assert a == b, "the resumed run's EMA weights differ from the uninterrupted run's"

    from rtdetr_jax.train.checkpoint import Checkpointer

    params = []
    for run in (full, killed):
        ckpt = Checkpointer(run / "checkpoints")
        state, meta = ckpt.restore_arrays(24)
        assert meta["step"] == 24
        params.append(traverse_util.flatten_dict(state["params"]))
        ckpt.close()
    assert all(np.array_equal(params[0][k], params[1][k]) for k in params[0])


