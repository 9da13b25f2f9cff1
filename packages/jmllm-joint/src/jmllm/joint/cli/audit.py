"""``jmllm-joint hallucination-audit``: the authors' yes/no hallucination study at dataset scale.

Registered by :func:`jmllm.joint.cli.build_parser` through :func:`register`.

    jmllm-joint hallucination-audit --annotations instances.json --images DIR -o DIR
    jmllm-joint hallucination-audit --dataset NAME_OR_FOLDER [--split S] -o DIR
    jmllm-joint hallucination-audit --benchmark pope|chair ... (:mod:`jmllm.joint.cli.benchmark`)
    accelerate launch --num_processes N -m jmllm.joint hallucination-audit ... (split by images)

Exit codes: 0 done, 2 bad input, 1 runtime failure, 3 partial (some images could not be read;
rerun to retry them — finished images are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any

logger = logging.getLogger("jmllm.joint.cli")

EXIT_PARTIAL = 3


def register(subparsers: Any, common_args: argparse.ArgumentParser) -> None:
    """Add ``hallucination-audit`` to ``jmllm-joint``'s parser."""
    from jmllm.align.options import finite_float, integer, template_type
    from jmllm.align.preprocessing import PREPROCESSINGS
    from jmllm.joint.audit.data import ARTICLES, SAMPLINGS
    from jmllm.joint.audit.pope import POPE_RULES
    from jmllm.joint.audit.run import DEFAULT_KV_CACHE_GIB, DEFAULT_MAX_NEW_TOKENS, PARSE_RULES
    from jmllm.joint.chat.templates import PAPER_TEMPLATE
    from jmllm.joint.chat.tokenization import TOKENIZATIONS
    from jmllm.joint.cli.benchmark import add_benchmark_arguments
    from jmllm.joint.cli.common import template_argument

    p = subparsers.add_parser(
        "hallucination-audit",
        parents=[common_args],
        help="ask J yes/no about every present and absent class of a COCO-format dataset, "
        "beside OWL-ViT's score on the same embedding; POPE metrics and a gallery",
        description="The authors' hallucination study at dataset scale: for every image, J is "
        "asked whether each class is in it; OWL-ViT's maximum score for the class is read from "
        "the same embedding t. Writes results.jsonl (resumable), report.json, report.md, "
        "confidence_histograms.png and gallery.html into --out.",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--annotations", help="COCO-format annotation file, instances_*.json (default: none)"
    )
    data.add_argument("--images", help="folder of the images the annotations name (default: none)")
    data.add_argument(
        "--dataset",
        help="a datasets dataset with objects: saved folder or name (default: none)",
    )
    data.add_argument("--split", help="split of --dataset (default: its only or train split)")
    data.add_argument("--image-column", default="image", help="image column of --dataset")
    data.add_argument("--objects-column", default="objects", help="objects column of --dataset")
    data.add_argument("--category-field", default="category", help="category field of the objects")
    data.add_argument(
        "--limit", type=integer(1), help="audit only the first N images (default: all)"
    )
    p.add_argument("-o", "--out", required=True, help="output folder (reused to resume)")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into an --out that holds files the audit did not write (never replacing them)",
    )
    proto = p.add_argument_group("protocol")
    proto.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default=None,
        help="classes asked: all present and absent (the authors') or POPE's "
        "random/popular/adversarial (default: all)",
    )
    proto.add_argument(
        "-k", type=integer(1, 10_000), default=None, help="POPE: positives per image (default: 3)"
    )
    proto.add_argument(
        "--seed", type=integer(0, 2**63 - 1), default=0, help="seed of sampling and bootstrap"
    )
    template_argument(  # the authors' notebook
        proto, PAPER_TEMPLATE, shown="paper; --benchmark pope and chair: llava-1.5"
    )
    # --benchmark pope and chair default to the llava-1.5 template: None until resolved
    proto.set_defaults(template=None)
    # ... and so the inputs: the authors' token ids and pixels for the authors' protocol, the
    # checkpoint's tokenizer and upright photos for pope and chair (as their template)
    proto.add_argument(
        "--tokenization",
        choices=TOKENIZATIONS,
        default=None,
        help="prompt token ids: legacy, the authors' (a ▁ after <image>, as transformers 4 "
        "gave); checkpoint, as the checkpoint's tokenizer config says (default: legacy; "
        "--benchmark pope and chair: checkpoint)",
    )
    proto.add_argument(
        "--preprocessing",
        choices=sorted(PREPROCESSINGS),
        default=None,
        help="image preprocessing: authors, the stored pixels resized as the HF image processors "
        "do; exif, EXIF orientation applied, torch's resize (default: authors; --benchmark pope "
        "and chair: exif)",
    )
    proto.add_argument(
        "--question",
        type=template_type("--question"),
        default=None,
        help="question with {} for the class name; --benchmark pope: {} is the file's question "
        "(default: the authors' question; --benchmark pope: the file's and LLaVA's 'Answer the "
        "question using a single word or phrase.')",
    )
    proto.add_argument(
        "--articles",
        choices=ARTICLES,
        default=None,
        help="a: the question as written (authors); a-an: 'an' before vowels (POPE) (default: a)",
    )
    proto.add_argument(
        "--query-template",
        type=template_type("--query-template"),
        default="{}",
        help="OWL-ViT query for the class (default: '{}', the bare name, as the authors)",
    )
    proto.add_argument(
        "--max-new-tokens",
        type=integer(1, 4096),
        default=None,
        help=f"answer length limit (default: {DEFAULT_MAX_NEW_TOKENS}; --benchmark pope 128, "
        "chair 512; with --tiny pope 16, chair 48)",
    )
    proto.add_argument(
        "--batch-size",
        type=integer(1),
        help="questions per language-model batch (default: as many as --kv-cache-gib hold)",
    )
    proto.add_argument(
        "--kv-cache-gib",
        type=finite_float(0, open_low=True),
        default=DEFAULT_KV_CACHE_GIB,
        help=f"KV-cache budget of one batch of questions, GiB (default: {DEFAULT_KV_CACHE_GIB:g})",
    )
    rep = p.add_argument_group("report")
    rep.add_argument(
        "--parse",
        choices=tuple(dict.fromkeys((*PARSE_RULES, *POPE_RULES))),
        default=None,
        help="answer rule: authors (exactly Yes/No), strict (yes/no, any case), pope (POPE's); "
        "--benchmark pope: llava (= pope), lmms-eval, vlmevalkit, first-token (default: authors; "
        "strict with --tiny on a toy world trained to answer in lower case; --benchmark pope: "
        "llava)",
    )
    rep.add_argument(
        "--top-k",
        type=integer(0),
        default=None,
        help="hallucinations in the gallery (default: 25; --benchmark chair: 10 captions)",
    )
    rep.add_argument(
        "--resamples", type=integer(1, 10_000_000), default=2000, help="bootstrap resamples"
    )
    rep.add_argument(
        "--confidence",
        type=finite_float(0, 1, open_low=True, open_high=True),
        default=0.95,
        help="interval coverage in (0, 1)",
    )
    add_benchmark_arguments(p)
    p.set_defaults(func=cmd_hallucination_audit)


def _dataset(args: argparse.Namespace) -> Any:
    from jmllm.joint.audit.data import load_coco, load_objects_dataset
    from jmllm.joint.cli.common import CliError

    if args.dataset and (args.annotations or args.images):
        raise CliError("--dataset: give either --dataset or --annotations with --images")
    if args.dataset:
        return load_objects_dataset(
            args.dataset,
            split=args.split,
            image_column=args.image_column,
            objects_column=args.objects_column,
            category_field=args.category_field,
            limit=args.limit,
        )
    if not (args.annotations and args.images):
        raise CliError("--annotations and --images: both required (or --dataset)")
    return load_coco(args.annotations, args.images, limit=args.limit)


def cmd_hallucination_audit(args: argparse.Namespace) -> int:
    """Run the audit (resuming), then write the report on the main process."""
    from jmllm.align.files import output_folder
    from jmllm.align.preprocessing import PAPER_PREPROCESSING
    from jmllm.joint.audit.data import AUTHORS_QUESTION, AuditError
    from jmllm.joint.audit.report import AUDIT_OUTPUTS
    from jmllm.joint.audit.run import (
        DEFAULT_MAX_NEW_TOKENS,
        LOCK_OWNER,
        PARSE_RULES,
        AuditSettings,
        process_state,
    )
    from jmllm.joint.chat.templates import PAPER_TEMPLATE
    from jmllm.joint.chat.tokenization import PAPER_TOKENIZATION
    from jmllm.joint.cli.common import CliError, out_dir

    if args.benchmark != "authors":
        from jmllm.joint.cli.benchmark import cmd_benchmark

        return cmd_benchmark(args)
    # --dtype auto is the path's own precision: the authors' notebook ran float32, on GPU too
    # (the report says when a run is not); pope and chair keep J's usual (bfloat16 on GPU).
    # Not set_defaults: --dtype is the shared parent parser's action, every command's default.
    if args.dtype == "auto":
        args.dtype = "float32"
    only_benchmarks = (
        ("--data", "data"),
        ("--captions", "captions"),
        ("--synonyms", "synonyms"),
        ("-p/--prompt", "prompt"),
        ("--sample-images", "sample_images"),
        ("--vision", "vision"),
        ("--threshold", "threshold"),
        ("--first-token-threshold", "first_token_threshold"),
    )
    for flag, name in only_benchmarks:
        if getattr(args, name) is not None:
            raise CliError(f"{flag}: only with --benchmark pope or chair")
    if args.parse is not None and args.parse not in PARSE_RULES:
        raise CliError(f"--parse: {args.parse!r} is a POPE rule (--benchmark pope)")
    try:
        settings = AuditSettings(
            sampling=args.sampling or "all",
            k=args.k if args.k is not None else 3,
            seed=args.seed,
            template=args.template or PAPER_TEMPLATE,
            question=args.question or AUTHORS_QUESTION,
            articles=args.articles or "a",
            query_template=args.query_template,
            max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            tokenization=args.tokenization or PAPER_TOKENIZATION,
            preprocessing=args.preprocessing or PAPER_PREPROCESSING,
        )
        dataset = _dataset(args)
    except AuditError as exc:
        raise CliError(str(exc)) from None
    state = process_state()
    out = out_dir(args.out) if state.is_main_process else None
    with contextlib.ExitStack() as stack:
        if out is not None:  # refused before any model loads if --out is not the audit's own
            stack.enter_context(
                output_folder(
                    out, command=LOCK_OWNER, outputs=AUDIT_OUTPUTS, force=args.force, what="--out"
                )
            )
        return _audit(args, settings, dataset, state, out)


def _audit(args: argparse.Namespace, settings: Any, dataset: Any, state: Any, out: Any) -> int:
    from jmllm.joint.audit.report import write_audit_report
    from jmllm.joint.audit.run import exclusive_folder, run_audit
    from jmllm.joint.cli.common import TOY_WORLD_NOTE, builtin_sources, load_model
    from jmllm.joint.toy import toy_yes_no
    from jmllm.joint.toy.scenes import LLAVA_YES_NO

    if args.device is None and state.num_processes > 1 and state.device.type == "cuda":
        args.device = str(state.device)  # one GPU per process
    with state.main_process_first():  # one process loads first (a Hub download happens once)
        model = load_model(args)
    with exclusive_folder(args.out, state):  # the run and its report: one writer at a time
        result = run_audit(
            model,
            dataset,
            args.out,
            settings,
            batch_size=args.batch_size,
            kv_cache_gib=args.kv_cache_gib,
            progress=True,
        )
        if not state.is_main_process:
            return EXIT_PARTIAL if result.failed else 0
        assert out is not None
        notes = [TOY_WORLD_NOTE] if args.tiny else []
        # the authors' rule reads LLaVA-1.5's exact "Yes"/"No", as the shipped toy LLaVA answers;
        # a toy world trained on lower case is read with the strict rule, and the report says so
        lower_case_toy = args.tiny and toy_yes_no(builtin_sources().root) != LLAVA_YES_NO
        rule = args.parse or ("strict" if lower_case_toy else "authors")
        if args.parse is None and lower_case_toy:
            notes.append(
                "Answers read with the strict rule (yes/no in any case): the toy LLaVA answers "
                "in lower case, which the authors' exact Yes/No rule would count as unparsed."
            )
        report = write_audit_report(
            result,
            out,
            model,
            rule=rule,
            top_k=args.top_k if args.top_k is not None else 25,
            n_resamples=args.resamples,
            confidence=args.confidence,
            seed=args.seed,
            notes=notes,
            progress=True,
        )
    m = report.metrics
    pope = m["pope"]
    print(
        f"{m['images']} images ({result.processed} audited now, {result.kept} kept from an "
        f"earlier run, {len(result.failed)} unreadable), {m['questions']} questions, "
        f"{m['unparsed']} unparsed"
    )
    print(
        "POPE: "
        + ", ".join(
            f"{k} {pope[k]:.3f}" if pope[k] is not None else f"{k} —"
            for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")
        )
    )
    auc = m["auroc_owl_predicts_yes"]
    print(f"AUROC of OWL-ViT's score for J's yes: {auc:.3f}" if auc is not None else "AUROC: —")
    print(f"Report: {report.gallery_path}")
    for image_id, why in sorted(result.failed.items()):
        logger.warning("image %s: %s", image_id, why)
    if result.failed:
        print(f"{len(result.failed)} image(s) could not be read; rerun to retry them")
        return EXIT_PARTIAL
    return 0
