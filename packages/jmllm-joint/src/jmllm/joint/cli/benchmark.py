"""``jmllm-joint hallucination-audit --benchmark pope|chair``: POPE's official files and CHAIR on
captions, each with J's perceptual evidence (the ``authors`` benchmark is
:mod:`jmllm.joint.cli.audit`'s).

    jmllm-joint hallucination-audit --benchmark pope --data POPE/output/coco --images val2014 --out DIR
    jmllm-joint hallucination-audit --benchmark chair --annotations instances_val2014.json \\
        --captions captions_val2014.json --images val2014 --out DIR
    jmllm-joint hallucination-audit --tiny --benchmark pope|chair --data FOLDER --out DIR
        (FOLDER: what ``jmllm-joint sample-data --out FOLDER`` wrote)

Exit codes as the audit's: 0 done, 2 bad input, 1 runtime failure, 3 partial.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("jmllm.joint.cli")

EXIT_PARTIAL = 3
# With --tiny: the toy LLaVA knows the authors' question, so a POPE question is put in it
# ("Is there a circle in the image?" + " Only answer with 'yes' or 'no'."), and captions the
# scenes when asked the paper's caption prompt.
TOY_POPE_QUESTION = "{} Only answer with 'yes' or 'no'."
TOY_MAX_NEW_TOKENS = {"pope": 16, "chair": 48}
DEFAULT_TOP_K = {"pope": 25, "chair": 10}


def add_benchmark_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``--benchmark pope|chair`` (added to ``hallucination-audit``)."""
    from jmllm.align.options import finite_float, integer, unit_interval
    from jmllm.joint.audit.benchmark_report import DEFAULT_OWL_THRESHOLD
    from jmllm.joint.audit.chair import DEFAULT_SAMPLE

    g = p.add_argument_group("benchmarks (--benchmark pope or chair)")
    g.add_argument(
        "--benchmark",
        choices=("authors", "pope", "chair"),
        default="authors",
        help="authors: the paper's yes/no protocol on a COCO-format dataset; pope: POPE's "
        "official question files (--data); chair: CHAIR on J's captions",
    )
    g.add_argument(
        "--data",
        help="pope: the folder of *pope_{random,popular,adversarial}.json; with --tiny (or for "
        "chair) also a folder written by `jmllm-joint sample-data` (default: none)",
    )
    g.add_argument(
        "--captions",
        help="chair: COCO captions file (captions_val2014.json), part of the truth (default: none)",
    )
    g.add_argument(
        "--synonyms", help="chair: synonym list (default: CHAIR's standard list of COCO objects)"
    )
    g.add_argument(
        "--sample-images",
        type=integer(1),
        default=None,
        help=f"chair: images drawn with --seed (default: {DEFAULT_SAMPLE}; every image if fewer)",
    )
    g.add_argument(
        "-p",
        "--prompt",
        help="chair: the caption prompt (default: 'Please describe this image in detail.'; with "
        '--tiny "What\'s the content of the image?")',
    )
    g.add_argument(
        "--vision",
        choices=("joint", "llava"),
        default=None,
        help="joint = J answers; llava = stock LLaVA's own vision tower answers (the published "
        "LLaVA-1.5 figures), OWL-ViT's evidence still from J's t (default: joint)",
    )
    g.add_argument(
        "--threshold",
        type=unit_interval(open_low=True, open_high=True),
        default=None,
        help="OWL-ViT sees an object at or above this score, in (0, 1): perception vs language "
        f"(default: {DEFAULT_OWL_THRESHOLD}, the hallucination view's)",
    )
    g.add_argument(
        "--first-token-threshold",
        type=finite_float(),
        default=None,
        help="pope, first-token rule: yes when log-odds(yes) - log-odds(no) exceeds it "
        "(default: 0)",
    )


def _check_unused(args: argparse.Namespace) -> None:
    """Options of the authors' protocol given to pope/chair are refused, never ignored."""
    from jmllm.joint.cli.common import CliError

    for flag, name in (
        ("--sampling", "sampling"),
        ("-k", "k"),
        ("--articles", "articles"),
        ("--dataset", "dataset"),
    ):
        if getattr(args, name, None) is not None:
            raise CliError(f"{flag}: only with --benchmark authors")
    if args.benchmark == "chair" and args.first_token_threshold is not None:
        raise CliError("--first-token-threshold: only with --benchmark pope")
    if args.benchmark == "pope" and args.sample_images is not None:
        raise CliError("--sample-images: only with --benchmark chair (pope: --limit)")
    if args.benchmark == "pope":
        for flag, name in (
            ("--captions", "captions"),
            ("--synonyms", "synonyms"),
            ("--annotations", "annotations"),
            ("-p/--prompt", "prompt"),
        ):
            if getattr(args, name) is not None:
                raise CliError(f"{flag}: only with --benchmark chair")
    else:
        if args.question is not None:
            raise CliError("--question: only with --benchmark pope or authors (chair: -p/--prompt)")
        if args.limit is not None:
            raise CliError("--limit: not with --benchmark chair (use --sample-images)")
        if args.parse is not None:
            raise CliError("--parse: only with --benchmark pope or authors")


def _pope_rule(args: argparse.Namespace) -> str:
    from jmllm.joint.audit.pope import POPE_RULES
    from jmllm.joint.cli.common import CliError

    rule = args.parse or "llava"
    if rule == "pope":  # POPE's own evaluate.py is LLaVA's eval_pope.py
        rule = "llava"
    if rule not in POPE_RULES:
        raise CliError(f"--parse: {rule!r} is not a POPE rule ({', '.join(POPE_RULES)})")
    return rule


def _folder(path: str | None, what: str) -> Path:
    from jmllm.joint.cli.common import CliError

    if path is None:
        raise CliError(what)
    return Path(path)


def _pope_data(args: argparse.Namespace) -> Any:
    from jmllm.joint.audit.pope import load_pope

    data = _folder(args.data, "--data: give the folder of POPE's question files")
    images = Path(args.images) if args.images else data / "coco" / "images"
    return load_pope(data, images, limit=args.limit)


def _chair_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """(images to caption, ChairInputs) from the options."""
    from jmllm.joint.audit.benchmark import chair_images
    from jmllm.joint.audit.benchmark_report import ChairInputs
    from jmllm.joint.audit.chair import (
        DEFAULT_SAMPLE,
        ChairVocabulary,
        coco_vocabulary,
        image_truth,
        load_reference_captions,
        sample_images,
    )
    from jmllm.joint.audit.data import load_coco
    from jmllm.joint.cli.common import CliError

    root = Path(args.data) if args.data else None
    annotations = args.annotations or (str(root / "coco" / "instances.json") if root else None)
    images = args.images or (str(root / "coco" / "images") if root else None)
    if not annotations or not images:
        raise CliError("--annotations and --images: both required for chair (or --data)")
    captions = args.captions
    if captions is None and root is not None and (root / "coco" / "captions.json").is_file():
        captions = str(root / "coco" / "captions.json")
    synonyms = args.synonyms
    if synonyms is None and root is not None and (root / "chair" / "synonyms.txt").is_file():
        synonyms = str(root / "chair" / "synonyms.txt")
    vocabulary = ChairVocabulary.from_file(synonyms) if synonyms else coco_vocabulary()
    dataset = load_coco(annotations, images)
    count = args.sample_images if args.sample_images is not None else DEFAULT_SAMPLE
    chosen = set(sample_images([im.image_id for im in dataset.images], count, args.seed))
    picked = [im for im in dataset.images if im.image_id in chosen]
    references = load_reference_captions(captions) if captions else None
    truth = image_truth(vocabulary, {im.image_id: im.present for im in picked}, references)
    inputs = ChairInputs(
        vocabulary=vocabulary,
        truth=truth,
        sample={
            "images": len(picked),
            "from": len(dataset.images),
            "seed": args.seed,
            "rule": "numpy default_rng(seed).permutation of the ids sorted, first N",
        },
        truth_source="instances and reference captions" if references else "instances only",
    )
    files = {im.image_id: im.file for im in picked}
    return chair_images(files, images, vocabulary.categories), inputs


def cmd_benchmark(args: argparse.Namespace) -> int:
    """Run POPE or CHAIR (resuming), then write the report on the main process."""
    from jmllm.align.files import output_folder
    from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING
    from jmllm.joint.audit.benchmark import BenchmarkSettings, pope_images
    from jmllm.joint.audit.benchmark_report import CURVE_PNG
    from jmllm.joint.audit.data import AuditError
    from jmllm.joint.audit.report import AUDIT_OUTPUTS
    from jmllm.joint.audit.run import LOCK_OWNER, process_state
    from jmllm.joint.chat.templates import INTERACTIVE_TEMPLATE
    from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION
    from jmllm.joint.cli.common import CliError, out_dir

    _check_unused(args)
    benchmark = args.benchmark
    rule = _pope_rule(args) if benchmark == "pope" else None
    if args.tiny:
        from jmllm.joint.toy.scenes import CONTENT_QUESTION

        question = args.question or (TOY_POPE_QUESTION if benchmark == "pope" else None)
        prompt = args.prompt or CONTENT_QUESTION
        max_new_tokens = args.max_new_tokens or TOY_MAX_NEW_TOKENS[benchmark]
    else:
        question, prompt, max_new_tokens = args.question, args.prompt, args.max_new_tokens
    try:
        settings = BenchmarkSettings(
            benchmark=benchmark,
            question=(question or "") if benchmark == "pope" else (prompt or ""),
            template=args.template or INTERACTIVE_TEMPLATE,
            max_new_tokens=max_new_tokens or 0,
            query_template=args.query_template,
            vision=args.vision or "joint",
            tokenization=args.tokenization or INTERACTIVE_TOKENIZATION,
            preprocessing=args.preprocessing or INTERACTIVE_PREPROCESSING,
        )
        if benchmark == "pope":
            pope = _pope_data(args)
            chair = None
            images = pope_images(pope)
        else:
            pope = None
            images, chair = _chair_data(args)
    except AuditError as exc:
        raise CliError(str(exc)) from None
    state = process_state()
    out = out_dir(args.out) if state.is_main_process else None
    with contextlib.ExitStack() as stack:
        if out is not None:  # refused before any model loads if --out is not the audit's own
            stack.enter_context(
                output_folder(
                    out,
                    command=LOCK_OWNER,  # the audit's command: one folder rule for both
                    outputs=(*AUDIT_OUTPUTS, CURVE_PNG),
                    force=args.force,
                    what="--out",
                )
            )
        return _run(args, benchmark, settings, rule, pope, chair, images, state, out)


def _run(
    args: argparse.Namespace,
    benchmark: str,
    settings: Any,
    rule: str | None,
    pope: Any,
    chair: Any,
    images: Any,
    state: Any,
    out: Any,
) -> int:
    from jmllm.joint.audit.benchmark import run_benchmark
    from jmllm.joint.audit.benchmark_report import DEFAULT_OWL_THRESHOLD, write_benchmark_report
    from jmllm.joint.audit.run import exclusive_folder
    from jmllm.joint.cli.common import TOY_WORLD_NOTE, load_model

    if args.device is None and state.num_processes > 1 and state.device.type == "cuda":
        args.device = str(state.device)  # one GPU per process
    with state.main_process_first():
        model = load_model(args)
    with exclusive_folder(args.out, state):
        result = run_benchmark(
            model,
            images,
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
        if args.tiny and benchmark == "pope" and args.question is None:
            notes.append(
                "POPE's questions are put in the toy world's question form "
                f"({TOY_POPE_QUESTION!r}): the toy LLaVA was trained on it, not on LLaVA's "
                "post-prompt."
            )
        report = write_benchmark_report(
            result,
            out,
            model,
            pope=pope,
            chair=chair,
            rule=rule or "llava",
            threshold=args.first_token_threshold or 0.0,
            owl_threshold=args.threshold if args.threshold is not None else DEFAULT_OWL_THRESHOLD,
            top_k=args.top_k if args.top_k is not None else DEFAULT_TOP_K[benchmark],
            n_resamples=args.resamples,
            confidence=args.confidence,
            seed=args.seed,
            notes=notes,
            progress=True,
        )
    _print_summary(report.metrics, result)
    print(f"Report: {report.gallery_path}")
    for image_id, why in sorted(result.failed.items()):
        logger.warning("image %s: %s", image_id, why)
    if result.failed:
        print(f"{len(result.failed)} image(s) could not be read; rerun to retry them")
        return EXIT_PARTIAL
    return 0


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}"


def _print_summary(m: dict[str, Any], result: Any) -> None:
    print(
        f"{m['images']} images ({result.processed} answered now, {result.kept} kept from an "
        f"earlier run, {len(result.failed)} unreadable), {result.rows_per_batch} answers per "
        "batch"
    )
    if m["benchmark"] == "pope":
        pope = m["pope"]
        for split in [*m["pope_rows"], "mean"]:
            print(
                f"POPE {split} (rule {m['parse_rule']}): "
                + ", ".join(
                    f"{k} {_fmt(pope[split][k])}"
                    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")
                )
            )
    else:
        c = m["chair"]
        print(
            f"CHAIR_s {_fmt(c['chair_s'])}, CHAIR_i {_fmt(c['chair_i'])}, recall "
            f"{_fmt(c['recall'])} ({c['captions']} captions, {c['mentions']} mentions)"
        )
    pvl = m["perception_vs_language"]
    print(
        f"J's hallucinations: perception {_fmt(pvl['perception'])}, language "
        f"{_fmt(pvl['language'])} (of {pvl['errors']}); AUROC of OWL-ViT's score for the "
        f"truth {_fmt(m['auroc_owl_predicts_truth'])}"
    )
