"""It learns: train the `tiny` RT-DETRv2 preset on the synthetic shapes dataset on the CPU and report COCO AP on
held-out images (the issue's bar: AP50 >= 0.8 within 15 minutes).

    python benchmarks/bench_learning.py                 # full run, writes benchmarks/results/learning.json
    python benchmarks/bench_learning.py --smoke         # a few steps (what CI runs through the tests)

After training, the exported model (EMA weights) is evaluated again on the held-out images, once computing in
float32 and once in bfloat16 (float32 parameters, bfloat16 activations: `--dtype bfloat16`), and the AP of the
two is reported side by side: issue 5 asks that bfloat16 leave the mAP unchanged within 0.5 AP (0.005).
`--no-bfloat16` skips that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine_info, scratch_dir, start_like_the_cli, write_result  # noqa: E402
from rtdetr_jax.data.synthetic import write_shapes_dataset  # noqa: E402
from rtdetr_jax.train.loop import TrainConfig, evaluate_model, fit  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-images", type=int, default=1200)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-bfloat16", action="store_true", help="skip the float32 / bfloat16 evaluation of the "
                    "exported model")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "learning.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_images, args.val_images, args.epochs, args.image_size = 32, 8, 1, 128
    work = args.workdir or scratch_dir("rtdetr-learning-")
    data = os.path.join(work, "shapes")
    t0 = time.perf_counter()
    write_shapes_dataset(data, train=args.train_images, val=args.val_images, size=args.image_size, seed=0)
    t_data = time.perf_counter() - t0
    cfg = TrainConfig(
        data_dir=data, output_dir=os.path.join(work, "run"), config="tiny", epochs=args.epochs,
        batch_size=args.batch_size, image_size=args.image_size, max_boxes=8, no_aug_epochs=max(args.epochs // 5, 1),
        learning_rate=args.lr, backbone_lr_multiplier=1.0, warmup_steps=100, ema_decay=0.99,
        ema_warmup_steps=100, save_every=10**9, eval_every=max(args.epochs // 2, 1), log_every=10,
        progress=not args.smoke,
    )
    t0 = time.perf_counter()
    summary = fit(cfg)
    t_train = time.perf_counter() - t0
    result = {
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "data_seconds": round(t_data, 1),
        "train_seconds": round(t_train, 1),
        "steps": summary["steps"],
        "eval": summary["eval"],
    }
    if not args.no_bfloat16:
        # float32 again, not summary["eval"]: both dtypes then take the same path (the exported folder, loaded and
        # evaluated), and float32's equality with training's own evaluation checks that path
        by_dtype = {dtype: evaluate_model(summary["model_dir"], data, dtype=dtype, batch_size=args.batch_size,
                                          progress=False)
                    for dtype in ("float32", "bfloat16")}
        result["eval_by_dtype"] = by_dtype
        result["bfloat16_minus_float32"] = {k: by_dtype["bfloat16"][k] - by_dtype["float32"][k]
                                            for k in by_dtype["float32"]}
    print(json.dumps(result, indent=2))
    if not args.smoke:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    start_like_the_cli()
    main()
