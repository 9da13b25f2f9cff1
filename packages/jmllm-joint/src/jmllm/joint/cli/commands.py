"""The core subcommands (``demo``, ``chat``, ``describe``, ``detect``), the parser with its plug-ins, and main.

Every command takes ``--owl/--mllm/--alignment`` (Hub ids or local paths) or ``--tiny`` for the
built-in models: the toy world (:mod:`jmllm.joint.toy`, small models trained on synthetic shapes),
resolved by :func:`~jmllm.joint.cli.common.builtin_sources` — the one place every package's ``--tiny`` goes through. Bad input ends with one line on stderr naming the input,
never a traceback (``--debug`` shows it); ``-v`` and ``--version`` as every jmllm command. Exit codes follow docs/conventions.md: 2 bad input or
usage (numbers are checked here, at the boundary, with the argparse types of
:mod:`jmllm.align.options`), 1 runtime failure, 3 partial results, 130 Ctrl-C.

Extending: for every module of :data:`PLUGINS` that exists (``jmllm.joint.cli.explain``,
``jmllm.joint.cli.toy``, ``jmllm.joint.cli.app``, ``jmllm.joint.cli.audit``,
``jmllm.joint.cli.faithfulness``, ``jmllm.joint.cli.sample``), :func:`build_parser`
calls its ``register(subparsers, common_args)``. ``subparsers`` is the ``add_subparsers`` object;
``common_args`` holds the shared model options: use it as a parent parser,
``subparsers.add_parser("explain", parents=[common_args], help=...)``, or call it on a parser,
``common_args(parser)``. A subcommand sets its handler with
``parser.set_defaults(func=handler)``; ``handler(args) -> int`` may call :func:`~jmllm.joint.cli.common.load_model` and
raise :class:`~jmllm.joint.cli.common.CliError` for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jmllm.align.options import (
    EXIT_INTERRUPTED,
    ArgumentParser,
    exit_code_for,
    printable,
)
from jmllm.align.vocabulary import add_json_out, add_standard_options, error_line, setup_logging
from jmllm.joint.cli.common import (
    DEFAULT_QUESTION,
    DEMO_QUERIES,
    DEMO_QUESTIONS,
    PROG,
    REAL_CHECKPOINTS_HINT,
    TOY_DEMO_QUERIES,
    TOY_DEMO_QUESTIONS,
    TOY_DEMO_SCENE,
    TOY_WORLD_NOTE,
    check_answers,
    common_arguments,
    detection_arguments,
    force_argument,
    generation_arguments,
    generation_kwargs,
    image_arg,
    load_model,
    nms_of,
    out_dir,
    output_folder,
    preprocessing_argument,
    queries_of,
    report_notes,
    template_argument,
    tokenization_argument,
)

logger = logging.getLogger("jmllm.joint.cli")

# what each command writes directly in --out (its folder is claimed for these names)
DEMO, CHAT, DETECT = "jmllm-joint demo", "jmllm-joint chat", "jmllm-joint detect"
REPORT_OUTPUTS = ("report.html", "result.json", "detections.png")
DEMO_OUTPUTS = (*REPORT_OUTPUTS, "explanation")

PLUGINS = (  # modules adding subcommands, in the order --help lists them
    "jmllm.joint.cli.explain",
    "jmllm.joint.cli.toy",
    "jmllm.joint.cli.app",
    "jmllm.joint.cli.audit",
    "jmllm.joint.cli.faithfulness",
    "jmllm.joint.cli.sample",
)


def _run_chat(
    model: Any, emb: Any, questions: Sequence[str], args: argparse.Namespace
) -> tuple[Any, Any]:
    kwargs = generation_kwargs(args)
    conversation = model.chat(emb, list(questions), **kwargs)
    stock = model.chat(emb, list(questions), vision="llava", **kwargs) if args.compare else None
    return conversation, stock


def _print_conversation(conversation: Any, stock: Any) -> None:
    for i, turn in enumerate(conversation.turns):
        print(f"USER: {printable(turn.question, keep_newlines=True)}")
        print(f"J: {printable(turn.answer, keep_newlines=True)}")
        if stock is not None:
            print(f"LLaVA: {printable(stock.turns[i].answer, keep_newlines=True)}")


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
    from jmllm.joint.render.report import atomic_write_text, draw_detections, save_png, write_report

    image = emb.pil_image(0)
    record: dict[str, Any] = {"image_size": list(emb.image_sizes[0]), "sources": model.sources}
    if conversation is not None:
        record.update(model.input_record(args.template, args.tokenization, emb.preprocessing))
        record["conversation"] = [
            {"question": turn.question, "answer": turn.answer} for turn in conversation.turns
        ]
        if stock is not None:
            record["stock_llava"] = [turn.answer for turn in stock.turns]
    else:
        record.update(model.input_record(preprocessing=emb.preprocessing))
        del record["template"], record["tokenization"]  # nothing was asked
    if detections is not None:
        save_png(
            draw_detections(image, detections, max_boxes=args.max_boxes), out / "detections.png"
        )
        record["queries"] = detections.queries
        record["threshold"] = detections.threshold
        record["detections"] = detections.to_records()
    record["notes"] = list(notes)
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
        objectness = f"  objectness {record['objectness']:.3f}" if "objectness" in record else ""
        print(f"  {printable(record['label']):<16} {record['score']:.3f}  [{box}]{objectness}")


# ---------------------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    """Chat + detection + GA explanation on the sample image shipped with the package; writes
    report.html and explanation/report.html."""
    out = out_dir(args.out, DEMO, DEMO_OUTPUTS, args.force)
    tiny = not (args.owl or args.mllm or args.alignment)
    args.tiny = args.tiny or tiny
    with output_folder(out, DEMO, DEMO_OUTPUTS, args.force):
        return _demo(args, out)


def _demo(args: argparse.Namespace, out: Path) -> int:
    from importlib.resources import as_file, files

    model = load_model(args)
    truth = None
    if args.tiny:
        from jmllm.joint.toy.scenes import make_scene

        scene = make_scene(*TOY_DEMO_SCENE)
        emb = model.embed([scene.image], preprocessing=args.preprocessing)
        questions, queries = TOY_DEMO_QUESTIONS, TOY_DEMO_QUERIES
        split = "held-out" if scene.split == "heldout" else scene.split
        truth = f"{split} toy scene {scene.index}: {scene.caption}"
    else:
        with as_file(files("jmllm.joint") / "data" / "sample.png") as sample:
            emb = model.embed([sample], preprocessing=args.preprocessing)
        questions, queries = DEMO_QUESTIONS, DEMO_QUERIES
    conversation, stock = _run_chat(model, emb, questions, args)
    detections = model.detect(
        emb,
        queries_of(args, queries),
        threshold=args.threshold,
        nms_iou=nms_of(args),
        template=args.query_template,
    )[0]
    notes = []
    if args.tiny:  # one notice: what the image is, what the models are, how to go further
        notes.append(
            f"The image is the {truth} (the truth the answers can be checked against). "
            f"{TOY_WORLD_NOTE} {REAL_CHECKPOINTS_HINT}"
        )
    notes += report_notes(model, emb, [turn.answer for turn in conversation.turns[:1]])
    explanation = None
    links: list[tuple[str, str]] = []
    if args.explain:
        # every word's class map uses the query naming the object it refers to (GA's default)
        explanation = _explain_first_answer(model, emb, conversation, detections.queries, out)
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


def _explain_first_answer(
    model: Any, emb: Any, conversation: Any, queries: Sequence[str], out: Path
) -> Path:
    """GA for every word of the first answer (exactly the generated tokens), as a report."""
    from jmllm.joint.render.explanation import write_explanation_report
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
    image = image_arg(args.image)
    out = out_dir(args.out, CHAT, REPORT_OUTPUTS, args.force) if args.out else None
    if args.queries is not None:
        queries_of(args)  # bad queries are refused before the models load
    model = load_model(args)
    emb = model.embed([image], preprocessing=args.preprocessing)
    kwargs = generation_kwargs(args)
    answer_problems: list[str] = []
    if args.prompt:
        conversation, stock = _run_chat(model, emb, args.prompt, args)
        _print_conversation(conversation, stock)
        for turn in conversation.turns:
            answer_problems += check_answers(model, emb, [turn.answer])
    else:
        from jmllm.joint.chat.templates import Conversation

        conversation, stock = Conversation(), (Conversation() if args.compare else None)
        for question in _interactive_questions():
            conversation = model.chat(emb, question, history=conversation, **kwargs)
            print(f"J: {printable(conversation.turns[-1].answer, keep_newlines=True)}", flush=True)
            answer_problems += check_answers(model, emb, [conversation.turns[-1].answer])
            if stock is not None:
                stock = model.chat(emb, question, history=stock, vision="llava", **kwargs)
                print(f"LLaVA: {printable(stock.turns[-1].answer, keep_newlines=True)}", flush=True)
    if out is not None and conversation.turns:
        detections = None
        if args.queries:
            detections = model.detect(
                emb,
                queries_of(args),
                threshold=args.threshold,
                nms_iou=nms_of(args),
                template=args.query_template,
            )[0]
        notes = report_notes(model, emb) + list(dict.fromkeys(answer_problems))
        with output_folder(out, CHAT, REPORT_OUTPUTS, args.force):
            report = _write_outputs(out, model, emb, conversation, stock, detections, args, notes)
        print(f"Report: {report}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """One answer about IMAGE (J's, and stock LLaVA's with --compare)."""
    image = image_arg(args.image)
    model = load_model(args)
    emb = model.embed([image], preprocessing=args.preprocessing)
    kwargs = generation_kwargs(args)
    answer = model.generate(emb, args.prompt, **kwargs)[0]
    stock = model.generate(emb, args.prompt, vision="llava", **kwargs)[0] if args.compare else None
    check_answers(model, emb, [answer.text])
    if args.json_out:
        record = {
            "prompt": args.prompt,
            **model.input_record(answer.template, answer.tokenization, emb.preprocessing),
            "answer": answer.text,
            "tokens": answer.tokens,
        }
        if stock is not None:
            record["stock_llava"] = stock.text
        _write_json(args.json_out, json.dumps(record, ensure_ascii=False))
    else:
        text = answer.text if stock is None else f"J: {answer.text}\nLLaVA: {stock.text}"
        print(printable(text, keep_newlines=True))  # model text: never raw to the terminal
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    """Detections of the queries in IMAGE: detections.png, result.json and report.html in --out."""
    image = image_arg(args.image)
    queries = queries_of(args)
    nms_iou = nms_of(args)
    out = out_dir(args.out, DETECT, REPORT_OUTPUTS, args.force)
    model = load_model(args, language=False)  # detection needs OWL-ViT only
    emb = model.embed([image], preprocessing=args.preprocessing)
    detections = model.detect(
        emb, queries, threshold=args.threshold, nms_iou=nms_iou, template=args.query_template
    )[0]
    with output_folder(out, DETECT, REPORT_OUTPUTS, args.force):
        report = _write_outputs(
            out, model, emb, None, None, detections, args, report_notes(model, emb)
        )
    _print_detections(detections, args.max_boxes)
    print(f"Report: {report}")
    return 0


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``jmllm-joint`` parser, with the plug-in subcommands of :data:`PLUGINS`."""
    from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING
    from jmllm.joint.chat.templates import INTERACTIVE_TEMPLATE
    from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION

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
        f"queries the toy shapes ({', '.join(TOY_DEMO_QUERIES)}); with --owl/--mllm/"
        f"--alignment it is a sample photo, queries {', '.join(DEMO_QUERIES)}.",
    )
    demo.add_argument("-o", "--out", default="jmllm-joint-demo", help="output folder")
    force_argument(demo)
    generation_arguments(demo)
    template_argument(demo, INTERACTIVE_TEMPLATE)
    tokenization_argument(demo, INTERACTIVE_TOKENIZATION)
    preprocessing_argument(demo, INTERACTIVE_PREPROCESSING)
    detection_arguments(demo, TOY_DEMO_QUERIES)
    # the demo shows J beside stock LLaVA: the comparison is the point of J
    demo.add_argument(
        "--explain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GA explanation of every word of the first answer",
    )
    demo.set_defaults(max_new_tokens=24, threshold=0.5, max_boxes=10, compare=True)
    demo.set_defaults(func=cmd_demo)

    chat = sub.add_parser("chat", parents=[common], help="multi-turn chat about an image")
    chat.add_argument("image", help="image file")
    chat.add_argument(
        "-p",
        "--prompt",
        action="append",
        help="a user turn, repeatable for scripted turns (default: none, interactive)",
    )
    chat.add_argument(
        "-o",
        "--out",
        help="also write report.html (and detections with -q) to this folder (default: none)",
    )
    force_argument(chat)
    generation_arguments(chat)
    template_argument(chat, INTERACTIVE_TEMPLATE)
    tokenization_argument(chat, INTERACTIVE_TOKENIZATION)
    preprocessing_argument(chat, INTERACTIVE_PREPROCESSING)
    detection_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    describe = sub.add_parser("describe", parents=[common], help="one answer about an image")
    describe.add_argument("image", help="image file")
    describe.add_argument("-p", "--prompt", default=DEFAULT_QUESTION, help="the question")
    add_json_out(describe, "write the answer as a JSON record to this file (-: standard output)")
    generation_arguments(describe)
    template_argument(describe, INTERACTIVE_TEMPLATE)
    tokenization_argument(describe, INTERACTIVE_TOKENIZATION)
    preprocessing_argument(describe, INTERACTIVE_PREPROCESSING)
    describe.set_defaults(func=cmd_describe)

    detect = sub.add_parser("detect", parents=[common], help="open-vocabulary detections from t")
    detect.add_argument("image", help="image file")
    detect.add_argument("-o", "--out", required=True, help="output folder")
    force_argument(detect)
    detection_arguments(detect)
    preprocessing_argument(detect, INTERACTIVE_PREPROCESSING)
    detect.set_defaults(func=cmd_detect)

    for name in PLUGINS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub, common)
    return add_standard_options(parser, "jmllm-joint")


def _write_json(path: str, text: str) -> None:
    """``--json-out``: the record on standard output (``-``) or into a file (atomically)."""
    if path == "-":
        print(text)
        return
    from jmllm.align.files import atomic_write_text

    atomic_write_text(path, text + "\n")


def _prog(args: argparse.Namespace) -> str:
    """``jmllm-joint COMMAND`` (``jmllm-joint toy train`` for a nested one), for messages."""
    words = [PROG, args.command]
    if getattr(args, "toy_command", None):
        words.append(args.toy_command)
    return " ".join(words)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jmllm-joint``; returns the exit code (docs/conventions.md)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, ["jmllm"])
    prog = _prog(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # never a traceback for users; --debug shows it
        if args.debug:
            raise
        code = exit_code_for(exc)
        print(error_line(prog, exc, code), file=sys.stderr)
        return code
