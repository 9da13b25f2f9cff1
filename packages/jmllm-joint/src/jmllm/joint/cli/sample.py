"""``jmllm-joint sample-data -o DIR``: toy-world sample data for every workflow
(:mod:`jmllm.joint.toy.sample_data`). Registered by :func:`jmllm.joint.cli.build_parser`."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common_args: argparse.ArgumentParser) -> None:
    """Add ``sample-data`` to ``jmllm-joint``'s parser."""
    from jmllm.align.options import integer
    from jmllm.align.vocabulary import hidden_alias

    p = subparsers.add_parser(
        "sample-data",
        help="write toy-world sample data: COCO captions/instances, a CUB-style WSOL folder",
        description="Held-out toy scenes with their truth in the formats the workflows read "
        "(COCO captions and instances JSON, a CUB-style folder with boxes.csv), offline.",
    )
    p.add_argument("-o", "--out", required=True, help="output folder")
    count = integer(1, 10000)
    p.add_argument("-n", "--num-images", type=count, default=12, help="COCO-style scenes")
    hidden_alias(p, "--images", dest="num_images", type=count)  # its former name
    p.add_argument("--num-wsol-images", type=count, default=8, help="single-object scenes in cub/")
    hidden_alias(p, "--wsol-images", dest="num_wsol_images", type=count)  # its former name
    p.add_argument(
        "--force",
        action="store_true",
        help="write into an --out that holds other files (never replacing them)",
    )
    p.set_defaults(func=cmd_sample_data)


def cmd_sample_data(args: argparse.Namespace) -> int:
    from jmllm.joint.cli.common import out_dir, output_folder
    from jmllm.joint.toy.sample_data import write_sample_data

    out = out_dir(args.out)
    with output_folder(out):
        write_sample_data(
            out, count=args.num_images, wsol_count=args.num_wsol_images, force=args.force
        )
    print(f"sample data -> {out} (see {out / 'README.md'})")
    return 0
