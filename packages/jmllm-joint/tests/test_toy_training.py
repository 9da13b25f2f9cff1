"""The pieces of the toy recipe, on small inputs: losses, labels, conversations, features."""

from __future__ import annotations

import random
import re

import pytest
import torch

from jmllm.align import llava_image_tokens
from jmllm.joint.chat import format_prompt
from jmllm.joint.detection import cxcywh_to_xyxy
from jmllm.joint.toy.captioner import (
    CaptionerRecipe,
    encode_conversation,
    patch_labels,
    sample_conversation,
    tower_features,
)
from jmllm.joint.toy.detector import (
    QUERY_NAMES,
    DetectorRecipe,
    _BatchTargets,
    detection_loss,
    match,
    paired_giou,
    paired_iou,
    targets_of,
)
from jmllm.joint.toy.models import ToyDims, new_llava, toy_llava_tokenizer, toy_owl_tokenizer
from jmllm.joint.toy.pool import ScenePool
from jmllm.joint.toy.scenes import (
    COLOURS,
    HALLUCINATION_QUESTION,
    LLAVA_YES_NO,
    QA,
    SHAPES,
    ToyObject,
    make_scene,
    scene_questions,
    with_yes_no,
)

VOCABULARY = set(COLOURS) | set(SHAPES)
SMALL = ToyDims(llava_vision_width=32, llava_vision_layers=2, llm_width=32, llm_layers=1)


def test_paired_iou_and_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 3.0, 2.0]])  # overlap 2 of union 6; hull 6
    assert paired_iou(a, b).item() == pytest.approx(1 / 3)
    assert paired_giou(a, b).item() == pytest.approx(1 / 3)
    far = torch.tensor([[4.0, 0.0, 6.0, 2.0]])  # no overlap, hull 12 of which union 8
    assert paired_iou(a, far).item() == 0.0
    assert paired_giou(a, far).item() == pytest.approx(-4 / 12)


def _scene_targets():
    obj = ToyObject("circle", "red", (32, 32, 64, 64))  # exactly the 4 cells (2,2)..(3,3)
    target = targets_of((obj,), 128)
    coverage = torch.zeros(1, 1, 64)
    coverage[0, 0, [18, 19, 26, 27]] = 1.0
    return obj, target, coverage


def test_matching_and_loss_prefer_the_right_patch_and_box():
    _, target, coverage = _scene_targets()
    recipe = DetectorRecipe()
    boxes = torch.full((1, 64, 4), 0.5)
    boxes[..., 2:] = 0.05
    boxes[0, 27] = target.boxes[0]  # patch 27 (on the object) predicts the true box
    logits = torch.full((1, 64, len(QUERY_NAMES)), -5.0)
    batch = _BatchTargets.stack([target], coverage)
    rows, cols = match(logits, boxes, batch, recipe)[0]
    assert rows.tolist() == [27] and cols.tolist() == [0]
    # IoU-aware targets: patches on the object that box it well should score high
    boxes[0, [18, 19, 26]] = target.boxes[0]
    good = logits.clone()
    for patch in (18, 19, 26, 27):
        good[0, patch, QUERY_NAMES.index("circle")] = 5.0
        good[0, patch, QUERY_NAMES.index("red circle")] = 5.0
    wrong = logits.clone()
    wrong[0, 27, QUERY_NAMES.index("blue square")] = 5.0
    loss_good = detection_loss(good, boxes, [target], coverage, recipe)
    loss_wrong = detection_loss(wrong, boxes, [target], coverage, recipe)
    assert loss_good["class"] < 0.1 * loss_wrong["class"]
    # a patch on the object whose box misses it must not be pushed up
    far = boxes.clone()
    far[0, 18] = torch.tensor([0.9, 0.9, 0.05, 0.05])
    assert detection_loss(good, far, [target], coverage, recipe)["class"] > loss_good["class"]
    assert loss_good["l1"] == pytest.approx(0.0, abs=1e-6)
    moved = boxes.clone()
    moved[0, [18, 19, 26, 27], 0] += 0.1  # whichever patch is matched is now off by 0.1
    assert detection_loss(good, moved, [target], coverage, recipe)["l1"] > 0.09
    # the loss trains boxes and logits: gradients reach both
    boxes_req, logits_req = boxes.clone().requires_grad_(), logits.clone().requires_grad_()
    detection_loss(logits_req, boxes_req, [target], coverage, recipe)["loss"].backward()
    assert boxes_req.grad.abs().sum() > 0 and logits_req.grad.abs().sum() > 0
    assert cxcywh_to_xyxy(target.boxes)[0].tolist() == pytest.approx([0.25, 0.25, 0.5, 0.5])


def test_patch_labels_follow_the_pixels():
    pool = ScenePool.render("heldout", 20, seed=4)
    coverage = pool.coverage(8)
    assert coverage.shape == (20, 3, 64) and float(coverage.max()) <= 1.0
    for objects, cov in zip(pool.objects, coverage, strict=True):
        colours, shapes, centres = patch_labels(objects, cov, 128)
        for j, o in enumerate(objects):
            # a patch covered by an object's pixels lies on its box...
            for c in torch.nonzero(cov[j] > 0).flatten().tolist():
                r, k = divmod(c, 8)
                x0, y0, x1, y1 = o.box
                assert r * 16 < y1 and (r + 1) * 16 > y0 and k * 16 < x1 and (k + 1) * 16 > x0
            # ... and one it mostly covers is labelled with it
            mine = cov[j] >= 0.5
            assert bool(mine.any())  # objects of 22 px or more fill half of some patch
            assert (colours[mine] == list(COLOURS).index(o.colour) + 1).all()
            assert (shapes[mine] == SHAPES.index(o.shape) + 1).all()
            want = torch.tensor(o.centre) / 128
            torch.testing.assert_close(centres[mine], want.expand(int(mine.sum()), 2))
        empty = (cov < 0.1).all(0)
        assert (shapes[empty] == 0).all() and (colours[empty] == 0).all()
        assert torch.isnan(centres[empty]).all()


def test_conversations_never_give_the_answer_away():
    rng = random.Random(0)
    recipe = CaptionerRecipe()
    for i in range(60):
        scene = make_scene("train", i)
        turns = sample_conversation(scene.questions, rng, recipe)
        kinds = [t.kind for t in turns]
        if any(k in ("content", "in_image") for k in kinds):
            assert len(turns) == 1  # a caption answers everything else
        facts = [
            set(re.findall(r"[a-z]+", f"{t.question} {t.answer}".lower())) & VOCABULARY
            for t in turns
        ]
        for a in range(len(facts)):
            for b in range(a + 1, len(facts)):
                assert not facts[a] & facts[b], turns  # no colour or shape asked twice
        assert 1 <= len(turns) <= recipe.max_turns


def test_training_labels_are_the_answers_of_the_prompt_j_uses():
    tok = toy_llava_tokenizer()
    turns = [
        QA("What colour is the circle?", "red", "colour"),
        QA("Is there a cross?", "no", "exists"),
    ]
    for template in ("llava-1.5", "paper"):
        ids, labels = encode_conversation(tok, turns, template, image_tokens=4)
        supervised = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
        assert supervised.replace(" ", "") == "red</s>no</s>"
        # the first turn's prompt is token for token what J sends for the question alone
        prompt = format_prompt(turns[0].question, template=template).replace(
            "<image>", "<image>" * 4
        )
        prompt_ids = tok(prompt)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids


def test_llava_yes_no_recipe_trains_exactly_llavas_capitalised_answers(monkeypatch):
    """``CaptionerRecipe(yes_no=LLAVA_YES_NO)``: the yes/no questions (both forms) are trained
    to "Yes"/"No" — every token of the reply labelled, nothing else — while every other answer
    is untouched, so the authors' parse rule (exact "Yes"/"No") can read the model's replies."""
    objects = [ToyObject("cross", "red", (0, 0, 4, 4))]
    lower = scene_questions(objects)
    upper = [with_yes_no(q, LLAVA_YES_NO) for q in lower]
    changed = {(a.kind, a.answer, b.answer) for a, b in zip(lower, upper, strict=True) if a != b}
    assert changed == {
        ("exists", "yes", "Yes"), ("exists", "no", "No"),
        ("hallucination", "yes", "Yes"), ("hallucination", "no", "No"),
    }  # fmt: skip
    tok = toy_llava_tokenizer(LLAVA_YES_NO)
    for answer in LLAVA_YES_NO:
        turns = [QA(HALLUCINATION_QUESTION.format("cross"), answer, "hallucination")]
        for template in ("llava-1.5", "paper"):
            ids, labels = encode_conversation(tok, turns, template, image_tokens=4)
            supervised = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
            # every token of the reply and nothing of the question ("'yes' or 'no'.")
            assert tok.decode(supervised).strip() == f"{answer}</s>", template
            assert tok.unk_token_id not in supervised

    # and train_captioner asks the recipe's form: every yes/no turn it encodes is Yes or No
    import jmllm.joint.toy.captioner as captioner

    seen: list[QA] = []
    real = captioner.encode_conversation

    def spy(tokenizer, turns, *args):
        seen.extend(turns)
        return real(tokenizer, turns, *args)

    monkeypatch.setattr(captioner, "encode_conversation", spy)
    pool = ScenePool.render("train", 8, seed=0, progress=False)
    recipe = CaptionerRecipe(
        steps=3, vision_steps=0, batch_size=16, warmup_steps=1, yes_no=LLAVA_YES_NO
    )
    captioner.train_captioner(new_llava(SMALL, tok, 0), tok, pool, recipe, progress=False)
    yes_no = [q.answer for q in seen if q.kind in ("exists", "hallucination")]
    assert yes_no and set(yes_no) <= set(LLAVA_YES_NO), yes_no


def test_cached_tower_features_give_llavas_own_image_tokens():
    llava = new_llava(SMALL, toy_llava_tokenizer(), seed=0).eval()
    pixels = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ours = llava.model.multi_modal_projector(tower_features(llava, pixels))
        theirs = llava_image_tokens(llava, pixels)
    torch.testing.assert_close(ours, theirs)


def test_owl_tokenizer_pools_at_end_of_text():
    tok = toy_owl_tokenizer()
    ids = tok("a photo of a red circle")["input_ids"]
    assert ids[-1] == max(tok.get_vocab().values())  # OWL-ViT pools at the argmax id
    assert "<unk>" not in tok.convert_ids_to_tokens(ids)


def test_toy_tokenizers_rebuild_the_shipped_ones() -> None:
    """The recipe's tokenizers (jmllm.align.testing's builders on the toy corpora) are the ones
    the shipped models were trained with: same vocabulary, merges, specials and templates."""
    import json

    from jmllm.joint.toy import toy_paths
    from jmllm.joint.toy.models import toy_llava_tokenizer, toy_owl_tokenizer
    from jmllm.joint.toy.train import ToyRecipe

    paths = toy_paths()
    for tokenizer, folder in (
        (toy_owl_tokenizer(), paths.owl),
        (toy_llava_tokenizer(ToyRecipe().captioner.yes_no), paths.llava),  # as train.py builds it
    ):
        shipped = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        rebuilt = json.loads(tokenizer.backend_tokenizer.to_str())
        for key in ("model", "added_tokens", "post_processor", "pre_tokenizer", "decoder"):
            assert rebuilt[key] == shipped[key], (folder.name, key)
