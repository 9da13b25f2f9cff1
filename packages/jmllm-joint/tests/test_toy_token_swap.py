"""``benchmarks/toy_token_swap.py``: the token mixes docs/toy.md quotes are what they claim.

Feeding W(t) through the swap gives J's own answers and feeding the stock tokens gives stock
LLaVA's (``generate(vision="stock")``), so the mixes in between are J and stock LLaVA patch by
patch; the report counts every scene and every patch once.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from jmllm.joint.toy import load_toy_joint
from jmllm.joint.toy.default_path import MAX_NEW_TOKENS, QUESTION
from jmllm.joint.toy.scenes import make_scene

ROOT = Path(__file__).resolve().parents[3]


def _swap_module():
    spec = importlib.util.spec_from_file_location(
        "toy_token_swap", ROOT / "benchmarks" / "toy_token_swap.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fed_tokens_reproduce_j_and_stock_llava():
    swap = _swap_module()
    model = load_toy_joint()
    emb = model.embed([make_scene("heldout", i).image for i in (1000, 1001, 1003, 1007)])
    with torch.no_grad():
        joint = model.image_tokens(emb.t)
        stock = model.stock_image_tokens(emb)

    def texts(**kwargs):
        return [a.text for a in model.generate(emb, QUESTION, MAX_NEW_TOKENS, **kwargs)]

    as_j, as_stock = texts(), texts(vision="stock")
    assert as_j != as_stock  # the scenes tell the two apart (else the test proves nothing)
    with swap.fed_tokens(model, joint):
        assert texts() == as_j
    with swap.fed_tokens(model, stock):
        assert texts() == as_stock
    assert "image_tokens" not in vars(model)  # the method is J's own again
    assert texts() == as_j


def test_mixes_take_each_patch_from_its_side():
    swap = _swap_module()
    joint, stock = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    on_object = torch.tensor([[True, False, False, True], [False] * 4])
    mixed = swap.mixes(joint, stock, on_object)
    assert set(mixed) == set(swap.MIXES)
    assert mixed["joint_on_objects"][..., 0].tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]
    assert mixed["joint_on_background"][..., 0].tolist() == [[1, 0, 0, 1], [0, 0, 0, 0]]


def test_report_counts_every_scene_and_patch(tmp_path):
    swap = _swap_module()
    out = tmp_path / "swap.json"
    assert swap.main(["--scenes", "6", "--batch", "4", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sum(place["patches"] for place in report["tokens"].values()) == 6 * 64
    assert report["tokens"]["object"]["patches"] > 0
    # W(t) imitates the stock tokens closely on the background, less so on the objects
    assert report["tokens"]["background"]["cosine"] > report["tokens"]["object"]["cosine"]
    for cell in report["captions"].values():
        assert cell["scenes"] == 6
        assert sum(c["scenes"] for c in cell["by_objects"].values()) == 6
        if cell["ci95"] is not None:
            assert cell["ci95"][0] <= cell["accuracy"] <= cell["ci95"][1]
