"""``jmllm-joint sample-data --out DIR``: toy-world sample data for every workflow
(:mod:`jmllm.joint.sample_data`). Registered by :func:`jmllm.joint.cli.build_parser`."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common_args: argparse.ArgumentParser) -> None:
    """Add ``sample-data`` to ``jmllm-joint``'s parser."""
    from jmllm.align.options import integer

    p = subparsers.add_parser(
        "sample-data",
        help="write toy-world sample data: COCO captions/instances, a CUB-style WSOL folder",
        description="Held-out toy scenes with their truth in the formats the workflows read "
        "(COCO captions and instances JSON, a CUB-style folder with boxes.csv), offline.",
    )
    p.add_argument("--out", required=True, help="output folder (new, or a previous run's)")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into an --out that holds other files (never replacing them)",
    )
    p.add_argument(
        "-n", "--images", type=integer(1, 10000), default=12, help="COCO-style scenes (default 12)"
    )
    p.add_argument(
        "--wsol-images",
        type=integer(1, 10000),
        default=8,
        help="single-object scenes in cub/ (default 8)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_sample_data)


def cmd_sample_data(args: argparse.Namespace) -> int:
    from jmllm.joint.cli.common import out_dir
    from jmllm.joint.sample_data import write_sample_data

    out = out_dir(args.out)
    write_sample_data(out, count=args.images, wsol_count=args.wsol_images, force=args.force)
    print(f"sample data -> {out} (see {out / 'README.md'})")
    return 0
