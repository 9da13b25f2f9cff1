"""OWLv2 as J's vision side: loading, its padded-square pixels, ``t``, and detections (class
logits, boxes with its box bias, objectness) equal to stock ``Owlv2ForObjectDetection``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from jmllm.joint import JointModel
from jmllm.joint.model.base import JointModelError
from jmllm.joint.testing import TINY_FAMILIES, TinyJoint, build_tiny_owlv2_joint, generated_images

QUERIES = ["cat", "dog", "a red ball"]
TEMPLATE = "a photo of a {}"


@pytest.fixture(scope="session")
def stock(owlv2_paths: TinyJoint):
    from transformers import AutoProcessor, Owlv2ForObjectDetection

    model = Owlv2ForObjectDetection.from_pretrained(owlv2_paths.owl).eval()
    return model, AutoProcessor.from_pretrained(owlv2_paths.owl)


def _images() -> list[Image.Image]:
    square, wide = generated_images(2, size=64, seed=5)
    tall = Image.fromarray((np.random.RandomState(3).rand(150, 70, 3) * 255).astype(np.uint8))
    return [square, wide.resize((200, 90)), tall]


def test_owlv2_is_picked_from_its_config(owlv2_joint: JointModel):
    assert type(owlv2_joint.owl).__name__ == "Owlv2ForObjectDetection"
    assert owlv2_joint.pads_to_square and owlv2_joint.owl_grid == (8, 8)
    # the 8x8 grid is resampled onto the tiny LLaVA's 6x6
    emb = owlv2_joint.embed(_images()[:1])
    assert emb.t.shape == (1, 65, 32)
    assert owlv2_joint.image_tokens(emb.t).shape == (1, 36, 48)


def test_owlvit_is_unchanged(tiny_joint: JointModel):
    assert not tiny_joint.pads_to_square
    emb = tiny_joint.embed(_images()[:1])
    out = tiny_joint.detection_outputs(emb.t, tiny_joint.encode_queries(["cat"]))
    assert out.objectness is None
    dets = tiny_joint.detect(emb, ["cat"], threshold=0.0)[0]
    assert dets.objectness is None and "objectness" not in dets.to_records()[0]


def test_other_detectors_are_refused_in_one_line(tmp_path, owlv2_paths: TinyJoint):
    from transformers import CLIPVisionConfig

    CLIPVisionConfig().save_pretrained(tmp_path)
    with pytest.raises(JointModelError, match=r"not 'owlvit' or 'owlv2'") as info:
        JointModel.detector(tmp_path, device="cpu")
    assert "\n" not in str(info.value)


def test_embed_feeds_exactly_the_stock_processors_pixels(owlv2_joint: JointModel, stock):
    model, processor = stock
    images = _images()
    emb = owlv2_joint.embed(images)
    for i, image in enumerate(images):
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        ours = owlv2_joint.owl_norm([emb.images[i]], "cpu", "exif")
        assert torch.equal(ours, pixels)
        with torch.no_grad():
            hidden = model.owlv2.vision_model(pixels, output_hidden_states=True).hidden_states
        torch.testing.assert_close(emb.t[i : i + 1], hidden[-2], rtol=0, atol=1e-5)


def test_detections_equal_stock_owlv2(owlv2_joint: JointModel, stock):
    """Class logits, boxes (with OWLv2's box bias) and objectness logits from ``t`` equal the
    stock forward on the same image, float32, within 1e-5; the boxes in pixels equal the
    processor's post-processing (scaled by the padded square's side)."""
    model, processor = stock
    images = _images()
    emb = owlv2_joint.embed(images)
    queries = owlv2_joint.encode_queries(QUERIES, TEMPLATE)
    texts = [TEMPLATE.format(q) for q in QUERIES]
    for i, image in enumerate(images):
        inputs = processor(text=[texts], images=image, return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
            ours = owlv2_joint.detection_outputs(emb.t[i : i + 1], queries)
        assert ours.objectness is not None
        torch.testing.assert_close(ours.class_logits, out.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.boxes, out.pred_boxes, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.objectness, out.objectness_logits, rtol=0, atol=1e-5)
        width, height = image.size
        (post,) = processor.image_processor.post_process_object_detection(
            out, threshold=0.0, target_sizes=[(height, width)]
        )
        dets = owlv2_joint.detect(emb.select(i), QUERIES, threshold=0.0, template=TEMPLATE)[0]
        expected = post["boxes"][dets.patches]  # the stock boxes of the same patches
        expected[:, 0::2] = expected[:, 0::2].clamp(0, width)  # J clips to the image
        expected[:, 1::2] = expected[:, 1::2].clamp(0, height)
        torch.testing.assert_close(dets.boxes, expected, rtol=0, atol=1e-3)
        torch.testing.assert_close(dets.scores, post["scores"][dets.patches], rtol=0, atol=1e-6)
        torch.testing.assert_close(
            dets.objectness,
            torch.sigmoid(out.objectness_logits[0, dets.patches]),
            rtol=0,
            atol=1e-6,
        )
        assert set(dets.to_records()[0]) == {"label", "score", "box", "patch", "objectness"}


def test_objectness_is_differentiable_in_t(owlv2_joint: JointModel):
    emb = owlv2_joint.embed(_images()[:1])
    t = emb.t.clone().requires_grad_(True)
    out = owlv2_joint.detection_outputs(t, owlv2_joint.encode_queries(["cat"]))
    assert out.objectness is not None
    (grad,) = torch.autograd.grad(out.objectness[0, 5], t)
    assert grad.abs().sum() > 0


def test_detector_alone_loads_owlv2(owlv2_paths: TinyJoint, owlv2_joint: JointModel):
    det = JointModel.detector(owlv2_paths.owl, device="cpu")
    assert not det.has_language and det.pads_to_square
    emb = det.embed(_images()[1:2])
    torch.testing.assert_close(emb.t, owlv2_joint.embed(_images()[1:2]).t)


def test_w_fits_owlv2_base_and_llava_published_shapes():
    """OWLv2 base/16 (960 px, 60x60 grid, 768 wide) with LLaVA-1.5-7b: W's widths are 768 ->
    4096 and its inputs are OWLv2's 60x60 patches resampled onto LLaVA's 24x24."""
    from jmllm.align import alignment_config_for, encoder_dims
    from jmllm.align.testing import llava_1_5_7b_config, owlv2_base_config
    from jmllm.joint.model.base import check_compatible

    owl, llava = owlv2_base_config(), llava_1_5_7b_config()
    vision = owl.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (960, 16, 768)
    assert (vision.num_hidden_layers, vision.num_attention_heads) == (12, 12)
    assert (owl.text_config.hidden_size, owl.projection_dim) == (512, 512)
    dims = encoder_dims(owl, llava)
    assert (dims.in_dim, dims.out_dim, dims.num_tokens) == (768, 4096, 576)
    assert dims.source_grid == (60, 60) and dims.target_grid == (24, 24) and dims.resampled
    check_compatible(alignment_config_for(owl, llava), owl, llava)  # passes silently


def test_resampling_owlv2_grid_onto_llava_is_a_box_filter():
    """60x60 -> 24x24: each target cell averages the source cells it covers (2.5 per axis,
    sampled 3 times), so a constant grid stays constant and a smooth ramp stays monotone."""
    from jmllm.align.families import resample_patches, vision_family
    from jmllm.align.testing import llava_1_5_7b_config

    layout = vision_family(llava_1_5_7b_config()).layout
    const = torch.full((1, 3600, 2), 3.0)
    torch.testing.assert_close(
        resample_patches(const, (60, 60), layout), torch.full((1, 576, 2), 3.0)
    )
    ramp = torch.arange(60.0).repeat(60).view(1, 3600, 1)  # x coordinate of each patch
    out = resample_patches(ramp, (60, 60), layout).view(24, 24)
    assert bool((out[:, 1:] > out[:, :-1]).all()) and out[0, 0] < 2.0 and out[0, -1] > 57.0


@pytest.mark.slow
def test_owlv2_base_published_shape_detections_equal_stock(real_shapes):
    """OWLv2 base/16 at its published widths and 960 px input (60x60 patches), one text layer
    and two vision layers (which decide no shape), random weights: J's ``t`` and detections
    (class logits, boxes, objectness) equal stock ``Owlv2ForObjectDetection``'s."""
    from transformers import Owlv2ForObjectDetection, Owlv2ImageProcessor

    from jmllm.align.testing import calibrate_owl_heads, owlv2_base_config, tiny_owl_tokenizer

    config = owlv2_base_config()
    config.vision_config.num_hidden_layers = 2
    config.text_config.num_hidden_layers = 1
    with torch.random.fork_rng():
        torch.manual_seed(0)
        owl = Owlv2ForObjectDetection._from_config(config, attn_implementation="eager").eval()
    calibrate_owl_heads(owl)
    tokenizer = tiny_owl_tokenizer()
    det = JointModel(owl, None, None, owl_tokenizer=tokenizer)
    assert det.owl_grid == (60, 60) and det.pads_to_square
    image = _images()[1]  # 200 x 90: padded to 200 x 200, then 960 x 960
    emb = det.embed([image])
    assert emb.t.shape == (1, 3601, 768)
    processor = Owlv2ImageProcessor()
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    texts = tokenizer(
        [TEMPLATE.format(q) for q in QUERIES],
        padding="max_length",
        max_length=16,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = owl(
            pixel_values=pixels, input_ids=texts.input_ids, attention_mask=texts.attention_mask
        )
        ours = det.detection_outputs(emb.t, det.encode_queries(QUERIES, TEMPLATE))
    assert ours.objectness is not None
    for name, a, b in (
        ("class logits", ours.class_logits, out.logits),
        ("boxes", ours.boxes, out.pred_boxes),
        ("objectness", ours.objectness, out.objectness_logits),
    ):
        print(f"OWLv2 base/16 {name}: max |J - stock| = {float((a - b).abs().max()):.2e}")
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # GA's fast norms (a sample of patches) and numerators equal one autograd call per output,
    # objectness included, on the 60x60 grid
    from jmllm.joint.saliency import OwlHeadGradients, naive_owl_gradients

    queries = det.encode_queries(QUERIES[:1], TEMPLATE)
    heads = OwlHeadGradients(owl, emb.t, queries)
    g_llm = torch.randn(emb.t.shape, generator=torch.Generator().manual_seed(1))
    patches = [0, 1234, 3599]
    fast_norms = heads.gradient_norms(patches=patches)  # (3, 1 + 4 + 1)
    fast_nums = heads.numerators(g_llm)
    outputs = [(k, c) for k in patches for c in range(heads.num_channels)]
    naive_norms, naive_nums = naive_owl_gradients(owl, emb.t, queries, outputs, g_llm)
    assert naive_nums is not None and heads.num_channels == 6
    rel = float(((fast_norms.flatten() - naive_norms).abs() / naive_norms.abs()).max())
    sampled = fast_nums[patches].flatten()
    num_err = float((sampled - naive_nums).abs().max() / naive_nums.abs().max())
    print(f"OWLv2 base/16 GA: norms rel {rel:.1e}, numerators rel-to-max {num_err:.1e}")
    assert rel < 1e-3 and num_err < 1e-4


def test_reports_show_objectness_for_owlv2_only(owlv2_joint: JointModel, tiny_joint: JointModel):
    from jmllm.joint.render.report import render_report_html

    image = _images()[1]
    ours = owlv2_joint.detect([image], ["cat"], threshold=0.0)[0]
    page = render_report_html(image, detections=ours)
    assert "<th>Objectness</th>" in page and f"{float(ours.objectness[0]):.3f}" in page
    theirs = tiny_joint.detect([image], ["cat"], threshold=0.0)[0]
    assert "Objectness" not in render_report_html(image, detections=theirs)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_owlv2_with_every_family(family, tiny_joint_paths: TinyJoint):
    """OWLv2 is the vision side of J over any family: W fitted from its 8x8 grid resampled onto
    the family's grids, an answer generated, detections with objectness, GA on objectness."""
    from jmllm.joint import GradientAlignment

    paths = build_tiny_owlv2_joint(tiny_joint_paths.root, family)
    model = JointModel.from_pretrained(paths.owl, paths.llava, paths.alignment, device="cpu")
    assert model.family is not None and model.family.model_type == family
    emb = model.embed(_images()[1:2])
    tokens = model.image_tokens(emb.t)  # t's 8x8 resampled onto the family's grids
    assert tokens.shape[0] == 1 and tokens.shape[-1] == model.mllm.config.text_config.hidden_size
    answer = model.generate(emb, "What is in the image?", max_new_tokens=3)[0]
    assert answer.token_ids.numel() > 0
    assert model.detect(emb, ["cat"], threshold=0.0)[0].objectness is not None
    res = GradientAlignment(model, class_query="objectness").attribute(
        emb, "What is in the image?", 0, ["cat"], answer=answer
    )
    assert res.channels[-1] == "objectness" and np.isfinite(res.map("class")).all()


def test_decode_maps_owlv2_boxes_back_through_the_padding():
    """A 200x100 image padded to 200x200: y and x both scale by 200, so a box in the lower half
    of the square lies below the image (clipped to its border)."""
    from jmllm.joint import decode_detections
    from jmllm.joint.detection.heads import image_fraction_boxes
    from jmllm.joint.render.explanation_pictures import map_title

    boxes = torch.tensor([[0.5, 0.25, 0.5, 0.25], [0.5, 0.75, 0.2, 0.1]])
    logits = torch.tensor([[3.0], [2.0]])
    objectness = torch.tensor([0.0, -1.0])
    dets = decode_detections(
        logits, boxes, (200, 100), ["x"], 0.0, objectness=objectness, pads_to_square=True
    )
    torch.testing.assert_close(dets.boxes[0], torch.tensor([50.0, 25.0, 150.0, 75.0]))
    assert dets.boxes[1, 1] == dets.boxes[1, 3] == 100.0  # wholly in the padding
    torch.testing.assert_close(dets.objectness, torch.sigmoid(objectness))
    squashed = decode_detections(logits, boxes, (200, 100), ["x"], 0.0)
    assert squashed.objectness is None and "objectness" not in squashed.to_records()[0]
    torch.testing.assert_close(squashed.boxes[0], torch.tensor([50.0, 12.5, 150.0, 37.5]))
    fractions = image_fraction_boxes(boxes, (200, 100))
    torch.testing.assert_close(fractions[0], torch.tensor([0.5, 0.5, 0.5, 0.5]))
    assert map_title("class", "objectness") == "GA class weight, OWLv2's objectness channel"


def test_every_attribution_method_runs_with_owlv2(owlv2_joint: JointModel):
    """Every method of the faithfulness benchmark runs on J with OWLv2; maps of ``t``'s grid lay
    it on the padded square, maps of the MLLM's tokens (attention, logit lens) on the image."""
    pytest.importorskip("captum")
    from jmllm.joint.saliency.attribution import METHODS, get_method

    emb = owlv2_joint.embed(_images()[1:2])
    for name in METHODS:
        result = get_method(name, owlv2_joint).attribute(
            emb, "What is this?", 0, answer="a cat", queries=["cat"]
        )
        painted = result.map()
        assert painted.shape == (90, 200) and np.isfinite(painted).all(), name
        assert result.pads_to_square == (result.scores.numel() == 64), name
