"""Command line: `rtdetr-jax detect | demo | train | evaluate | port | make-shapes` (also `python -m rtdetr_jax`).

Errors a user can cause (missing file, bad image, bad checkpoint, bad option value) print one line on stderr and
exit 2; never a traceback. Anything unexpected prints one line too and exits 1 (`RTDETR_JAX_TRACEBACK=1` shows
the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `rtdetr-jax detect: error: ...`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _detect(args: argparse.Namespace) -> int:
    from rtdetr_jax.detect import JSONL_NAME, DetectOptions, detect_files, summary_table

    options = DetectOptions(model=args.model, out_dir=args.out, threshold=args.threshold,
                            batch_size=args.batch_size, dtype=args.dtype, device=args.device, revision=args.revision,
                            progress=False if args.no_progress else None)
    records = detect_files(args.images, options)
    print(summary_table(records))
    total = sum(len(r["detections"]) for r in records)
    print(f"{total} detections in {len(records)} images; annotated copies and {JSONL_NAME} in {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rtdetr_jax.demo import DemoOptions, run_demo

    result = run_demo(DemoOptions(out_dir=args.out, train_images=args.train_images, val_images=args.val_images,
                                  image_size=args.image_size,
                                  epochs=args.epochs, batch_size=args.batch_size, max_steps=args.max_steps,
                                  seed=args.seed, progress=not args.no_progress))
    m = result["val_metrics"]
    print(f"trained {result['steps']} steps in {result['train_seconds']:.0f} s; held-out COCO AP {m.get('AP', 0):.3f}, "
          f"AP50 {m.get('AP50', 0):.3f}, AP75 {m.get('AP75', 0):.3f}")
    n = sum(len(r["detections"]) for r in result["records"])
    print(f"{n} detections on {len(result['records'])} fresh images: {os.path.dirname(result['detections'])}")
    print(f"picture: {result['grid']}; model: {result['model_dir']}")
    return 0


def _port(args: argparse.Namespace) -> int:
    from rtdetr_jax.convert.port import port

    out = port(args.source, args.out, config=args.config, revision=args.revision, force=args.force)
    print(f"wrote {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from rtdetr_jax.train.loop import TrainConfig, fit

    if args.model is None and args.config is None:
        args.config = "r18vd"
    cfg = TrainConfig(
        data_dir=args.data, output_dir=args.out, model=args.model, config=args.config, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, image_size=args.image_size, max_boxes=args.max_boxes,
        no_aug_epochs=args.no_aug_epochs, multi_scale=args.multi_scale, learning_rate=args.lr,
        backbone_lr_multiplier=args.backbone_lr_multiplier, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm, warmup_steps=args.warmup_steps, schedule=args.schedule, ema_decay=args.ema_decay,
        ema_warmup_steps=args.ema_warmup_steps, save_every=args.save_every, keep=args.keep,
        eval_every=args.eval_every, log_every=args.log_every, seed=args.seed, dtype=args.dtype,
        workers=args.workers, resume=args.resume, progress=not args.no_progress,
    )
    summary = fit(cfg)
    ev = summary["eval"]
    print(f"trained {summary['steps']} steps; AP {ev.get('AP', 0):.3f} AP50 {ev.get('AP50', 0):.3f}; "
          f"model saved to {summary['model_dir']}")
    for why, n in summary["skipped"].items():
        print(f"skipped {n}: {why}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from rtdetr_jax.train.loop import evaluate_model

    metrics = evaluate_model(args.model, args.data, args.split, args.image_size, args.batch_size, args.dtype,
                             progress=not args.no_progress)
    print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _make_shapes(args: argparse.Namespace) -> int:
    from rtdetr_jax.data.synthetic import write_shapes_dataset

    paths = write_shapes_dataset(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed)
    print(f"wrote {args.train} train and {args.val} val images; annotations: {', '.join(paths.values())}")
    return 0


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return n


def _probability(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= x <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{value} must be within [0, 1]")
    return x


def build_parser() -> argparse.ArgumentParser:
    from rtdetr_jax.detect import DEFAULT_MODEL

    parser = _Parser(prog="rtdetr-jax", description="RT-DETRv2 object detection in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "detect",
        help="detect objects in images; write annotated copies and detections.jsonl",
        description="Run a detector on image files and folders (walked for .jpg/.jpeg/.png/.bmp/.gif/.tif/.webp). "
        "Writes, into OUT, an annotated copy of every image (boxes, label names, scores) and detections.jsonl "
        "with one line per image: {image, width, height, detections: [{label, label_id, score, box_xyxy}]}. "
        "Boxes are pixels of the image as displayed (EXIF rotation applied). A file named here that cannot be "
        "read is an error; an unreadable file found in a folder is skipped with a warning.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub repo id or local folder (default {DEFAULT_MODEL}); "
                   "downloaded once into the Hugging Face cache, converted once into the rtdetr-jax cache")
    p.add_argument("--threshold", type=_probability, default=0.5, help="keep detections scoring above this, in "
                   "[0, 1] (default 0.5)")
    p.add_argument("--out", default="detections", help="output folder (default ./detections)")
    p.add_argument("--batch-size", type=_positive, default=4, help="images per forward pass; all batches share "
                   "one compiled shape (default 4)")
    p.add_argument("--device", choices=["cpu", "gpu", "tpu"], default=None, help="JAX platform to run on "
                   "(default: JAX's default, i.e. an accelerator when present)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype "
                   "(parameters stay float32; default float32)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) for a repo id")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown for more than 4 images)")
    p.set_defaults(func=_detect)

    p = sub.add_parser(
        "demo",
        help="offline end-to-end demo: make a synthetic dataset, train a small model, detect, report COCO AP",
        description="Needs no network and no weights: writes the synthetic shapes dataset into OUT/shapes, trains "
        "the tiny RT-DETRv2 preset on the CPU (about 5 minutes on 2 cores with the defaults), reports COCO AP on "
        "held-out images, then detects on freshly generated images into OUT/detections and tiles four of them "
        "into OUT/demo.jpg.",
    )
    p.add_argument("--out", default="demo", help="output folder (default ./demo)")
    p.add_argument("--train-images", type=_positive, default=960, help="training images (default 960)")
    p.add_argument("--val-images", type=_positive, default=128, help="held-out images for COCO AP (default 128)")
    p.add_argument("--image-size", type=_positive, default=160, help="training and model input size (default 160)")
    p.add_argument("--epochs", type=_positive, default=6, help="epochs (default 6)")
    p.add_argument("--batch-size", type=_positive, default=16, help="batch size (default 16)")
    p.add_argument("--max-steps", type=_positive, default=None, help="stop training after this many steps")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and order (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "port",
        help="convert a PyTorch checkpoint into a folder rtdetr-jax (and transformers) loads",
        description="Convert transformers safetensors (folder, Hub repo id or file) or an authors' rtdetrv2_*.pth "
        "into a folder with flax_model.msgpack, model.safetensors, config.json and preprocessor_config.json.",
    )
    p.add_argument("source", help="folder or Hub repo id with config.json + model.safetensors, a .safetensors "
                   "file, or an original rtdetrv2_*.pth")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--config", default=None, help="config.json path or preset (r18vd, r34vd, r50vd_m, r50vd, "
                   "r101vd); required for a bare .pth/.safetensors without a config.json beside it")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) for a repo id")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_port)

    p = sub.add_parser(
        "train",
        help="train or fine-tune on a COCO-format dataset, on every local device",
        description="Train RT-DETRv2 on DATA/annotations/instances_{train,val}.json with images in DATA/train and "
        "DATA/val. Logs to OUT/train_log.jsonl, checkpoints to OUT/checkpoints (orbax), and exports the EMA "
        "model to OUT/model (transformers-loadable).",
    )
    p.add_argument("--data", required=True, help="dataset folder (COCO layout, see above)")
    p.add_argument("--out", required=True, help="run folder for logs, checkpoints and the exported model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="Hub id or folder to fine-tune from (class heads are "
                     "re-initialised if its labels differ from the dataset's)")
    src.add_argument("--config", default=None, help="preset (r18vd, r34vd, r50vd_m, r50vd, r101vd, tiny) or "
                     "config.json to train from scratch (default r18vd)")
    p.add_argument("--epochs", type=_positive, default=12, help="epochs over the training set (default 12)")
    p.add_argument("--max-steps", type=_positive, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=_positive, default=4, help="global batch, split over devices (default 4)")
    p.add_argument("--image-size", type=_positive, default=640, help="square input size, multiple of 32")
    p.add_argument("--max-boxes", type=_positive, default=100, help="boxes kept per image (padding size)")
    p.add_argument("--no-aug-epochs", type=int, default=2, help="last epochs without strong augmentation")
    p.add_argument("--multi-scale", action="store_true", help="random input sizes +-160 px per batch")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW; default 1e-4)")
    p.add_argument("--backbone-lr-multiplier", type=float, default=0.1, help="backbone lr factor (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay, not on norms/biases")
    p.add_argument("--clip-norm", type=float, default=0.1, help="global gradient-norm clip (0: off)")
    p.add_argument("--warmup-steps", type=int, default=2000, help="linear warm-up steps")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant", help="lr after warm-up")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay of the evaluated weights")
    p.add_argument("--ema-warmup-steps", type=int, default=2000, help="EMA warm-up (decay ramps up)")
    p.add_argument("--save-every", type=_positive, default=500, help="checkpoint every N steps")
    p.add_argument("--keep", type=_positive, default=3, help="recent checkpoints kept (plus the best)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate the EMA weights every N epochs")
    p.add_argument("--log-every", type=_positive, default=10, help="log loss terms every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and augmentation")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--workers", type=int, default=2, help="data-loading threads (0: in the main thread)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="COCO mAP of a model on a COCO-format dataset",
                       description="Print AP, AP50, AP75 and AP by object size (pycocotools) of MODEL on a split.")
    p.add_argument("--model", required=True, help="folder or Hub id (e.g. OUT/model from train)")
    p.add_argument("--data", required=True, help="dataset folder (COCO layout)")
    p.add_argument("--split", default="val", help="split name: annotations/instances_SPLIT.json (default val)")
    p.add_argument("--image-size", type=_positive, default=None, help="square input size, multiple of 32 (default: the model's preprocessor_config.json size, else 640)")
    p.add_argument("--batch-size", type=_positive, default=8, help="images per step")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("make-shapes", help="write the synthetic shapes dataset (COCO format)",
                       description="Coloured circles, squares, triangles and diamonds on textured backgrounds.")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--train", type=_positive, default=512, help="training images (default 512)")
    p.add_argument("--val", type=_positive, default=64, help="validation images (default 64)")
    p.add_argument("--size", type=_positive, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same dataset")
    p.set_defaults(func=_make_shapes)
    return parser


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"rtdetr-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, FloatingPointError) as err:
        print(f"rtdetr-jax {args.command}: error: {_first_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not bad input: still one line, the traceback on request
        if os.environ.get("RTDETR_JAX_TRACEBACK"):
            raise
        print(f"rtdetr-jax {args.command}: unexpected error: {type(err).__name__}: {_first_line(err)} "
              "(set RTDETR_JAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1


def entry() -> int:
    """The `rtdetr-jax` console command and `python -m rtdetr_jax`: first re-executes itself once with tcmalloc
    preloaded where it is installed, else with glibc malloc on transparent huge pages, so that XLA:CPU's per-call
    scratch memory is kept between calls or at least faulted in 2 MiB at a time (rtdetr_jax/host_memory.py; the
    r18vd training step 9-12% faster on the CPU with huge pages; with tcmalloc no slow step after a pause, the
    demo 11% faster), then turns on jax's persistent compilation cache (rtdetr_jax/compilation_cache.py; a later
    command's first r18vd forward 14.3 s -> 3.1 s), then runs `main`."""
    from rtdetr_jax.compilation_cache import enable_for_command_line
    from rtdetr_jax.host_memory import reexec_with_tuned_malloc

    try:
        reexec_with_tuned_malloc()
    except ValueError as err:  # a bad RTDETR_JAX_MALLOC value
        print(f"rtdetr-jax: error: {err}", file=sys.stderr)
        return 2
    enable_for_command_line()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
