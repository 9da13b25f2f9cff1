"""Where do J's captions lose an object? Swap J's image tokens for stock ones, patch by patch.

J's language model reads W(t) where stock LLaVA reads its own image tokens, and J's captions are
right less often than stock LLaVA's (``docs/toy.md``). This script splits the image tokens of
each held-out scene into the patches an object covers and the rest, and captions the scene with
four mixes:

- ``joint``: W(t) on every patch (J as users run it);
- ``stock``: the toy LLaVA's own tokens on every patch (stock LLaVA);
- ``joint_on_objects``: W(t) on the objects' patches, stock tokens on the rest;
- ``joint_on_background``: stock tokens on the objects' patches, W(t) on the rest.

If ``joint_on_objects`` scores like ``joint`` and ``joint_on_background`` like ``stock``, the
captions' loss is W's error on the objects' tokens, not on the background. Beside the captions,
the cosine of W(t) with the stock token and their mean squared error, on object and background
patches.

    python benchmarks/toy_token_swap.py [--dir DIR] [--scenes 300] [--start 1000]
        [--cover 0.1] [--json-out PATH]

A patch is an object's when the object's pixels cover at least ``--cover`` of it
(:meth:`jmllm.joint.toy.pool.ScenePool.coverage`). Captions answer the demo's question in the
``llava-1.5`` template, greedily, as ``explain --tiny`` does
(:mod:`jmllm.joint.toy.default_path`), scored by :func:`jmllm.joint.toy.metrics.caption_correct`.
It prints JSON: each accuracy with its scene count and a 95 % percentile-bootstrap interval over
scenes (``jmllm.joint.faithfulness.stats.bootstrap_interval``), overall and by the number of
objects in the scene; on two cores 300 scenes take about two minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

MIXES = ("joint", "stock", "joint_on_objects", "joint_on_background")


@contextlib.contextmanager
def fed_tokens(model, tokens: torch.Tensor) -> Iterator[None]:
    """While open, ``model`` gives its language model ``tokens`` (B, L, D) as J's image tokens
    (in place of W(t)): ``model.generate(emb, ...)`` then answers from them."""
    model.image_tokens = lambda t: tokens.to(t.device)
    try:
        yield
    finally:
        del model.image_tokens  # the class's method again


def mixes(joint: torch.Tensor, stock: torch.Tensor, on_object: torch.Tensor) -> dict:
    """The four token mixes of :data:`MIXES` from J's ``joint`` and the ``stock`` tokens
    (B, L, D), ``on_object`` (B, L) marking the objects' patches."""
    mask = on_object[..., None]
    return {
        "joint": joint,
        "stock": stock,
        "joint_on_objects": torch.where(mask, joint, stock),
        "joint_on_background": torch.where(mask, stock, joint),
    }


def accuracy_cell(right: np.ndarray) -> dict:
    """Accuracy over scenes (one caption each) with the reports' 95 % interval."""
    from jmllm.joint.faithfulness.stats import bootstrap_interval

    right = np.asarray(right, dtype=np.float64)
    interval = bootstrap_interval(lambda index: right[index].mean(-1), len(right))
    return {
        "accuracy": round(float(right.mean()), 4),
        "ci95": None if interval is None else [round(v, 4) for v in interval],
        "scenes": len(right),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="a toy world (default: shipped)")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--start", type=int, default=1000)
    parser.add_argument("--cover", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not 0.0 < args.cover <= 1.0:
        parser.error(f"--cover: must be in (0, 1], got {args.cover}")
    torch.set_num_threads(args.threads)
    from jmllm.joint.toy import load_toy_joint, toy_manifest
    from jmllm.joint.toy.default_path import MAX_NEW_TOKENS, QUESTION, TEMPLATE
    from jmllm.joint.toy.metrics import caption_correct
    from jmllm.joint.toy.pool import ScenePool

    started = time.perf_counter()
    model = load_toy_joint(args.dir)
    seed = toy_manifest(args.dir)["seed"]
    pool = ScenePool.render("heldout", args.scenes, seed=seed, start=args.start)
    right: dict[str, list[bool]] = {mix: [] for mix in MIXES}
    cosines: dict[str, list[torch.Tensor]] = {"object": [], "background": []}
    errors: dict[str, list[torch.Tensor]] = {"object": [], "background": []}
    objects_per_scene = np.array([len(objs) for objs in pool.objects])
    coverage: torch.Tensor | None = None  # (N, K, grid²), once the grid is known
    for begin in range(0, len(pool), args.batch):
        rows = list(range(begin, min(begin + args.batch, len(pool))))
        emb = model.embed(pool.images(rows))
        with torch.no_grad():
            joint = model.image_tokens(emb.t)
            stock = model.stock_image_tokens(emb).to(joint.dtype)
        grid = math.isqrt(joint.shape[1])
        if grid * grid != joint.shape[1]:
            raise ValueError(f"--dir: {joint.shape[1]} image tokens are not one per patch")
        if coverage is None:
            coverage = pool.coverage(grid)
        on_object = (coverage[rows] >= args.cover).any(1)  # (B, L)
        cosine = torch.nn.functional.cosine_similarity(joint, stock, dim=-1)
        error = ((joint - stock) ** 2).mean(-1)
        for place, where in (("object", on_object), ("background", ~on_object)):
            cosines[place].append(cosine[where])
            errors[place].append(error[where])
        for mix, tokens in mixes(joint, stock, on_object).items():
            with fed_tokens(model, tokens):
                answers = model.generate(
                    emb, QUESTION, max_new_tokens=MAX_NEW_TOKENS, template=TEMPLATE
                )
            right[mix] += [
                caption_correct(a.text, pool.objects[r]) for a, r in zip(answers, rows, strict=True)
            ]
    out: dict = {"benchmark": "toy_token_swap", "scenes": args.scenes, "start": args.start,
                 "cover": args.cover, "weights": str(args.dir or "shipped"),
                 "question": QUESTION, "template": TEMPLATE}  # fmt: skip
    out["tokens"] = {
        place: {
            "patches": int(torch.cat(cosines[place]).numel()),
            "cosine": round(float(torch.cat(cosines[place]).mean()), 4),
            "mse": round(float(torch.cat(errors[place]).mean()), 4),
        }
        for place in cosines
    }
    out["captions"] = {}
    for mix in MIXES:
        hits = np.array(right[mix])
        cell = accuracy_cell(hits)
        cell["by_objects"] = {
            str(k): accuracy_cell(hits[objects_per_scene == k])
            for k in sorted(set(objects_per_scene.tolist()))
        }
        out["captions"][mix] = cell
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
