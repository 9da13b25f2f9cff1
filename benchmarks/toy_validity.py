"""Are J's explanations right? The toy world checked against its truth (held-out scenes).

On the toy J shipped in ``jmllm-joint`` (or a retrained one, ``--dir``), CPU, float32, in one run:

- the models: ``detection_ap50`` (the lowest shape's AP50 of ``jmllm-joint detect``'s boxes), ``caption_accuracy_llava``,
  ``caption_accuracy_joint``, ``qa_accuracy_llava`` (``llava-1.5`` template);
- GA localisation: for every object J names correctly in its answer to ``What's in the image?``,
  GA's class map of the shape word (query ``a photo of a <shape>``) against the object's true
  box, MaxBoxAccV2 at IoU 0.3/0.5/0.7 (``ga_maxboxacc_iou50``...), beside the plain-gradient
  baseline (``gradient_maxboxacc_iou50``), a seeded random patch map
  (``random_maxboxacc_iou50``) and random weights painted on OWL-ViT's boxes;
- sanity checks (Adebayo et al., NeurIPS 2018): Spearman correlation of GA maps with W
  re-initialised (``sanity_spearman_randomised_w``) and along the cumulative top-down cascade
  (``sanity_cascade``); a shape word explained where its object is absent (``absent_word``);
- the hallucination view on answers teacher-forced to name an absent object
  (``hallucination_precision``, ``hallucination_recall``).

Targets (printed under ``targets``): GA ≥ 0.8 at IoU 0.5 and above both baselines; the
correlation falls under randomisation. The figures are reported whatever they are.

    python benchmarks/toy_validity.py [--scenes 30] [--metric-scenes 100] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("toy_validity")

TARGET_GA_IOU50 = 0.8


def _count(name: str, minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name}: must be at least {minimum}, got {value}")
        return value

    return parse


def _finite(value: Any) -> Any:
    """NaN (a ratio with nothing to count) as JSON null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenes",
        type=_count("--scenes", 1),
        default=30,
        help="held-out scenes for the explanation checks (default 30: under 3 min on 2 cores)",
    )
    parser.add_argument(
        "--metric-scenes",
        type=_count("--metric-scenes", 1),
        default=100,
        help="held-out scenes for detection AP and caption/QA accuracy (default 100)",
    )
    parser.add_argument(
        "--start",
        type=_count("--start", 0),
        default=1000,
        help="first held-out scene (default 1000; the manifest's scores use 0-299)",
    )
    parser.add_argument("--dir", help="a toy world trained with `jmllm-joint toy train --out`")
    parser.add_argument("--threads", type=_count("--threads", 1), default=None)
    parser.add_argument("--json-out", help="also write the JSON result here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from jmllm.joint.report import atomic_write_text
    from jmllm.joint.toy import ToyWorldError, load_toy_joint, toy_manifest
    from jmllm.joint.toy.validity import toy_validity

    try:
        model = load_toy_joint(args.dir)
        manifest = toy_manifest(args.dir)
    except ToyWorldError as exc:
        print(f"toy_validity: {exc}", file=sys.stderr)
        return 2
    start, cpu_start = time.perf_counter(), time.process_time()
    result = toy_validity(
        model,
        scenes=args.scenes,
        metric_scenes=args.metric_scenes,
        seed=int(manifest["seed"]),
        start=args.start,
        progress=not args.no_progress,
    )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ga, grad, rand = (
        result["ga_maxboxacc_iou50"],
        result["gradient_maxboxacc_iou50"],
        result["random_maxboxacc_iou50"],
    )
    cascade = [stage["spearman"] for stage in result["sanity_cascade"]]
    report: dict[str, Any] = {
        "benchmark": "toy_validity",
        **result,
        "targets": {
            "ga_maxboxacc_iou50_at_least_0.8": ga >= TARGET_GA_IOU50,
            "ga_above_both_baselines": ga > grad and ga > rand,
            "spearman_falls_with_w_randomised": result["sanity_spearman_randomised_w"] < 1.0,
            "spearman_falls_along_cascade": cascade[-1] < cascade[0],
        },
        "weights": str(args.dir or "shipped"),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "wall_seconds": round(wall, 2),
        # CPU seconds / 2: the wall time on two otherwise idle cores (the shared machine's
        # wall time depends on what else runs; read load_average)
        "cpu_seconds_per_2_cores": round(cpu / 2, 2),
        "load_average": list(os.getloadavg()),
    }
    text = json.dumps(_finite(report), indent=2)
    print(text)
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")
        logger.info("written: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
