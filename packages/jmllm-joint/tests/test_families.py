"""Every MLLM family behind one J: each public entry point on a tiny checkpoint of each family.

The fixture ``family_joint`` loads, in turn, a tiny J of every supported family through
``JointModel.from_pretrained`` (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL).
The references are the models' own code paths: the stock forward with the model's own image
inputs, ``generate`` against teacher forcing, GA against one autograd call per output with the
token's gradient taken through transformers' own image injection (``mm_encoder_outputs``).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from jmllm.joint import GradientAlignment, JointModel, JointModelError
from jmllm.joint.app.explorer import Explorer
from jmllm.joint.audit import AuditSettings, YesNoAuditor, ask_one_by_one
from jmllm.joint.hallucination import check_hallucinations
from jmllm.joint.model.families import FAMILIES
from jmllm.joint.saliency import naive_owl_gradients
from jmllm.joint.testing import TINY_FAMILIES, build_tiny_family_joint, generated_images
from jmllm.joint.wsol import run_wsol

QUESTION = "What's in the image?"
ANSWER = "The image shows a bird"
TEMPLATES = {  # the chat format each family is prompted in by default
    "llava": "llava-1.5",
    "llava_next": "llava-next-mistral",
    "llava_onevision": "llava-onevision",
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2-vl",
}


def _family(model: JointModel) -> str:
    assert model.family is not None
    return model.family.model_type


def _stock_forward(model: JointModel, emb, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's own forward: its processor-shaped image inputs, its own injection."""
    extra = {}
    if _family(model).startswith("qwen"):
        extra["mm_token_type_ids"] = model.placeholders(input_ids).int()
    return model.mllm(input_ids=input_ids, **model.stock_inputs(emb), **extra).logits


def test_every_family_has_an_adapter_and_a_tiny_checkpoint():
    assert set(FAMILIES) == set(TINY_FAMILIES)
    assert set(FAMILIES) == {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"}


def test_the_family_comes_from_the_config(family_joint, sample_images):
    model = family_joint
    family = _family(model)
    layout = model.family.layout
    g = layout.grid[0]
    # image tokens in the prompt, counted by hand from each family's rules
    expected = {
        "llava": g * g,
        "llava_next": g * g + (2 * g) * (2 * g + 1),  # base + 2x2 crops, a newline per row
        "llava_onevision": g * g + (2 * g) * (2 * g + 1),
        "qwen2_vl": 24 * 24,
        "qwen2_5_vl": 24 * 24,
    }[family]
    assert model.num_image_tokens == expected
    ids = model.prompt_inputs(QUESTION)["input_ids"]
    assert int((ids == model.family.image_token_id).sum()) == expected
    assert model.image_tokens(model.embed(sample_images[:1]).t).shape[1] == expected
    # LLaVA-1.5's two formats by name; every other family its own chat format for both
    paper = "paper" if family == "llava" else TEMPLATES[family]
    assert model.conversation_template("paper").name == paper
    assert model.conversation_template("llava-1.5").name == TEMPLATES[family]
    assert model.conversation_template("qwen2-vl").name == "qwen2-vl"  # a named one: as named


def test_stock_vision_through_js_slot_gives_the_models_own_logits(family_joint, sample_images):
    """Point 4's identity path: the MLLM's own vision tokens fed through W's slot (J's merge,
    J's positions) give exactly the logits of the model's own forward."""
    model = family_joint
    emb = model.embed(sample_images[:2])
    ids = model.prompt_inputs([QUESTION, "Is there a cat?"])  # the second row is left-padded
    with torch.no_grad():
        ours = model.logits_from_image_tokens(model.stock_image_tokens(emb), **ids)
        keep = ids["attention_mask"][1].bool()
        one = ids["input_ids"][1][keep].unsqueeze(0)
        mine = model.logits_from_image_tokens(model.stock_image_tokens(emb.select(1)), one)
        assert torch.equal(mine, _stock_forward(model, emb.select(1), one))  # bit for bit
    # left padding changes nothing of the real tokens' logits
    torch.testing.assert_close(ours[1][keep], mine[0], rtol=1e-4, atol=1e-4)


def test_generation_equals_teacher_forcing_and_batches_equal_singles(family_joint, sample_images):
    model = family_joint
    emb = model.embed(sample_images[:2])
    prompts = [QUESTION, "Is there a cat in the image? Only answer yes or no."]
    batch = model.generate(emb, prompts, max_new_tokens=4)
    single = model.generate(emb.select(1), prompts[1], max_new_tokens=4)[0]
    assert batch[1].token_ids.tolist() == single.token_ids.tolist()  # left-padded row
    assert {a.template for a in batch} == {TEMPLATES[_family(model)]}
    answer = batch[0]
    ids = answer.prompt_ids.unsqueeze(0)
    with torch.no_grad():
        for token in answer.token_ids.tolist():  # the cached decode equals teacher forcing
            assert int(model.language_logits(emb.t[:1], ids)[0, -1].argmax()) == token
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    stock = model.generate(emb.select(0), prompts[0], max_new_tokens=3, vision="stock")[0]
    assert stock.vision == "stock" and stock.tokens >= 1


def test_chat_keeps_the_history_in_the_familys_format(family_joint, sample_images):
    model = family_joint
    conversation = model.chat(
        model.embed(sample_images[:1]), [QUESTION, "And the colour?"], max_new_tokens=3
    )
    first, second = (turn.result for turn in conversation.turns)
    assert first is not None and second is not None
    assert second.prompt.startswith(first.prompt)  # the second prompt holds the first turn
    assert first.text in second.prompt and second.template == TEMPLATES[_family(model)]
    # one image per conversation: the placeholders are the first turn's only
    n = int((second.prompt_ids == model.family.image_token_id).sum())
    assert n >= model.num_image_tokens


def test_detections_equal_stock_owlvit(family_joint, sample_images):
    model = family_joint
    emb = model.embed(sample_images[:1])
    queries = model.encode_queries(["cat", "dog"])
    with torch.no_grad():
        logits, boxes = model.detection_heads(emb.t, queries)
        pixels = model.owl_norm(emb.images, model.device)
        ids = model.owl_tokenizer(
            ["a photo of a cat", "a photo of a dog"],
            padding="max_length",
            max_length=16,
            return_tensors="pt",
        )
        stock = model.owl(pixel_values=pixels, **ids)
    torch.testing.assert_close(logits, stock.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(boxes, stock.pred_boxes, rtol=1e-4, atol=1e-4)
    detections = model.detect(emb, ["cat", "dog"], threshold=0.0)[0]
    assert len(detections.to_records()) > 0


def _reference_g_llm(model: JointModel, t: torch.Tensor, ids: torch.Tensor, rows, cols):
    """∂ (sum of the answer tokens' logits) / ∂ t through transformers' own image injection."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = t.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        tokens = model.image_tokens(t)  # (1, L, D)
        extra = {}
        if _family(model).startswith("qwen"):
            extra = {
                "mm_token_type_ids": model.placeholders(ids).int(),
                "image_grid_thw": model.family.grid_thw(1, ids.device),  # type: ignore[attr-defined]
            }
        pooled = BaseModelOutputWithPooling(pooler_output=tuple(tokens))
        logits = model.mllm(input_ids=ids, mm_encoder_outputs={"image": pooled}, **extra).logits
        score = logits[0, rows, cols].sum()
        (grad,) = torch.autograd.grad(score, t)
    return grad


def test_ga_equals_the_naive_loop_through_the_models_own_injection(family_joint, sample_images):
    model = family_joint
    ga = GradientAlignment(model)
    emb = model.embed(sample_images[:1])
    res = ga.attribute(emb, QUESTION, target=-1, queries=["bird", "cat"], answer=ANSWER)
    prompt = model.prompt_inputs(QUESTION)["input_ids"][0]
    answer = torch.tensor(model.tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
    assert not bool((answer == model.family.image_token_id).any())
    ids = torch.cat([prompt, answer]).unsqueeze(0)
    positions = [token.position for token in res.tokens]
    rows = [prompt.numel() + p - 1 for p in positions]
    g_ref = _reference_g_llm(model, emb.t, ids, rows, answer[positions])
    N = model.owl_grid[0] ** 2  # OWL-ViT's patches, whatever the family's grids
    assert res.norms.shape == (N, 2 + 4)
    # one autograd call per output, on a sample (test_saliency checks every output)
    sample = [(0, 0), (7, 1), (N // 2, 2), (N - 1, 3), (11, 4), (N - 2, 5)]
    queries = model.encode_queries(["bird", "cat"])
    norms, nums = naive_owl_gradients(model.owl, emb.t, queries, sample, g_ref)
    assert nums is not None
    fast_norms = torch.stack([res.norms[k, c] for k, c in sample])
    fast_nums = torch.stack([res.numerators[k, c] for k, c in sample])
    torch.testing.assert_close(fast_norms, norms, rtol=1e-4, atol=1e-6)
    scale = float(res.numerators.abs().max())
    assert float((fast_nums - nums).abs().max()) <= 1e-4 * scale
    assert res.g_llm_norm == pytest.approx(float(g_ref.norm()), rel=1e-4)
    for name in ("class", "coord", "any", "gradient"):
        m = res.maps[name]
        assert np.isfinite(m).all() and m.shape == (64, 64)


def test_hallucination_view(family_joint, sample_images):
    report = check_hallucinations(
        family_joint,
        sample_images[0],
        QUESTION,
        answer="A cat and a dog.",
        objects=["cat", "dog", "car"],
    )
    assert sorted(report.objects) == ["cat", "dog"]
    for check in report.objects.values():
        assert check.mentioned and np.isfinite(check.score) and check.ga is not None
        assert np.isfinite(check.ga.map("class")).all()


def test_audit_fast_path_equals_the_per_question_loop(family_joint):
    """The audit's shared, cached prefix (Qwen: its M-RoPE offset kept by the model) answers as
    the authors' loop does, token for token."""
    model = family_joint
    settings = AuditSettings(max_new_tokens=3)
    classes = ["cat", "teddy bear"]
    auditor = YesNoAuditor(model, settings, classes, batch_size=2)
    template = "paper" if _family(model) == "llava" else TEMPLATES[_family(model)]
    image = generated_images(1, size=64, seed=21)[0]
    emb = model.embed([image], preprocessing=settings.preprocessing)  # as the loop embeds it
    fast = auditor.ask(emb.t, classes, return_logits=True)
    slow = ask_one_by_one(model, image, classes, settings, return_logits=True)
    for f, s in zip(fast, slow, strict=True):
        assert f.answer.token_ids.tolist() == s.answer.token_ids.tolist()
        assert f.answer.prompt == s.answer.prompt and f.answer.template == template
        torch.testing.assert_close(f.first_token_logits, s.first_token_logits, atol=1e-4, rtol=1e-4)


def test_wsol_scores_every_family(family_joint, tmp_path, sample_images):
    root = tmp_path / "cub"
    (root / "images" / "001.Bird").mkdir(parents=True)
    rows = ["image_id,x0,y0,x1,y1"]
    for i, image in enumerate(sample_images[:1]):
        name = f"001.Bird/bird_{i}.png"
        image.save(root / "images" / name)
        w, h = image.size
        rows.append(f"{name},{w // 4},{h // 4},{3 * w // 4},{3 * h // 4}")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    report = run_wsol(family_joint, root, progress=False, samples=0)
    assert report.num_images == 1 and set(report.results) == {"ga", "gradient"}
    assert all(0.0 <= r.value <= 100.0 for r in report.results.values())


def test_explorer_app_flow(family_joint, tmp_path, sample_images):
    path = tmp_path / "image.png"
    sample_images[0].save(path)
    explorer = Explorer(family_joint)
    state = explorer.ask(explorer.open_image(path), QUESTION, max_new_tokens=6)
    state = explorer.set_queries(state, "cat, dog")
    state, view = explorer.explain_word(state, 0)
    assert np.isfinite(view.result.map("class")).all()
    state = explorer.hallucinations(state)
    assert "<html" in explorer.report_html(state).lower()


def test_bfloat16_answers_and_explains(family_joint, tiny_joint_paths, sample_images):
    family = _family(family_joint)
    paths = build_tiny_family_joint(tiny_joint_paths.root, family)
    model = JointModel.from_pretrained(
        paths.owl, paths.llava, paths.alignment, device="cpu", dtype=torch.bfloat16
    )
    emb = model.embed(sample_images[:1])
    assert emb.t.dtype == torch.bfloat16
    answer = model.generate(emb, QUESTION, max_new_tokens=3)[0]
    assert answer.tokens >= 1
    res = GradientAlignment(model).attribute(emb, QUESTION, -1, ["bird"], answer=ANSWER)
    assert res.numerators.dtype == torch.float32 and bool(torch.isfinite(res.numerators).all())
    # bf16 follows float32 (random tiny weights: loose, but the wrong image would be far off)
    with torch.no_grad():
        ids = family_joint.prompt_inputs(QUESTION)["input_ids"]
        full = family_joint.language_logits(family_joint.embed(sample_images[:1]).t, ids)[0, -1]
        half = model.language_logits(emb.t, ids)[0, -1].float()
    assert torch.nn.functional.cosine_similarity(full, half, dim=0) > 0.98


def test_cli_chat_and_describe_take_any_family(family_joint, tiny_joint_paths, tmp_path, capsys):
    from jmllm.joint import cli

    paths = build_tiny_family_joint(tiny_joint_paths.root, _family(family_joint))
    image = tmp_path / "in.png"
    generated_images(1, size=48, seed=3)[0].save(image)
    models = ["--owl", str(paths.owl), "--llava", str(paths.llava)]
    models += ["--alignment", str(paths.alignment), "--device", "cpu"]
    out = tmp_path / "chat"
    args = ["chat", str(image), *models, "-p", QUESTION, "--max-new-tokens", "3"]
    assert cli.main([*args, "--out", str(out)]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["conversation"][0]["question"] == QUESTION
    assert record["template"] == TEMPLATES[_family(family_joint)]  # the one J prompted with
    assert cli.main(["describe", str(image), *models, "--max-new-tokens", "2"]) == 0
    capsys.readouterr()


def test_a_w_of_another_family_is_refused_in_one_line(tiny_joint_paths):
    llava_w = tiny_joint_paths.alignment
    qwen = build_tiny_family_joint(tiny_joint_paths.root, "qwen2_vl")
    with pytest.raises(JointModelError) as info:
        JointModel.from_pretrained(qwen.owl, qwen.llava, llava_w, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "trained for the 'llava' family" in message and "'qwen2_vl'" in message


def test_an_unsupported_family_is_refused_with_the_supported_ones(tiny_joint_paths, tmp_path):
    from transformers import AutoConfig

    folder = tmp_path / "blip"
    AutoConfig.for_model("blip-2").save_pretrained(folder)
    with pytest.raises(JointModelError) as info:
        JointModel.from_pretrained(
            tiny_joint_paths.owl, folder, tiny_joint_paths.alignment, device="cpu"
        )
    message = str(info.value)
    assert "\n" not in message and "'blip-2' is not a supported" in message
    assert "llava, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl" in message


def test_embedding_from_t_alone_answers_like_the_image(family_joint, sample_images):
    model = family_joint
    emb = model.embed(sample_images[:1])
    bare = dataclasses.replace(emb, images=[])
    a = model.generate(emb, QUESTION, max_new_tokens=3)[0]
    b = model.generate(bare, QUESTION, max_new_tokens=3)[0]
    assert a.token_ids.tolist() == b.token_ids.tolist()
