"""Exactness at the published shapes of one real model per family (random weights, offline).

For each family J is built in memory at the published configuration (every width, grid,
vocabulary and special-token id as published; one language-model layer and two vision-tower
layers, which decide no shape) with OWL-ViT B/32, and checked:

- the model's own vision tokens fed through W's slot give exactly the stock model's logits;
- J's detections equal stock OWL-ViT's;
- GA's token gradient through J equals the one through transformers' own image injection, and
  GA's fast numerators equal one autograd call per output (on a sample of outputs);
- bfloat16 runs and follows float32.

Each prints its configuration's key fields beside the published ``config.json`` values (run
with ``-s`` to read them). Opt-in, as they take minutes per family on two cores and 3-4 GB of
memory: ``pytest packages/jmllm-joint/tests/test_family_real_shapes.py --real-shapes -s`` (or
``JMLLM_REAL_SHAPES=1``). The GPU check runs the same shapes at full depth.
"""

from __future__ import annotations

import gc

import pytest
import torch

from jmllm.joint.model.families import FAMILIES
from jmllm.joint.saliency import OwlHeadGradients, naive_owl_gradients
from jmllm.joint.testing import PUBLISHED, generated_images, key_fields, published_config

# slow, and long on a loaded machine: the published vocabularies make every logit row wide
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _prompt_ids(model) -> torch.Tensor:
    """A prompt of ids: a few text tokens, the image's placeholders, a few more."""
    config = model.mllm.config
    image = [config.image_token_id] * model.num_image_tokens
    if model.family.model_type.startswith("qwen"):
        image = [config.vision_start_token_id, *image, config.vision_end_token_id]
    return torch.tensor([[11, 12, 13, *image, 14, 15, 16, 17]])


def _stock_logits(model, emb, ids):
    extra = {}
    if model.family.model_type.startswith("qwen"):
        extra["mm_token_type_ids"] = model.placeholders(ids).int()
    return model.mllm(input_ids=ids, **model.stock_inputs(emb), **extra).logits


def _g_llm_reference(model, t, ids, row, col):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = t.detach().clone().requires_grad_(True)
    extra = {}
    if model.family.model_type.startswith("qwen"):
        extra = {
            "mm_token_type_ids": model.placeholders(ids).int(),
            "image_grid_thw": model.family.grid_thw(1, ids.device),
        }
    with torch.enable_grad():
        pooled = BaseModelOutputWithPooling(pooler_output=tuple(model.image_tokens(t)))
        # only the explained row's logits: the published vocabularies make every row wide
        keep = ids.shape[1] - row
        out = model.mllm(
            input_ids=ids, mm_encoder_outputs={"image": pooled}, logits_to_keep=keep, **extra
        )
        (grad,) = torch.autograd.grad(out.logits[0, 0, col], t)
    return grad


def _print_fields(family: str, config) -> None:
    ours, published = key_fields(config), key_fields(published_config(family))
    print(f"\n{family}: {PUBLISHED[family].model_id if family in PUBLISHED else 'llava-hf'}")
    for name, value in published.items():
        mark = "" if ours[name] == value else "   <- reduced for the CPU check"
        print(f"  {name:32} ours {str(ours[name])[:60]:60} published {str(value)[:60]}{mark}")
    for source in PUBLISHED[family].sources if family in PUBLISHED else ():
        print(f"  source: {source}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_published_shapes_are_exact(family, real_shapes):
    from jmllm.joint.testing import real_shape_joint

    model = real_shape_joint(family)
    config = model.mllm.config
    _print_fields(family, config)
    differing = {
        k for k, v in key_fields(config).items() if v != key_fields(published_config(family))[k]
    }
    assert differing <= {"text.num_hidden_layers", "vision.num_hidden_layers", "vision.depth"}

    emb = model.embed(generated_images(1, size=96, seed=4))
    ids = _prompt_ids(model)
    with torch.no_grad():
        ours = model.logits_from_image_tokens(model.stock_image_tokens(emb), ids)
        assert torch.equal(ours, _stock_logits(model, emb, ids))  # identity path: exact
        del ours
        # detections: J's heads on t equal stock OWL-ViT on the image
        owl_ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 9])
        queries = model.owl.owlvit.get_text_features(input_ids=owl_ids)
        queries = getattr(queries, "pooler_output", queries)
        queries = queries / queries.norm(dim=-1, keepdim=True)
        logits, boxes = model.detection_heads(emb.t, queries)
        stock = model.owl(pixel_values=model.owl_norm(emb.images), input_ids=owl_ids)
    torch.testing.assert_close(logits, stock.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(boxes, stock.pred_boxes, rtol=1e-4, atol=1e-4)

    # GA: the token's gradient two ways, then fast numerators against the naive loop
    from jmllm.joint.saliency import GradientAlignment

    row = ids.shape[1] - 1  # the last token, explained as the answer
    (g_j,) = GradientAlignment(model).llm_gradients(emb.t, ids[0, :-1], ids[0, -1:], [[0]])
    g_ref = _g_llm_reference(model, emb.t, ids, row - 1, int(ids[0, -1]))
    torch.testing.assert_close(g_j, g_ref, rtol=1e-3, atol=1e-3 * float(g_ref.abs().max()))
    heads = OwlHeadGradients(model.owl, emb.t, queries)
    fast = heads.numerators(g_j)
    sample = [(0, 0), (287, 1), (575, 2), (300, 4)]
    _, naive = naive_owl_gradients(model.owl, emb.t, queries, sample, g_j)
    assert naive is not None
    got = torch.stack([fast[k, c] for k, c in sample])
    assert float((got - naive).abs().max()) <= 1e-4 * float(fast.abs().max())

    # bfloat16: the same J runs and follows float32
    with torch.no_grad():
        full = model.language_logits(emb.t, ids)[0, -1]
    model.mllm.to(torch.bfloat16)
    model.alignment.to(torch.bfloat16)
    with torch.no_grad():
        half = model.language_logits(emb.t.to(torch.bfloat16), ids)[0, -1].float()
        assert torch.equal(
            model.logits_from_image_tokens(model.stock_image_tokens(emb), ids),
            _stock_logits(model, emb, ids),
        )
    assert bool(torch.isfinite(half).all())
    assert torch.nn.functional.cosine_similarity(full, half, dim=0) > 0.99
    del model
    gc.collect()
