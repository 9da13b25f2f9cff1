"""``jmllm-joint faithfulness``: attribution methods × faithfulness metrics on J, with intervals.

Registered by :func:`jmllm.joint.cli.build_parser` through :func:`register`.

    jmllm-joint faithfulness --tiny --out DIR                       # the toy world's scenes
    jmllm-joint faithfulness --annotations instances.json --images DIR --out DIR
    jmllm-joint faithfulness --data-dir CUB_DIR [--object bird] --out DIR
    accelerate launch --num_processes N -m jmllm.joint faithfulness ... (split by images)

Exit codes: 0 done, 2 bad input, 1 runtime failure, 3 partial (some images could not be read;
rerun to retry them — finished images are kept).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

logger = logging.getLogger("jmllm.joint.cli")

EXIT_PARTIAL = 3


def register(subparsers: Any, common_args: argparse.ArgumentParser) -> None:
    """Add ``faithfulness`` to ``jmllm-joint``'s parser."""
    from jmllm.align.options import finite_float, integer
    from jmllm.joint.chat.templates import INTERACTIVE_TEMPLATE
    from jmllm.joint.cli.common import template_argument

    # the names are listed here, not imported, so --help loads no model code
    methods = (
        "ga", "ga_coord", "ga_any", "gradient", "gradient_x_input", "integrated_gradients",
        "attention", "attention_rollout", "logit_lens", "random",
    )  # fmt: skip
    p = subparsers.add_parser(
        "faithfulness",
        parents=[common_args],
        help="GA against other attribution methods: deletion/insertion AUC, pointing game, "
        "MaxBoxAccV2 and the randomisation cascade, with intervals",
        description="Explain the objects J names with every attribution method and score the "
        "maps: deletion and insertion curves (on t and in pixels), the pointing game and "
        "MaxBoxAccV2 against true boxes, and the model-randomisation cascade. Data: the toy "
        "world's held-out scenes (the default with --tiny), a COCO-format dataset "
        "(--annotations, --images) or a folder with images/ and boxes.csv (--data-dir). Writes "
        "results.jsonl (resumable), faithfulness.json, report.md, curves.png, cascade.png and "
        "faithfulness.html into --out.",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--annotations", help="COCO-format annotation file (instances_*.json) (default: none)"
    )
    data.add_argument("--images", help="folder of the images the annotations name (default: none)")
    data.add_argument(
        "--data-dir",
        help="folder with images/ and boxes.csv (image_id,x0,y0,x1,y1) (default: none)",
    )
    data.add_argument(
        "--object",
        default="bird",
        help="with --data-dir: the object every box holds, named in the answer and queried "
        "(as CUB-200-2011)",
    )
    data.add_argument(
        "--limit", type=integer(1), help="score only the first N images (default: all)"
    )
    data.add_argument("--scenes", type=integer(1), default=100, help="toy world: held-out scenes")
    data.add_argument(
        "--start",
        type=integer(0),
        default=1000,
        help="toy world: first held-out scene (as the toy world's validity report)",
    )
    p.add_argument("-o", "--out", required=True, help="output folder (reused to resume)")
    proto = p.add_argument_group("methods and metrics")
    proto.add_argument(
        "--method",
        action="append",
        choices=methods,
        help="a method to score (repeat) (default: every method, ga first)",
    )
    proto.add_argument(
        "--steps",
        type=integer(1, 10_000),
        default=16,
        help="deletion/insertion steps K: K + 1 points per curve, all in one batched forward",
    )
    proto.add_argument(
        "--baseline",
        choices=("blank", "blur", "zero"),
        default="blank",
        help="what replaces a removed patch, in t and in pixels, and integrated gradients' "
        "start: blank (the image of CLIP's mean colour), blur, zero",
    )
    proto.add_argument(
        "--space",
        action="append",
        dest="spaces",
        choices=("t", "pixels"),
        help="where deletion and insertion remove patches (repeat) (default: both)",
    )
    proto.add_argument(
        "--ig-steps",
        type=integer(1, 10_000),
        default=64,
        help="integrated gradients' steps, trapezoid rule (64: fewer miss the logit's change "
        "on a path with a jump)",
    )
    proto.add_argument(
        "--cascade",
        choices=("full", "final", "none"),
        default="full",
        help="randomisation cascade: every stage (W, LM head, each decoder layer; default), "
        "only the fully randomised model, or none",
    )
    proto.add_argument(
        "--no-separation",
        dest="separation",
        action="store_false",
        help="do not score the randomised model's maps too (halves the curves' forwards; the "
        "report then says nothing on which metric separates trained from randomised maps)",
    )
    proto.add_argument(
        "--protocol",
        choices=("wsolevaluation", "exact"),
        default="wsolevaluation",
        help="MaxBoxAccV2 as clovaai/wsolevaluation computes it (default; needs "
        "jmllm-joint[wsol]) or with exact geometry",
    )
    proto.add_argument(
        "--map-side",
        type=integer(8, 4096),
        default=224,
        help="maps are scored with the image shrunk to at most this many pixels",
    )
    proto.add_argument(
        "--batch-size",
        type=integer(1),
        help="rows per forward of the curves and of integrated gradients' steps (default: "
        "all at once; lower it to bound memory on a large model)",
    )
    template_argument(proto, INTERACTIVE_TEMPLATE)
    rep = p.add_argument_group("report")
    rep.add_argument(
        "--seed",
        type=integer(0, 2**63 - 1),
        default=0,
        help="seed of the bootstrap, of ties in a ranking and of the random method",
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
    rep.add_argument(
        "--examples",
        type=integer(0, 100),
        default=3,
        help="explained targets the page shows with every method's map (3; 0: none)",
    )
    p.set_defaults(func=cmd_faithfulness)


def _source(args: argparse.Namespace) -> Any:
    from jmllm.joint.cli.common import CliError
    from jmllm.joint.faithfulness import FaithfulnessDataError, ToySource, boxes_source, coco_source

    coco = bool(args.annotations or args.images)
    if coco and args.data_dir:
        raise CliError("--data-dir: give either --data-dir or --annotations with --images")
    try:
        if args.data_dir:
            return boxes_source(args.data_dir, args.object, args.limit, args.template)
        if coco:
            if not (args.annotations and args.images):
                raise CliError("--annotations and --images: both required")
            return coco_source(args.annotations, args.images, args.limit, args.template)
    except FaithfulnessDataError as exc:
        raise CliError(str(exc)) from None
    if not args.tiny:
        raise CliError(
            "data: give --annotations with --images, or --data-dir (the toy world's scenes are "
            "the data of the built-in models, --tiny)"
        )
    return ToySource(scenes=args.scenes, start=args.start, template=args.template)


def cmd_faithfulness(args: argparse.Namespace) -> int:
    """Run the benchmark (resuming), then write the report on the main process."""
    from jmllm.joint.audit.run import exclusive_folder, process_state
    from jmllm.joint.cli.common import TOY_WORLD_NOTE, CliError, load_model, out_dir
    from jmllm.joint.faithfulness import FaithfulnessError, FaithfulnessSettings, run_faithfulness
    from jmllm.joint.faithfulness.report import example_pictures, write_faithfulness_report
    from jmllm.joint.faithfulness.run import DEFAULT_METHODS, LOCK_FILE, LOCK_OWNER

    source = _source(args)
    methods = tuple(args.method) if args.method else DEFAULT_METHODS
    try:
        settings = FaithfulnessSettings(
            methods=methods,
            steps=args.steps,
            baseline=args.baseline,
            spaces=tuple(dict.fromkeys(args.spaces)) if args.spaces else ("t", "pixels"),
            ig_steps=args.ig_steps,
            cascade=args.cascade,
            protocol=args.protocol,
            map_side=args.map_side,
            seed=args.seed,
            separation=args.separation,
        )
    except FaithfulnessError as exc:
        raise CliError(str(exc)) from None
    if args.protocol == "wsolevaluation":
        from jmllm.joint.wsol.run import WsolDependencyError, opencv

        try:
            opencv()
        except WsolDependencyError as exc:
            raise CliError(f"--protocol wsolevaluation: {exc}") from None
    state = process_state()
    out = out_dir(args.out) if state.is_main_process else None
    if args.device is None and state.num_processes > 1 and state.device.type == "cuda":
        args.device = str(state.device)  # one GPU per process
    with state.main_process_first():  # one process loads first (a Hub download happens once)
        model = load_model(args)
    try:
        # the run and its report: one writer at a time
        with exclusive_folder(
            args.out, state, owner=LOCK_OWNER, lock_file=LOCK_FILE, error=FaithfulnessError
        ):
            result = run_faithfulness(
                model, source, args.out, settings, batch_size=args.batch_size, progress=True
            )
            if not state.is_main_process:
                return EXIT_PARTIAL if result.failed else 0
            assert out is not None
            if not result.targets:
                raise CliError(
                    f"{source.name}: no target could be scored ({len(result.failed)} images "
                    "unreadable); nothing to report"
                )
            notes = [TOY_WORLD_NOTE] if args.tiny else []
            examples = example_pictures(model, result, source, args.examples)
            report = write_faithfulness_report(
                result,
                out,
                resamples=args.resamples,
                confidence=args.confidence,
                seed=args.seed,
                notes=notes,
                examples=examples,
            )
    except FaithfulnessError as exc:
        raise CliError(str(exc)) from None
    summary = report.summary
    print(
        f"{summary['images']} images, {summary['targets']} targets ({result.processed} images "
        f"scored now, {result.kept} kept from an earlier run, {len(result.failed)} unreadable)"
    )
    headline = ("deletion_auc", "insertion_auc", "pointing", "maxboxacc_iou50",
                "randomisation_spearman")  # fmt: skip
    width = max(len(m) for m in summary["methods"])
    print(f"{'method':{width}}  " + "  ".join(f"{h:>22}" for h in headline))
    for name, row in summary["methods"].items():
        cells = []
        for key in headline:
            entry = row.get(key)
            cells.append(f"{entry['value']:22.3f}" if entry else f"{'—':>22}")
        print(f"{name:{width}}  " + "  ".join(cells))
    print(f"Report: {report.html_path}")
    for item_id, why in sorted(result.failed.items()):
        logger.warning("image %s: %s", item_id, why)
    if result.failed:
        print(f"{len(result.failed)} image(s) could not be read; rerun to retry them")
        return EXIT_PARTIAL
    return 0
