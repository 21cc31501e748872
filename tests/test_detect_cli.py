"""`rtdetr-jax detect` end to end (a checkpoint saved by transformers with random weights), the converted-weights
cache, and every bad input of the issue: one line on stderr naming the file or value, a non-zero exit, no
traceback, no partial output (or, inside a folder, a warning and the run goes on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import build_reference, tiny_config
from images import synthetic_image
from rtdetr_jax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 160  # the test checkpoint's processor input size (25 tokens >= 20 queries)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment for subprocesses: offline Hub in an empty cache, a shared persistent XLA cache."""
    e = dict(os.environ)
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["HF_HUB_OFFLINE"] = "1"
    e["HF_HOME"] = e["HF_HUB_CACHE"] = str(tmp_path_factory.mktemp("hf_home"))
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("RTDETR_JAX_TRACEBACK", None)
    return e


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny RT-DETRv2 saved by transformers (random weights, perturbed), with a 160x160 processor config."""
    from rtdetr_jax.processing import RTDetrImageProcessor

    folder = str(tmp_path_factory.mktemp("ckpt"))
    config = tiny_config(id2label={i: name for i, name in enumerate(["cat", "dog", "car", "tree", "cup"])})
    build_reference(folder, config, seed=3)
    RTDetrImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five good images of different sizes and modes in a folder (one in a sub-folder)."""
    folder = tmp_path_factory.mktemp("images")
    synthetic_image(120, 200, seed=1).save(folder / "a.jpg", quality=95)
    synthetic_image(96, 96, seed=2).save(folder / "b.png")
    synthetic_image(150, 100, seed=3).convert("L").save(folder / "grey.png")
    os.makedirs(folder / "sub")
    synthetic_image(80, 140, seed=4).convert("P").save(folder / "sub" / "palette.gif")
    rgba = synthetic_image(64, 64, seed=5).convert("RGBA")
    rgba.putalpha(180)
    rgba.save(folder / "sub" / "rgba.png")
    (folder / "notes.txt").write_text("not an image, not an image extension: ignored")
    return folder


def run_cli(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "rtdetr_jax", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def one_line_error(stderr: str, *needles: str) -> str:
    """The error message: exactly one non-empty stderr line, no traceback, containing every needle."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def no_files(folder) -> bool:
    return not os.path.exists(folder) or not any(files for _, _, files in os.walk(folder))


# ---------------------------------------------------------------------------------------------- end to end
def test_detect_end_to_end(ckpt, images, env, tmp_path):
    out = tmp_path / "out"
    r = run_cli(["detect", str(images), "--model", ckpt, "--threshold", "0.3", "--out", str(out),
                 "--batch-size", "2"], env)
    assert r.returncode == 0, r.stderr
    assert "detect:" in r.stderr and "5/5" in r.stderr  # the progress bar (more than 4 images)
    records = read_jsonl(out / "detections.jsonl")
    assert [os.path.relpath(rec["image"], images) for rec in records] == \
        ["a.jpg", "b.png", "grey.png", os.path.join("sub", "palette.gif"), os.path.join("sub", "rgba.png")]
    assert sum(len(rec["detections"]) for rec in records) > 0
    for rec in records:
        with Image.open(rec["image"]) as src:
            assert (rec["width"], rec["height"]) == src.size
        for d in rec["detections"]:
            assert set(d) == {"label", "label_id", "score", "box_xyxy"}
            assert d["label"] in ("cat", "dog", "car", "tree", "cup") and 0.3 < d["score"] <= 1
            x0, y0, x1, y1 = d["box_xyxy"]
            assert 0 <= x0 <= x1 <= rec["width"] and 0 <= y0 <= y1 <= rec["height"]
        annotated = rec["annotated"]
        assert annotated.startswith(str(out)) and os.path.isfile(annotated)
        with Image.open(annotated) as im:
            assert im.size == (rec["width"], rec["height"]) and im.mode == "RGB"
    # the palette .gif is written as .png; sub-folders are mirrored
    assert os.path.isfile(out / images.name / "sub" / "palette.png")
    # the table names every image
    for rec in records:
        assert os.path.basename(rec["image"]) in r.stdout

    # pixels on a drawn box edge differ from the input, pixels far from every box do not change much
    rec = max(records, key=lambda x: len(x["detections"]))
    src = np.asarray(Image.open(rec["image"]).convert("RGB"), np.int32)
    ann = np.asarray(Image.open(rec["annotated"]).convert("RGB"), np.int32)
    x0, y0, x1, y1 = (int(round(v)) for v in rec["detections"][0]["box_xyxy"])
    edge = ann[min(max(y0, 0), ann.shape[0] - 1):y1 + 1, min(x0, ann.shape[1] - 1)]  # the left edge, a column
    assert np.abs(edge - src[min(max(y0, 0), src.shape[0] - 1):y1 + 1, min(x0, src.shape[1] - 1)]).max() > 60
    covered = np.zeros(src.shape[:2], bool)
    for d in rec["detections"]:
        a, b, c, e = (int(v) for v in d["box_xyxy"])
        covered[max(b - 25, 0):e + 26, max(a - 20, 0):max(c, a + 100) + 21] = True  # box, border, label tag
    if (~covered).any():
        assert np.abs(ann - src)[~covered].max() <= 40  # only JPEG re-encoding noise


def test_second_detect_loads_the_compiled_forward(ckpt, images, env, tmp_path):
    """Two `rtdetr-jax detect` runs without JAX_COMPILATION_CACHE_DIR: the first stores the forward under
    RTDETR_JAX_CACHE/jax_compilation, the second finds it (no second entry for the forward) and detects the same."""
    from rtdetr_jax.compilation_cache import SUBDIR

    e = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    e["RTDETR_JAX_CACHE"] = str(tmp_path / "cache")
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny model compiles in well under jax's 1 s
    args = ["detect", str(images / "a.jpg"), "--model", ckpt, "--threshold", "0.2", "--no-progress"]
    first = run_cli([*args, "--out", str(tmp_path / "one")], e)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "cache" / SUBDIR

    def forward_entries():  # the detection forward's (model.py: `apply_fields`, DETECTION_FIELDS)
        return sorted(n for n in os.listdir(folder) if n.startswith("jit_apply_fields-") and n.endswith("-cache"))

    forward = forward_entries()
    assert len(forward) == 1, os.listdir(folder)
    entry, last_use = folder / forward[0], folder / forward[0].replace("-cache", "-atime")
    written, used = entry.stat().st_mtime_ns, last_use.read_bytes()
    second = run_cli([*args, "--out", str(tmp_path / "two")], e)
    assert second.returncode == 0, second.stderr
    assert forward_entries() == forward
    assert entry.stat().st_mtime_ns == written  # not compiled and stored again ...
    assert last_use.read_bytes() != used  # ... but read: jax records each use of an entry for its eviction
    one, two = read_jsonl(tmp_path / "one" / "detections.jsonl"), read_jsonl(tmp_path / "two" / "detections.jsonl")
    assert [r["detections"] for r in one] == [r["detections"] for r in two]


def test_detect_matches_python_api(ckpt, images, tmp_path):
    """The CLI's records equal the transformers-style API: processor -> model -> post_process."""
    from rtdetr_jax import RTDetrImageProcessor, RTDetrV2ForObjectDetection
    from rtdetr_jax.detect import DetectOptions, detect_files

    records = detect_files([str(images / "a.jpg"), str(images / "grey.png")],
                           DetectOptions(model=ckpt, out_dir=str(tmp_path / "o"), threshold=0.2, progress=False))
    model = RTDetrV2ForObjectDetection.from_pretrained(ckpt)
    processor = RTDetrImageProcessor.from_pretrained(ckpt)
    for rec in records:
        image = Image.open(rec["image"])
        outputs = model(**processor(image))
        res = processor.post_process_object_detection(outputs, threshold=0.2,
                                                      target_sizes=[(image.height, image.width)])[0]
        assert len(res["scores"]) == len(rec["detections"])
        np.testing.assert_allclose([d["score"] for d in rec["detections"]], res["scores"], atol=1e-4)
        boxes = np.clip(res["boxes"], 0, [image.width, image.height] * 2)
        np.testing.assert_allclose([d["box_xyxy"] for d in rec["detections"]], boxes.reshape(-1, 4), atol=0.02)
        assert [d["label_id"] for d in rec["detections"]] == res["labels"].tolist()


def test_detect_batches_share_one_compiled_shape(ckpt, images, tmp_path):
    from rtdetr_jax.detect import DetectOptions, Detector, detect_files, load_detector

    options = DetectOptions(model=ckpt, out_dir=str(tmp_path / "o"), threshold=0.5, batch_size=2, progress=False)
    model, processor = load_detector(options)
    detector = Detector(model, processor, batch_size=2, threshold=0.5)
    detect_files([str(images)], options, detector=detector)  # 5 images: batches of 2, 2, 1 (padded)
    assert model.compiled_shapes == 1


def test_exif_rotation_is_applied(ckpt, tmp_path):
    """A photo stored landscape with Orientation=6 is detected as the portrait picture it shows."""
    from rtdetr_jax.detect import DetectOptions, detect_files

    upright = synthetic_image(200, 120, seed=9)  # 120 wide, 200 tall as displayed
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 200 wide, 120 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=98)
    Image.open(tmp_path / "rotated.jpg").transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    opts = DetectOptions(model=ckpt, out_dir=str(tmp_path / "o"), threshold=0.2, progress=False)
    rot, up = detect_files([str(tmp_path / "rotated.jpg"), str(tmp_path / "upright.png")], opts)
    assert (rot["width"], rot["height"]) == (120, 200) == (up["width"], up["height"])
    assert Image.open(rot["annotated"]).size == (120, 200)
    assert len(rot["detections"]) == len(up["detections"]) > 0
    np.testing.assert_allclose([d["box_xyxy"] for d in rot["detections"]],
                               [d["box_xyxy"] for d in up["detections"]], atol=0.05)


def test_odd_sizes_and_modes(ckpt, tmp_path, capsys):
    """1x1, 12000x9000 (above PIL's bomb warning), 16-bit grey: all processed, boxes in their own pixels."""
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one.png")
    big = synthetic_image(90, 120, seed=4).resize((12000, 9000), Image.NEAREST)
    big.save(folder / "huge.jpg", quality=80)
    del big
    grey16 = (np.asarray(synthetic_image(100, 100, seed=6).convert("L"), np.uint16) * 257)
    Image.fromarray(grey16.astype(np.uint16)).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode.startswith("I")
    out = tmp_path / "out"
    rc = main(["detect", str(folder), "--model", ckpt, "--threshold", "0.2", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err and "DecompressionBomb" not in captured.err
    records = {os.path.basename(r["image"]): r for r in read_jsonl(out / "detections.jsonl")}
    assert (records["one.png"]["width"], records["one.png"]["height"]) == (1, 1)
    assert (records["huge.jpg"]["width"], records["huge.jpg"]["height"]) == (12000, 9000)
    assert Image.open(records["huge.jpg"]["annotated"]).size == (12000, 9000)
    for rec in records.values():
        for d in rec["detections"]:
            x0, y0, x1, y1 = d["box_xyxy"]
            assert 0 <= x0 <= x1 <= rec["width"] and 0 <= y0 <= y1 <= rec["height"]


# ---------------------------------------------------------------------------------------------- conversion cache
def test_converted_weights_are_cached(ckpt, monkeypatch, tmp_path):
    import shutil

    from rtdetr_jax import model as model_module
    from rtdetr_jax.model import RTDetrV2ForObjectDetection

    monkeypatch.setenv("RTDETR_JAX_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "copy"
    shutil.copytree(ckpt, folder)
    first = RTDetrV2ForObjectDetection.from_pretrained(str(folder))
    assert not first.loaded_from_cache and os.path.isfile(first.conversion_cache)
    assert first.conversion_cache.startswith(str(tmp_path / "cache"))

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_module, "load_transformers_checkpoint", no_conversion)
    second = RTDetrV2ForObjectDetection.from_pretrained(str(folder))
    assert second.loaded_from_cache and second.conversion_cache == first.conversion_cache
    for a, b in zip(*(map(np.asarray, __import__("jax").tree_util.tree_leaves(m.variables)) for m in (first, second))):
        np.testing.assert_array_equal(a, b)

    # a changed checkpoint is converted again
    os.utime(folder / "model.safetensors", ns=(1, 1))
    with pytest.raises(AssertionError, match="converted again"):
        RTDetrV2ForObjectDetection.from_pretrained(str(folder))
    # a corrupt cache entry is ignored and rewritten; RTDETR_JAX_CACHE=off converts every time
    monkeypatch.undo()
    monkeypatch.setenv("RTDETR_JAX_CACHE", str(tmp_path / "cache"))
    fourth = RTDetrV2ForObjectDetection.from_pretrained(str(folder))
    with open(fourth.conversion_cache, "wb") as fh:
        fh.write(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        fifth = RTDetrV2ForObjectDetection.from_pretrained(str(folder))
    assert not fifth.loaded_from_cache and fifth.conversion_cache == fourth.conversion_cache
    assert RTDetrV2ForObjectDetection.from_pretrained(str(folder)).loaded_from_cache
    monkeypatch.setenv("RTDETR_JAX_CACHE", "off")
    assert RTDetrV2ForObjectDetection.from_pretrained(str(folder)).conversion_cache is None


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture()
def bad_files(tmp_path):
    """Each kind of unreadable image file, next to two good ones, in tmp_path/bad."""
    tmp_path = tmp_path / "bad"
    tmp_path.mkdir()
    good = tmp_path / "good.jpg"
    synthetic_image(100, 120, seed=7).save(good, quality=95)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = tmp_path / "good.png"
    synthetic_image(60, 80, seed=8).save(png)
    raw = bytearray(png.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = b"\x00" * 64  # corrupt the compressed data (and its CRC)
    (tmp_path / "corrupt.png").write_bytes(bytes(raw))
    (tmp_path / "text.jpg").write_text("hello, I am a text file with a .jpg name\n")
    (tmp_path / "empty.png").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("name,message", [
    ("truncated.jpg", "corrupt or truncated image"),
    ("corrupt.png", "corrupt or truncated image"),
    ("text.jpg", "not a readable image file"),
    ("empty.png", "not a readable image file"),
    ("missing.jpg", "no such file or folder"),
])
def test_bad_named_file_is_one_line_error(bad_files, name, message, capsys, tmp_path):
    out = tmp_path / "out"
    rc = main(["detect", str(bad_files / "good.jpg"), str(bad_files / name), "--model", "/nonexistent/never-read",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    one_line_error(err, "rtdetr-jax detect: error:", str(bad_files / name), message)
    assert no_files(out)  # checked before any model is loaded or anything written


def test_bad_files_in_a_folder_are_skipped(ckpt, bad_files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["detect", str(bad_files), "--model", ckpt, "--out", str(out), "--threshold", "0.3", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    warnings = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(warnings) == 4 and all("warning:" in w and "(skipped)" in w for w in warnings), captured.err
    for name in ("truncated.jpg", "corrupt.png", "text.jpg", "empty.png"):
        assert any(name in w for w in warnings)
    records = read_jsonl(out / "detections.jsonl")
    assert sorted(os.path.basename(r["image"]) for r in records) == ["good.jpg", "good.png"]
    assert sorted(os.listdir(out / bad_files.name)) == ["good.jpg", "good.png"]  # no stray temporary files


def test_folder_of_only_bad_files(ckpt, bad_files, tmp_path, capsys):
    for name in ("good.jpg", "good.png"):
        os.remove(bad_files / name)
    out = tmp_path / "out"
    rc = main(["detect", str(bad_files), "--model", ckpt, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "none of the 4 image files could be read" in err.splitlines()[-1]
    assert no_files(out)


def test_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    rc = main(["detect", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert rc == 2
    one_line_error(capsys.readouterr().err, str(tmp_path / "empty"), "no image files")
    assert no_files(tmp_path / "out")


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "high"])
def test_threshold_out_of_range(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["detect", str(tmp_path), "--threshold", value])
    assert exc.value.code == 2
    one_line_error(capsys.readouterr().err, "--threshold", value)


def test_model_errors(ckpt, images, tmp_path, capsys):
    """A path with no config, another architecture's config, weights of another size, a corrupt weights file."""
    import shutil

    img = str(images / "a.jpg")
    cases = []
    empty = tmp_path / "no_config"
    empty.mkdir()
    cases.append((empty, "no config.json"))
    detr = tmp_path / "detr"
    shutil.copytree(ckpt, detr)
    cfg = json.loads((detr / "config.json").read_text())
    cfg["model_type"] = "detr"
    (detr / "config.json").write_text(json.dumps(cfg))
    cases.append((detr, "model_type='detr'"))
    wider = tmp_path / "wider"
    shutil.copytree(ckpt, wider)
    cfg = json.loads((wider / "config.json").read_text())
    cfg["d_model"] = 64
    (wider / "config.json").write_text(json.dumps(cfg))
    cases.append((wider, "model.safetensors"))
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    cases.append((broken, "cannot read as safetensors"))
    for folder, message in cases:
        out = tmp_path / ("out_" + folder.name)
        rc = main(["detect", img, "--model", str(folder), "--out", str(out)])
        assert rc == 2, folder
        one_line_error(capsys.readouterr().err, str(folder), message)
        assert no_files(out)


def test_unknown_model_id_offline(images, env, tmp_path):
    out = tmp_path / "out"
    r = run_cli(["detect", str(images / "a.jpg"), "--model", "nobody-xyz/no-such-model", "--out", str(out)], env)
    assert r.returncode == 2
    one_line_error(r.stderr, "nobody-xyz/no-such-model", "not in the local Hub cache")
    assert no_files(out)


def test_unknown_device(images, tmp_path, capsys):
    import jax

    if all(d.platform == "cpu" for d in jax.devices()):
        rc = main(["detect", str(images / "a.jpg"), "--device", "tpu", "--out", str(tmp_path / "o")])
        assert rc == 2
        one_line_error(capsys.readouterr().err, "--device tpu", "available: cpu")


def test_failure_midway_leaves_no_partial_files(ckpt, images, tmp_path, monkeypatch):
    """An error after the first image: its complete picture stays, no jsonl, no temporary file anywhere."""
    from rtdetr_jax import visualize
    from rtdetr_jax.detect import DetectOptions, detect_files

    calls = []
    real = visualize.draw_detections

    def flaky(image, dets):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(image, dets)

    monkeypatch.setattr(visualize, "draw_detections", flaky)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        detect_files([str(images / "a.jpg"), str(images / "b.png")],
                     DetectOptions(model=ckpt, out_dir=str(out), progress=False))
    assert sorted(os.listdir(out)) == ["a.jpg"]
    Image.open(out / "a.jpg").load()


# ---------------------------------------------------------------------------------------------- other entry points
@pytest.mark.parametrize("argv,needles", [
    (["evaluate", "--model", "/nonexistent/model", "--data", "/nonexistent/data"], ["/nonexistent/model"]),
    (["train", "--data", "/nonexistent/data", "--out", "OUT", "--config", "tiny"], ["/nonexistent/data"]),
    (["train", "--data", "DATA", "--out", "OUT", "--config", "no-such-preset"], ["no-such-preset"]),
    (["port", "/nonexistent/source.safetensors", "--out", "OUT"], ["/nonexistent/source.safetensors"]),
    (["demo", "--epochs", "0"], ["--epochs", "0"]),
    (["train", "--data", "DATA", "--out", "OUT", "--batch-size", "x"], ["--batch-size", "'x'"]),
])
def test_other_commands_bad_input(argv, needles, tmp_path, capsys):
    from rtdetr_jax.data.synthetic import write_shapes_dataset

    if "DATA" in argv:
        write_shapes_dataset(str(tmp_path / "data"), train=2, val=1, size=64)
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("DATA", str(tmp_path / "data")) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    assert rc == 2
    one_line_error(capsys.readouterr().err, *needles)
    assert no_files(tmp_path / "out")


def test_help_explains_every_option():
    from rtdetr_jax.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == {"detect", "demo", "train", "evaluate", "port", "make-shapes"}
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            assert action.help and len(action.help) > 8, (name, action.dest)


def test_python_dash_m_help(env):
    r = run_cli(["detect", "--help"], env, timeout=120)
    assert r.returncode == 0 and "--threshold" in r.stdout and "detections.jsonl" in r.stdout


def test_atomic_writes(tmp_path):
    """Complete files get normal permissions (not mkstemp's 0600); a failed write leaves nothing behind."""
    from rtdetr_jax.io_utils import _UMASK, atomic_path, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == 0o666 & ~_UMASK
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.bin") as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]
