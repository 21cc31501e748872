"""How much of our training step the convolutions' gradients take, and how ours compare with PyTorch's.

    python benchmarks/profile_kernel_gradients.py [--preset r18vd] [--batch 4] [--size 640] [--iters 7] [--rounds 4]

Three tables:

1. Every convolution of the training step (recorded while the step is traced), its kernel gradient alone:
   ours as `conv2d` (rtdetr_jax/ops/conv.py) computes it for that shape, jit-compiled, against PyTorch's
   (`torch.nn.grad.conv2d_weight`, oneDNN's on the CPU) on the same input and output gradient, alternating call by
   call in one process; the median time of each, its GFLOP/s (direct-convolution FLOPs) and PyTorch's time / ours.
   Sums per kind (3x3 stride 1, 1x1, strided).
2. The same for their input gradients (`torch.nn.grad.conv2d_input`), except the first convolution's, whose input
   is the pixels: the step does not compute that one.
3. Our whole training step against the same step with the kernel gradients of one kind of convolution replaced by
   zeros (a `custom_vjp` around `conv2d` that returns only the input gradient, so XLA drops the kernel gradient and
   everything that feeds only it), all variants compiled in one process and their steps alternated round by round:
   what each kind costs inside the step, where the work overlaps with everything else. The loss and every other
   gradient are unchanged; only the timing is of interest. Without any kernel gradient, no backbone parameter
   needs a gradient (its batch norms are frozen), so XLA also drops the backbone's input gradients; the variant
   that keeps only the first convolution's kernel gradient (55-70 ms alone) keeps them, and tells the two apart.

Writes benchmarks/results/kernel_gradients_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    machine_info,
    our_train_step,
    start_like_the_cli,
    synthetic_detection_batch,
    write_result,
)

KINDS = ("3x3 stride 1", "1x1", "strided")
VARIANTS = ("step", "without 3x3 stride-1 kernel gradients", "without 1x1 kernel gradients",
            "without strided kernel gradients", "without any convolution kernel gradient",
            "without any kernel gradient but the first convolution's")
GRADIENTS = ("kernel", "input")


def first_convolution_input(pixels) -> tuple:
    """The shape of the first convolution's input: the (batch, 3, H, W) pixels in our NHWC layout."""
    return tuple(pixels.transpose(0, 2, 3, 1).shape)


def kind_of(kernel_shape, stride: int) -> str:
    if stride > 1:
        return "strided"
    return "1x1" if tuple(kernel_shape[:2]) == (1, 1) else "3x3 stride 1"


@contextlib.contextmanager
def conv2d_replaced(wrap):
    """Within the block, the detector's layers call `wrap(conv2d)` instead of `conv2d` (ops/conv.py)."""
    import rtdetr_jax.modeling.layers as layers

    original = layers.conv2d
    layers.conv2d = wrap(original)
    try:
        yield
    finally:
        layers.conv2d = original


def recording(calls: collections.Counter):
    """A `conv2d_replaced` wrapper that counts every call in `calls` by (input shape, kernel shape, stride,
    padding)."""
    def wrap(original):
        def conv2d(x, kernel, stride=1, padding=0):
            calls[(tuple(x.shape), tuple(kernel.shape), stride, padding)] += 1
            return original(x, kernel, stride, padding)
        return conv2d
    return wrap


def dropping_kernel_gradients(kinds, keep_input_shape=None):
    """A `conv2d_replaced` wrapper under which the convolutions of `kinds` return zeros as their kernel gradient
    (their forward and input gradient unchanged), so that the traced step computes no kernel gradient for them;
    a convolution whose input has the shape `keep_input_shape` keeps its kernel gradient."""
    import jax
    import jax.numpy as jnp

    def wrap(original):
        @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
        def input_gradient_only(x, kernel, stride, padding):
            return original(x, kernel, stride, padding)

        def fwd(x, kernel, stride, padding):
            return original(x, kernel, stride, padding), (x, kernel)

        def bwd(stride, padding, residuals, dy):
            x, kernel = residuals
            dx = jax.vjp(lambda v: original(v, kernel, stride, padding), x)[1](dy)[0]
            return dx, jnp.zeros_like(kernel)

        input_gradient_only.defvjp(fwd, bwd)

        def conv2d(x, kernel, stride=1, padding=0):
            if kind_of(kernel.shape, stride) in kinds and tuple(x.shape) != keep_input_shape:
                return input_gradient_only(x, kernel, stride, padding)
            return original(x, kernel, stride, padding)
        return conv2d
    return wrap


def census(calls, iters: int, gradient: str = "kernel", skip_input_shape=None) -> list[dict]:
    """Tables 1 and 2: each recorded convolution's kernel (or input) gradient, ours against PyTorch's; convolutions
    whose input has the shape `skip_input_shape` are left out."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import rtdetr_jax.ops.conv as conv

    if gradient not in GRADIENTS:
        raise ValueError(f"gradient {gradient!r} is not one of {', '.join(GRADIENTS)}")
    rng = np.random.default_rng(0)
    rows = []
    print(f"\n| {gradient} gradient of | count | ours | PyTorch's | PyTorch's / ours | ours, GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for (xs, ks, stride, padding), count in sorted(calls.items(), key=lambda kv: (KINDS.index(
            kind_of(kv[0][1], kv[0][2])), -kv[0][0][1], kv[0][1][2])):
        if xs == skip_input_shape:
            continue
        y_shape = jax.eval_shape(lambda a, k: conv.conv2d(a, k, stride, padding), jax.ShapeDtypeStruct(xs, jnp.float32),
                                 jax.ShapeDtypeStruct(ks, jnp.float32)).shape
        dy = rng.standard_normal(y_shape, np.float32)
        tdy = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())
        jdy = jnp.asarray(dy)
        if gradient == "kernel":
            x = rng.standard_normal(xs, np.float32)  # the convolution's input
            ours = jax.jit(lambda a, d: jax.vjp(lambda k: conv.conv2d(a, k, stride, padding),
                                                jnp.zeros(ks, jnp.float32))[1](d)[0])
            jx = jnp.asarray(x)
            tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            weight_size = (ks[3], ks[2], ks[0], ks[1])

            def theirs():
                return torch.nn.grad.conv2d_weight(tx, weight_size, tdy, stride=stride, padding=padding)
            layout = (2, 3, 1, 0)  # OIHW -> HWIO
        else:
            kernel = (rng.standard_normal(ks, np.float32) / np.sqrt(ks[0] * ks[1] * ks[2])).astype(np.float32)
            ours = jax.jit(lambda k, d: jax.vjp(lambda a: conv.conv2d(a, k, stride, padding),
                                                jnp.zeros(xs, jnp.float32))[1](d)[0])
            jx = jnp.asarray(kernel)  # the kernel, the operand besides dy
            tk = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
            input_size = (xs[0], xs[3], xs[1], xs[2])

            def theirs():
                return torch.nn.grad.conv2d_input(input_size, tk, tdy, stride=stride, padding=padding)
            layout = (0, 2, 3, 1)  # NCHW -> NHWC

        got = np.asarray(ours(jx, jdy))
        ref = theirs().numpy().transpose(*layout)
        rel = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
        t_ours, t_theirs = [], []
        for i in range(iters):
            for fn, ts in ((lambda: ours(jx, jdy).block_until_ready(), t_ours), (theirs, t_theirs))[::1 - 2 * (i % 2)]:
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
        ours_s, theirs_s = statistics.median(t_ours), statistics.median(t_theirs)
        gflop = 2 * float(np.prod(y_shape[:3])) * ks[0] * ks[1] * ks[2] * ks[3] / 1e9
        row = {"input": list(xs), "kernel": list(ks), "stride": stride, "padding": padding, "count": count,
               "kind": kind_of(ks, stride), "gflop": gflop, "ours_s": ours_s, "torch_s": theirs_s,
               "relative_difference": rel, "gradient": gradient}
        rows.append(row)
        print(f"| {xs} -> {ks[3]}, {ks[0]}x{ks[1]}/{stride} | {count} | {ours_s * 1e3:.1f} ms | "
              f"{theirs_s * 1e3:.1f} ms | {theirs_s / ours_s:.2f} | {gflop / ours_s:.0f} |", flush=True)
    print("\n| kind | GFLOP | ours, summed | PyTorch's, summed | PyTorch's / ours |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        sel = [r for r in rows if r["kind"] == kind]
        o = sum(r["count"] * r["ours_s"] for r in sel)
        t = sum(r["count"] * r["torch_s"] for r in sel)
        g = sum(r["count"] * r["gflop"] for r in sel)
        print(f"| {kind} | {g:.1f} | {o * 1e3:.0f} ms | {t * 1e3:.0f} ms | {t / o:.2f} |")
    worst = max(r["relative_difference"] for r in rows)
    print(f"(largest relative difference between the two {gradient} gradients: {worst:.1e})")
    return rows


def step_ablation(model, pixels, labels, rounds: int) -> dict:
    """Table 3: the step and its variants without some kernel gradients, alternated round by round."""
    import jax

    first = first_convolution_input(pixels)
    drops = {VARIANTS[0]: ((), None), VARIANTS[1]: (("3x3 stride 1",), None), VARIANTS[2]: (("1x1",), None),
             VARIANTS[3]: (("strided",), None), VARIANTS[4]: (KINDS, None), VARIANTS[5]: (KINDS, first)}
    runs = {}
    for name, (kinds, keep) in drops.items():
        steps, state, batch = our_train_step(model, pixels, labels)
        with conv2d_replaced(dropping_kernel_gradients(kinds, keep)):
            state, metrics = steps.train_step(state, *batch)  # traced and compiled here
            jax.block_until_ready(metrics)
        runs[name] = [steps, state, batch]

    def step(name):
        steps, state, batch = runs[name]
        runs[name][1], metrics = steps.train_step(state, *batch)
        jax.block_until_ready(metrics)

    for name in drops:
        step(name)  # one untimed step each after compiling
    times = {name: [] for name in drops}
    for r in range(rounds):
        for name in (list(drops) if r % 2 == 0 else list(drops)[::-1]):
            t = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians[VARIANTS[0]]
    print("\n| our training step | median | saved | share of the step |")
    print("|---|---|---|---|")
    for name, m in medians.items():
        print(f"| {name} | {m:.3f} s | {base - m:.3f} s | {(base - m) / base:.0%} |")
    return {"times_s": times, "median_s": medians}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r18vd")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--iters", type=int, default=7, help="calls of each gradient, alternating (tables 1 and 2)")
    ap.add_argument("--rounds", type=int, default=4, help="timed steps of each variant (table 3); 0 skips it")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kernel_gradients_profile.json"))
    args = ap.parse_args(argv)
    if args.iters < 1:
        ap.error(f"--iters {args.iters}: at least 1 (each gradient's median needs a call)")
    if args.rounds < 0:
        ap.error(f"--rounds {args.rounds}: 0 (skip the step table) or more")
    start_like_the_cli()
    import torch

    from rtdetr_jax.config import RTDetrV2Config
    from rtdetr_jax.train.loop import fresh_model

    torch.set_num_threads(os.cpu_count() or 1)
    config = RTDetrV2Config.from_preset(args.preset)
    pixels, labels = synthetic_detection_batch(args.batch, args.size, config.num_labels)
    model = fresh_model(config)
    steps, state, batch = our_train_step(model, pixels, labels)
    calls = collections.Counter()
    with conv2d_replaced(recording(calls)):
        steps.train_step.lower(state, *batch)
    result = {"machine": machine_info(), "args": vars(args), "census": census(calls, args.iters),
              # the first convolution's input is the pixels: the step computes no input gradient for it
              "input_census": census(calls, args.iters, "input", first_convolution_input(pixels))}
    if args.rounds > 0:
        result["step"] = step_ablation(model, pixels, labels, args.rounds)
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
