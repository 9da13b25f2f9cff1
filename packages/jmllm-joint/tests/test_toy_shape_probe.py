"""``benchmarks/toy_shape_probe.py``: the probes docs/toy.md quotes read what they claim to read.

On a few scenes of the shipped toy world: an object's shape is readable from the stock tokens
that cover it (a probe fed another object's tokens, or the wrong patches, reads chance, 0.25),
its colour perfectly, and J's tokens carry no more than the stock ones they imitate.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]


def _probe_module():
    spec = importlib.util.spec_from_file_location(
        "toy_shape_probe", ROOT / "benchmarks" / "toy_shape_probe.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_reads_shapes_and_colours(tmp_path):
    probe = _probe_module()
    out = tmp_path / "probe.json"
    assert probe.main(["--fit-scenes", "300", "--scenes", "60", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    shape, colour = report["shape"], report["colour"]
    assert shape["stock"]["objects"] == shape["joint"]["objects"] >= 100
    assert shape["stock"]["accuracy"] >= 0.85 and shape["owl"]["accuracy"] >= 0.85, shape
    assert colour["stock"]["accuracy"] >= 0.95 and colour["joint"]["accuracy"] >= 0.95
    assert shape["joint"]["accuracy"] <= shape["stock"]["accuracy"] + 0.05
    low, high = shape["stock"]["ci95"]
    assert low <= shape["stock"]["accuracy"] <= high
    sizes = shape["stock"]["by_size"].values()
    assert sum(cell["objects"] for cell in sizes) == shape["stock"]["objects"]


def test_interval_resamples_scenes():
    """Scenes are the bootstrap's unit: one scene of many objects all wrong widens the interval
    far more than if those objects were independent, and the interval holds the accuracy."""
    probe = _probe_module()
    right = np.array([False] * 20 + [True] * 20)
    clustered = probe.accuracy_cell(right, np.array([0] * 20 + list(range(1, 21))), 21)
    spread = probe.accuracy_cell(right, np.arange(40), 40)
    assert clustered["accuracy"] == spread["accuracy"] == 0.5
    for cell in (clustered, spread):
        assert cell["ci95"][0] < 0.5 < cell["ci95"][1]
    width = lambda cell: cell["ci95"][1] - cell["ci95"][0]  # noqa: E731
    assert width(clustered) > 1.5 * width(spread)


def test_fit_probe_learns_a_separable_rule():
    probe = _probe_module()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=generator)
    y = (x[:, 2] > 0).long()
    predict = probe.fit_probe(x, y, steps=300)
    assert float((predict(x) == y).float().mean()) > 0.97
