"""benchmarks/bench_gpu.py, the accelerator rows of the speed benchmark, on the CPU: a smoke run of every path
(ours against PyTorch eager and torch.compile, float32 and bfloat16, the bfloat16 error), the time budget, and
the query-matched error it reports."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import bench_gpu  # noqa: E402


def test_query_matched_error_pairs_queries_and_counts_close_topk():
    rng = np.random.default_rng(0)
    full = {"boxes": rng.random((2, 5, 4)), "probs": rng.random((2, 5, 3)),
            "enc_scores": np.array([[0.9, 0.8, 0.5, 0.4], [0.9, 0.8, 0.5, 0.499]])}
    order = [3, 0, 4, 1, 2]  # the reduced run lists the same queries in another order, slightly moved
    reduced = {"boxes": full["boxes"][:, order] + 0.01, "probs": full["probs"][:, order] - 0.002,
               "enc_scores": full["enc_scores"] + 0.005}
    error = bench_gpu.query_matched_error(reduced, full, num_queries=3)
    assert error["max_abs_diff_boxes_probs"] == pytest.approx(0.01)
    assert error["mean_abs_diff_boxes_probs"] == pytest.approx((4 * 0.01 + 3 * 0.002) / 7)
    # image 0: 3rd/4th encoder scores 0.1 apart (> 0.005 error); image 1: 0.001 apart (< 0.005)
    assert error["images_with_topk_gap_below_score_error"] == 1 and error["images"] == 2


@pytest.mark.slow
def test_smoke_run_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    result = bench_gpu.main(["--device", "cpu", "--presets", "tiny", "--size", "128", "--batches", "1",
                             "--iters", "1", "--no-torch-compile", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert [(r["dtype"], r["batch"]) for r in result["rows"]] == [("float32", 1), ("bfloat16", 1)]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["jax_median_s"] > 0 and row["torch_eager_median_s"] > 0
        assert row["time_ratio_jax_over_torch_eager"] == pytest.approx(row["jax_median_s"]
                                                                        / row["torch_eager_median_s"])
        assert row["paired_time_ratio_jax_over_torch_eager"] == pytest.approx(row["jax_times_s"][0]
                                                                               / row["torch_eager_times_s"][0])
    assert result["torch_compile_rows"] == [] and result["not_run"] == []
    errors = {e["side"]: e for e in result["bfloat16_error"]}
    assert set(errors) == {"jax", "torch"}
    for e in errors.values():  # bfloat16 moves the outputs, on average by far less than their range
        assert 0 < e["mean_abs_diff_boxes_probs"] < 0.2 and e["max_abs_diff_boxes_probs"] <= 1
        assert 0 <= e["queries_within_0.01"] <= e["queries_within_0.05"] <= 1 and e["images"] == 1
    assert "tiny   float32 batch   1  jax" in capsys.readouterr().out


@pytest.mark.slow
def test_torch_compile_rows_on_cpu(tmp_path):
    """torch.compile's path (dynamo with its eager backend, ~40 s of tracing here; the GPU run uses inductor)."""
    result = bench_gpu.main(["--device", "cpu", "--presets", "tiny", "--size", "128", "--batches", "1",
                             "--dtypes", "float32", "--iters", "1", "--torch-compile-backend", "eager",
                             "--out", str(tmp_path / "gpu.json")])
    [row] = result["torch_compile_rows"]
    assert "error" not in row, row
    assert row["backend"] == "eager" and row["torch_compile_median_s"] > 0
    assert row["time_ratio_jax_over_torch_compile"] == pytest.approx(result["rows"][0]["jax_median_s"]
                                                                      / row["torch_compile_median_s"])


def test_spent_budget_runs_nothing_and_says_so(tmp_path):
    result = bench_gpu.main(["--device", "cpu", "--presets", "tiny", "r18vd", "--budget-s", "0", "--out",
                             str(tmp_path / "gpu.json")])
    assert result["rows"] == [] and result["torch_compile_rows"] == []
    assert result["not_run"] == ["tiny (every row)", "r18vd (every row)"]


@pytest.mark.parametrize("argv, message", [
    (["--iters", "0"], "--iters 0: need at least 1 timed call"),
    (["--batches", "1", "0"], "--batches [1, 0]: every batch size must be at least 1"),
    (["--presets", "nosuch"], "argument --presets: invalid choice: 'nosuch'"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


def test_no_gpu_is_a_one_line_error():
    with pytest.raises(SystemExit, match="jax sees no gpu device .*; --device cpu for a smoke run"):
        bench_gpu.main(["--device", "gpu"])


def test_precision_settings_are_put_back():
    import jax
    import torch

    before = (jax.config.jax_default_matmul_precision, torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32)
    with bench_gpu._precision_restored():
        bench_gpu.set_precision("float32")
        assert jax.config.jax_default_matmul_precision == "highest"
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        bench_gpu.set_precision("tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (jax.config.jax_default_matmul_precision, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32) == before
