"""The toy world's second family: a toy Qwen2-VL trained by the toy LLaVA's recipe.

The fast tests build the recipe's model and run one training step of each stage on a few scenes;
the end-to-end run (``toy train --family qwen2_vl --quick``: train, load J, generate, GA) is
opt-in, as the LLaVA recipe's: ``--toy-retrain`` or ``JMLLM_TOY_RETRAIN=1`` (``conftest.py``).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from jmllm.joint.toy.captioner import (
    CaptionerRecipe,
    encode_conversation,
    num_image_tokens,
    sample_conversation,
    train_captioner,
)
from jmllm.joint.toy.pool import ScenePool
from jmllm.joint.toy.qwen import QwenDims, new_qwen, toy_qwen_tokenizer
from jmllm.joint.toy.scenes import make_scene


@pytest.fixture(scope="module")
def tokenizer():
    return toy_qwen_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return new_qwen(QwenDims(), tokenizer, 0)


def test_the_toy_qwen_is_a_qwen2_vl_on_the_toy_grid(tokenizer, model):
    """The real class, its tokens on the toy OWL-ViT's 8 × 8 grid, J's adapter for it."""
    from jmllm.joint.model.families import adapter_for

    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert num_image_tokens(model) == 64
    adapter = adapter_for(model)
    assert adapter.model_type == "qwen2_vl"
    assert adapter.layout.side == 128  # the scene as it is: 8 × 8 patches of 16 px
    # one id per toy word and per chat special
    assert tokenizer.convert_ids_to_tokens(tokenizer("a red circle").input_ids) == [
        "▁a",
        "▁red",
        "▁circle",
    ]


def test_qwen_conversations_label_only_the_answers(tokenizer, model):
    """In the qwen2-vl format, the labels are each answer and the <|im_end|> closing it."""
    from jmllm.joint.model.families import adapter_for

    adapter = adapter_for(model)
    scene = make_scene("train", 3)
    turns = sample_conversation(scene.questions, random.Random(1), CaptionerRecipe())
    ids, labels = encode_conversation(
        tokenizer, turns, "qwen2-vl", 64, adapter.image_text(tokenizer)
    )
    assert ids.count(model.config.image_token_id) == 64
    labelled = [i for i, label in zip(ids, labels, strict=True) if label != -100]
    expected = "".join(f"{qa.answer}<|im_end|>" for qa in turns)
    assert tokenizer.decode(labelled).replace(" ", "") == expected.replace(" ", "")


def test_one_step_of_each_stage_runs(tokenizer, model):
    """Dense tower pre-training and conversation training (M-RoPE inputs from J's adapter)."""
    pool = ScenePool.render("train", 4, seed=0, progress=False)
    recipe = CaptionerRecipe(steps=1, vision_steps=1, batch_size=2, warmup_steps=1)
    stats = train_captioner(model, tokenizer, pool, recipe, progress=False)
    assert stats["first_loss"] > 0 and stats["vision_pretraining"]["first_loss"] > 0
    assert all(p.requires_grad for p in model.model.visual.parameters())  # unfrozen after


@pytest.mark.slow
@pytest.mark.timeout(3600)  # minutes on two idle cores; far longer on a shared machine
def test_qwen_recipe_end_to_end(tmp_path, toy_retrain):
    """``toy train --family qwen2_vl --quick``: the losses fall, the toy world loads as a Qwen2-VL
    J beside the shipped toy OWL-ViT, answers, and GA explains its answer."""
    if not toy_retrain:
        pytest.skip("re-training is opt-in: --toy-retrain or JMLLM_TOY_RETRAIN=1")
    from jmllm.align.files import OUTPUTS_RECORD
    from jmllm.joint import cli
    from jmllm.joint.saliency import GradientAlignment
    from jmllm.joint.toy import load_toy_joint, toy_manifest, toy_paths
    from jmllm.joint.toy.scenes import SHAPES

    out = tmp_path / "world"
    argv = ["toy", "train", "--family", "qwen2_vl", "--quick", "--out", str(out), "--seed", "3"]
    assert cli.main([*argv, "--no-progress"]) == 0
    manifest = toy_manifest(out)
    assert manifest["family"] == "qwen2_vl" and "--family qwen2_vl" in manifest["command"]
    assert sorted(p.name for p in out.iterdir()) == [
        OUTPUTS_RECORD,  # what the command wrote there (--force replaces only those)
        "alignment.safetensors",
        "manifest.json",
        "owlvit",
        "qwen2_vl",
    ]
    qwen, w = manifest["training"]["qwen2_vl"], manifest["training"]["alignment"]
    assert qwen["final_loss"] < 0.5 * qwen["first_loss"], qwen
    vision = qwen["vision_pretraining"]
    assert vision["final_loss"] < 0.5 * vision["first_loss"], vision
    assert w["eval_mse"] < 0.5 * w["eval_mse_initial"], w
    # the shipped toy OWL-ViT, byte for byte
    shipped = toy_manifest()["files"]
    for name, digest in manifest["files"].items():
        if name.startswith("owlvit/"):
            assert digest == shipped[name], name

    model = load_toy_joint(out)
    assert model.family.model_type == "qwen2_vl" and toy_paths(out).family == "qwen2_vl"
    assert model.alignment.config.target_model == "qwen2_vl"
    emb = model.embed(make_scene("heldout", 0).image)
    question = "What's the content of the image?"
    answer = model.generate(emb, question)[0].text
    words = [w.strip(".,") for w in answer.split()]
    assert words, answer
    # GA explains a word of J's answer against the four shape queries (a brief run's answer
    # may be wrong; the map is what is checked)
    result = GradientAlignment(model).attribute(
        emb, question, words[-1], list(SHAPES), answer=answer
    )
    saliency = result.map("class")
    assert saliency.shape == (128, 128) and np.isfinite(saliency).all() and saliency.max() > 0
    assert cli.main(["toy", "eval", "--dir", str(out), "--scenes", "4", "--ga-scenes", "0"]) == 0


def test_the_toy_llava_recipe_keeps_llava_1_5s_templates() -> None:
    """Adding families' templates must not reach the toy LLaVA: it trains and is scored in the
    templates its shipped manifest was scored in (llava-1.5, paper), not every family's."""
    import inspect

    from jmllm.joint.toy import toy_manifest
    from jmllm.joint.toy.captioner import TEMPLATES
    from jmllm.joint.toy.evaluate import answer_scores

    shipped = tuple(toy_manifest()["metrics"]["caption_accuracy"]["joint"])
    default = inspect.signature(answer_scores).parameters["templates"].default
    assert tuple(TEMPLATES) == shipped == tuple(default)


def test_default_path_records_the_format_a_qwen_j_prompts_in(tokenizer, model):
    """The default-path report of a Qwen2-VL J says ``qwen2-vl``, the format J prompted in (its
    interactive default, ``llava-1.5``, maps to the family's own), not the name it was asked
    for."""
    from jmllm.align import AlignmentLayer, alignment_config_for
    from jmllm.joint import JointModel
    from jmllm.joint.toy import load_toy_joint
    from jmllm.joint.toy.default_path import TEMPLATE, default_path_localisation

    toy = load_toy_joint()
    w = AlignmentLayer(
        alignment_config_for(toy.owl.config, model.config, "deep-mlp", hidden_dim=32)
    )
    joint = JointModel(
        toy.owl, model.eval(), w, tokenizer=tokenizer, owl_tokenizer=toy.owl_tokenizer
    )
    report = default_path_localisation(joint, scenes=1, start=1000)
    assert report["setting"]["template"] == "qwen2-vl"
    assert toy.conversation_template(TEMPLATE).name == "llava-1.5"  # a LLaVA J keeps the name


def test_the_qwen_towers_centre_target_moves_with_the_scene():
    """The toy Qwen2-VL's tower (2-D RoPE, no absolute position) regresses each patch's offset
    to its object's centre: moving the object by one patch moves the targets with it, equal
    patch for patch, where the absolute centres differ."""
    import torch

    from jmllm.joint.toy.captioner import patch_labels, relative_centres
    from jmllm.joint.toy.scenes import ToyObject

    grid, size = 8, 128

    def targets(dx: int) -> tuple[torch.Tensor, torch.Tensor]:
        box = (16 + 16 * dx, 16, 48 + 16 * dx, 48)  # covers cells (1..2 + dx, 1..2)
        coverage = torch.zeros(1, grid * grid)
        for row in (1, 2):
            for col in (1 + dx, 2 + dx):
                coverage[0, row * grid + col] = 1.0
        _, _, centres = patch_labels((ToyObject("circle", "red", box),), coverage, size)
        return centres, relative_centres(centres, grid)

    (absolute, offsets), (moved_absolute, moved_offsets) = targets(0), targets(1)
    cells = [9, 10, 17, 18]
    moved = [c + 1 for c in cells]
    assert torch.equal(offsets[cells], moved_offsets[moved])
    assert not torch.equal(absolute[cells], moved_absolute[moved])
    assert torch.isnan(offsets[0]).all()  # background stays unlabelled


def test_toy_train_runs_the_familys_recipe(tmp_path, monkeypatch):
    """``toy train --family qwen2_vl`` trains the toy Qwen2-VL's tower for QWEN_VISION_STEPS
    and its language model with QWEN_TOKEN_NOISE, and is otherwise the toy LLaVA's recipe;
    ``--family llava`` is the shipped recipe as is (no noise)."""
    import dataclasses

    from jmllm.joint import cli
    from jmllm.joint.toy import toy_manifest
    from jmllm.joint.toy import train as toy_train

    seen = {}

    def fake_train(out, recipe, progress=True, *, force=False, family="llava"):
        seen[family] = recipe
        return toy_manifest()  # the shipped world's scores, for the command to print

    monkeypatch.setattr(toy_train, "train_toy_world", fake_train)
    for family in ("llava", "qwen2_vl"):
        out = tmp_path / family
        assert cli.main(["toy", "train", "--family", family, "--out", str(out), "--seed", "2"]) == 0
    llava, qwen = seen["llava"], seen["qwen2_vl"]
    assert llava == toy_train.ToyRecipe(seed=2, threads=2)
    assert qwen.captioner.vision_steps == toy_train.QWEN_VISION_STEPS > llava.captioner.vision_steps
    assert qwen.captioner.token_noise == toy_train.QWEN_TOKEN_NOISE > llava.captioner.token_noise
    # the steps and yes/no its documented figures were measured with (docs/toy.md)
    assert (qwen.captioner.steps, qwen.captioner.yes_no) == (2500, ("yes", "no"))
    assert (llava.captioner.steps, llava.captioner.yes_no) == (3000, ("Yes", "No"))
    same = dataclasses.replace(
        qwen.captioner,
        steps=llava.captioner.steps,
        vision_steps=llava.captioner.vision_steps,
        token_noise=llava.captioner.token_noise,
        yes_no=llava.captioner.yes_no,
    )
    assert same == llava.captioner and qwen.seed == 2
