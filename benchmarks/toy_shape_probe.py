"""Where do the toy world's captions lose an object's shape? Linear probes on its image tokens.

Captions of the toy LLaVA miss mostly by naming a wrong shape for a small object. This script
asks, for each object of a held-out scene, whether a linear classifier can read the object's
shape (and colour) from the image tokens that cover it (each token weighted by the share of
its patch the object covers), in three places:

- ``stock``: the toy LLaVA's own image tokens (what its language model was trained on);
- ``joint``: W(t), J's image tokens, read by the *same* classifier (fitted on stock tokens, as
  the language model was): what J's language model can get from W;
- ``owl``: OWL-ViT's ``t`` itself (CLS dropped), with a classifier fitted on ``t``: what W could
  at best pass on.

Each is reported overall and by object size (the larger side of the object's box, px at 128).
The classifiers are fitted on the objects of train scenes ``0 … --fit-scenes - 1`` and scored on
held-out scenes ``0 … --scenes - 1`` (standardised features, full-batch Adam, seeded).

    python benchmarks/toy_shape_probe.py [--dir DIR] [--fit-scenes 3000] [--scenes 600]
        [--json-out PATH]

It prints JSON (95 % Wilson intervals; objects, not scenes, are the unit); on two cores it
takes under a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIZE_BINS = ((0, 26), (26, 30), (30, 34), (34, 129))


def object_features(model, pool, where: str, batch: int = 100):
    """(features (K, D), shape ids (K,), colour ids (K,), sizes (K,)) of every object of the
    pool's scenes, from the image tokens ``where`` (``stock``, ``joint`` or ``owl``)."""
    from jmllm.joint.toy.scenes import COLOURS, SHAPES

    grid = 8
    coverage = pool.coverage(grid)  # (N, K_max, 64)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(pool), batch):
            emb = model.embed(pool.images(list(range(start, min(start + batch, len(pool))))))
            if where == "stock":
                chunks.append(model.stock_image_tokens(emb))
            elif where == "joint":
                chunks.append(model.image_tokens(emb.t))
            else:
                chunks.append(emb.t[:, -grid * grid :])  # OWL-ViT's patch tokens, CLS dropped
    tokens = torch.cat(chunks)
    feats, shapes, colours, sizes = [], [], [], []
    for b, objects in enumerate(pool.objects):
        for j, obj in enumerate(objects):
            weight = coverage[b, j] / coverage[b, j].sum()
            feats.append((weight[:, None] * tokens[b]).sum(0))
            shapes.append(SHAPES.index(obj.shape))
            colours.append(list(COLOURS).index(obj.colour))
            sizes.append(max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]))
    return torch.stack(feats), torch.tensor(shapes), torch.tensor(colours), np.array(sizes)


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 1500, seed: int = 0):
    """A linear classifier on standardised ``x``; returns a function giving predictions."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    optimizer = torch.optim.Adam(linear.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear((x - mean) / std), y).backward()
        optimizer.step()
    return lambda z: linear((z - mean) / std).argmax(-1)


def wilson(right: np.ndarray, z: float = 1.96) -> list[float]:
    """The 95 % Wilson score interval of a proportion."""
    n, p = len(right), float(right.mean())
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def score(predict, x, y, sizes) -> dict:
    """Accuracy with its 95 % interval and object count, overall and by object size."""
    with torch.no_grad():
        right = (predict(x) == y).numpy()

    def cell(mask: np.ndarray) -> dict:
        part = right[mask]
        return {
            "accuracy": round(float(part.mean()), 4),
            "ci95": wilson(part),
            "objects": len(part),
        }

    by_size = {f"{lo}-{hi - 1}px": cell((sizes >= lo) & (sizes < hi)) for lo, hi in SIZE_BINS}
    return {**cell(np.ones(len(right), dtype=bool)), "by_size": by_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="a toy world (default: shipped)")
    parser.add_argument("--fit-scenes", type=int, default=3000)
    parser.add_argument("--scenes", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from jmllm.joint.toy import load_toy_joint, toy_manifest
    from jmllm.joint.toy.pool import ScenePool

    started = time.perf_counter()
    model = load_toy_joint(args.dir)
    seed = toy_manifest(args.dir)["seed"]
    fit = ScenePool.render("train", args.fit_scenes, seed=seed, progress=False)
    test = ScenePool.render("heldout", args.scenes, seed=seed, progress=False)
    out: dict = {"benchmark": "toy_shape_probe", "fit_scenes": args.fit_scenes,
                 "scenes": args.scenes, "weights": str(args.dir or "shipped")}  # fmt: skip
    stock_fit = object_features(model, fit, "stock")
    owl_fit = object_features(model, fit, "owl")
    tests = {where: object_features(model, test, where) for where in ("stock", "joint", "owl")}
    for target, index in (("shape", 1), ("colour", 2)):
        on_stock = fit_probe(stock_fit[0], stock_fit[index])
        on_owl = fit_probe(owl_fit[0], owl_fit[index])
        out[target] = {
            where: score(on_owl if where == "owl" else on_stock, x[0], x[index], x[3])
            for where, x in tests.items()
        }
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
