"""GA saliency: the fast exact method against the naive autograd loop, the API, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jmllm.joint.saliency import (
    GAError,
    GradientAlignment,
    OwlHeadGradients,
    answer_tokens,
    cosine_similarities,
    naive_owl_gradients,
    normalise_similarities,
    owl_outputs_reference,
    paint_boxes,
    patch_grid_map,
    resolve_target,
)

QUESTION = "What's in the image?"
ANSWER = "The image shows a bird"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1e-12)).max())


@pytest.fixture(scope="module")
def eager_owl(tiny_joint_paths):
    """The tiny J's OWL-ViT loaded with eager attention (the brief's reference)."""
    from transformers import OwlViTForObjectDetection

    owl = OwlViTForObjectDetection.from_pretrained(
        tiny_joint_paths.owl, attn_implementation="eager"
    )
    return owl.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_t(tiny_joint, sample_images):
    return tiny_joint.embed(sample_images[:1]).t


def test_reexpressed_forward_equals_module_forward(tiny_joint, eager_owl, tiny_t):
    queries = tiny_joint.encode_queries(["bird", "cat"])
    heads = OwlHeadGradients(eager_owl, tiny_t, queries)
    reference = owl_outputs_reference(eager_owl, tiny_t, queries)
    torch.testing.assert_close(heads.outputs(), reference, rtol=1e-5, atol=1e-5)
    # and J's own detection heads (sdpa attention) give the same logits and boxes
    logits, boxes = tiny_joint.detection_heads(tiny_t, queries)
    torch.testing.assert_close(heads.outputs()[:, :2], logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(heads.boxes(), boxes[0], rtol=1e-4, atol=1e-5)


def test_every_output_equals_naive_on_tiny(tiny_joint, eager_owl, tiny_t):
    queries = tiny_joint.encode_queries(["bird"])
    heads = OwlHeadGradients(eager_owl, tiny_t, queries)
    g_llm = torch.randn(tiny_t.shape, generator=torch.Generator().manual_seed(3))
    fast_norms = heads.gradient_norms(chunk_size=7)  # a chunk size that does not divide N
    fast_nums = heads.numerators(g_llm)
    naive_norms, naive_nums = naive_owl_gradients(eager_owl, tiny_t, queries, None, g_llm)
    assert naive_nums is not None
    N, C = fast_norms.shape
    assert (N, C) == (36, 5)
    assert _rel(fast_norms, naive_norms.view(N, C)) < 1e-4
    scale = naive_nums.abs().max()
    assert float((fast_nums - naive_nums.view(N, C)).abs().max() / scale) < 1e-4
    # the cosines, the quantity GA reports, agree too
    cos_fast = cosine_similarities(fast_nums, fast_norms, g_llm.norm())
    cos_naive = cosine_similarities(naive_nums.view(N, C), naive_norms.view(N, C), g_llm.norm())
    torch.testing.assert_close(cos_fast, cos_naive, rtol=1e-4, atol=1e-5)
    # a subset of patches, in any order, gives the same rows
    sub = heads.gradient_norms(patches=[35, 0, 17])
    torch.testing.assert_close(sub, fast_norms[[35, 0, 17]])


@pytest.mark.slow
def test_sampled_outputs_equal_naive_on_b32_shapes():
    """OWL-ViT B/32 shapes (768 px, patch 32, hidden 768, 12 heads, 24×24 grid), random weights.

    Only the last vision layer matters for GA (t is the input), so the model is built with two
    vision layers and one text layer to keep the test short; every GA-relevant shape is B/32.
    Randomly initialised heads are badly conditioned (logits ~1e4), so float32 rounding alone
    moves the *naive* norms by ~1e-4: the algorithm is checked in float64 (exact to 1e-9), and
    the float32 fast result against that float64 truth.
    """
    from transformers import OwlViTForObjectDetection

    from jmllm.align.testing import owlvit_b32_config

    config = owlvit_b32_config()
    config.vision_config.num_hidden_layers = 2
    config.text_config.num_hidden_layers = 1
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    owl = OwlViTForObjectDetection(config).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(1, 577, 768, generator=gen)
    queries = torch.randn(1, 512, generator=gen)
    g_llm = torch.randn(1, 577, 768, generator=gen)
    sample = [(0, 0), (300, 2), (575, 4), (123, 1)]
    patches, channels = [k for k, _ in sample], torch.tensor([c for _, c in sample])

    def fast(model, dtype):
        heads = OwlHeadGradients(model, t.to(dtype), queries.to(dtype))
        norms = heads.gradient_norms(patches=patches)[torch.arange(len(sample)), channels]
        nums = heads.numerators(g_llm.to(dtype))
        return norms, torch.stack([nums[k, c] for k, c in sample])

    fast32_norms, fast32_nums = fast(owl, torch.float32)
    owl = owl.double()
    fast64_norms, fast64_nums = fast(owl, torch.float64)
    naive_norms, naive_nums = naive_owl_gradients(
        owl, t.double(), queries.double(), sample, g_llm.double()
    )
    assert naive_nums is not None
    assert _rel(fast64_norms, naive_norms) < 1e-9
    assert _rel(fast64_nums, naive_nums) < 1e-9
    assert _rel(fast32_norms.double(), naive_norms) < 1e-3
    assert float((fast32_nums.double() - naive_nums).abs().max() / naive_nums.abs().max()) < 1e-4


def test_attribute_word_result(tiny_joint, sample_images):
    ga = GradientAlignment(tiny_joint)
    image = sample_images[2]  # 120 × 48, not square
    res = ga.attribute(image, QUESTION, target="bird", queries=["bird", "cat"], answer=ANSWER)
    assert res.target == "bird" and [t.text.strip() for t in res.tokens] == ["bird"]
    N = tiny_joint.num_image_tokens
    assert res.similarities.shape == (N, 6) and res.channels[-4:] == ["cx", "cy", "w", "h"]
    for name in ("class", "coord", "any", "gradient"):
        m = res.maps[name]
        assert m.shape == (48, 120) and m.dtype == np.float32
        assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1
    assert (res.maps["any"] >= res.maps["class"] - 1e-6).all()
    assert (res.maps["any"] >= res.maps["coord"] - 1e-6).all()
    # the norms are those of the naive gradients (a sample; every output is checked above)
    sample = [(0, 0), (17, 1), (35, 5), (20, 3)]
    naive_norms, _ = naive_owl_gradients(
        tiny_joint.owl,
        tiny_joint.embed([image]).t,
        tiny_joint.encode_queries(["bird", "cat"]),
        sample,
    )
    assert _rel(torch.stack([res.norms[k, c] for k, c in sample]), naive_norms) < 1e-4
    norm_class = res.normalised[:, :2]
    assert float(norm_class.min()) == 0.0 and float(norm_class.max()) == pytest.approx(1.0)


def test_position_target_and_t_input(tiny_joint, tiny_t):
    ga = GradientAlignment(tiny_joint)
    by_word = ga.attribute(tiny_t, QUESTION, target="shows", queries=["bird"], answer=ANSWER)
    pos = by_word.tokens[0].position
    by_pos = ga.attribute(tiny_t, QUESTION, target=pos, queries=["bird"], answer=ANSWER)
    torch.testing.assert_close(by_pos.numerators, by_word.numerators)
    size = tiny_joint.owl.config.vision_config.image_size
    assert by_pos.maps["class"].shape == (size, size)  # from t alone: OWL-ViT's input size


def test_multi_token_word_sums_its_token_logits(tiny_joint, tiny_t):
    tok = tiny_joint.tokenizer
    word = next(
        w
        for w in ["zebrafish", "xylophone", "quokka", "gizmo"]
        if len(tok(w, add_special_tokens=False)["input_ids"]) > 1
    )
    answer = f"The image shows a {word}"
    ga = GradientAlignment(tiny_joint)
    res = ga.attribute(tiny_t, QUESTION, target=word, queries=["bird"], answer=answer)
    assert len(res.tokens) > 1 and res.target == word
    parts = [
        ga.attribute(tiny_t, QUESTION, target=t.position, queries=["bird"], answer=answer)
        for t in res.tokens
    ]
    torch.testing.assert_close(
        res.numerators, sum(p.numerators for p in parts), rtol=1e-4, atol=1e-6
    )


def test_position_list_target_sums_words_and_is_labelled_by_its_span(tiny_joint, tiny_t):
    answer = "The image shows a traffic light"
    ga = GradientAlignment(tiny_joint)
    words = [
        ga.attribute(tiny_t, QUESTION, target=w, queries=["bird"], answer=answer)
        for w in ("traffic", "light")
    ]
    positions = [t.position for r in words for t in r.tokens]
    both = ga.attribute(tiny_t, QUESTION, target=positions, queries=["bird"], answer=answer)
    assert both.target == "traffic light"
    assert [t.position for t in both.tokens] == sorted(positions)
    torch.testing.assert_close(
        both.numerators, words[0].numerators + words[1].numerators, rtol=1e-4, atol=1e-6
    )
    # negative positions name the same tokens; duplicates count once
    n = len(tiny_joint.tokenizer(answer, add_special_tokens=False)["input_ids"])
    again = ga.attribute(
        tiny_t,
        QUESTION,
        target=[p - n for p in positions] + positions[:1],
        queries=["bird"],
        answer=answer,
    )
    torch.testing.assert_close(again.numerators, both.numerators)
    with pytest.raises(GAError, match="non-empty"):
        ga.attribute(tiny_t, QUESTION, target=[], queries=["bird"], answer=answer)
    with pytest.raises(GAError, match=r"positions \[99\] are outside"):
        ga.attribute(tiny_t, QUESTION, target=[0, 99], queries=["bird"], answer=answer)
    with pytest.raises(GAError, match="only integers"):
        ga.attribute(tiny_t, QUESTION, target=[0, "a"], queries=["bird"], answer=answer)


def test_explain_answer_computes_norms_once(tiny_joint, sample_images, monkeypatch):
    calls = {"norms": 0, "jvp": 0, "grad": 0, "forward": 0}
    t_shape = tuple(tiny_joint.embed(sample_images[:1]).t.shape)
    real_norms = OwlHeadGradients.gradient_norms
    real_nums = OwlHeadGradients.numerators
    real_grad = torch.autograd.grad

    def count_norms(self, *a, **k):
        calls["norms"] += 1
        return real_norms(self, *a, **k)

    def count_nums(self, *a, **k):
        calls["jvp"] += 1
        return real_nums(self, *a, **k)

    def count_grad(outputs, inputs, *a, **k):
        # torch.func also calls autograd.grad internally: count only backwards into t
        calls["grad"] += tuple(getattr(inputs, "shape", ())) == t_shape
        return real_grad(outputs, inputs, *a, **k)

    real_logits = type(tiny_joint).language_logits

    def count_forward(self, *a, **k):
        calls["forward"] += 1
        return real_logits(self, *a, **k)

    monkeypatch.setattr(OwlHeadGradients, "gradient_norms", count_norms)
    monkeypatch.setattr(OwlHeadGradients, "numerators", count_nums)
    monkeypatch.setattr(torch.autograd, "grad", count_grad)
    monkeypatch.setattr(type(tiny_joint), "language_logits", count_forward)
    ga = GradientAlignment(tiny_joint)
    exp = ga.explain_answer(sample_images[0], QUESTION, ["bird"], answer=ANSWER)
    A = len(exp.tokens)
    assert A >= 5 and len(exp.token_results) == A
    # one norm computation, one LLM forward; per token one LLM backward and one JVP
    assert calls == {"norms": 1, "jvp": A, "grad": A, "forward": 1}
    # words reuse the token terms; each equals the single-target attribution
    bird = next(r for r in exp.word_results if r.target == "bird")
    single = GradientAlignment(tiny_joint).attribute(
        sample_images[0], QUESTION, "bird", ["bird"], answer=ANSWER
    )
    torch.testing.assert_close(bird.similarities, single.similarities, rtol=1e-4, atol=1e-5)


def test_generated_answer(tiny_joint, tiny_t):
    exp = GradientAlignment(tiny_joint).explain_answer(tiny_t, QUESTION, ["cat"], max_new_tokens=4)
    assert 1 <= len(exp.tokens) <= 4
    assert all(np.isfinite(r.maps["class"]).all() for r in exp.token_results)


def test_zero_gradient_gives_zero_maps_not_nan(tiny_joint, tiny_t):
    ga = GradientAlignment(tiny_joint)
    size = (40, 30)
    prepared = ga.prepare(tiny_t, size, ["bird"], "a photo of a {}")
    zero = torch.zeros_like(tiny_t)
    res = ga._result(prepared, zero, prepared.heads.numerators(zero), [], "#0", "")
    assert torch.isfinite(res.similarities).all() and float(res.similarities.abs().max()) == 0
    for m in res.maps.values():
        assert np.isfinite(m).all() and float(m.max()) == 0.0
    const = normalise_similarities(torch.full((4, 5), 0.3), 1)
    assert torch.equal(const, torch.zeros(4, 5))


def test_bad_targets_and_inputs(tiny_joint, tiny_t, sample_images):
    ga = GradientAlignment(tiny_joint)
    with pytest.raises(GAError, match=r"zebra.*'The', 'image', 'shows', 'a', 'bird'"):
        ga.attribute(tiny_t, QUESTION, "zebra", ["bird"], answer=ANSWER)
    with pytest.raises(GAError, match="position 99 is outside"):
        ga.attribute(tiny_t, QUESTION, 99, ["bird"], answer=ANSWER)
    with pytest.raises(GAError, match="answer: is empty"):
        ga.attribute(tiny_t, QUESTION, 0, ["bird"], answer="")
    with pytest.raises(GAError, match="t: expected shape"):
        ga.attribute(tiny_t[:, :10], QUESTION, 0, ["bird"], answer=ANSWER)
    with pytest.raises(GAError, match="NaN"):
        ga.attribute(tiny_t * float("nan"), QUESTION, 0, ["bird"], answer=ANSWER)
    with pytest.raises(GAError, match="one image at a time"):
        ga.attribute(tiny_joint.embed(sample_images[:2]), QUESTION, 0, ["bird"], answer=ANSWER)
    with pytest.raises(ValueError, match="empty"):
        ga.attribute(tiny_t, QUESTION, 0, [""], answer=ANSWER)
    with pytest.raises(GAError, match="target"):
        resolve_target(True, "a b", [], 0)


def test_token_spans_cover_the_answer(tiny_joint):
    ids = tiny_joint.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    text, tokens = answer_tokens(tiny_joint.tokenizer, ids)
    assert "".join(t.text for t in tokens) == text
    assert [t.position for t in tokens] == list(range(len(ids)))


def test_paint_boxes_is_pixelwise_max():
    boxes = np.array([[0, 0, 6, 4], [2, 1, 8, 5], [9, 9, 9, 9]])  # the last box is empty
    canvas = paint_boxes(np.array([0.5, 0.2, 1.0]), boxes, (10, 6))
    assert canvas.shape == (6, 10)
    assert canvas[0, 0] == 0.5 and canvas[2, 3] == 0.5 and canvas[4, 7] == pytest.approx(0.2)
    assert canvas[5, 9] == 0 and canvas.max() == 0.5
    grid = patch_grid_map(torch.tensor([0.0, 1.0, 2.0, 3.0]), (4, 2))  # 2×2 grid on 4×2 px
    np.testing.assert_allclose(grid, [[0, 0, 1 / 3, 1 / 3], [2 / 3, 2 / 3, 1, 1]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# OWLv2 as the vision side: its objectness head is one more channel
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def owlv2_t(owlv2_joint, sample_images):
    return owlv2_joint.embed(sample_images[2:3]).t  # the non-square image: padded by OWLv2


def test_every_output_equals_naive_on_tiny_owlv2(owlv2_joint, owlv2_t):
    """The fast exact GA (row-restricted backward for the norms, one JVP for the numerators)
    equals one autograd call per output on OWLv2 too: Q class channels, 4 box channels (with its
    box bias) and the objectness channel."""
    queries = owlv2_joint.encode_queries(["bird", "cat"])
    heads = OwlHeadGradients(owlv2_joint.owl, owlv2_t, queries)
    reference = owl_outputs_reference(owlv2_joint.owl, owlv2_t, queries)
    torch.testing.assert_close(heads.outputs(), reference, rtol=1e-5, atol=1e-5)
    out = owlv2_joint.detection_outputs(owlv2_t, queries)
    assert out.objectness is not None
    torch.testing.assert_close(heads.outputs()[:, -1], out.objectness[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(heads.boxes(), out.boxes[0], rtol=1e-4, atol=1e-5)
    g_llm = torch.randn(owlv2_t.shape, generator=torch.Generator().manual_seed(3))
    fast_norms = heads.gradient_norms(chunk_size=5)
    fast_nums = heads.numerators(g_llm)
    naive_norms, naive_nums = naive_owl_gradients(owlv2_joint.owl, owlv2_t, queries, None, g_llm)
    assert naive_nums is not None
    N, C = fast_norms.shape
    assert (N, C) == (64, 2 + 4 + 1)
    assert _rel(fast_norms, naive_norms.view(N, C)) < 1e-4
    scale = naive_nums.abs().max()
    assert float((fast_nums - naive_nums.view(N, C)).abs().max() / scale) < 1e-4


def test_ga_end_to_end_with_owlv2_and_its_objectness_channel(owlv2_joint, sample_images):
    ga = GradientAlignment(owlv2_joint, class_query="objectness")
    emb = owlv2_joint.embed(sample_images[2:3])
    res = ga.attribute(emb, QUESTION, -1, ["bird", "cat"], answer=ANSWER)
    assert res.channels == ["bird", "cat", "cx", "cy", "w", "h", "objectness"]
    assert res.similarities.shape == (64, 7) and res.normalised.shape == (64, 7)
    torch.testing.assert_close(res.weights("class"), res.normalised[:, 6])
    torch.testing.assert_close(res.weights("coord"), res.normalised[:, 2:6].max(-1).values)
    assert res.maps["class"].shape == (48, 120) and np.isfinite(res.maps["any"]).all()
    # the gradient baseline: OWLv2's 8x8 grid covers the 120x120 padded square, so the image
    # shows its top 3.2 rows of patches
    assert res.pads_to_square
    expected = patch_grid_map(res.patch_gradient_norms, (120, 48), pads_to_square=True)
    np.testing.assert_array_equal(res.map("gradient"), expected)
    top = np.asarray(patch_grid_map(res.patch_gradient_norms, (120, 120)))[:48]
    np.testing.assert_array_equal(res.map("gradient"), top)  # the square, cropped
    # OWLv2's boxes come back from its padded square to the image: equal to J's detections
    dets = owlv2_joint.detect(emb, ["bird", "cat"], threshold=0.0)[0]
    width, height = emb.image_sizes[0]
    xyxy = torch.stack(
        [
            (res.boxes[:, 0] - res.boxes[:, 2] / 2) * width,
            (res.boxes[:, 1] - res.boxes[:, 3] / 2) * height,
            (res.boxes[:, 0] + res.boxes[:, 2] / 2) * width,
            (res.boxes[:, 1] + res.boxes[:, 3] / 2) * height,
        ],
        dim=1,
    )
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    torch.testing.assert_close(xyxy[dets.patches], dets.boxes, rtol=0, atol=1e-3)
    # the default (matching) is unchanged by the extra channel
    plain = GradientAlignment(owlv2_joint).attribute(emb, QUESTION, -1, ["bird"], answer=ANSWER)
    assert plain.class_query == "matching" and plain.channel() == 0


def test_objectness_is_refused_with_owlvit_in_one_line(tiny_joint, tiny_t):
    with pytest.raises(GAError, match="objectness") as info:
        GradientAlignment(tiny_joint, class_query="objectness")
    assert "\n" not in str(info.value)
    res = GradientAlignment(tiny_joint).attribute(tiny_t, QUESTION, -1, ["bird"], answer=ANSWER)
    assert res.channels == ["bird", "cx", "cy", "w", "h"]
    with pytest.raises(ValueError, match="OWL-ViT has none"):
        res.weights("class", "objectness")
