"""The kernel gradient of a 3x3 stride-1 convolution (NHWC, batch 4): XLA's own against three matmul forms.

    python benchmarks/bench_kernel_gradient.py [--iters 7]

Why: in the r18vd training step XLA:CPU's kernel gradient runs at about half the GFLOP/s of the forward of the same
convolution, and a float32 matmul whose operands are already laid out reaches 140-160 GFLOP/s on this machine. Each
matmul form first builds a patch matrix (the input shifted by each of the 9 taps), then contracts it with dy over
the batch x H x W positions:

- `patches_cm`: channels-major patches (9 * in, N*H*W) @ dy (N*H*W, out);
- `patches_nhwc`: dy^T (out, N*H*W) @ patches (N*H*W, 9 * in), transposed at the end;
- `row_shifts`: 3 matmuls, one per kernel row, over column-shifted patches (3 * in, N*H*W).

Prints, per shape, the median time of each (ms) and its GFLOP/s, and checks each against XLA's result (relative
max error); also the forward for scale. A second table times the kernel gradients the library uses
(rtdetr_jax/ops/kernel_gradient.py) against XLA's: at stride 1 the batch stacked into one tall image, its transpose
by XLA, by a matmul with the identity and as a plain two-dimensional transpose; at stride 2 (the backbone's and
the encoder's downsampling convolutions) one stride phase at a time; and at both strides the C++ kernel
(`native_kernel_gradient`, rtdetr_jax/ops/cpu_kernel_gradient.cc), which the library takes on the CPU in float32
where it builds. Writes benchmarks/results/kernel_gradient.json.
JAX only: PyTorch has no counterpart to compare here (its kernel gradient is oneDNN's, measured inside
bench_training.py's step).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import machine_info, median_time, start_like_the_cli, write_result  # noqa: E402

# the r18vd backbone's 3x3 stride-1 convolutions at batch 4, 640x640: stages 1-4 and the stem
SHAPES = [(4, 160, 160, 64, 64), (4, 80, 80, 128, 128), (4, 40, 40, 256, 256), (4, 20, 20, 512, 512),
          (4, 320, 320, 32, 32)]


def forms():
    import jax
    import jax.numpy as jnp

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def xla(x, k, dy):
        return jax.vjp(lambda v: conv(x, v), k)[1](dy)[0]

    def patches_cm(x, k, dy):
        n, h, w, cin = x.shape
        xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (1, 1), (1, 1)))  # (in, n, h+2, w+2)
        taps = [xt[:, :, a:a + h, b:b + w] for a in range(3) for b in range(3)]
        pat = jnp.concatenate(taps, 0).reshape(9 * cin, -1)  # (9 * in, n*h*w)
        return (pat @ dy.reshape(-1, dy.shape[-1])).reshape(k.shape)

    def patches_nhwc(x, k, dy):
        n, h, w, cin = x.shape
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        taps = [xp[:, a:a + h, b:b + w] for a in range(3) for b in range(3)]
        pat = jnp.concatenate(taps, -1).reshape(-1, 9 * cin)  # (n*h*w, 9 * in)
        return (dy.reshape(-1, dy.shape[-1]).T @ pat).T.reshape(k.shape)

    def row_shifts(x, k, dy):
        n, h, w, cin = x.shape
        xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (1, 1), (1, 1)))
        g = dy.reshape(-1, dy.shape[-1])
        rows = [jnp.concatenate([xt[:, :, a:a + h, b:b + w] for b in range(3)], 0).reshape(3 * cin, -1) @ g
                for a in range(3)]  # each (3 * in, out)
        return jnp.stack(rows).reshape(k.shape)

    return conv, {"xla": xla, "patches_cm": patches_cm, "patches_nhwc": patches_nhwc, "row_shifts": row_shifts}


# (batch, H, W, in, out, stride): r18vd's 3x3 convolutions at batch 4, 640x640, for the library's kernel gradients
LIBRARY_SHAPES = [(4, 320, 320, 32, 32, 1), (4, 320, 320, 32, 64, 1), (4, 160, 160, 64, 64, 1),
                  (4, 80, 80, 128, 128, 1), (4, 640, 640, 3, 32, 2), (4, 160, 160, 64, 128, 2),
                  (4, 80, 80, 128, 256, 2), (4, 40, 40, 256, 512, 2), (4, 80, 80, 256, 256, 2)]


def library_rows(iters: int, rng) -> list[dict]:
    """XLA's kernel gradient against the library's for LIBRARY_SHAPES; prints a table."""
    import jax
    import numpy as np

    import rtdetr_jax.ops.kernel_gradient as kg
    from rtdetr_jax.ops.xla_conv import xla_kernel_gradient

    def stacked(transpose):
        return lambda x, dy: kg.stacked_kernel_gradient(x, dy, (3, 3), 1, transpose)

    rows = []
    print("\n| kernel gradient of (3x3) | stride | XLA's | stacked, XLA's transpose | stacked, matmul transpose "
          "| stacked, plain transpose | per stride phase | C++ kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for n, h, w, cin, cout, stride in LIBRARY_SHAPES:
        x = jax.numpy.asarray(rng.standard_normal((n, h, w, cin), np.float32))
        dy = jax.numpy.asarray(rng.standard_normal((n, h // stride, w // stride, cout), np.float32))
        ways = {"xla": lambda x_, dy_: xla_kernel_gradient(x_, dy_, (3, 3, cin, cout), stride, 1)}
        if stride == 1:
            ways |= {"stacked_xla_transpose": stacked("xla"), "stacked_matmul_transpose": stacked("matmul"),
                     "stacked_plain_transpose": stacked("plain")}
        else:
            ways["phases"] = lambda x_, dy_: kg.phase_kernel_gradient(x_, dy_, (3, 3, cin, cout), stride, 1)
        ways["native"] = lambda x_, dy_: kg.native_kernel_gradient(x_, dy_, (3, 3, cin, cout), stride, 1)
        row = {"shape": [n, h, w, cin, cout], "stride": stride}
        reference = None
        for name, fn in ways.items():
            f = jax.jit(fn)
            got = np.asarray(f(x, dy))
            reference = got if reference is None else reference
            row[f"{name}_s"] = median_time(lambda: f(x, dy).block_until_ready(), iters)
            row[f"{name}_rel_error"] = float(np.abs(got - reference).max() / np.abs(reference).max())
        rows.append(row)
        cells = [f"{row[k] * 1e3:.0f} ms" if k in row else "-" for k in
                 ("xla_s", "stacked_xla_transpose_s", "stacked_matmul_transpose_s", "stacked_plain_transpose_s",
                  "phases_s", "native_s")]
        print(f"| ({n}, {h}, {w}, {cin}) -> {cout} | {stride} | " + " | ".join(cells) + " |", flush=True)
    worst = max(v for r in rows for k, v in r.items() if k.endswith("_rel_error"))
    print(f"(largest relative difference from XLA's kernel gradient: {worst:.1e})")
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kernel_gradient.json"))
    args = ap.parse_args(argv)

    from rtdetr_jax.xla_flags import apply_default_xla_flags

    apply_default_xla_flags()  # our XLA:CPU settings (importing rtdetr_jax applies them too), before jax starts
    import jax
    import numpy as np

    conv, kernels = forms()
    rng = np.random.default_rng(0)
    rows = []
    print("| kernel gradient of (3x3, stride 1) | GFLOP | forward | " + " | ".join(kernels) + " |")
    print("|---|---|---|" + "---|" * len(kernels))
    for n, h, w, cin, cout in SHAPES:
        x = jax.numpy.asarray(rng.standard_normal((n, h, w, cin), np.float32))
        k = jax.numpy.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * 0.05)
        dy = jax.numpy.asarray(rng.standard_normal((n, h, w, cout), np.float32))
        gflop = 2 * n * h * w * cin * cout * 9 / 1e9
        fwd = jax.jit(conv)
        row = {"shape": [n, h, w, cin, cout], "gflop": gflop,
               "forward_s": median_time(lambda: fwd(x, k).block_until_ready(), args.iters)}
        reference = None
        for name, fn in kernels.items():
            f = jax.jit(fn)
            got = np.asarray(f(x, k, dy))
            reference = got if reference is None else reference
            row[f"{name}_s"] = median_time(lambda: f(x, k, dy).block_until_ready(), args.iters)
            row[f"{name}_rel_error"] = float(np.abs(got - reference).max() / np.abs(reference).max())
        rows.append(row)
        cells = [f"{row[f'{name}_s'] * 1e3:.0f} ms ({gflop / row[f'{name}_s']:.0f})" for name in kernels]
        print(f"| ({n}, {h}, {w}, {cin}) -> {cout} | {gflop:.1f} | {row['forward_s'] * 1e3:.0f} ms "
              f"({gflop / row['forward_s']:.0f}) | " + " | ".join(cells) + " |", flush=True)
    worst = max(r[f"{name}_rel_error"] for r in rows for name in kernels)
    print(f"(GFLOP/s in brackets; largest relative difference from XLA's gradient: {worst:.1e})")
    library = library_rows(args.iters, rng)
    result = {"rows": rows, "library_rows": library, "machine": machine_info(), "settings": vars(args) | {"out": None}}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    start_like_the_cli()
    main()
