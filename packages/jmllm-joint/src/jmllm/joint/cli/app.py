"""``jmllm-joint app``: serve the interactive explorer (:mod:`jmllm.joint.app`) on one loaded J.

Registered by :func:`jmllm.joint.cli.build_parser` through :func:`register`.

    jmllm-joint app --tiny                       # built-in models, http://127.0.0.1:7860
    jmllm-joint app --alignment W.safetensors [--owl …] [--mllm …] [--host H] [--port P]
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from typing import Any

logger = logging.getLogger("jmllm.joint.cli")

DEFAULT_PORT = 7860


def register(subparsers: Any, common_args: argparse.ArgumentParser) -> None:
    """Add ``app`` to ``jmllm-joint``'s parser."""
    from jmllm.align.images import MAX_IMAGE_PIXELS
    from jmllm.align.options import finite_float, integer
    from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING
    from jmllm.joint.app.explorer import MAX_UPLOAD_BYTES
    from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION
    from jmllm.joint.cli.common import preprocessing_argument, tokenization_argument

    app = subparsers.add_parser(
        "app",
        parents=[common_args],
        help='interactive explorer in the browser (needs pip install "jmllm-joint[app]")',
        description="Serve a local web page to chat with J, see its detections and click any "
        "word of an answer for its GA map. Offline: no analytics, no share link, nothing "
        "fetched from the internet.",
    )
    app.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 serves "
        "everyone who can reach it)",
    )
    app.add_argument("--port", type=integer(1, 65535), default=DEFAULT_PORT, help="TCP port")
    app.add_argument(
        "--max-upload-mb",
        type=finite_float(0, open_low=True),
        default=MAX_UPLOAD_BYTES / 2**20,
        help=f"largest uploaded file in MB (default: {MAX_UPLOAD_BYTES // 2**20})",
    )
    app.add_argument(
        "--max-pixels",
        type=integer(1, MAX_IMAGE_PIXELS),
        default=MAX_IMAGE_PIXELS,
        help=f"largest accepted image in pixels, from its header (default: {MAX_IMAGE_PIXELS}, "
        "the project's image policy, also the most)",
    )
    app.add_argument(
        "--objects",
        help="comma-separated vocabulary of the answer's object words (default: the 80 COCO "
        "names; with --tiny the toy shapes circle, square, triangle, cross)",
    )
    tokenization_argument(app, INTERACTIVE_TOKENIZATION)
    preprocessing_argument(app, INTERACTIVE_PREPROCESSING)
    app.set_defaults(func=cmd_app)


def _check(args: argparse.Namespace) -> tuple[int, int, list[str] | None]:
    from jmllm.joint.cli.common import CliError

    if not args.host.strip():
        raise CliError("--host: empty")
    objects = None
    if args.objects is not None:
        objects = [o.strip() for o in args.objects.split(",") if o.strip()]
        if not objects:
            raise CliError("--objects: empty list")
    return int(args.max_upload_mb * 2**20), args.max_pixels, objects


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_app(args: argparse.Namespace) -> int:
    """Load J once and serve the explorer until interrupted."""
    from jmllm.joint.cli.common import TOY_WORLD_NOTE, CliError, load_model

    max_bytes, max_pixels, objects = _check(args)
    try:
        from jmllm.joint.app.page import build_app, launch, require_gradio

        require_gradio()
    except ImportError as exc:
        raise CliError(str(exc)) from None
    if not _is_loopback(args.host):
        logger.warning(
            "serving on %s: anyone who can reach this address can use the model", args.host
        )
    model = load_model(args)
    notes = [TOY_WORLD_NOTE] if args.tiny else []
    if args.tiny and objects is None:
        from jmllm.joint.cli.common import builtin_vocabulary

        objects = builtin_vocabulary()  # the object words the toy world knows
    app = build_app(
        model,
        notes=notes,
        objects=objects,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        tokenization=args.tokenization,
        preprocessing=args.preprocessing,
    )
    launch(app, host=args.host, port=args.port, max_file_size=max_bytes)
    return 0
