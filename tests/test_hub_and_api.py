"""Hub loading offline (Hub-cache layout, HF_HUB_OFFLINE=1), clear errors, the model object's jit cache and
input checks, bfloat16 compute."""

import os
import shutil
import subprocess
import sys

import numpy as np
import jax
import pytest
from conftest import build_reference, tiny_config

from rtdetr_jax import DETECTION_FIELDS, ModelNotFoundError, RTDetrImageProcessor, RTDetrV2ForObjectDetection

REPO = "PekingU/rtdetr_v2_tiny_test"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A checkpoint saved by transformers, placed in the Hub cache layout huggingface_hub reads offline."""
    src = tmp_path_factory.mktemp("src")
    build_reference(src, tiny_config(), seed=4)
    RTDetrImageProcessor().save_pretrained(src)
    cache = tmp_path_factory.mktemp("hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name in os.listdir(src):
        shutil.copy(src / name, snapshot / name)
    return cache, src


def _run(code, cache):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_repo_id_resolves_from_offline_cache(hub_cache):
    cache, src = hub_cache
    code = f"""
import numpy as np
from rtdetr_jax import RTDetrV2ForObjectDetection, RTDetrImageProcessor
m = RTDetrV2ForObjectDetection.from_pretrained({REPO!r})
p = RTDetrImageProcessor.from_pretrained({REPO!r})
local = RTDetrV2ForObjectDetection.from_pretrained({str(src)!r})
x = np.random.default_rng(0).random((1, 3, 64, 96), dtype=np.float32)
assert np.array_equal(np.asarray(m(pixel_values=x).logits), np.asarray(local(pixel_values=x).logits))
print("ok", p.size)
"""
    result = _run(code, cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok {'height': 640, 'width': 640}" in result.stdout


def test_missing_repo_is_a_clear_error(hub_cache):
    cache, _ = hub_cache
    code = """
from rtdetr_jax import RTDetrV2ForObjectDetection
try:
    RTDetrV2ForObjectDetection.from_pretrained("PekingU/does_not_exist")
except FileNotFoundError as err:
    print("ERR", err)
"""
    result = _run(code, cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ERR PekingU/does_not_exist: config.json is not in the local Hub cache" in result.stdout


def test_local_path_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="folder has no config.json"):
        RTDetrV2ForObjectDetection.from_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not a valid Hub repo id"):
        RTDetrV2ForObjectDetection.from_pretrained("./no/such/dir/here")
    build_reference(tmp_path, tiny_config(), seed=4)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match="no flax_model.msgpack, model.safetensors"):
        RTDetrV2ForObjectDetection.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_reference(folder, tiny_config(), seed=5)
    return RTDetrV2ForObjectDetection.from_pretrained(folder), folder


def test_compiles_once_per_shape(tiny_model, images_2x96x128):
    _, folder = tiny_model
    model = RTDetrV2ForObjectDetection.from_pretrained(folder)  # its own jit caches, whatever other tests ran
    assert model.compiled_shapes == 0
    first = model(pixel_values=images_2x96x128)
    assert model.compiled_shapes == 1
    second = model(pixel_values=images_2x96x128 * 0.5)
    assert model.compiled_shapes == 1  # same shape: no recompilation
    assert not np.array_equal(np.asarray(first.logits), np.asarray(second.logits))
    model(pixel_values=images_2x96x128[:1])
    assert model.compiled_shapes == 2
    # a selection of output fields is a forward of its own, compiled once per shape too
    model(pixel_values=images_2x96x128, output_fields=DETECTION_FIELDS)
    model(pixel_values=images_2x96x128 * 0.5, output_fields=["pred_boxes", "logits"])  # same selection
    assert model.compiled_shapes == 3


def test_output_fields_compute_only_the_fields_asked_for(tiny_model, images_2x96x128):
    """`output_fields=DETECTION_FIELDS` (what post-processing reads) gives the same logits and boxes as the full
    forward, leaves the other fields None, and compiles to less work: XLA drops the dense encoder heads over every
    anchor and the NCHW copies of the encoder's maps."""
    model, _ = tiny_model
    full = model(pixel_values=images_2x96x128)
    lean = model(pixel_values=images_2x96x128, output_fields=DETECTION_FIELDS)
    assert lean.keys() == ["logits", "pred_boxes"]
    np.testing.assert_allclose(np.asarray(lean.logits), np.asarray(full.logits), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lean.pred_boxes), np.asarray(full.pred_boxes), rtol=0, atol=1e-6)
    one = model(pixel_values=images_2x96x128, output_fields="enc_outputs_coord_logits")
    assert one.keys() == ["enc_outputs_coord_logits"]
    np.testing.assert_allclose(np.asarray(one.enc_outputs_coord_logits), np.asarray(full.enc_outputs_coord_logits),
                               rtol=0, atol=1e-5)

    x = jax.numpy.asarray(images_2x96x128)

    def flops(fields):
        compiled = model._forward(fields).lower(model.variables, x).compile()
        analysis = compiled.cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    # what is dropped includes the box head's three matmuls over every anchor of both images (the score head
    # stays: the query selection reads it)
    from rtdetr_jax.modeling.detector import num_tokens

    d, tokens = model.config.d_model, 2 * num_tokens(model.config, 96, 128)
    assert flops(None) - flops(DETECTION_FIELDS) >= 2 * tokens * (d * d + d * d + d * 4)


def test_output_fields_with_labels_keep_the_loss(tiny_model, images_2x96x128):
    model, _ = tiny_model
    labels = [{"class_labels": np.array([1, 2]), "boxes": np.array([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
              {"class_labels": np.array([0]), "boxes": np.array([[0.4, 0.4, 0.3, 0.3]])}]
    full = model(pixel_values=images_2x96x128, labels=labels)
    lean = model(pixel_values=images_2x96x128, labels=labels, output_fields=DETECTION_FIELDS)
    assert lean.keys() == ["logits", "pred_boxes", "loss", "loss_dict"]
    np.testing.assert_allclose(float(lean.loss), float(full.loss), rtol=1e-6)
    assert sorted(lean.loss_dict) == sorted(full.loss_dict)


@pytest.mark.parametrize("fields, message", [
    (("logits", "boxes"), "output_fields \\('logits', 'boxes'\\): unknown field 'boxes'; choose from logits, "),
    ((), "output_fields \\(\\): empty; choose from logits, "),
])
def test_bad_output_fields(tiny_model, fields, message):
    model, _ = tiny_model
    with pytest.raises(ValueError, match=message):
        model(pixel_values=np.zeros((1, 3, 64, 64), np.float32), output_fields=fields)


def test_repeated_inference_never_recompiles(tiny_model, images_2x96x128):
    """Counts real XLA compilations (jax's backend-compile event), not just our jit cache: after the first
    forward + post-processing at a shape, more calls at that shape compile nothing."""
    import jax.monitoring

    model, _ = tiny_model
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name", "?"))

    processor = RTDetrImageProcessor()
    pixels = images_2x96x128[:, :, :64, :96]  # a shape no other test uses, so the first call must compile
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = model(pixel_values=pixels)
        processor.post_process_object_detection(out, threshold=0.0, target_sizes=[(64, 96)] * 2)
        assert compiles, "the first call at a new shape compiled nothing: is the compile event still recorded?"
        compiles.clear()
        for scale in (0.5, 0.25, 1.0):
            out = model(pixel_values=pixels * scale)
            processor.post_process_object_detection(out, threshold=0.0, target_sizes=[(64, 96)] * 2)
        assert compiles == [], f"recompiled for a repeated shape: {compiles}"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_compiler_memory_released_after_each_new_shape(tiny_model, images_2x96x128, monkeypatch):
    """After a call that compiled (a new input shape), the model drops jax's tracing caches
    (jax_caches.drop_tracing_caches) and hands the freed memory back to the system (host_memory.release_free_heap)
    as the call starts, and trims again once its outputs are ready (its scratch memory freed); calls that reuse a
    compiled shape do not pay for it, nor wait: they only hand back tcmalloc's surplus free pages once dispatched
    (host_memory.release_surplus_heap, a second scratch block)."""
    import rtdetr_jax.model

    model, _ = tiny_model
    events = []
    monkeypatch.setattr(rtdetr_jax.model, "drop_tracing_caches", lambda: events.append("drop") or True)
    monkeypatch.setattr(rtdetr_jax.model, "release_free_heap", lambda: events.append("trim") or True)
    monkeypatch.setattr(rtdetr_jax.model, "release_surplus_heap", lambda: events.append("surplus") or False)
    block = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: events.append("wait") or block(x))
    pixels = images_2x96x128[:, :, :32, :64]  # a shape no other test uses, so the first call must compile
    model(pixel_values=pixels)
    assert events == ["drop", "trim", "wait", "trim"]
    model(pixel_values=pixels * 0.5)
    assert events == ["drop", "trim", "wait", "trim", "surplus"]
    model(pixel_values=pixels[:1])
    assert events == ["drop", "trim", "wait", "trim", "surplus", "drop", "trim", "wait", "trim"]


@pytest.mark.parametrize("flax_weights", [False, True])
def test_loading_releases_host_memory(tiny_model, tmp_path, monkeypatch, flax_weights):
    """from_pretrained, from transformers' safetensors or from our msgpack, drops jax's tracing caches (its shape
    check traced the model's init) and then trims the heap (the host copies of the weights)."""
    import rtdetr_jax.model

    model, folder = tiny_model
    if flax_weights:
        model.save_pretrained(tmp_path / "saved")
        folder = tmp_path / "saved"
    events = []
    monkeypatch.setattr(rtdetr_jax.model, "drop_tracing_caches", lambda: events.append("drop") or True)
    monkeypatch.setattr(rtdetr_jax.model, "release_free_heap", lambda: events.append("trim") or True)
    RTDetrV2ForObjectDetection.from_pretrained(folder)
    assert events == ["drop", "trim"]


@pytest.mark.parametrize(
    "shape, message",
    [((3, 96, 128), "expected \\(batch, 3, height, width\\)"), ((1, 1, 96, 128), "expected"),
     ((1, 3, 100, 128), "multiples of 32")],
)
def test_bad_input_shapes(tiny_model, shape, message):
    model, _ = tiny_model
    with pytest.raises(ValueError, match=message):
        model(pixel_values=np.zeros(shape, np.float32))


def test_too_few_tokens_for_the_queries():
    from rtdetr_jax import RTDetrV2Config

    config = RTDetrV2Config.from_dict(dict(tiny_config().to_dict(), num_queries=50))
    model = RTDetrV2ForObjectDetection(config)
    with pytest.raises(ValueError, match="32x32 give 21 encoder tokens, fewer than num_queries=50"):
        model(pixel_values=np.zeros((1, 3, 32, 32), np.float32))


def test_bfloat16_compute_runs(tiny_model, images_2x96x128):
    """bfloat16 activations, float32 parameters. Runs and keeps its dtypes; accuracy is not asserted here: on this
    perturbed random tiny model the encoder scores differ from float32 by up to ~18% of their range on CPU. On a
    trained model it moved AP by 0.22 AP points (benchmarks/bench_learning.py, benchmarks/README.md)."""
    model, folder = tiny_model
    bf16 = RTDetrV2ForObjectDetection.from_pretrained(folder, dtype="bfloat16")
    a = model(pixel_values=images_2x96x128)
    b = bf16(pixel_values=images_2x96x128)
    assert str(b.last_hidden_state.dtype) == "bfloat16"
    assert str(b.logits.dtype) == "float32" and a.logits.shape == b.logits.shape
    assert str(model.params["model"]["enc_score_head"]["kernel"].dtype) == "float32"
    assert np.isfinite(np.asarray(b.logits, np.float32)).all()
    with pytest.raises(ValueError, match="dtype='int8'"):
        RTDetrV2ForObjectDetection.from_pretrained(folder, dtype="int8")
