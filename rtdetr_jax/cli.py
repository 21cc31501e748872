"""Command line: `rtdetr-jax port ...` (also `python -m rtdetr_jax`).

Errors a user can cause (missing file, bad checkpoint, bad value) print one line on stderr and exit 2;
never a traceback.
"""

from __future__ import annotations

import argparse
import sys


def _port(args: argparse.Namespace) -> int:
    from rtdetr_jax.convert.port import port

    out = port(args.source, args.out, config=args.config, revision=args.revision, force=args.force)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtdetr-jax", description="RT-DETRv2 object detection in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("rtdetr-jax: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"rtdetr-jax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
