"""Explorer app latency (DESIGN §5): what a person waits for in ``jmllm-joint app``.

On the built-in models (``--tiny``, through the same resolver as every command) on this CPU, the
explorer's steps behind the page's events are timed, pictures included, on a few images:

- ``first_answer_s``: J's first answer to a question, and the detections picture;
- ``first_click_s``: the first word clicked on an (image, queries): the GA gradient norms are
  computed, then one LLM forward/backward and one JVP, then the map, box view and top patches;
- ``further_click_s``: every further word of the same answer (norms cached);
- ``uncached_click_s``: the same further words, each with the norm cache emptied first — the
  baseline timed in the same run; ``speedup`` is its median over the cached median.

``ga_*`` figures are the GA part alone (the rest is drawing the pictures). Target: a further
click in at most 0.5 s (``meets_target``). Figures on a shared machine are noisy: compare the
ratio, and read ``load_average``.

    python benchmarks/app_latency.py [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("app_latency")

TARGET_FURTHER_CLICK_S = 0.5
QUESTION = "What's in the image?"
QUERIES = "house, tree, car"


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p90": float("nan"), "max": float("nan"), "n": 0}
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 4),
        "p90": round(ordered[round(0.9 * (len(ordered) - 1))], 4),
        "max": round(ordered[-1], 4),
        "n": len(ordered),
    }


def _click(explorer: Any, state: Any, index: int) -> tuple[Any, float, float]:
    """One word click as the page runs it: GA, then the pictures and the table.

    Returns the new state, the whole time and the GA part of it."""
    start = time.perf_counter()
    state, view = explorer.explain_word(state, index)
    explorer.word_pictures(state, view.result, "class")
    explorer.top_patches(view.result, "class")
    return state, time.perf_counter() - start, view.seconds


def run(images: int, words: int) -> dict[str, Any]:
    from jmllm.joint.app.explorer import Explorer
    from jmllm.joint.cli import build_parser, load_model
    from jmllm.joint.testing import generated_images

    args = build_parser().parse_args(["app", "--tiny"])  # the built-in models, as the CLI
    start = time.perf_counter()
    model = load_model(args)
    load_s = time.perf_counter() - start
    explorer = Explorer(model)
    folder = Path(tempfile.mkdtemp(prefix="jmllm-app-bench-"))
    first_answer, first_click, further, uncached = [], [], [], []
    ga_first, ga_further, ga_uncached = [], [], []
    for n, picture in enumerate(generated_images(images, size=224, seed=100)):
        path = folder / f"image{n}.png"
        picture.save(path)
        state = explorer.set_queries(explorer.open_image(path), QUERIES)
        start = time.perf_counter()
        state = explorer.ask(state, QUESTION, max_new_tokens=48)
        explorer.detections_picture(state, explorer.detect(state))
        first_answer.append(time.perf_counter() - start)
        count = min(words + 1, len(explorer.words(state)))
        if count < 2:
            logger.warning("image %d: the answer has %d word(s); skipped", n, count)
            continue
        answered = state
        for index in range(count):
            state, seconds, ga_seconds = _click(explorer, state, index)
            (first_click if index == 0 else further).append(seconds)
            (ga_first if index == 0 else ga_further).append(ga_seconds)
        for index in range(1, count):  # the baseline: the same words, norms not cached
            explorer.ga.clear_cache()
            _, seconds, ga_seconds = _click(explorer, dataclasses.replace(answered), index)
            uncached.append(seconds)
            ga_uncached.append(ga_seconds)
    further_s, uncached_s = _summary(further), _summary(uncached)
    return {
        "models": model.sources,
        "image_patches": int(model.num_image_tokens),
        "load_s": round(load_s, 3),
        "images": images,
        "first_answer_s": _summary(first_answer),
        "first_click_s": _summary(first_click),
        "further_click_s": further_s,
        "uncached_click_s": uncached_s,
        "speedup": round(uncached_s["median"] / further_s["median"], 2) if further else None,
        "ga_first_click_s": _summary(ga_first),
        "ga_further_click_s": _summary(ga_further),
        "ga_uncached_click_s": _summary(ga_uncached),
        "target_further_click_s": TARGET_FURTHER_CLICK_S,
        "meets_target": bool(further) and further_s["median"] <= TARGET_FURTHER_CLICK_S,
    }


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one image, three further words")
    parser.add_argument("--images", type=int, default=None, help="images (default 3)")
    parser.add_argument("--words", type=int, default=None, help="further words per image (6)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--json-out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    images = args.images if args.images is not None else (1 if args.quick else 3)
    words = args.words if args.words is not None else (3 if args.quick else 6)
    if images < 1 or words < 1:
        parser.error("--images and --words must be at least 1")
    report: dict[str, Any] = {
        "benchmark": "app_latency",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    logger.info("explorer latency: %d image(s), %d further words each...", images, words)
    report.update(run(images, words))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        _write_atomic(Path(args.json_out), text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
