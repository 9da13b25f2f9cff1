"""Command line: ``jmllm-joint demo | chat | describe | detect`` (and plug-in subcommands).

Every command takes ``--owl/--llava/--alignment`` (Hub ids or local paths) or ``--tiny`` for the
built-in models: the toy world (:mod:`jmllm.joint.toy`, small models trained on synthetic shapes),
resolved by :func:`builtin_sources` — the one place every package's ``--tiny`` goes through. Bad input ends with one line on stderr naming the input,
never a traceback (``--debug`` shows it). Exit codes follow docs/conventions.md: 2 bad input or
usage (numbers are checked here, at the boundary, with the argparse types of
:mod:`jmllm.align.options`), 1 runtime failure, 3 partial results, 130 Ctrl-C.

Extending: for every module of :data:`PLUGINS` that exists (``jmllm.joint.cli_explain``,
``jmllm.joint.toy.cli``, ``jmllm.joint.cli_app``, ``jmllm.joint.cli_audit``,
``jmllm.joint.cli_sample``), :func:`build_parser`
calls its ``register(subparsers, common_args)``. ``subparsers`` is the ``add_subparsers`` object;
``common_args`` holds the shared model options: use it as a parent parser,
``subparsers.add_parser("explain", parents=[common_args], help=...)``, or call it on a parser,
``common_args(parser)``. A subcommand sets its handler with
``parser.set_defaults(func=handler)``; ``handler(args) -> int`` may call :func:`load_model` and
raise :class:`CliError` for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jmllm.align.options import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    ArgumentParser,
    exit_code_for,
    finite_float,
    integer,
    one_line,
    quiet_third_party,
    template_type,
    unit_interval,
)
from jmllm.joint.detection import DEFAULT_NMS_IOU, DEFAULT_THRESHOLD

logger = logging.getLogger("jmllm.joint.cli")

PROG = "jmllm-joint"
PLUGINS = (  # modules adding subcommands, in the order --help lists them
    "jmllm.joint.cli_explain",
    "jmllm.joint.toy.cli",
    "jmllm.joint.cli_app",
    "jmllm.joint.cli_audit",
    "jmllm.joint.cli_sample",
)
DEFAULT_QUESTION = "What's the content of the image?"
# With real checkpoints the demo explains the sample photo shipped in jmllm/joint/data/.
DEMO_QUESTIONS = ("What's the content of the image?", "What colour is the house?")
DEMO_QUERIES = ("house", "tree", "sun", "car")
# With the built-in (toy world) models it explains a held-out toy scene: a blue triangle, a red
# cross and a green cross, which the shipped toy J captions, answers and detects correctly.
TOY_DEMO_SCENE = ("heldout", 103)
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
    "(defaults --owl google/owlvit-base-patch32 --llava llava-hf/llava-1.5-7b-hf; W comes from "
    "`jmllm-align train` or the authors' weights via `jmllm-align import-pth`)."
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
        _add_common_arguments(parser)
        return parser


def common_arguments() -> CommonArguments:
    """The parent parser of the model options every subcommand shares."""
    common = CommonArguments(add_help=False)
    _add_common_arguments(common)
    return common


def _add_common_arguments(common: argparse.ArgumentParser) -> None:
    group = common.add_argument_group("models")
    group.add_argument(
        "--owl", help="OWL-ViT Hub id or folder (default google/owlvit-base-patch32)"
    )
    group.add_argument(
        "--llava", help="LLaVA-1.5 Hub id or folder (default llava-hf/llava-1.5-7b-hf)"
    )
    group.add_argument(
        "--alignment",
        help="alignment W: .safetensors file, folder or Hub id (required for real models; "
        "detect needs none)",
    )
    group.add_argument(
        "--tiny",
        action="store_true",
        help="use the built-in models: the toy world (small OWL-ViT, LLaVA and W trained on "
        "synthetic shapes; offline, shipped in the package)",
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1, … (default: GPU if available)")
    group.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights dtype (auto: bfloat16 on GPU, float32 on CPU)",
    )
    group.add_argument("--device-map", help="LLaVA device_map, e.g. 'auto' to spread it over GPUs")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress")
    common.add_argument("--debug", action="store_true", help="show tracebacks")


def template_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--template``: the conversation template J (and stock LLaVA) is prompted with."""
    from jmllm.joint.chat import CONVERSATION_TEMPLATES

    forms = "; ".join(
        f"{name}: {form.first!r}" for name, form in sorted(CONVERSATION_TEMPLATES.items())
    )
    parser.add_argument(
        "--template",
        choices=sorted(CONVERSATION_TEMPLATES),
        default=default,
        help=f"conversation template (default {default}; {forms.replace('%', '%%')})",
    )


def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument(
        "--max-new-tokens", type=integer(1), default=64, help="(default %(default)s)"
    )
    group.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument(
        "--temperature", type=finite_float(0, open_low=True), default=1.0, help="> 0 (sampling)"
    )
    group.add_argument(
        "--top-p", type=unit_interval(open_low=True), default=1.0, help="in (0, 1] (sampling)"
    )
    group.add_argument("--seed", type=integer(0, 2**63 - 1), default=None)
    group.add_argument(
        "--compare", action="store_true", help="also answer with stock LLaVA (its own vision tower)"
    )


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "template": args.template,
    }


def _detection_arguments(
    parser: argparse.ArgumentParser, default_queries: Sequence[str] = ()
) -> None:
    group = parser.add_argument_group("detection")
    group.add_argument(
        "-q",
        "--query",
        action="append",
        dest="queries",
        default=None,
        help="object to detect (repeat for several)"
        + (f"; default {', '.join(default_queries)}" if default_queries else ""),
    )
    group.add_argument(
        "--threshold",
        type=unit_interval(),
        default=DEFAULT_THRESHOLD,
        help="minimum score in [0, 1] (default %(default)s)",
    )
    group.add_argument(
        "--nms",
        type=unit_interval(open_low=True),
        default=DEFAULT_NMS_IOU,
        help="per-class NMS IoU in (0, 1] (default %(default)s; 1 disables)",
    )
    group.add_argument(
        "--query-template",
        type=template_type("--query-template"),
        default="a photo of a {}",
        help="OWL-ViT query template with exactly one {} (default 'a photo of a {}')",
    )
    group.add_argument(
        "--max-boxes",
        type=integer(0),
        default=20,
        help="boxes drawn and listed (default %(default)s)",
    )


def load_model(args: argparse.Namespace, *, language: bool = True) -> Any:
    """The :class:`~jmllm.joint.JointModel` the model options of ``args`` select.

    Args:
        args: parsed options (``--owl/--llava/--alignment`` or ``--tiny``, ``--device``, ...).
        language: False loads OWL-ViT alone (:meth:`JointModel.detector`), for commands that
            only detect: neither LLaVA nor W is loaded (nor needed).
    """
    import torch

    from jmllm.joint.model import DEFAULT_LLAVA, DEFAULT_OWL, JointModel

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.tiny:
        if args.owl or args.llava or args.alignment:
            raise CliError("--tiny: cannot be combined with --owl, --llava or --alignment")
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
        owl, llava, alignment = args.owl or DEFAULT_OWL, args.llava or DEFAULT_LLAVA, args.alignment
        device = args.device
    if not language or llava is None:
        logger.info("loading OWL-ViT only (detection): owl=%s", owl)
        return JointModel.detector(owl, dtype=dtype, device=device)
    logger.info("loading J: owl=%s llava=%s alignment=%s", owl, llava, alignment)
    return JointModel.from_pretrained(
        owl, llava, alignment, dtype=dtype, device=device, device_map=args.device_map
    )


def _queries(args: argparse.Namespace, default: Sequence[str] = ()) -> list[str]:
    queries = args.queries if args.queries is not None else list(default)
    if not queries:
        raise CliError("-q/--query: give at least one object to detect")
    for query in queries:
        if not query.strip():
            raise CliError("-q/--query: empty query")
    return queries


def _nms(args: argparse.Namespace) -> float | None:
    return None if args.nms >= 1.0 else args.nms


def _out_dir(path: str) -> Path:
    """Check ``--out`` (a folder, or a path where one can be made) without creating it: it is
    created when there is something to write (:func:`output_folder`), so a run that fails
    first leaves no empty folder behind."""
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
    return out


def output_folder(out: Path) -> Any:
    """Create ``out`` for the outputs; removed again if still empty when the work fails."""
    from jmllm.align.files import output_folder as folder

    return folder(out)


def _image_arg(path: str) -> Path:
    image = Path(path)
    if not image.is_file():
        raise CliError(f"{image}: no such image file")
    return image


def _run_chat(
    model: Any, emb: Any, questions: Sequence[str], args: argparse.Namespace
) -> tuple[Any, Any]:
    kwargs = _generation_kwargs(args)
    conversation = model.chat(emb, list(questions), **kwargs)
    stock = model.chat(emb, list(questions), vision="llava", **kwargs) if args.compare else None
    return conversation, stock


def _print_conversation(conversation: Any, stock: Any) -> None:
    for i, turn in enumerate(conversation.turns):
        print(f"USER: {turn.question}")
        print(f"J: {turn.answer}")
        if stock is not None:
            print(f"LLaVA: {stock.turns[i].answer}")


def _write_outputs(
    out: Path,
    model: Any,
    emb: Any,
    conversation: Any,
    stock: Any,
    detections: Any,
    args: Any,
    notes: Sequence[str] = (),
    links: Sequence[tuple[str, str]] = (),
) -> Path:
    from jmllm.joint.report import atomic_write_text, draw_detections, save_png, write_report

    image = emb.pil_image(0)
    record: dict[str, Any] = {"image_size": list(emb.image_sizes[0]), "sources": model.sources}
    if conversation is not None:
        record["template"] = args.template
        record["conversation"] = [
            {"question": turn.question, "answer": turn.answer} for turn in conversation.turns
        ]
        if stock is not None:
            record["stock_llava"] = [turn.answer for turn in stock.turns]
    if detections is not None:
        save_png(
            draw_detections(image, detections, max_boxes=args.max_boxes), out / "detections.png"
        )
        record["queries"] = detections.queries
        record["threshold"] = detections.threshold
        record["detections"] = detections.to_records()
    atomic_write_text(out / "result.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return write_report(
        out / "report.html",
        image,
        conversation=conversation,
        stock=stock,
        detections=detections,
        notes=list(notes),
        sources=model.sources,
        max_boxes=args.max_boxes,
        links=list(links),
    )


def _print_detections(detections: Any, limit: int) -> None:
    """The detections (best first), at most ``limit`` of them, under a count that says how many
    are listed of how many there are."""
    records = detections.to_records()
    shown = records[:limit]
    more = f", {len(shown)} listed" if len(shown) < len(records) else ""
    print(f"{len(records)} detections (score >= {detections.threshold:g}{more})")
    for record in shown:
        box = ", ".join(f"{v:.1f}" for v in record["box"])
        print(f"  {record['label']:<16} {record['score']:.3f}  [{box}]")


# ---------------------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    """Chat + detection + GA explanation on the sample image shipped with the package; writes
    report.html and explanation/report.html."""
    out = _out_dir(args.out)
    tiny = not (args.owl or args.llava or args.alignment)
    args.tiny = args.tiny or tiny
    with output_folder(out):
        return _demo(args, out)


def _demo(args: argparse.Namespace, out: Path) -> int:
    from importlib.resources import as_file, files

    model = load_model(args)
    truth = None
    if args.tiny:
        from jmllm.joint.toy.scenes import make_scene

        scene = make_scene(*TOY_DEMO_SCENE)
        emb, questions, queries = model.embed([scene.image]), TOY_DEMO_QUESTIONS, TOY_DEMO_QUERIES
        truth = f"{scene.split} toy scene {scene.index}: {scene.caption}"
    else:
        with as_file(files("jmllm.joint") / "data" / "sample.png") as sample:
            emb = model.embed([sample])
        questions, queries = DEMO_QUESTIONS, DEMO_QUERIES
    conversation, stock = _run_chat(model, emb, questions, args)
    detections = model.detect(
        emb,
        _queries(args, queries),
        threshold=args.threshold,
        nms_iou=_nms(args),
        template=args.query_template,
    )[0]
    notes = [TOY_WORLD_NOTE, REAL_CHECKPOINTS_HINT] if args.tiny else []
    if truth is not None:
        notes.insert(0, f"The image is the {truth} (the truth the answers can be checked against).")
    explanation = None
    links: list[tuple[str, str]] = []
    if args.explain:
        # GA's class map follows the first query (the authors' choice): the queries the answer
        # names come first, in the order it names them
        ordered = mention_order(detections.queries, conversation.turns[0].answer)
        explanation = _explain_first_answer(model, emb, conversation, ordered, out)
        relative = explanation.relative_to(out).as_posix()
        links.append(
            (
                f"GA explanation of every word of the first answer, click a word ({relative})",
                relative,
            )
        )
    report = _write_outputs(
        out, model, emb, conversation, stock, detections, args, notes, links=links
    )
    if truth is not None:
        print(f"Image: {truth}")
    _print_conversation(conversation, stock)
    _print_detections(detections, args.max_boxes)
    print(f"Report: {report}")
    if explanation is not None:
        print(f"GA explanation: {explanation}")
    if args.tiny:
        print(TOY_WORLD_NOTE)
        print(REAL_CHECKPOINTS_HINT)
    return 0


def mention_order(queries: Sequence[str], text: str) -> list[str]:
    """``queries`` reordered: those ``text`` mentions first, in the order of their first
    mention, then the others in their order.

    Example:
        >>> mention_order(["circle", "square", "triangle"], "a blue triangle and a red circle")
        ['triangle', 'circle', 'square']
    """
    import re

    lowered = text.lower()
    found = {}
    for query in queries:
        match = re.search(rf"\b{re.escape(query.lower())}\b", lowered)
        if match:
            found[query] = match.start()
    named = sorted(found, key=lambda q: found[q])
    return named + [q for q in queries if q not in found]


def _explain_first_answer(
    model: Any, emb: Any, conversation: Any, queries: Sequence[str], out: Path
) -> Path:
    """GA for every word of the first answer (exactly the generated tokens), as a report."""
    from jmllm.joint.explain_report import write_explanation_report
    from jmllm.joint.saliency import GradientAlignment

    turn = conversation.turns[0]
    ga = GradientAlignment(model, progress=True)
    exp = ga.explain_answer(emb, turn.question, list(queries), answer=turn.result)
    return write_explanation_report(
        out / "explanation",
        exp.image,
        exp.prompt,
        exp.answer_text,
        exp.word_results,
        title="GA explanation of J's first answer",
    )


def _interactive_questions() -> Any:
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line.strip()


def cmd_chat(args: argparse.Namespace) -> int:
    """Multi-turn chat about IMAGE: scripted with --prompt (repeatable) or interactive."""
    image = _image_arg(args.image)
    out = _out_dir(args.out) if args.out else None
    if args.queries is not None:
        _queries(args)  # bad queries are refused before the models load
    model = load_model(args)
    emb = model.embed([image])
    kwargs = _generation_kwargs(args)
    if args.prompt:
        conversation, stock = _run_chat(model, emb, args.prompt, args)
        _print_conversation(conversation, stock)
    else:
        from jmllm.joint.chat import Conversation

        conversation, stock = Conversation(), (Conversation() if args.compare else None)
        for question in _interactive_questions():
            conversation = model.chat(emb, question, history=conversation, **kwargs)
            print(f"J: {conversation.turns[-1].answer}", flush=True)
            if stock is not None:
                stock = model.chat(emb, question, history=stock, vision="llava", **kwargs)
                print(f"LLaVA: {stock.turns[-1].answer}", flush=True)
    if out is not None and conversation.turns:
        detections = None
        if args.queries:
            detections = model.detect(
                emb,
                _queries(args),
                threshold=args.threshold,
                nms_iou=_nms(args),
                template=args.query_template,
            )[0]
        with output_folder(out):
            report = _write_outputs(out, model, emb, conversation, stock, detections, args)
        print(f"Report: {report}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """One answer about IMAGE (J's, and stock LLaVA's with --compare)."""
    image = _image_arg(args.image)
    model = load_model(args)
    emb = model.embed([image])
    kwargs = _generation_kwargs(args)
    answer = model.generate(emb, args.prompt, **kwargs)[0]
    stock = model.generate(emb, args.prompt, vision="llava", **kwargs)[0] if args.compare else None
    if args.json:
        record = {
            "prompt": args.prompt,
            "template": answer.template,
            "answer": answer.text,
            "tokens": answer.tokens,
        }
        if stock is not None:
            record["stock_llava"] = stock.text
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(answer.text if stock is None else f"J: {answer.text}\nLLaVA: {stock.text}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    """Detections of the queries in IMAGE: detections.png, result.json and report.html in --out."""
    image = _image_arg(args.image)
    queries = _queries(args)
    nms_iou = _nms(args)
    out = _out_dir(args.out)
    model = load_model(args, language=False)  # detection needs OWL-ViT only
    emb = model.embed([image])
    detections = model.detect(
        emb, queries, threshold=args.threshold, nms_iou=nms_iou, template=args.query_template
    )[0]
    with output_folder(out):
        report = _write_outputs(out, model, emb, None, None, detections, args)
    _print_detections(detections, args.max_boxes)
    print(f"Report: {report}")
    return 0


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``jmllm-joint`` parser, with the plug-in subcommands of :data:`PLUGINS`."""
    from jmllm.joint.chat import INTERACTIVE_TEMPLATE

    common = common_arguments()
    parser = ArgumentParser(
        prog=PROG,
        description="The joint model J (OWL-ViT + W + LLaVA-1.5): chat about an image and see "
        "the detections made from the same vision embedding.",
        epilog="Start with `jmllm-joint demo` (the built-in toy-world models, offline).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="chat + detection + GA on a toy scene (built-in models), report.html",
        description="Chat, detection and GA explanation on one image, into report.html. With "
        "the built-in models (the default) the image is a held-out toy scene and the default "
        f"queries the toy shapes ({', '.join(TOY_DEMO_QUERIES)}); with --owl/--llava/"
        f"--alignment it is a sample photo, queries {', '.join(DEMO_QUERIES)}.",
    )
    demo.add_argument(
        "--out", default="jmllm-joint-demo", help="output folder (default ./jmllm-joint-demo)"
    )
    _generation_arguments(demo)
    template_argument(demo, INTERACTIVE_TEMPLATE)
    _detection_arguments(demo, TOY_DEMO_QUERIES)
    # the demo shows J beside stock LLaVA: the comparison is the point of J
    demo.add_argument(
        "--explain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GA explanation of every word of the first answer (default on)",
    )
    demo.set_defaults(max_new_tokens=24, threshold=0.5, max_boxes=10, compare=True)
    demo.set_defaults(func=cmd_demo)

    chat = sub.add_parser("chat", parents=[common], help="multi-turn chat about an image")
    chat.add_argument("image", help="image file")
    chat.add_argument(
        "-p",
        "--prompt",
        action="append",
        help="a user turn (repeat for scripted turns); none: interactive",
    )
    chat.add_argument(
        "--out", help="also write report.html (and detections with -q) to this folder"
    )
    _generation_arguments(chat)
    template_argument(chat, INTERACTIVE_TEMPLATE)
    _detection_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    describe = sub.add_parser("describe", parents=[common], help="one answer about an image")
    describe.add_argument("image", help="image file")
    describe.add_argument(
        "-p", "--prompt", default=DEFAULT_QUESTION, help=f"question (default {DEFAULT_QUESTION!r})"
    )
    describe.add_argument("--json", action="store_true", help="print a JSON record")
    _generation_arguments(describe)
    template_argument(describe, INTERACTIVE_TEMPLATE)
    describe.set_defaults(func=cmd_describe)

    detect = sub.add_parser("detect", parents=[common], help="open-vocabulary detections from t")
    detect.add_argument("image", help="image file")
    detect.add_argument("--out", required=True, help="output folder")
    _detection_arguments(detect)
    detect.set_defaults(func=cmd_detect)

    for name in PLUGINS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jmllm-joint``; returns the exit code (docs/conventions.md)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    quiet_third_party(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # never a traceback for users; --debug shows it
        if args.debug:
            raise
        code = exit_code_for(exc)
        message = one_line(exc)
        if code == EXIT_FAILURE:
            message = f"{type(exc).__name__}: {message} (run with --debug for details)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
