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

It prints JSON: each accuracy with its object count and a 95 % percentile-bootstrap interval
that resamples scenes (``jmllm.joint.faithfulness.stats.bootstrap_interval``, the reports'
convention); on two cores it takes under a minute. Each pool is embedded once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIZE_BINS = ((0, 26), (26, 30), (30, 34), (34, 129))
PLACES = ("stock", "joint", "owl")


def object_features(model, pool, batch: int = 100) -> dict:
    """Every object of the pool's scenes, from one embedding pass: ``features`` per place
    (``stock``, ``joint``, ``owl``: (K, D), the tokens covering the object weighted by the share
    of each patch it covers), and ``shape``, ``colour`` (K,) ids, ``size`` (K,) in px and
    ``scene`` (K,), the index of the object's scene (the bootstrap's unit)."""
    from jmllm.joint.toy.scenes import COLOURS, SHAPES

    chunks: dict[str, list[torch.Tensor]] = {place: [] for place in PLACES}
    with torch.no_grad():
        for start in range(0, len(pool), batch):
            emb = model.embed(pool.images(list(range(start, min(start + batch, len(pool))))))
            chunks["stock"].append(model.stock_image_tokens(emb))
            chunks["joint"].append(model.image_tokens(emb.t))
            chunks["owl"].append(emb.t[:, 1:])  # OWL-ViT's patch tokens, CLS dropped (as W reads)
    tokens = {place: torch.cat(parts) for place, parts in chunks.items()}
    grid = math.isqrt(tokens["owl"].shape[1])
    if any(t.shape[1] != grid * grid for t in tokens.values()):
        raise ValueError(
            f"--dir: the probe needs one token per patch of OWL-ViT's {grid} x {grid} grid in "
            f"every place; got { ({k: t.shape[1] for k, t in tokens.items()}) } tokens"
        )
    coverage = pool.coverage(grid)  # (N, K_max, grid²)
    weights, rows, labels = [], [], {"shape": [], "colour": [], "size": [], "scene": []}
    for b, objects in enumerate(pool.objects):
        for j, obj in enumerate(objects):
            weights.append(coverage[b, j] / coverage[b, j].sum())
            rows.append(b)
            labels["shape"].append(SHAPES.index(obj.shape))
            labels["colour"].append(list(COLOURS).index(obj.colour))
            labels["size"].append(max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]))
            labels["scene"].append(b)
    weight = torch.stack(weights)  # (K, grid²)
    features = {place: torch.einsum("kp,kpd->kd", weight, t[rows]) for place, t in tokens.items()}
    return {
        "features": features,
        "shape": torch.tensor(labels["shape"]),
        "colour": torch.tensor(labels["colour"]),
        "size": np.array(labels["size"]),
        "scene": np.array(labels["scene"]),
    }


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


def accuracy_cell(right: np.ndarray, scene: np.ndarray, scenes: int) -> dict:
    """Accuracy of the objects ``right`` marks, with the reports' 95 % interval: a percentile
    bootstrap that resamples scenes (the objects of one scene move together)."""
    from jmllm.joint.faithfulness.stats import bootstrap_interval

    hits = np.bincount(scene, weights=right.astype(np.float64), minlength=scenes)
    count = np.bincount(scene, minlength=scenes).astype(np.float64)

    def statistic(index: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return hits[index].sum(-1) / count[index].sum(-1)

    interval = bootstrap_interval(statistic, scenes)
    return {
        "accuracy": round(float(right.mean()), 4),
        "ci95": None if interval is None else [round(v, 4) for v in interval],
        "objects": len(right),
    }


def score(predict, data: dict, place: str, target: str, scenes: int) -> dict:
    """Accuracy with its 95 % interval and object count, overall and by object size."""
    with torch.no_grad():
        right = (predict(data["features"][place]) == data[target]).numpy()
    size, scene = data["size"], data["scene"]
    cells = {"all": np.ones(len(right), dtype=bool)}
    cells |= {f"{lo}-{hi - 1}px": (size >= lo) & (size < hi) for lo, hi in SIZE_BINS}
    out = {k: accuracy_cell(right[m], scene[m], scenes) for k, m in cells.items()}
    return {**out.pop("all"), "by_size": out}


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
    fitted, tested = object_features(model, fit), object_features(model, test)
    for target in ("shape", "colour"):
        on_stock = fit_probe(fitted["features"]["stock"], fitted[target])
        on_owl = fit_probe(fitted["features"]["owl"], fitted[target])
        out[target] = {
            place: score(on_owl if place == "owl" else on_stock, tested, place, target, len(test))
            for place in PLACES
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
