"""``jmllm-joint toy train | eval``: retrain the toy world, or score one against held-out truth.

Registered by :func:`jmllm.joint.cli.build_parser` through :func:`register`.

    jmllm-joint toy train -o DIR [--family {llava,qwen2_vl}] [--seed S] [--threads N] [--quick]
        [--force]
    jmllm-joint toy eval [--dir DIR] [--scenes N] [--ga-scenes N] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path
from typing import Any


def register(subparsers: Any, common_args: argparse.ArgumentParser) -> None:
    """Add ``toy`` (with ``train`` and ``eval``) to ``jmllm-joint``'s parser."""
    toy = subparsers.add_parser(
        "toy",
        help="the toy world: small OWL-ViT, LLaVA and W trained on synthetic shapes",
        description="The toy world: the real model classes, small, trained on synthetic scenes "
        "whose truth is known (a testbed, not a substitute for the real checkpoints).",
    )
    sub = toy.add_subparsers(dest="toy_command", metavar="ACTION", required=True)

    train = sub.add_parser(
        "train",
        help="train the toy OWL-ViT, LLaVA and W (jmllm-align train) and score them",
        description="Train all three toy models on the scenes of world SEED (about 21 minutes "
        "on two idle CPU cores), then score J and stock LLaVA on held-out scenes. Writes "
        "owlvit/, llava/, alignment.safetensors and manifest.json into --out.",
    )
    from jmllm.align.options import integer
    from jmllm.align.vocabulary import DTYPE_CHOICES, add_json_out

    train.add_argument("-o", "--out", required=True, help="output folder")
    train.add_argument(
        "--seed", type=integer(0), default=0, help="world, initialisation and data seed"
    )
    train.add_argument(
        "--family",
        choices=("llava", "qwen2_vl"),
        default="llava",
        help="the MLLM's family: llava (the shipped recipe) or qwen2_vl (a toy Qwen2-VL trained "
        "by the same recipe, its tower twice as long, into qwen2_vl/, beside the shipped toy "
        "OWL-ViT and a W for it; about 25 minutes)",
    )
    train.add_argument("--threads", type=integer(1), default=2, help="torch CPU threads")
    train.add_argument(
        "--quick",
        action="store_true",
        help="a brief run of the same recipe (minutes; checks that it learns, not for use)",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="replace a toy world this command trained in --out, or train beside other files "
        "(never replacing or deleting them)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "eval",
        help="held-out scores of a toy world: AP50, caption/QA accuracy, GA localisation",
    )
    evaluate.add_argument("--dir", help="a toy world folder (default: the shipped weights)")
    evaluate.add_argument(
        "--scenes",
        type=integer(1),
        help="held-out scenes (default: as many as the manifest's figures used, 300)",
    )
    evaluate.add_argument(
        "--ga-scenes",
        type=integer(0),
        default=40,
        help="held-out scenes for the GA localisation check, 0 skips it",
    )
    evaluate.add_argument("--seed", type=integer(0), help="world seed (default: the manifest's)")
    evaluate.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: the CPU)")
    evaluate.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights dtype (default: auto, float32)",
    )
    add_json_out(evaluate, "also write the scores to this JSON file (-: standard output)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=cmd_eval)


def _positive(name: str, value: int, minimum: int = 1) -> int:
    from jmllm.joint.cli.common import CliError

    if not isinstance(value, int) or value < minimum or not math.isfinite(value):
        raise CliError(f"{name}: must be an integer >= {minimum}, got {value}")
    return value


TRAINING_MODULES = ("datasets", "tokenizers")  # the jmllm-joint[toy] extra


def cmd_train(args: argparse.Namespace) -> int:
    """Train the toy world into ``--out``; print the manifest's scores."""
    from jmllm.joint.cli.common import CliError
    from jmllm.joint.toy.train import MANIFEST_NAME, ToyRecipe, train_toy_world

    _positive("--threads", args.threads)
    missing = [m for m in TRAINING_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(f"toy train needs {' and '.join(missing)}: pip install 'jmllm-joint[toy]'")
    if args.seed < 0:
        raise CliError(f"--seed: must be >= 0, got {args.seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: exists and is not a folder")
    if (out / MANIFEST_NAME).exists() and not args.force:
        raise CliError(f"--out {out}: already holds a toy world; pass --force to replace it")
    recipe = (
        ToyRecipe.quick(args.seed) if args.quick else ToyRecipe.for_family(args.family, args.seed)
    )
    recipe.threads = args.threads
    manifest = train_toy_world(
        out, recipe, progress=not args.no_progress, force=args.force, family=args.family
    )
    _print_scores(manifest["metrics"], manifest["seconds"])
    print(f"Toy world: {out} ({manifest['total_bytes'] / 1e6:.1f} MB)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a toy world on held-out scenes and print (and optionally write) the scores."""
    from jmllm.joint.cli.common import CliError
    from jmllm.joint.render.report import atomic_write_text
    from jmllm.joint.toy import load_toy_joint, toy_manifest
    from jmllm.joint.toy.evaluate import evaluate_joint
    from jmllm.joint.toy.localisation import ga_localisation

    if args.scenes is not None:
        _positive("--scenes", args.scenes)
    _positive("--ga-scenes", args.ga_scenes, minimum=0)
    if args.seed is not None and args.seed < 0:
        raise CliError(f"--seed: must be >= 0, got {args.seed}")
    manifest = toy_manifest(args.dir)
    seed = manifest["seed"] if args.seed is None else args.seed
    model = load_toy_joint(args.dir, **_model_kwargs(args))
    scenes = manifest["metrics"]["heldout_scenes"] if args.scenes is None else args.scenes
    from jmllm.joint.toy.train import FAMILY_TEMPLATES

    family = str(manifest.get("family", "llava"))
    scores: dict[str, Any] = evaluate_joint(
        model, scenes=scenes, seed=seed, templates=FAMILY_TEMPLATES.get(family)
    )
    if args.ga_scenes:
        scores["ga_localisation"] = ga_localisation(
            model, scenes=args.ga_scenes, seed=seed, progress=not args.no_progress
        )
    scores["source"] = str(args.dir or "shipped")
    _print_scores(scores)
    if args.json_out == "-":
        print(json.dumps(scores, indent=2))
    elif args.json_out:
        atomic_write_text(args.json_out, json.dumps(scores, indent=2) + "\n")
        print(f"Scores: {args.json_out}")
    return 0


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--device`` and ``--dtype`` as :func:`jmllm.joint.toy.load_toy_joint` takes them."""
    import torch

    device = "cpu" if args.device in (None, "auto") else args.device
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    return {"device": device, "dtype": dtype}


def _print_scores(metrics: dict[str, Any], seconds: dict[str, Any] | None = None) -> None:
    for key, label in (
        ("detection_ap50", "as `jmllm-joint detect` decodes: score >= 0.1, NMS 0.3"),
        ("detection_ap50_no_nms", "every patch's box, no NMS"),
    ):
        ap = metrics.get(key)
        if ap is None:
            continue
        print(f"detection AP50 ({label}): " + ", ".join(f"{k} {v:.3f}" for k, v in ap.items()))
    for key in ("caption_accuracy", "in_image_accuracy", "qa_accuracy"):
        for vision, by_template in metrics[key].items():
            values = ", ".join(f"{t} {v:.3f}" for t, v in by_template.items())
            print(
                f"{key.replace('_', ' ')} ({'J' if vision == 'joint' else 'stock LLaVA'}): {values}"
            )
    ga = metrics.get("ga_localisation")
    if ga:
        for protocol in ("caption", "name"):
            for group, scores in ga[protocol].items():
                values = ", ".join(f"{k} {v:.3f}" for k, v in scores["maxboxacc_iou50"].items())
                print(
                    f"GA MaxBoxAccV2 @ IoU 0.5, {protocol}, {group.replace('_', ' ')} "
                    f"({scores['objects']} objects): {values}; Spearman(GA, GA with W "
                    f"re-initialised) {scores['sanity_spearman_reinit_w']:.3f}"
                )
    if seconds:
        total = seconds["total_training"]
        print(f"training: {total['wall_s']:.0f} s wall, {total['cpu_s_per_2_cores']:.0f} s CPU / 2")
