"""The CLI's shared helpers: errors, the built-in models (``--tiny``), the model options, loading J.

Every subcommand module (the core ones of :mod:`jmllm.joint.cli.commands` and the plug-ins
``jmllm.joint.cli.explain``, ``jmllm.joint.cli.toy``, ``jmllm.joint.cli.app``,
``jmllm.joint.cli.audit``, ``jmllm.joint.cli.sample``) imports what it shares from here; this
module imports no subcommand. :func:`builtin_sources` is the one place every package's ``--tiny``
goes through.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jmllm.align.options import (
    ArgumentParser,
    finite_float,
    integer,
    quiet_third_party,
    template_type,
    unit_interval,
)
from jmllm.align.vocabulary import DEVICE_HELP, DTYPE_CHOICES, hidden_alias
from jmllm.joint.detection.heads import DEFAULT_NMS_IOU, DEFAULT_THRESHOLD

logger = logging.getLogger("jmllm.joint.cli")

PROG = "jmllm-joint"
DEFAULT_QUESTION = "What's the content of the image?"
# With real checkpoints the demo explains the sample photo shipped in jmllm/joint/data/.
DEMO_QUESTIONS = ("What's the content of the image?", "What colour is the house?")
DEMO_QUERIES = ("house", "tree", "sun", "car")
# With the built-in (toy world) models it explains a held-out toy scene: a yellow triangle and a
# green cross, which the shipped toy J captions, answers and detects correctly, every word's GA
# map on its object (tests/test_toy_validity.py)
TOY_DEMO_SCENE = ("heldout", 114)
TOY_DEMO_QUESTIONS = ("What's the content of the image?", "What colour is the triangle?")
TOY_DEMO_QUERIES = ("circle", "square", "triangle", "cross")  # every toy shape
TOY_WORLD_NOTE = (
    "These are the built-in toy-world models: a small OWL-ViT, LLaVA and W trained on synthetic "
    "scenes of coloured shapes (circle, square, triangle, cross; red, green, blue, yellow). On "
    "such scenes their answers, boxes and GA maps can be checked against the truth; they know "
    "nothing else, and are a testbed, not a substitute for the real checkpoints."
)
RANDOM_WEIGHTS_NOTE = TOY_WORLD_NOTE  # the former name of the built-in models' note
TOY_WORLD_ENV = "JMLLM_TOY_WORLD"  # a retrained toy world's folder (default: the shipped one)
REAL_CHECKPOINTS_HINT = (
    "To run on real checkpoints: jmllm-joint chat IMAGE --alignment W.safetensors "
    "(defaults --owl google/owlvit-base-patch32 --mllm llava-hf/llava-1.5-7b-hf; W comes from "
    "jmllm-align train, or from the authors' weights through jmllm-align import-pth)."
)


class CliError(ValueError):
    """Bad command-line input; the message names the input and the problem (exit code 2)."""


def builtin_sources() -> Any:
    """The built-in models every ``--tiny`` of every package loads: the toy world's folders.

    The shipped toy world (:func:`jmllm.joint.toy.toy_paths`), or the one trained into
    ``$JMLLM_TOY_WORLD`` (``jmllm-joint toy train --out DIR``). Nothing is built or downloaded.

    Returns:
        :class:`jmllm.joint.toy.ToyPaths` with ``owl``, ``llava`` and ``alignment``.

    Example:
        >>> builtin_sources().alignment.name
        'alignment.safetensors'
    """
    from jmllm.joint.toy import toy_paths

    return toy_paths(os.environ.get(TOY_WORLD_ENV) or None)


def builtin_vocabulary() -> list[str]:
    """The object words the built-in models know (the toy shapes): the default object vocabulary
    of commands run with ``--tiny`` (``hallucinations``, ``app``).

    Example:
        >>> builtin_vocabulary()
        ['circle', 'square', 'triangle', 'cross']
    """
    from jmllm.joint.toy.scenes import SHAPES

    return list(SHAPES)


def load_builtin_model(**kwargs: Any) -> Any:
    """The built-in J (:func:`builtin_sources`), loaded with its toy-scene input check; one line
    on stderr says what is being loaded.

    Args:
        **kwargs: passed to :meth:`JointModel.from_pretrained` (``device``, ``dtype``, ...).

    Example:
        >>> model = load_builtin_model()  # doctest: +SKIP
    """
    from jmllm.joint.toy import load_toy_joint

    paths = builtin_sources()
    # a command without -v (root logger above INFO) shows no third-party loading chatter
    quiet_third_party(logging.getLogger().getEffectiveLevel() <= logging.INFO)
    notice(f"loading the built-in toy-world models from {paths.root} …")
    return load_toy_joint(paths.root, **kwargs)


def check_answers(model: Any, emb: Any, texts: Sequence[str]) -> list[str]:
    """The model's :attr:`~jmllm.joint.JointModel.answer_check` of one answer per image of
    ``emb`` (the toy world's: does the answer name as many objects as the detector sees?),
    each problem logged as a warning; the problems, for a report.

    Example:
        >>> check_answers(model, emb, ["a red circle"])  # doctest: +SKIP
        []
    """
    check = getattr(model, "answer_check", None)
    if check is None:
        return []
    problems = [p for p in check(model, emb, list(texts)) if p]
    for problem in problems:
        logger.warning("%s", problem)
    return problems


def report_notes(model: Any, emb: Any, texts: Sequence[str] = ()) -> list[str]:
    """What a report of ``emb``'s images must say at its top: each image's problem with the
    models (:attr:`~jmllm.joint.JointEmbedding.input_problems`, already logged when it was
    embedded: a photo given to the toy world) and each answer's (:func:`check_answers`, logged
    here), so the page never shows an answer without the warning the terminal gave.

    Example:
        >>> report_notes(model, emb, ["a red circle"])  # a toy scene, a consistent answer  # doctest: +SKIP
        []
    """
    problems = [p for p in emb.input_problems if p]
    return problems + (check_answers(model, emb, texts) if texts else [])


def notice(message: str) -> None:
    """One line on stderr for a person watching (a terminal), so a pause has a reason; logged
    at INFO otherwise, so a script's stderr keeps only its errors.

    Example:
        >>> notice("building the tiny models …")
    """
    if sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)
    else:
        logger.info(message)


def tiny_cache_dir() -> Path:
    """Where ``--tiny`` checkpoints are built: ``$JMLLM_CACHE/tiny`` or ``~/.cache/jmllm/tiny``."""
    base = os.environ.get("JMLLM_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "jmllm") / "tiny"


class CommonArguments(ArgumentParser):
    """The shared model options: a parent parser (``parents=[common_args]``) that can also be
    called on a parser to add the same options to it (``common_args(parser)``)."""

    def __call__(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_common_arguments(parser)
        return parser


def common_arguments() -> CommonArguments:
    """The parent parser of the model options every subcommand shares."""
    common = CommonArguments(add_help=False)
    add_common_arguments(common)
    return common


def add_common_arguments(common: argparse.ArgumentParser) -> None:
    group = common.add_argument_group("models")
    group.add_argument(
        "--owl",
        help="OWL-ViT or OWLv2 Hub id or folder, picked from its config "
        "(default: google/owlvit-base-patch32)",
    )
    group.add_argument(
        "--mllm", help="LLaVA-1.5 Hub id or folder (default: llava-hf/llava-1.5-7b-hf)"
    )
    hidden_alias(group, "--llava", dest="mllm")  # its former name
    group.add_argument(
        "--alignment",
        help="alignment W: .safetensors file, folder or Hub id (default: none; required for "
        "real models, detect needs none)",
    )
    group.add_argument(
        "--tiny",
        action="store_true",
        help="use the built-in models: the toy world (small OWL-ViT, LLaVA and W trained on "
        "synthetic shapes; offline, shipped in the package)",
    )
    group.add_argument(
        "--device", help=DEVICE_HELP.replace("(default: auto,", "(default: auto; --tiny: the CPU;")
    )
    group.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights dtype (default: auto, bfloat16 on a GPU, float32 on the CPU)",
    )
    group.add_argument(
        "--device-map",
        help="LLaVA device_map, e.g. 'auto' to spread it over GPUs (default: none, all on "
        "--device)",
    )


def template_argument(
    parser: argparse.ArgumentParser, default: str, shown: str | None = None
) -> None:
    """``--template``: the conversation template J (and stock LLaVA) is prompted with.

    Args:
        parser: where to add it.
        default: the default template's name.
        shown: the default as ``--help`` says it, when the command resolves it later (e.g.
            ``"paper; --benchmark pope: llava-1.5"``).
    """
    from jmllm.joint.chat.templates import CONVERSATION_TEMPLATES

    forms = "; ".join(
        f"{name}: {form.first!r}" for name, form in sorted(CONVERSATION_TEMPLATES.items())
    )
    parser.add_argument(
        "--template",
        choices=sorted(CONVERSATION_TEMPLATES),
        default=default,
        help=f"conversation template ({forms.replace('%', '%%')})"
        + (f" (default: {shown})" if shown else ""),
    )


def tokenization_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--tokenization``: how J's prompts become LLaVA-1.5's token ids
    (:mod:`jmllm.joint.chat.tokenization`)."""
    from jmllm.joint.chat.tokenization import TOKENIZATIONS

    parser.add_argument(
        "--tokenization",
        choices=TOKENIZATIONS,
        default=default,
        help="prompt token ids legacy, the authors' (a ▁ after <image>, "
        "as transformers 4 gave); checkpoint, as the checkpoint's tokenizer config says",
    )


def preprocessing_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--preprocessing``: how images become the models' inputs
    (:mod:`jmllm.align.preprocessing`)."""
    from jmllm.align.preprocessing import PREPROCESSINGS

    parser.add_argument(
        "--preprocessing",
        choices=sorted(PREPROCESSINGS),
        default=default,
        help="image preprocessing authors, the stored pixels resized as "
        "the HF image processors do (the paper's); exif, EXIF orientation applied, torch's resize",
    )


def generation_arguments(parser: argparse.ArgumentParser) -> None:
    from jmllm.joint.chat.templates import INTERACTIVE_MAX_NEW_TOKENS

    group = parser.add_argument_group("generation")
    group.add_argument(
        "--max-new-tokens",
        type=integer(1),
        default=INTERACTIVE_MAX_NEW_TOKENS,
        help="answer length limit, in tokens",
    )
    group.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument(
        "--temperature",
        type=finite_float(0, open_low=True),
        default=1.0,
        help="sampling temperature, > 0",
    )
    group.add_argument(
        "--top-p", type=unit_interval(open_low=True), default=1.0, help="sampling top-p, in (0, 1]"
    )
    group.add_argument(
        "--seed",
        type=integer(0, 2**63 - 1),
        default=None,
        help="sampling seed (default: none, a fresh one)",
    )
    group.add_argument(
        "--compare", action="store_true", help="also answer with stock LLaVA (its own vision tower)"
    )


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "template": args.template,
        "tokenization": args.tokenization,
    }


def detection_arguments(
    parser: argparse.ArgumentParser, default_queries: Sequence[str] = ()
) -> None:
    group = parser.add_argument_group("detection")
    group.add_argument(
        "-q",
        "--query",
        action="append",
        dest="queries",
        default=None,
        help="object to detect, repeatable (default: "
        + (", ".join(default_queries) if default_queries else "none")
        + ")",
    )
    group.add_argument(
        "--threshold",
        type=unit_interval(),
        default=DEFAULT_THRESHOLD,
        help="minimum detection score, in [0, 1]",
    )
    group.add_argument(
        "--nms",
        type=unit_interval(open_low=True),
        default=DEFAULT_NMS_IOU,
        help="per-class NMS IoU in (0, 1], 1 disables it",
    )
    group.add_argument(
        "--query-template",
        type=template_type("--query-template"),
        default="a photo of a {}",
        help="OWL-ViT query template with exactly one {}",
    )
    group.add_argument("--max-boxes", type=integer(0), default=20, help="boxes drawn and listed")


def load_model(args: argparse.Namespace, *, language: bool = True) -> Any:
    """The :class:`~jmllm.joint.JointModel` the model options of ``args`` select.

    Args:
        args: parsed options (``--owl/--mllm/--alignment`` or ``--tiny``, ``--device``, ...).
        language: False loads OWL-ViT alone (:meth:`JointModel.detector`), for commands that
            only detect: neither LLaVA nor W is loaded (nor needed).
    """
    import torch

    from jmllm.joint.model.joint import DEFAULT_LLAVA, DEFAULT_OWL, JointModel

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.device == "auto":
        args.device = None
    if args.tiny:
        if args.owl or args.mllm or args.alignment:
            raise CliError("--tiny: cannot be combined with --owl, --mllm or --alignment")
        if language:
            return load_builtin_model(dtype=dtype, device=args.device or "cpu")
        from jmllm.joint.toy.inputs import toy_input_check

        paths = builtin_sources()
        notice(f"loading the built-in toy-world OWL-ViT from {paths.owl} …")
        detector = JointModel.detector(paths.owl, dtype=dtype, device=args.device or "cpu")
        detector.input_check = toy_input_check  # a photo is not a toy scene
        return detector
    elif not language:
        owl, llava, alignment = args.owl or DEFAULT_OWL, None, None
        device = args.device
    else:
        if not args.alignment:
            raise CliError(
                "--alignment: required with real checkpoints (there is no public default W); "
                "or use --tiny for the built-in tiny models"
            )
        owl, llava, alignment = args.owl or DEFAULT_OWL, args.mllm or DEFAULT_LLAVA, args.alignment
        device = args.device
    if not language or llava is None:
        logger.info("loading OWL-ViT only (detection): owl=%s", owl)
        return JointModel.detector(owl, dtype=dtype, device=device)
    logger.info("loading J: owl=%s llava=%s alignment=%s", owl, llava, alignment)
    return JointModel.from_pretrained(
        owl, llava, alignment, dtype=dtype, device=device, device_map=args.device_map
    )


def queries_of(args: argparse.Namespace, default: Sequence[str] = ()) -> list[str]:
    queries = args.queries if args.queries is not None else list(default)
    if not queries:
        raise CliError("-q/--query: give at least one object to detect")
    for query in queries:
        if not query.strip():
            raise CliError("-q/--query: empty query")
    return queries


def nms_of(args: argparse.Namespace) -> float | None:
    return None if args.nms >= 1.0 else args.nms


def out_dir(
    path: str, command: str | None = None, outputs: Sequence[str] = (), force: bool = False
) -> Path:
    """Check ``--out`` (a folder, or a path where one can be made) without creating it: it is
    created when there is something to write (:func:`output_folder`), so a run that fails
    first leaves no empty folder behind. With a ``command``, a folder holding entries it did not
    write is refused now, before any model loads (unless ``force``; see
    :func:`jmllm.align.files.claim_output_folder`)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: exists and is not a folder")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if out.exists():
        parent = out
    if parent is None or not parent.is_dir():
        raise CliError(f"--out {out}: cannot create folder (no existing parent folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: cannot create or write the folder (permission denied)")
    if command is not None:
        from jmllm.align.files import check_output_claim

        check_output_claim(out, command, outputs, force=force)
    return out


def output_folder(
    out: Path, command: str | None = None, outputs: Sequence[str] = (), force: bool = False
) -> Any:
    """Create ``out`` for the outputs; removed again if still empty when the work fails. With a
    ``command``, the folder is claimed for it first (its ``outputs`` recorded as its own)."""
    from jmllm.align.files import output_folder as folder

    return folder(out, command=command, outputs=outputs, force=force)


def force_argument(parser: argparse.ArgumentParser) -> None:
    """``--force``: write into an ``--out`` that holds files the command did not write."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into an --out that holds files this command did not write (they are never "
        "replaced or deleted)",
    )


def image_arg(path: str) -> Path:
    image = Path(path)
    if image.is_dir():
        raise CliError(f"{image}: is a folder, not an image file")
    if not image.is_file():
        raise CliError(f"{image}: no such image file")
    return image


# the former private names, kept for callers that used them
_add_common_arguments = add_common_arguments
_generation_arguments = generation_arguments
_generation_kwargs = generation_kwargs
_detection_arguments = detection_arguments
_queries = queries_of
_nms = nms_of
_out_dir = out_dir
_image_arg = image_arg
