"""``jmllm-joint explain | hallucinations | wsol``: GA saliency from the command line.

Registered by :func:`jmllm.joint.cli.build_parser` through :func:`register`.

    jmllm-joint explain IMAGE --prompt P [--token WORD | --position N | --all] [-q QUERY…] -o DIR
    jmllm-joint hallucinations IMAGE --prompt P -o DIR [-q EXTRA…]
    jmllm-joint wsol DATA_DIR [--limit N] [--json-out FILE.json]   # + FILE.html, FILE_maps/

``explain`` and ``hallucinations`` prompt J like ``chat`` (``--template llava-1.5``,
``--tokenization checkpoint``, ``--preprocessing exif``); ``wsol`` reproduces the paper, so every
default there is the authors' protocol (``--template paper``, ``--tokenization legacy``,
``--preprocessing authors``, ``--protocol wsolevaluation``, ``--pipeline authors``;
``docs/fidelity.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from jmllm.align.options import EXIT_OK, EXIT_PARTIAL, finite_float, integer, printable

# what each command writes directly in --out (its folder is claimed for these names)
EXPLAIN = "jmllm-joint explain"
EXPLAIN_OUTPUTS = ("report.html", "explanation.json", "arrays.safetensors", "maps")
HALLUCINATIONS = "jmllm-joint hallucinations"
HALLUCINATIONS_OUTPUTS = ("hallucinations.json", "hallucinations.html")

logger = logging.getLogger("jmllm.joint.cli")

# jmllm.joint.saliency.attribution's methods other than GA's weightings (listed here so that --help loads
# no model code; a test keeps the list equal to the package's)
ATTRIBUTION_METHODS = (
    "ga", "gradient", "gradient_x_input", "integrated_gradients", "attention",
    "attention_rollout", "logit_lens", "random",
)  # fmt: skip


def register(subparsers: Any, common_args: argparse.ArgumentParser) -> None:
    """Add the GA subcommands to ``jmllm-joint``'s parser."""
    from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING, PAPER_PREPROCESSING
    from jmllm.joint.chat.templates import INTERACTIVE_TEMPLATE, PAPER_TEMPLATE
    from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION, PAPER_TOKENIZATION
    from jmllm.joint.cli.common import (
        DEFAULT_QUESTION,
        force_argument,
        preprocessing_argument,
        template_argument,
        tokenization_argument,
    )
    from jmllm.joint.wsol.run import PIPELINES, PROTOCOLS

    explain = subparsers.add_parser(
        "explain",
        parents=[common_args],
        help="GA saliency maps of answer tokens (report.html, PNGs, arrays)",
    )
    explain.add_argument("image", help="image file")
    explain.add_argument(
        "-p",
        "--prompt",
        default=DEFAULT_QUESTION,
        help=f"the question (default: {DEFAULT_QUESTION!r}, as describe's)",
    )
    target = explain.add_mutually_exclusive_group()
    target.add_argument(
        "--token",
        help="a word of the answer, its tokens' logits summed (default: none, every word)",
    )
    target.add_argument(
        "--position",
        type=integer(),
        help="a token position in the answer, 0-based, negative from the end (default: none, "
        "every word)",
    )
    target.add_argument("--all", action="store_true", help="every word of the answer (the default)")
    explain.add_argument(
        "-q",
        "--query",
        action="append",
        dest="queries",
        help="OWL-ViT query, repeatable (default: with --tiny the four toy shapes; else the "
        "--token word)",
    )
    explain.add_argument(
        "--answer", help="explain this answer instead of generating one (default: none, J's own)"
    )
    explain.add_argument(
        "--method",
        choices=ATTRIBUTION_METHODS,
        default="ga",
        help="attribution method: the others of jmllm.joint.saliency.attribution draw one map per word, "
        "and need no query",
    )
    explain.add_argument("-o", "--out", required=True, help="output folder")
    force_argument(explain)
    _shared(explain)
    template_argument(explain, INTERACTIVE_TEMPLATE)
    tokenization_argument(explain, INTERACTIVE_TOKENIZATION)
    preprocessing_argument(explain, INTERACTIVE_PREPROCESSING)
    _painting(explain)
    explain.set_defaults(func=cmd_explain)

    hall = subparsers.add_parser(
        "hallucinations",
        parents=[common_args],
        help="objects the answer mentions vs what OWL-ViT detects in the same embedding",
    )
    hall.add_argument("image", help="image file")
    hall.add_argument(
        "-p",
        "--prompt",
        default=DEFAULT_QUESTION,
        help=f"the question (default: {DEFAULT_QUESTION!r}, as describe's)",
    )
    hall.add_argument(
        "-q",
        "--query",
        action="append",
        dest="queries",
        help="extra object to query although not mentioned, repeatable (default: none)",
    )
    hall.add_argument(
        "--objects",
        help="comma-separated object vocabulary (default: the 80 COCO names; with --tiny the "
        "toy shapes)",
    )
    hall.add_argument(
        "--threshold",
        type=finite_float(0, 1, open_low=True, open_high=True),
        default=0.1,
        help="detection score in (0, 1)",
    )
    hall.add_argument(
        "--answer", help="check this answer instead of generating one (default: none, J's own)"
    )
    hall.add_argument("-o", "--out", required=True, help="output folder")
    force_argument(hall)
    _shared(hall, weighting=False)
    template_argument(hall, INTERACTIVE_TEMPLATE)
    tokenization_argument(hall, INTERACTIVE_TOKENIZATION)
    preprocessing_argument(hall, INTERACTIVE_PREPROCESSING)
    hall.set_defaults(func=cmd_hallucinations)

    wsol = subparsers.add_parser(
        "wsol",
        parents=[common_args],
        help="MaxBoxAccV2 of GA maps (and the plain-gradient baseline) on a CUB-style folder",
    )
    wsol.add_argument("data_dir", help="folder with images/ and boxes.csv (image_id,x0,y0,x1,y1)")
    wsol.add_argument(
        "--limit", type=integer(1), help="score only the first N images (default: all)"
    )
    wsol.add_argument(
        "--token",
        help="the object word explained in every image, one word (default: each image's label "
        "in boxes.csv, else 'bird', the paper's)",
    )
    wsol.add_argument(
        "--weighting", choices=("class", "coord", "any"), default="class", help="GA map"
    )
    wsol.add_argument(
        "--json-out",
        metavar="PATH",
        help="write the full report (curves included) here, its HTML page beside it (the same "
        "name ending in .html) and the page's map pictures in NAME_maps/; those two are never "
        "written over a file wsol did not write (default: none)",
    )
    wsol.add_argument(
        "--samples",
        type=integer(0, 1000),
        default=8,
        help="images the HTML page shows with their maps and boxes, 0: none",
    )
    template_argument(wsol, PAPER_TEMPLATE)
    tokenization_argument(wsol, PAPER_TOKENIZATION)
    preprocessing_argument(wsol, PAPER_PREPROCESSING)
    wsol.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="wsolevaluation",
        help="MaxBoxAccV2 as clovaai/wsolevaluation computes it (needs jmllm-joint[wsol]) or "
        "with exact geometry",
    )
    wsol.add_argument(
        "--pipeline",
        choices=PIPELINES,
        default="authors",
        help="authors: maps at 224 px, boxes resized to it; original: own resolution",
    )
    _painting(wsol)
    wsol.set_defaults(func=cmd_wsol)


def _shared(parser: argparse.ArgumentParser, weighting: bool = True) -> None:
    parser.add_argument(
        "--max-new-tokens", type=integer(1), default=64, help="answer length limit, in tokens"
    )
    if weighting:
        parser.add_argument(
            "--weighting",
            choices=("class", "coord", "any", "gradient"),
            default="class",
            help="map shown in the report (gradient: the plain-gradient baseline)",
        )


def _painting(parser: argparse.ArgumentParser) -> None:
    from jmllm.joint.saliency import BOX_ROUNDINGS, CLASS_QUERY_MODES

    parser.add_argument(
        "--box-rounding",
        choices=BOX_ROUNDINGS,
        default="truncate",
        help="GA box corners to pixels: truncate (int(), the authors') or outward",
    )
    parser.add_argument(
        "--class-query",
        choices=CLASS_QUERY_MODES,
        default="matching",
        help="with several queries, the class map's channel: matching (the query naming the "
        "object the explained word refers to, e.g. 'blue' in 'a blue triangle' → triangle; the "
        "maximum when none does), first (the first query, the authors') or max; with one query "
        "all three are that query; objectness: OWLv2's objectness channel (J with --owl an "
        "OWLv2 checkpoint only)",
    )


def _queries(args: argparse.Namespace) -> list[str]:
    """The OWL-ViT queries of ``explain``: ``--query``, else ``--token``'s word, else with
    ``--tiny`` the objects the toy world knows (every shape); else none."""
    if args.queries or args.token:
        return list(args.queries or [args.token])
    if args.tiny:
        from jmllm.joint.cli.common import builtin_vocabulary

        return list(builtin_vocabulary())
    return []


def cmd_explain(args: argparse.Namespace) -> int:
    from jmllm.joint.cli.common import (
        CliError,
        image_arg,
        load_model,
        out_dir,
        output_folder,
        report_notes,
    )
    from jmllm.joint.render.explanation import write_explanation_report
    from jmllm.joint.saliency import GradientAlignment

    image = image_arg(args.image)
    if args.method != "ga":
        return _explain_with(args, image)
    queries = _queries(args)
    if not queries:
        raise CliError("-q/--query: give at least one OWL-ViT query (or use --token WORD)")
    if any(not q.strip() for q in queries):
        raise CliError("-q/--query: empty query")
    if args.answer is not None and not args.answer.strip():
        raise CliError("--answer: empty answer; there is no token to explain")
    out = out_dir(args.out, EXPLAIN, EXPLAIN_OUTPUTS, args.force)
    model = load_model(args)
    ga = GradientAlignment(
        model,
        progress=True,  # bars on stderr: norms, then one backward per answer token
        box_rounding=args.box_rounding,
        class_query=args.class_query,
    )
    emb = model.embed([image], preprocessing=args.preprocessing)
    answer = args.answer
    if args.token is not None or args.position is not None:
        target = args.token if args.token is not None else args.position
        result = ga.attribute(
            emb,
            args.prompt,
            target,
            queries,
            answer=answer,
            max_new_tokens=args.max_new_tokens,
            template=args.template,
            tokenization=args.tokenization,
        )
        results, text = [result], result.answer_text
    else:
        exp = ga.explain_answer(
            emb,
            args.prompt,
            queries,
            answer=answer,
            max_new_tokens=args.max_new_tokens,
            template=args.template,
            tokenization=args.tokenization,
        )
        results, text = exp.word_results, exp.answer_text
        if not results:
            raise CliError(f"answer {text!r}: has no words to explain")
    notes = report_notes(model, emb, [text])
    with output_folder(out, EXPLAIN, EXPLAIN_OUTPUTS, args.force):
        report = write_explanation_report(
            out,
            emb.pil_image(0),
            args.prompt,
            text,
            results,
            weighting=args.weighting,
            template=args.template,
            notes=notes,
        )
    print(f"ASSISTANT: {printable(text, keep_newlines=True)}")
    print(f"Report: {report}")
    return 0


def _explain_with(args: argparse.Namespace, image: Path) -> int:
    """``explain --method NAME`` for a method other than GA: one map per explained word."""
    from jmllm.joint.cli.common import CliError, load_model, out_dir, output_folder, report_notes
    from jmllm.joint.render.explanation import write_attribution_report
    from jmllm.joint.saliency import answer_tokens, answer_words
    from jmllm.joint.saliency.attribution import AttributionError, get_method, prepare_request

    if args.answer is not None and not args.answer.strip():
        raise CliError("--answer: empty answer; there is no token to explain")
    out = out_dir(args.out)
    model = load_model(args)
    method = get_method(args.method, model)
    emb = model.embed([image])
    answer: Any = args.answer
    if answer is None:
        answer = model.generate(
            emb, args.prompt, max_new_tokens=args.max_new_tokens, template=args.template
        )[0]
    try:
        if args.token is not None or args.position is not None:
            target = args.token if args.token is not None else args.position
            targets: list[Any] = [target]
        else:
            ids = answer.token_ids if hasattr(answer, "token_ids") else None
            if ids is None:
                ids = model.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
            text, tokens = answer_tokens(model.tokenizer, ids)
            targets = [list(word.positions) for word in answer_words(text, tokens)]
            if not targets:
                raise CliError(f"answer {text!r}: has no words to explain")
        requests = [
            prepare_request(model, emb, args.prompt, target, answer, template=args.template)
            for target in targets
        ]
        attributions = [method.attribute_request(request) for request in requests]
    except AttributionError as exc:
        raise CliError(str(exc)) from None
    text = requests[0].answer_text
    with output_folder(out):
        report = write_attribution_report(
            out,
            emb.pil_image(0),
            args.prompt,
            text,
            attributions,
            method,
            requests[0].template,
            queries=_queries(args),  # only to open the page on the word that names one
            notes=report_notes(model, emb, [text]),
        )
    print(f"ASSISTANT: {text}")
    print(f"Report: {report}")
    return 0


def cmd_hallucinations(args: argparse.Namespace) -> int:
    from jmllm.joint.cli.common import (
        CliError,
        image_arg,
        load_model,
        out_dir,
        output_folder,
        report_notes,
    )
    from jmllm.joint.hallucination.check import check_hallucinations
    from jmllm.joint.hallucination.page import write_hallucination_report

    image = image_arg(args.image)
    objects = None
    if args.objects is not None:
        objects = [o.strip() for o in args.objects.split(",") if o.strip()]
        if not objects:
            raise CliError("--objects: empty list")
    elif args.tiny:
        from jmllm.joint.cli.common import builtin_vocabulary

        objects = builtin_vocabulary()  # the built-in models know the toy shapes only
    out = out_dir(args.out, HALLUCINATIONS, HALLUCINATIONS_OUTPUTS, args.force)
    model = load_model(args)
    emb = model.embed([image], preprocessing=args.preprocessing)
    report = check_hallucinations(
        model,
        emb,
        args.prompt,
        answer=args.answer,
        objects=objects,
        extra_queries=args.queries or (),
        threshold=args.threshold,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        tokenization=args.tokenization,
    )
    with output_folder(out, HALLUCINATIONS, HALLUCINATIONS_OUTPUTS, args.force):
        path = write_hallucination_report(
            report, out, report_notes(model, emb, [report.answer_text])
        )
    print(f"ASSISTANT: {printable(report.answer_text, keep_newlines=True)}")
    missed = printable(", ".join(report.mentioned_not_detected) or "none")
    print(f"Mentioned but not detected: {missed}")
    print(
        f"Detected but not mentioned: {printable(', '.join(report.detected_not_mentioned) or 'none')}"
    )
    print(f"Report: {path}")
    return 0


def wsol_page_path(json_out: Path) -> Path:
    """Where ``wsol --json-out FILE`` writes its HTML page: beside it, ending in ``.html``.

    Example:
        >>> wsol_page_path(Path("runs/cub.json")).as_posix()
        'runs/cub.html'
    """
    from jmllm.joint.cli.common import CliError

    page = json_out.with_suffix(".html")
    if page == json_out:
        raise CliError(f"--json-out {json_out}: ends in .html, the page's own name; use .json")
    return page


def wsol_maps_dir(json_out: Path) -> Path:
    """Where ``wsol --json-out FILE`` writes the page's map pictures (PNG): ``FILE_maps/``.

    Example:
        >>> wsol_maps_dir(Path("runs/cub.json")).as_posix()
        'runs/cub_maps'
    """
    return json_out.with_name(json_out.stem + "_maps")


def cmd_wsol(args: argparse.Namespace) -> int:
    from jmllm.align.files import claim_beside
    from jmllm.joint.cli.common import CliError, load_model
    from jmllm.joint.wsol.run import WsolDependencyError, opencv, read_wsol_folder, run_wsol

    if args.token is not None and len(args.token.split()) != 1:
        raise CliError(f"--token: must be one word, got {args.token[:100]!r}")
    page = maps = None
    if args.json_out:
        if args.json_out == "-":
            raise CliError(
                "--json-out -: wsol writes its page beside the report, so it needs a file name "
                "(the summary is printed on standard output anyway)"
            )
        if Path(args.json_out).is_dir():
            raise CliError(f"--json-out {args.json_out}: is a folder; give a file name")
        page = wsol_page_path(Path(args.json_out))
        maps = wsol_maps_dir(Path(args.json_out))
        if maps.exists() and not maps.is_dir():
            raise CliError(f"--json-out {args.json_out}: {maps} (the maps' folder) is a file")
    if args.protocol == "wsolevaluation":
        try:
            opencv()
        except WsolDependencyError as exc:
            raise CliError(f"--protocol wsolevaluation: {exc}") from None
    read_wsol_folder(args.data_dir)  # fail on a malformed folder before loading the models
    if page is not None and maps is not None:
        # the page and the maps' folder are names the user did not choose: never another's file
        beside = [page.name, maps.name] if args.samples else [page.name]
        claim_beside(args.json_out, "jmllm-joint wsol", beside, what="--json-out")
    model = load_model(args)
    report = run_wsol(
        model,
        args.data_dir,
        weighting=args.weighting,
        limit=args.limit,
        template=args.template,
        protocol=args.protocol,
        pipeline=args.pipeline,
        box_rounding=args.box_rounding,
        class_query=args.class_query,
        samples=args.samples if page is not None else 0,
        tokenization=args.tokenization,
        preprocessing=args.preprocessing,
        target=args.token.strip() if args.token else None,
    )
    if args.json_out:
        report.save(Path(args.json_out))
    if page is not None:
        report.save_page(page, maps if args.samples else None)
    summary = {
        "max_box_acc_v2": report.to_json()["max_box_acc_v2"],
        "per_iou": {
            m: {str(d): v for d, v in r.per_iou.items()} for m, r in report.results.items()
        },
        "num_images": report.num_images,
        "skipped": len(report.skipped),
        "setting": {
            k: report.setting[k]
            for k in (
                "target",
                "template",
                "tokenization",
                "preprocessing",
                "dtype",
                "protocol",
                "pipeline",
                "box_rounding",
            )
        },
    }
    print(json.dumps(summary, indent=2))
    if page is not None:  # stderr: stdout stays the JSON summary alone
        where = f" (maps: {maps}/)" if args.samples else ""
        print(f"Page: {page}{where}", file=sys.stderr)
    return EXIT_PARTIAL if report.skipped else EXIT_OK  # images skipped: partial results
