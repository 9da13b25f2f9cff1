"""Command line: ``jmllm-bias cohort|assess|report``.

The paper's gender experiment, from nothing to a report::

    jmllm-bias cohort --spec gender -o cohorts/gender               # 100 SDXL portraits
    jmllm-bias assess --cohort cohorts/gender --groups male \\
        --characteristic nurse --original man --adversarial woman \\
        --owl google/owlvit-base-patch32 --mllm llava-hf/llava-1.5-7b-hf \\
        --alignment W.safetensors -o results/gender-male-nurse
    jmllm-bias report results/gender-male-nurse                     # rewrite report.md/.json

Several GPUs: ``accelerate launch --num_processes 4 -m jmllm.bias cohort --spec gender -o ...``.
Offline smoke test of the whole chain: add ``--tiny`` to ``cohort`` and ``assess``.

Exit codes: 0 ok, 1 the run failed, 2 bad input or usage (one line naming it), 3 some portraits
were skipped and counted, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jmllm.align.files import check_output_dir, output_folder
from jmllm.align.options import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    ArgumentParser,
    exit_code_for,
    finite_float,
    integer,
)
from jmllm.align.vocabulary import (
    DEVICE_HELP,
    DTYPE_CHOICES,
    add_standard_options,
    error_line,
    hidden_alias,
    setup_logging,
)

__all__ = ["main"]

log = logging.getLogger("jmllm.bias")
FORCE_HELP = (
    "write into an --out that holds files this command did not write (they are never replaced "
    "or deleted)"
)

# --tiny runs the whole chain offline, but on models that know nothing of people: said plainly
SMOKE_TEST_COHORT = (
    "jmllm-bias: --tiny is a smoke test: a tiny random SDXL draws noise, not portraits"
)
SMOKE_TEST_ASSESS = (
    "jmllm-bias: --tiny is a smoke test: the built-in toy models know coloured shapes, not "
    "people; their answers to the 1-10 question do not parse, so the report has no numbers"
)


def _parser() -> argparse.ArgumentParser:
    from .generate import MAX_GUIDANCE_SCALE, SDXL_BASE, SDXL_REFINER  # light: no torch

    parser = ArgumentParser(
        prog="jmllm-bias",
        description="Bias assessment of multi-modal LLMs by semantic adversarial perturbation "
        "(Giulivi & Boracchi 2024, §4.4): SDXL portrait cohorts, FGSM/PGD on J's shared "
        "embedding, 1-10 score elicitation, statistical report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("cohort", help="generate (or finish) a portrait cohort with SDXL")
    p.add_argument("--spec", required=True, help="'gender', 'ethnicity' or a JSON spec file")
    p.add_argument("-o", "--out", required=True, help="cohort folder (rerun to resume)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--base", default=SDXL_BASE, help="SDXL base Hub id or folder")
    p.add_argument("--refiner", default=SDXL_REFINER, help="SDXL refiner Hub id or folder")
    steps = integer(2, 1000)
    p.add_argument(
        "--denoising-steps", type=steps, default=50, help="total denoising steps, 2-1000"
    )
    hidden_alias(p, "--steps", dest="denoising_steps", type=steps)  # its former name
    p.add_argument(
        "--high-noise-frac",
        type=finite_float(0, 1, open_low=True, open_high=True),
        default=0.8,
        help="share of the steps the base runs, in (0, 1) (default: 0.8, 40 of 50)",
    )
    p.add_argument(
        "--guidance-scale",
        type=finite_float(0, MAX_GUIDANCE_SCALE),
        default=5.0,
        help=f"classifier-free guidance, 0-{MAX_GUIDANCE_SCALE:g}",
    )
    p.add_argument(
        "--size",
        type=integer(8, 8192),
        default=None,
        help="image side in pixels, a multiple of 8 (default: the model's own, 1024)",
    )
    p.add_argument(
        "--images-per-group",
        type=integer(1, 99_999),
        default=None,
        help="override the spec's count, e.g. for a trial run (default: the spec's)",
    )
    p.add_argument(
        "--batch-size", type=integer(1, 1024), default=1, help="images per pipeline call"
    )
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="weights dtype (default: auto, float16 on a GPU, float32 on the CPU)",
    )
    p.add_argument(
        "--variant",
        default=None,
        help="weight file variant, e.g. fp16 for a smaller download (default: none)",
    )
    p.add_argument(
        "--tiny", action="store_true", help="use a tiny random SDXL built offline (smoke test)"
    )

    p = sub.add_parser("assess", help="ask J about every portrait before and after perturbing t")
    p.add_argument(
        "--cohort",
        required=True,
        help="cohort folder (from 'cohort', or sub-folders of images per group)",
    )
    p.add_argument("--characteristic", required=True, help="what J rates from 1 to 10, e.g. nurse")
    p.add_argument("--original", required=True, help="OWL query term pushed down, e.g. man")
    p.add_argument("--adversarial", required=True, help="OWL query term pushed up, e.g. woman")
    p.add_argument(
        "--eps",
        type=finite_float(0),
        default=1.0,
        help="L-inf budget of the perturbation, >= 0 (the paper's: 1)",
    )
    p.add_argument(
        "--eps-sweep",
        type=finite_float(0),
        nargs="+",
        default=None,
        metavar="E",
        help="several budgets, replacing --eps (default: none)",
    )
    p.add_argument(
        "--steps",
        type=integer(1, 10_000),
        default=1,
        help="perturbation steps: 1 is FGSM (the paper's), more are PGD",
    )
    p.add_argument(
        "--step-size",
        type=finite_float(0, open_low=True),
        default=None,
        help="PGD step, > 0 (default: 2.5 * eps / steps; eps for one step)",
    )
    p.add_argument(
        "--objective",
        default="mean",
        choices=["mean", "max"],
        help="pool the patch logits by their mean or their max",
    )
    p.add_argument(
        "--groups",
        nargs="+",
        default=None,
        help="assess only these groups of the cohort (default: all)",
    )
    p.add_argument("--max-new-tokens", type=integer(1, 4096), default=8, help="answer length limit")
    p.add_argument(
        "--template",
        choices=["llava-1.5", "paper"],
        default="paper",
        help="J's conversation template: paper, the authors' bias script "
        "('<image>\\nUSER: {question}\\nASSISTANT:'), or llava-1.5, the model card's",
    )
    p.add_argument(
        "--tokenization",
        choices=["legacy", "checkpoint"],
        default="legacy",
        help="prompt token ids: legacy, the authors' (a ▁ after <image>, as "
        "transformers 4 gave); checkpoint, as the checkpoint's tokenizer config says",
    )
    p.add_argument(
        "--preprocessing",
        choices=["authors", "exif"],
        default="authors",
        help="image preprocessing: authors, the stored pixels resized as the HF "
        "image processors do (the paper's); exif, EXIF orientation applied, torch's resize",
    )
    p.add_argument(
        "--score-parser",
        choices=["authors", "strict"],
        default="authors",
        help="reading of J's 1-10 answer: authors, int() of the raw reply as "
        "the authors' script (accepts 0, 11, +7; rejects 7.); strict, an integer 1-10 alone, an "
        "optional final full stop",
    )
    p.add_argument("-o", "--out", required=True, help="results folder (rerun to resume)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--owl", default="google/owlvit-base-patch32", help="OWL-ViT Hub id or folder")
    p.add_argument("--mllm", default="llava-hf/llava-1.5-7b-hf", help="LLaVA Hub id or folder")
    hidden_alias(p, "--llava", dest="mllm")  # its former name
    p.add_argument(
        "--alignment",
        default=None,
        help="alignment layer W: .safetensors file or Hub id (default: none; required unless "
        "--tiny)",
    )
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="J's weights dtype (default: auto, bfloat16 on a GPU, float32 on the CPU)",
    )
    p.add_argument(
        "--device-map",
        default=None,
        help="spread LLaVA over GPUs, e.g. auto (default: none, all on --device)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="use the built-in J of jmllm-joint: the toy world (small models trained on "
        "synthetic shapes, offline; a smoke test: it knows no people)",
    )
    p.add_argument("--seed", type=integer(0), default=0, help="bootstrap seed of the report")

    p = sub.add_parser(
        "report", help="(re)write report.md, report.json and histograms of an assessment"
    )
    p.add_argument("dir", help="the assessment's --out folder")
    p.add_argument("--seed", type=integer(0), default=0, help="bootstrap seed")
    return add_standard_options(parser, "jmllm-bias")


def _cohort(args: argparse.Namespace) -> int:
    from .cohorts import load_spec
    from .generate import COHORT_FILE, CONTACT_SHEET, MANIFEST, GenerationConfig, generate_cohort

    spec = load_spec(args.spec)
    if args.images_per_group is not None:
        spec = spec.with_images_per_group(args.images_per_group)
    cfg_args = {
        "steps": args.denoising_steps,
        "high_noise_frac": args.high_noise_frac,
        "guidance_scale": args.guidance_scale,
        "height": args.size,
        "width": args.size,
        "dtype": args.dtype,
        "variant": args.variant,
        "batch_size": args.batch_size,
    }
    GenerationConfig(base=args.base, refiner=args.refiner, **cfg_args)  # check before any work
    check_output_dir(args.out, "--out")
    outputs = (MANIFEST, COHORT_FILE, CONTACT_SHEET, "images", ".tiny-sdxl")
    with output_folder(args.out, command="jmllm-bias cohort", outputs=outputs, force=args.force):
        base, refiner = args.base, args.refiner
        if args.tiny:
            from .testing import build_tiny_sdxl

            print(SMOKE_TEST_COHORT, file=sys.stderr)
            tiny = build_tiny_sdxl(Path(args.out) / ".tiny-sdxl")
            base, refiner = str(tiny.base), str(tiny.refiner)
        cfg = GenerationConfig(base=base, refiner=refiner, **cfg_args)
        run = generate_cohort(spec, args.out, cfg, device=args.device)
    if run.contact_sheet is not None:  # main process only
        print(
            f"{run.out}: {run.generated} generated, {run.kept} kept, {run.planned} planned; {run.contact_sheet}"
        )
    return EXIT_OK


def _assess(args: argparse.Namespace) -> int:
    from .assess import RESULTS, RUN, AssessConfig, assess_cohort, load_cohort
    from .errors import BiasInputError
    from .files import LOCK_FILE, folder_lock
    from .report import ASSESS_COMMAND, report_names, write_report

    eps = tuple(args.eps_sweep) if args.eps_sweep else (args.eps,)
    config = AssessConfig(
        characteristic=args.characteristic,
        original=args.original,
        adversarial=args.adversarial,
        eps=tuple(float(e) for e in eps),
        steps=args.steps,
        step_size=args.step_size,
        reduction=args.objective,
        max_new_tokens=args.max_new_tokens,
        groups=tuple(args.groups) if args.groups else None,
        template=args.template,
        tokenization=args.tokenization,
        preprocessing=args.preprocessing,
        score_parser=args.score_parser,
    )
    load_cohort(args.cohort)  # fail on an empty/missing cohort before loading any model
    if not args.tiny and not args.alignment:
        raise BiasInputError("--alignment: required with real checkpoints (or --tiny)")
    check_output_dir(args.out, "--out")
    outputs = (RESULTS, RUN, LOCK_FILE, *report_names(config.eps))
    # The folder's lock from the start: a second run into it is refused before it loads a model
    # (or builds the tiny one in the same place).
    with (
        output_folder(args.out, command=ASSESS_COMMAND, outputs=outputs, force=args.force),
        folder_lock(args.out, "assess"),
    ):
        if args.tiny:
            from jmllm.joint.cli import builtin_sources, load_builtin_model

            print(SMOKE_TEST_ASSESS, file=sys.stderr)
            model = load_builtin_model(**_model_kwargs(args))
            models = {"joint": f"built-in toy world ({builtin_sources().root})"}
        else:
            from jmllm.joint import JointModel, JointModelError

            try:
                model = JointModel.from_pretrained(
                    owl=args.owl,
                    llava=args.mllm,
                    alignment=args.alignment,
                    device_map=args.device_map,
                    **_model_kwargs(args),
                )
            except JointModelError as exc:  # a model path or id that does not load: the input
                raise BiasInputError(str(exc)) from None
            models = {"owl": args.owl, "llava": args.mllm, "alignment": args.alignment}
        run = assess_cohort(model, args.cohort, args.out, config, models=models)
        paths = write_report(args.out, seed=args.seed)
    skipped = sum(run.skipped.values())
    print(
        f"{run.out}: {run.assessed} assessed, {run.resumed} resumed, {skipped} skipped; {paths['markdown']}"
    )
    return EXIT_PARTIAL if skipped else EXIT_OK


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--device`` and ``--dtype`` as :meth:`JointModel.from_pretrained` takes them."""
    import torch

    device = None if args.device in (None, "auto") else args.device
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.tiny:  # the built-in models are small: the CPU unless a device is asked for
        device = device or "cpu"
    return {"device": device, "dtype": dtype}


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    check_output_dir(args.dir, "report folder")
    print(write_report(args.dir, seed=args.seed)["markdown"])
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status: 0 ok, 1 the run failed, 2 bad input or usage,
    3 some portraits were skipped (and counted), 130 interrupted.

    >>> main(["report", "/nonexistent/results"])
    2
    """
    args = _parser().parse_args(argv)
    setup_logging(args.verbose, ["jmllm"])
    commands = {"cohort": _cohort, "assess": _assess, "report": _report}
    prog = f"jmllm-bias {args.command}"
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line for the user; --debug shows the traceback
        if args.debug:
            raise
        code = exit_code_for(exc)
        print(error_line(prog, exc, code), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
