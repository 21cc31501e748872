"""benchmarks/profile_inference.py and profile_training.py, where the time goes: the interleaved timing rounds, the
per-round stage differences, and a smoke run of the inference profile on the CPU."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import common  # noqa: E402
import profile_inference  # noqa: E402
import profile_training  # noqa: E402


def test_interleaved_times_warms_up_each_call_then_runs_rounds_in_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = common.interleaved_times(fns, 3)
    assert calls == ["a", "b", "c"] * 4  # one warm-up round, untimed, then three timed ones
    assert {name: len(ts) for name, ts in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_stage_medians_take_the_median_of_each_rounds_difference():
    # round 3 ran in a slow phase: its calls all took longer; per-round differences cancel it, while the
    # difference of the two medians (3.0 - 2.0 = 1.0) would not
    times = {"backbone": [1.0, 2.0, 3.0], "encoder": [1.5, 3.0, 3.2], "forward": [2.0, 3.1, 3.4]}
    stages = common.stage_medians(times, {"backbone": "backbone", "encoder": "encoder", "rest": "forward"})
    assert list(stages) == ["backbone", "encoder", "rest"]
    assert stages == pytest.approx({"backbone": 2.0, "encoder": 0.5, "rest": 0.2})


def test_stage_medians_refuse_rounds_of_different_counts():
    with pytest.raises(ValueError):
        common.stage_medians({"a": [1.0, 2.0], "b": [3.0]}, {"first": "a", "second": "b"})


def test_training_profile_stages_and_step():
    times = {"backbone": [1.0, 1.2], "encoder": [1.5, 1.6], "loss": [3.0, 3.4], "step": [3.5, 3.6]}
    stages = profile_training.stage_times(times)
    assert list(stages) == [*profile_training.STAGES, "training step"]
    assert stages == pytest.approx({"backbone": 1.1, "encoder": 0.45, "decoder, matcher and loss": 1.65,
                                    "optimizer": 0.35, "training step": 3.55})


@pytest.mark.parametrize("script", [profile_inference, profile_training])
def test_profiles_reject_bad_arguments(script, capsys):
    for argv, fault in ((["--preset", "r19"], "--preset"), (["--iters", "0"], "--iters 0: must be at least 1")):
        with pytest.raises(SystemExit):
            script.main(argv)
        assert fault in capsys.readouterr().err


@pytest.mark.slow
def test_inference_profile_smoke_run(tmp_path, capsys):
    out = tmp_path / "profile.json"
    result = profile_inference.main(["--preset", "tiny", "--size", "96", "--iters", "2", "--out", str(out)])
    assert json.loads(out.read_text())["jax_s"] == pytest.approx(result["jax_s"])
    for side in ("jax", "torch"):
        assert {name: len(ts) for name, ts in result["times_s"][side].items()} == {
            "backbone": 2, "encoder": 2, "forward": 2, "post-processing": 2}
        stages = result[f"{side}_s"]
        assert list(stages) == [*profile_inference.STAGES, "forward", "post-processing"]
        assert stages["forward"] > 0 and stages["post-processing"] > 0
    printed = capsys.readouterr().out
    assert "| decoder and heads |" in printed and "| post-processing |" in printed
