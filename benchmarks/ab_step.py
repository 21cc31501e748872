"""Our training step (or inference forward) against itself with module constants or environment variables changed:
an in-process A/B of one lever.

    python benchmarks/ab_step.py --set rtdetr_jax.ops.conv.WINOGRAD_NARROW_MAX_PIXELS=25600 \\
        --set rtdetr_jax.ops.conv.WINOGRAD_GRADIENT_MIN_CHANNELS=128 [--env RTDETR_JAX_NATIVE=off] [--rounds 10]
        [--order ab] [--step train|forward] [--preset r18vd] [--batch 4] [--size 640]
    python benchmarks/ab_step.py --step forward --b-output-fields logits,pred_boxes --batch 1

Why: the library's algorithm choices (the bounds in rtdetr_jax/ops/conv.py, the switches in ops/winograd.py,
`RTDETR_JAX_NATIVE`) are read when a function is traced, so two steps traced under different values can live in
one process and run alternately (`common.paired_times`, which swaps which side goes first every round), on the same
machine minute. Side "a" is the code as it is, side "b" the code with every `--set MODULE.NAME=VALUE` (VALUE a
Python literal) and `--env NAME=VALUE` applied while it is traced. `--step train` (the default) times the train
step (`common.our_train_step`, batch statistics, loss, backward, update); `--step forward` the inference forward
(`model(pixel_values=...)`, each side its own model of the same seed), where side b may also compute only some
of the output's fields (`--b-output-fields`, the model's `output_fields`). `--order ba` compiles "b" first: the harness
has a position bias of ~1-2% (which step was compiled and placed in memory first), so run both orders and read the
two paired ratios together.

Prints both sides' times, their medians and the paired ratio b/a (below 1: "b" is faster), and writes
benchmarks/results/ab_step.json. A train step A/B resolves ~1% over 10-14 rounds on the 2-core machine; a lever
smaller than that needs the op profile instead (benchmarks/README.md says which ones were judged so).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (machine_info, our_train_step, paired_times, start_like_the_cli,  # noqa: E402
                    synthetic_detection_batch, write_result)


def parse_setting(text: str):
    """'package.module.NAME=VALUE' -> (module, 'NAME', value); a one-line error for anything else."""
    target, sep, literal = text.partition("=")
    module_name, _, name = target.rpartition(".")
    if not sep or not module_name or not name:
        raise ValueError(f"--set {text!r}: expected MODULE.NAME=VALUE, "
                         "e.g. rtdetr_jax.ops.conv.WINOGRAD_MIN_CHANNELS=128")
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError):
        raise ValueError(f"--set {text!r}: {literal!r} is not a Python literal") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(f"--set {text!r}: no module {module_name!r}") from None
    if not hasattr(module, name):
        raise ValueError(f"--set {text!r}: {module_name} has no {name}")
    return module, name, value


def parse_env(text: str) -> tuple[str, str]:
    """'NAME=VALUE' -> (NAME, VALUE); a one-line error for anything else."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise ValueError(f"--env {text!r}: expected NAME=VALUE, e.g. RTDETR_JAX_NATIVE=off")
    return name, value


class Applied:
    """Side b's settings while it is traced: module constants set and environment variables set, then restored."""

    def __init__(self, settings, env):
        self.settings, self.env = settings, env

    def __enter__(self):
        self.old = [getattr(module, name) for module, name, _ in self.settings]
        self.old_env = {name: os.environ.get(name) for name, _ in self.env}
        for module, name, value in self.settings:
            setattr(module, name, value)
        os.environ.update(dict(self.env))

    def __exit__(self, *exc):
        for (module, name, _), old in zip(self.settings, self.old):
            setattr(module, name, old)
        for name, old in self.old_env.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="MODULE.NAME=VALUE",
                        help="a module constant and its value on side b (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable and its value on side b (repeatable)")
    parser.add_argument("--step", choices=("train", "forward"), default="train")
    parser.add_argument("--b-output-fields", metavar="NAME[,NAME...]",
                        help="side b's forward computes only these output fields (--step forward), e.g. "
                             "logits,pred_boxes: what post-processing reads")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--order", choices=("ab", "ba"), default="ab", help="which side is compiled first")
    parser.add_argument("--preset", default="r18vd")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "ab_step.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be at least 1")
    if not args.settings and not args.env and not args.b_output_fields:
        parser.error("side b needs at least one --set, --env or --b-output-fields")
    if args.b_output_fields and args.step != "forward":
        parser.error(f"--b-output-fields {args.b_output_fields}: only with --step forward")
    from rtdetr_jax.model import check_output_fields

    try:
        settings = [parse_setting(text) for text in args.settings]
        env = [parse_env(text) for text in args.env]
        fields = {"a": None, "b": check_output_fields(args.b_output_fields.split(",")) if args.b_output_fields
                  else None}
    except ValueError as err:
        parser.error(str(err))

    import jax

    from rtdetr_jax.config import RTDetrV2Config
    from rtdetr_jax.model import RTDetrV2ForObjectDetection

    config = RTDetrV2Config.from_preset(args.preset)
    model = RTDetrV2ForObjectDetection(config) if args.step == "train" else None
    pixels, labels = synthetic_detection_batch(args.batch, args.size, config.num_labels)
    sides, first_step = {}, {}
    for side in args.order:
        with Applied(settings if side == "b" else [], env if side == "b" else []):
            if args.step == "train":
                steps, state, batch = our_train_step(model, pixels, labels)
                start = time.perf_counter()
                state, _ = steps.train_step(state, *batch)  # traced and compiled here, under this side's values
                jax.block_until_ready(state)
                sides[side] = [steps, state, batch]
            else:
                side_model = RTDetrV2ForObjectDetection(config)
                start = time.perf_counter()
                jax.block_until_ready(side_model(pixel_values=pixels, output_fields=fields[side]))
                sides[side] = side_model
            first_step[side] = time.perf_counter() - start
        print(f"side {side}: first {args.step} (compile) {first_step[side]:.1f} s", flush=True)

    def step(side):
        if args.step == "forward":
            jax.block_until_ready(sides[side](pixel_values=pixels, output_fields=fields[side]))
            return
        steps, state, batch = sides[side]
        sides[side][1], _ = steps.train_step(state, *batch)
        jax.block_until_ready(sides[side][1])

    step("a"), step("b")  # one steady step each before timing
    times_a, times_b, paired = paired_times(lambda: step("a"), lambda: step("b"), args.rounds)
    print("b: " + ", ".join(args.settings + args.env
                            + ([f"output_fields={args.b_output_fields}"] if args.b_output_fields else [])))
    for side, times in (("a", times_a), ("b", times_b)):
        print(f"{side}: median {statistics.median(times):.3f} s  [" + ", ".join(f"{t:.3f}" for t in times) + "]")
    print(f"paired b/a: {paired:.3f} ({args.rounds} rounds, {args.order[0]} compiled first)")
    write_result(args.out, {"settings": args.settings, "env": args.env, "b_output_fields": fields["b"],
                            "step": args.step, "order": args.order, "preset": args.preset, "batch": args.batch,
                            "size": args.size, "first_step_s": first_step, "a_s": times_a, "b_s": times_b,
                            "paired_b_over_a": paired, "machine": machine_info()})


if __name__ == "__main__":
    start_like_the_cli()
    main()
