"""The shipped toy world still does what its manifest says, and the recipe still learns.

The fast tests check the manifest's figures against the recipe's targets (or, where the shipped
world misses one, the floor docs/toy.md documents), then load the weights shipped in the package
and score them on fresh held-out scenes with looser thresholds (a small sample is noisy). The slow test
re-trains the whole recipe briefly; it is off by default: run it with ``--toy-retrain`` or
``JMLLM_TOY_RETRAIN=1`` (see ``conftest.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from jmllm.joint import cli
from jmllm.joint.detection import DEFAULT_NMS_IOU, DEFAULT_THRESHOLD
from jmllm.joint.toy import ToyWorldError, load_toy_joint, toy_manifest, toy_paths
from jmllm.joint.toy.evaluate import answer_scores, detection_ap50
from jmllm.joint.toy.localisation import ga_localisation
from jmllm.joint.toy.metrics import average_precision, caption_accuracy
from jmllm.joint.toy.pool import ScenePool
from jmllm.joint.toy.scenes import CONTENT_QUESTION, SHAPES
from jmllm.joint.toy.train import file_digests

CAPTION_SCENES = 100  # fresh held-out scenes captioned by the fast tests (the manifest: 300)
QA_SCENES = 24  # fresh held-out scenes whose ~12 questions each are asked
DETECTION_SCENES = 40

# The recipe's targets on held-out scenes (None: the recipe sets none), and the floor the shipped
# world is held to where it misses one (docs/toy.md, "What misses its target", says by how much
# and why). (metric path in the manifest, target, shipped floor)
MANIFEST_FLOORS = [
    *((("detection_ap50", s), 0.9, 0.9) for s in ("circle", "square", "triangle", "cross")),
    # issue 19's caption targets (stock 0.97, J 0.95), missed: docs/toy.md says why
    (("caption_accuracy", "llava", "llava-1.5"), 0.97, 0.89),  # shipped: 0.900
    (("caption_accuracy", "llava", "paper"), 0.97, 0.89),  # shipped: 0.890
    (("caption_accuracy", "joint", "llava-1.5"), 0.95, 0.80),  # shipped: 0.807
    (("caption_accuracy", "joint", "paper"), 0.95, 0.80),  # shipped: 0.813
    (("qa_accuracy", "llava", "llava-1.5"), 0.95, 0.95),  # shipped: 0.976
    (("qa_accuracy", "llava", "paper"), 0.95, 0.95),  # shipped: 0.978
    (("qa_accuracy", "joint", "llava-1.5"), None, 0.96),  # shipped: 0.967
    (("qa_accuracy", "joint", "paper"), None, 0.96),  # shipped: 0.970
    # both templates pooled; the authors' long yes/no question answered "Yes"/"No"
    (("qa_by_kind", "llava", "colour"), 0.95, 0.95),  # shipped: 0.993
    (("qa_by_kind", "joint", "colour"), 0.95, 0.95),  # shipped: 0.991
    (("qa_by_kind", "llava", "hallucination"), None, 0.95),  # shipped: 0.974
    (("qa_by_kind", "joint", "hallucination"), None, 0.95),  # shipped: 0.965
]


@pytest.fixture(scope="module")
def toy(toy_joint):
    return toy_joint  # the session's one toy J (conftest)


@pytest.fixture(scope="module")
def heldout():
    # scenes the manifest's evaluation did not use (it scored 0..299), so the check is no replay
    return ScenePool.render("heldout", CAPTION_SCENES, seed=toy_manifest()["seed"], start=5000)


def _first(pool: ScenePool, n: int) -> ScenePool:
    return ScenePool(
        pool.split, pool.seed, pool.pixels[:n], pool.objects[:n], pool.captions[:n],
        pool.questions[:n],
    )  # fmt: skip


def test_shipped_files_are_the_manifests():
    paths = toy_paths()
    manifest = toy_manifest()
    assert manifest["files"] == file_digests(paths.root)  # sha256 and size of every file
    assert manifest["total_bytes"] == sum(f.stat().st_size for f in _weight_files(paths.root))
    assert manifest["total_bytes"] <= 20_000_000
    metrics = manifest["metrics"]
    assert metrics["heldout_scenes"] >= 300
    # the figures the documentation quotes meet the targets, or the documented floors
    for path, target, floor in MANIFEST_FLOORS:
        value = metrics
        for key in path:
            value = value[key]
        assert (target is None or floor <= target) and value >= floor, (path, value, floor)
    # detection_ap50 is the AP of what `jmllm-joint detect` prints by default
    decoding = metrics["detection_decoding"]
    assert decoding["detection_ap50"] == {
        "threshold": DEFAULT_THRESHOLD,
        "nms_iou": DEFAULT_NMS_IOU,
    }
    assert decoding["detection_ap50_no_nms"] == {"threshold": 0.0, "nms_iou": None}


def _weight_files(root):
    return [p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"]


def test_shipped_detector_finds_every_shape(toy, heldout):
    pool = _first(heldout, DETECTION_SCENES)
    ap = detection_ap50(toy, pool)
    assert min(ap.values()) >= 0.8, ap  # measured 0.85-0.99 on these 40 scenes
    # the figure is the AP of the boxes `detect` gives with the command line's defaults
    images = pool.images(range(len(pool)))
    dets = toy.detect(images, list(SHAPES), threshold=DEFAULT_THRESHOLD, nms_iou=DEFAULT_NMS_IOU)
    for q, shape in enumerate(SHAPES):
        predictions = [
            (d.boxes[d.labels == q].numpy(), d.scores[d.labels == q].numpy()) for d in dets
        ]
        truths = [
            np.array([o.box for o in objs if o.shape == shape], dtype=float).reshape(-1, 4)
            for objs in pool.objects
        ]
        assert average_precision(predictions, truths, 0.5) == pytest.approx(ap[shape])
    # every patch's box: the duplicates of each object are false positives, so AP is lower
    raw = detection_ap50(toy, pool, nms_iou=None, threshold=0.0)
    assert all(raw[s] < ap[s] for s in SHAPES), (raw, ap)


def test_shipped_models_caption(toy, heldout):
    emb = toy.embed(heldout.images(range(len(heldout))))
    for vision, template, floor in (
        ("llava", "llava-1.5", 0.82),  # measured 0.87 on these scenes
        ("joint", "llava-1.5", 0.72),  # measured 0.78
        ("joint", "paper", 0.72),  # measured 0.78
    ):
        answers = toy.generate(
            emb, CONTENT_QUESTION, max_new_tokens=24, vision=vision, template=template
        )
        texts = [a.text for a in answers]
        accuracy = caption_accuracy(texts, heldout.objects)
        assert accuracy >= floor, (vision, template, accuracy, texts[:5])


def test_shipped_models_answer(toy, heldout):
    scores = answer_scores(toy, _first(heldout, QA_SCENES), templates=("llava-1.5",))
    qa = scores["qa_accuracy"]
    # measured on the first 40 of these scenes: stock 0.95, J 0.92
    assert qa["llava"]["llava-1.5"] >= 0.9 and qa["joint"]["llava-1.5"] >= 0.87, qa
    # colour questions in the llava-1.5 template, where the toy worlds before 0.2 answered 0.81
    colour = {vision: scores["qa_by_kind"][vision]["colour"] for vision in ("llava", "joint")}
    assert min(colour.values()) >= 0.9, colour
    scores = answer_scores(toy, _first(heldout, 12), visions=("joint",), templates=("paper",))
    assert scores["qa_accuracy"]["joint"]["paper"] >= 0.85, scores["qa_accuracy"]


def test_ga_lands_on_the_named_objects(toy):
    report = ga_localisation(toy, scenes=16, start=5000)
    single = report["caption"]["single_object"]
    at50 = single["maxboxacc_iou50"]
    assert single["objects"] >= 3
    assert at50["ga"] >= 0.6, at50
    assert at50["ga"] > at50["random"] and at50["ga"] >= at50["gradient"], at50
    # destroying W changes the explanation (Adebayo et al.)
    assert report["sanity_spearman_reinit_w"] < 0.8


def test_cli_eval_and_bad_input(tmp_path, capsys, monkeypatch):
    out = tmp_path / "scores.json"
    args = ["toy", "eval", "--scenes", "6", "--ga-scenes", "2", "--json-out", str(out)]
    assert cli.main([*args, "--no-progress"]) == 0
    scores = json.loads(out.read_text())
    assert set(scores["detection_ap50"]) == {"circle", "square", "triangle", "cross"}
    assert "GA MaxBoxAccV2" in capsys.readouterr().out
    assert cli.main(["toy", "eval", "--dir", str(tmp_path / "none")]) == 2
    assert "toy OWL-ViT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # refused by the parser, before any work
        cli.main(["toy", "eval", "--scenes", "0"])
    assert refused.value.code == 2 and "--scenes: must be >= 1" in capsys.readouterr().err
    # an existing toy world is not overwritten by accident
    world = tmp_path / "world"
    shutil.copytree(toy_paths().root, world)
    assert cli.main(["toy", "train", "--out", str(world)]) == 2
    assert "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        cli.main(["toy", "train", "--out", str(tmp_path / "w2"), "--threads", "0"])
    assert refused.value.code == 2 and "--threads: must be >= 1" in capsys.readouterr().err
    with pytest.raises(ToyWorldError):
        toy_paths(tmp_path)
    # training without the jmllm-joint[toy] extra: one line naming it, nothing written
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "datasets" else real_find_spec(name, *a),
    )
    assert cli.main(["toy", "train", "--out", str(tmp_path / "w3")]) == 2
    assert "pip install 'jmllm-joint[toy]'" in capsys.readouterr().err
    assert not (tmp_path / "w3").exists()


def test_retrained_world_loads_from_its_folder(tmp_path):
    """A toy world copied anywhere loads by its folder (W finds the models by name)."""
    shutil.copytree(toy_paths().root, tmp_path / "copy")
    model = load_toy_joint(tmp_path / "copy")
    assert model.alignment.config.source_model == "owlvit"


@pytest.mark.slow
@pytest.mark.timeout(3600)  # minutes on two idle cores; far longer on a shared machine
def test_recipe_still_learns(tmp_path, toy_retrain):
    """A brief re-training of the whole recipe (the real trainers, W through jmllm-align
    train) learns: every loss falls well below where it started, and the output is a toy world
    that loads and answers better than chance."""
    if not toy_retrain:
        pytest.skip("re-training is opt-in: --toy-retrain or JMLLM_TOY_RETRAIN=1")
    from jmllm.joint.toy.train import ToyRecipe, train_toy_world

    manifest = train_toy_world(tmp_path / "world", ToyRecipe.quick(seed=3), progress=False)
    owl, llava, w = (manifest["training"][k] for k in ("owlvit", "llava", "alignment"))
    # the boxes learn; the total is no measure early on: with IoU-aware class targets, the class
    # term *rises* as the boxes improve (a brief run went 6.47 -> 6.18 in total, class 0.20 ->
    # 1.96, box L1 0.30 -> 0.07)
    assert owl["final_losses"]["l1"] < 0.5 * owl["first_losses"]["l1"], owl
    assert llava["final_loss"] < 0.5 * llava["first_loss"], llava
    vision = llava["vision_pretraining"]
    assert vision["final_loss"] < 0.5 * vision["first_loss"], vision
    assert w["eval_mse"] < 0.2 * w["eval_mse_initial"], w
    # count questions: "one"/"two"/"three" in equal thirds; learning shows above that
    assert manifest["metrics"]["qa_by_kind"]["llava"]["count"] > 0.5, manifest["metrics"]
    model = load_toy_joint(tmp_path / "world")
    assert model.alignment.provenance["trainer"] == "jmllm-align train"
    assert os.path.isfile(tmp_path / "world" / "manifest.json")
