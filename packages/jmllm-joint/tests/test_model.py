"""JointModel core: detections equal OWL-ViT's, logits equal LLaVA's, cache equals no cache."""

from __future__ import annotations

import pytest
import torch

from jmllm.align import alignment_config_for, owl_penultimate
from jmllm.align.testing import llava_1_5_7b_config, owlvit_b32_config
from jmllm.joint import (
    Conversation,
    JointEmbedding,
    JointModel,
    JointModelError,
    PromptError,
    check_compatible,
)


def test_embed_shapes_and_sizes(tiny_joint, sample_images):
    emb = tiny_joint.embed(sample_images)
    assert isinstance(emb, JointEmbedding)
    assert emb.t.shape == (3, 1 + 36, 32)
    assert emb.image_sizes == [(64, 64), (64, 64), (120, 48)]
    assert emb.images[2].shape == (3, 48, 120) and emb.images[2].dtype == torch.uint8
    # paths, PIL and uint8 tensors give the same t
    again = tiny_joint.embed([emb.images[2]])
    torch.testing.assert_close(again.t[0], emb.t[2])
    chunked = tiny_joint.embed(sample_images, batch_size=2)
    torch.testing.assert_close(chunked.t, emb.t)


def test_detection_heads_equal_owlvit_forward(tiny_joint, sample_images):
    model = tiny_joint
    queries = ["cat", "bird", "person"]
    emb = model.embed(sample_images)
    pixel_values = model.owl_norm(emb.images)
    texts = [f"a photo of a {q}" for q in queries]
    tokens = model.owl_tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")
    B = len(sample_images)
    with torch.no_grad():
        ref = model.owl(
            input_ids=tokens.input_ids.repeat(B, 1),
            attention_mask=tokens.attention_mask.repeat(B, 1),
            pixel_values=pixel_values,
        )
        t = owl_penultimate(model.owl, pixel_values)
        logits, boxes = model.detection_heads(t, model.encode_queries(queries))
    assert logits.shape == (B, 36, 3) and boxes.shape == (B, 36, 4)
    assert (logits - ref.logits).abs().max() <= 1e-5
    assert (boxes - ref.pred_boxes).abs().max() <= 1e-5
    torch.testing.assert_close(emb.t, t, rtol=0, atol=1e-5)


def test_query_embeddings_are_cached_and_validated(tiny_joint):
    first = tiny_joint.encode_queries(["cat", "dog"])
    assert tiny_joint.encode_queries(["cat", "dog"]) is first
    assert tiny_joint.encode_queries(["dog", "cat"]) is not first
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(2))
    with pytest.raises(PromptError, match="query 1: empty"):
        tiny_joint.encode_queries(["cat", "  "])
    with pytest.raises(PromptError, match="empty list"):
        tiny_joint.encode_queries([])
    with pytest.raises(PromptError, match="at most 16"):
        tiny_joint.encode_queries(["cat " * 20])


def test_stock_vision_path_reproduces_llava_logits(tiny_joint, sample_images):
    model = tiny_joint
    emb = model.embed(sample_images[:1])
    inputs = model.prompt_inputs(["What's the content of the image?"])
    pixel_values = model.llava_norm(emb.images)
    with torch.no_grad():
        ref = model.llava(input_ids=inputs["input_ids"], pixel_values=pixel_values).logits
        ours = model.logits_from_image_tokens(model.stock_image_tokens(emb), inputs["input_ids"])
    assert torch.equal(ours, ref)


def test_joint_logits_use_w_of_t(tiny_joint, sample_images):
    model = tiny_joint
    emb = model.embed(sample_images[:1])
    inputs = model.prompt_inputs("What's in the image?")
    with torch.no_grad():
        joint = model.language_logits(emb.t, **inputs)
        stock = model.logits_from_image_tokens(model.stock_image_tokens(emb), **inputs)
        perturbed = model.language_logits(emb.t + 0.5 * torch.randn_like(emb.t), **inputs)
    n_prompt = inputs["input_ids"].shape[1]
    assert joint.shape == (1, n_prompt, model.llava.config.text_config.vocab_size)
    assert not torch.allclose(joint, stock)
    assert not torch.allclose(joint[:, -1], perturbed[:, -1])
    # the text before the image does not see the image
    torch.testing.assert_close(joint[:, :2], stock[:, :2])


def test_language_logits_and_heads_are_differentiable_in_t(tiny_joint, sample_images):
    model = tiny_joint
    emb = model.embed(sample_images[:1])
    t = emb.t.clone().requires_grad_(True)
    inputs = model.prompt_inputs("What's in the image?")
    logit = model.language_logits(t, **inputs)[0, -1, 5]
    (g_language,) = torch.autograd.grad(logit, t)
    logits, boxes = model.detection_heads(t, model.encode_queries(["cat"]))
    (g_owl,) = torch.autograd.grad(logits[0, 7, 0] + boxes[0, 7, 2], t)
    assert g_language.shape == t.shape and g_language[0, 1:].abs().sum() > 0
    assert g_language[0, 0].abs().sum() == 0  # W drops CLS
    assert g_owl[0, 0].abs().sum() > 0 and g_owl[0, 1 + 7].abs().sum() > 0
    assert torch.isfinite(g_language).all() and torch.isfinite(g_owl).all()


def test_greedy_generation_with_cache_equals_recomputation(tiny_joint, sample_images):
    model = tiny_joint
    emb = model.embed(sample_images[:1])
    (answer,) = model.generate(emb, "What's in the image?", max_new_tokens=6)
    assert answer.tokens == 6 or answer.finished
    ids = answer.prompt_ids.unsqueeze(0)
    recomputed = []
    with torch.no_grad():
        for _ in range(answer.tokens):
            next_id = model.language_logits(emb.t, ids)[0, -1].argmax()
            recomputed.append(int(next_id))
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    assert answer.token_ids.tolist() == recomputed
    # incremental logits with the KV cache match the full no-cache forward
    full_ids = answer.full_ids.unsqueeze(0)
    n_prompt = answer.prompt_ids.numel()
    with torch.no_grad():
        no_cache = model.language_logits(emb.t, full_ids)[0, n_prompt - 1 :]
        embeds = model.merge_image_tokens(full_ids[:, :n_prompt], model.image_tokens(emb.t))
        out = model.llava(inputs_embeds=embeds, use_cache=True)
        steps, cache = [out.logits[0, -1]], out.cache
        for token in answer.token_ids.tolist():
            out = model.llava(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            steps.append(out.logits[0, -1])
            cache = out.cache
    torch.testing.assert_close(torch.stack(steps), no_cache, rtol=1e-4, atol=1e-4)


def test_an_image_token_in_the_answer_is_an_ordinary_token(tiny_joint, sample_images):
    """A model may generate the image-token id; generation fed it back through the token
    embedding, so a teacher-forced forward over prompt + answer (GA, the explorer) must too:
    only the prompt's N placeholders take the image tokens."""
    model = tiny_joint
    emb = model.embed(sample_images[:1])
    prompt = model.prompt_inputs("What's in the image?")["input_ids"]
    image_id = model.llava.config.image_token_id
    answer = [5, image_id, 7, image_id]
    full = torch.cat([prompt, torch.tensor([answer])], dim=1)
    with torch.no_grad():
        forced = model.language_logits(emb.t, full)[0, prompt.shape[1] - 1 :]
        embeds = model.merge_image_tokens(prompt, model.image_tokens(emb.t))
        out = model.llava(inputs_embeds=embeds, use_cache=True)
        steps, cache = [out.logits[0, -1]], out.cache
        for token in answer:
            out = model.llava(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            steps.append(out.logits[0, -1])
            cache = out.cache
    torch.testing.assert_close(torch.stack(steps), forced, rtol=1e-4, atol=1e-4)
    with pytest.raises(JointModelError, match="image tokens per row"):
        model.merge_image_tokens(torch.tensor([[1, image_id, 2]]), model.image_tokens(emb.t))


def test_batched_left_padded_generation_equals_single(tiny_joint, sample_images):
    model = tiny_joint
    emb = model.embed(sample_images[:2])
    prompts = ["What's in the image?", "From one to ten, how likely is the person to be a man?"]
    batch = model.generate(emb, prompts, max_new_tokens=5)
    singles = [model.generate(emb.select(i), prompts[i], max_new_tokens=5)[0] for i in range(2)]
    for got, want in zip(batch, singles, strict=True):
        assert got.token_ids.tolist() == want.token_ids.tolist()
        assert got.prompt_ids.tolist() == want.prompt_ids.tolist()
        assert got.text == want.text


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_joint, sample_images):
    emb = tiny_joint.embed(sample_images[:1])
    state = torch.random.get_rng_state()
    a = tiny_joint.generate(emb, "What's in the image?", 8, do_sample=True, seed=3)[0]
    b = tiny_joint.generate(emb, "What's in the image?", 8, do_sample=True, seed=3)[0]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.token_ids.tolist() == b.token_ids.tolist()
    greedy = tiny_joint.generate(emb, "What's in the image?", 8)[0]
    samples = {
        tuple(
            tiny_joint.generate(emb, "What's in the image?", 8, do_sample=True, seed=s)[
                0
            ].token_ids.tolist()
        )
        for s in range(4)
    }
    assert len(samples | {tuple(greedy.token_ids.tolist())}) > 1


def test_stock_llava_generation_side_by_side(tiny_joint, sample_images):
    emb = tiny_joint.embed(sample_images[:2])
    joint = tiny_joint.generate(emb, "What's in the image?", max_new_tokens=4)
    stock = tiny_joint.generate(emb, "What's in the image?", max_new_tokens=4, vision="llava")
    assert [a.vision for a in joint] == ["joint", "joint"]
    assert [a.vision for a in stock] == ["llava", "llava"]
    assert all(
        a.prompt_ids.tolist() == b.prompt_ids.tolist() for a, b in zip(joint, stock, strict=True)
    )
    with pytest.raises(JointModelError, match="vision"):
        tiny_joint.generate(emb, "hi", vision="clip")


def test_multi_turn_chat_uses_history(tiny_joint, sample_images):
    emb = tiny_joint.embed(sample_images[:1])
    conv = tiny_joint.chat(
        emb, ["What's in the image?", "What colour is the bus?"], max_new_tokens=4
    )
    assert [turn.question for turn in conv.turns] == [
        "What's in the image?",
        "What colour is the bus?",
    ]
    first, second = conv.turns
    assert first.result is not None and second.result is not None
    eos = tiny_joint.tokenizer.eos_token_id
    second_prompt = second.result.prompt_ids.tolist()
    image_id = tiny_joint.llava.config.image_token_id
    assert second_prompt.count(image_id) == 36  # the image only once, in turn 1
    assert eos in second_prompt  # turn 1 closed by </s>
    assert second.result.prompt.endswith("</s>USER: What colour is the bus? ASSISTANT:")
    more = tiny_joint.chat(emb, "Is it raining?", history=conv, max_new_tokens=2)
    assert len(more.turns) == 3 and more.turns[:2] == conv.turns


def test_prompt_validation(tiny_joint, sample_images):
    with pytest.raises(PromptError, match="prompt 1: empty"):
        tiny_joint.prompt_inputs(["hi", "   "])
    with pytest.raises(PromptError, match="<image>"):
        tiny_joint.prompt_inputs(["look: <image>"])
    with pytest.raises(PromptError, match="pending"):
        tiny_joint.prompt_inputs([Conversation().ask("a").answered("b")])
    emb = tiny_joint.embed(sample_images)
    with pytest.raises(JointModelError, match="2 prompts for 3 images"):
        tiny_joint.generate(emb, ["a", "b"], max_new_tokens=1)
    with pytest.raises(PromptError, match="positions"):
        tiny_joint.generate(emb.select(0), "hi", max_new_tokens=10_000)


def test_prompt_inputs_template(tiny_joint):
    inputs = tiny_joint.prompt_inputs(["What's in the image?"])
    ids = inputs["input_ids"][0].tolist()
    image_id = tiny_joint.llava.config.image_token_id
    assert ids.count(image_id) == 36
    text = tiny_joint.tokenizer.decode([i for i in ids if i != image_id])
    assert text.replace(" ", "").startswith("<s>USER:")
    assert text.replace(" ", "").endswith("What'sintheimage?ASSISTANT:")


def test_paper_template_reaches_the_model(tiny_joint, sample_images):
    from jmllm.joint import format_prompt

    image_id = tiny_joint.llava.config.image_token_id
    inputs = tiny_joint.prompt_inputs("What's in the image?", template="paper")
    ids = inputs["input_ids"][0].tolist()
    assert ids.index(image_id) == 1  # right after <s>: the image comes first
    expected = tiny_joint.tokenizer(format_prompt("What's in the image?", template="paper"))
    assert [i for i in ids if i != image_id] == [i for i in expected["input_ids"] if i != image_id]
    answers = {
        name: tiny_joint.generate(
            sample_images[:1], "What's in the image?", max_new_tokens=3, template=name
        )[0]
        for name in ("paper", "llava-1.5")
    }
    assert answers["paper"].prompt == format_prompt("What's in the image?", template="paper")
    assert not torch.equal(answers["paper"].prompt_ids, answers["llava-1.5"].prompt_ids)


def test_real_size_compatibility_on_meta_device():
    owl_config, llava_config = owlvit_b32_config(), llava_1_5_7b_config()
    w_config = alignment_config_for(owl_config, llava_config, "deep-mlp")
    check_compatible(w_config, owl_config, llava_config)
    from transformers import LlavaForConditionalGeneration, OwlViTForObjectDetection

    from jmllm.align import AlignmentConfig, AlignmentLayer

    with torch.device("meta"):
        owl = OwlViTForObjectDetection(owl_config)
        llava = LlavaForConditionalGeneration(llava_config)
        w = AlignmentLayer(w_config)
        model = JointModel(owl, llava, w)
        t = torch.empty(1, 577, 768)
        assert model.image_tokens(t).shape == (1, 576, 4096)
        logits, boxes = model.detection_heads(t, torch.empty(2, 512))
        ids = torch.cat(
            [
                torch.ones(1, 5, dtype=torch.long),
                torch.full((1, 576), 32000),
                torch.ones(1, 7, dtype=torch.long),
            ],
            dim=1,
        )
        # (LLaMA's own forward cannot run on meta tensors; the merge into its inputs can)
        embeds = model.merge_image_tokens(ids, model.image_tokens(t))
    assert logits.shape == (1, 576, 2) and boxes.shape == (1, 576, 4)
    assert embeds.shape == (1, 588, 4096)
    assert model.num_image_tokens == 576
    wrong = AlignmentConfig("deep-mlp", in_dim=1024, out_dim=4096, hidden_dim=8)
    with pytest.raises(
        JointModelError, match="input dimension 1024 != OWL-ViT vision hidden size 768"
    ):
        check_compatible(wrong, owl_config, llava_config)
    wrong = AlignmentConfig("deep-mlp", in_dim=768, out_dim=5120, hidden_dim=8)
    with pytest.raises(
        JointModelError, match="output dimension 5120 != LLaVA text hidden size 4096"
    ):
        check_compatible(wrong, owl_config, llava_config)


def test_one_image_many_prompts_and_embedding_from_t_alone(tiny_joint, sample_images):
    emb = tiny_joint.embed(sample_images[:1])
    prompts = ["What's in the image?", "Is there a bird?"]
    both = tiny_joint.generate(emb, prompts, max_new_tokens=3)
    assert [a.prompt for a in both] == [
        "USER: <image>\nWhat's in the image? ASSISTANT:",
        "USER: <image>\nIs there a bird? ASSISTANT:",
    ]
    bare = JointEmbedding(t=emb.t.clone(), image_sizes=emb.image_sizes)  # e.g. a perturbed t
    again = tiny_joint.generate(bare, prompts[0], max_new_tokens=3)[0]
    assert again.token_ids.tolist() == both[0].token_ids.tolist()
    with pytest.raises(JointModelError, match="needs the images"):
        tiny_joint.generate(bare, prompts[0], max_new_tokens=1, vision="llava")
