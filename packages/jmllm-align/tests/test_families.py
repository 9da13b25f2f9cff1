"""W for every MLLM family: the vision side of each family, its targets, its presets, the
family recorded in the weights file."""

from __future__ import annotations

import json

import pytest
import torch

from jmllm.align import AlignmentConfig, alignment_config_for, check_fits, load_alignment
from jmllm.align.families import (
    FAMILIES,
    Block,
    UnsupportedFamilyError,
    VisionLayout,
    family_name,
    resample_patches,
    vision_family,
)
from jmllm.align.testing import owlvit_b32_config
from jmllm.align.testing_families import PUBLISHED, build_tiny_family, published_config
from jmllm.align.train import load_preset, train

NON_LLAVA = [f for f in FAMILIES if f != "llava"]


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("families")
    return {family: build_tiny_family(root, family) for family in NON_LLAVA} | {"llava": tiny.llava}


# ------------------------------------------------------------------------- resampling
def test_resampling_is_the_identity_on_the_same_grid_and_exact_on_constants():
    x = torch.randn(2, 36, 5)
    same = VisionLayout(84, (Block(6, 6),))
    assert resample_patches(x, (6, 6), same) is x
    constant = torch.full((1, 36, 3), 2.5)
    layout = VisionLayout(196, (Block(7, 7), Block(3, 3, (0.5, 0.0, 1.0, 0.5))))
    out = resample_patches(constant, (6, 6), layout)
    assert out.shape == (1, 49 + 9, 3)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))


def test_resampling_follows_a_linear_ramp_and_averages_when_shrinking():
    H = W = 8
    cols = torch.arange(W, dtype=torch.float32).repeat(H)  # value = column index
    x = cols.view(1, H * W, 1)
    # upsampling a quarter (the top-left 4x4 cells) to 8x8: cell centres of the finer grid
    up = resample_patches(x, (H, W), VisionLayout(1, (Block(8, 8, (0.0, 0.0, 0.5, 0.5)),)))
    want = ((torch.arange(8) + 0.5) / 8 * 4 - 0.5).clamp(min=0)  # border-clamped at the edge
    torch.testing.assert_close(up.view(8, 8)[0], want)
    # shrinking 8 -> 2: each cell is the mean of its 4 source columns
    down = resample_patches(x, (H, W), VisionLayout(1, (Block(2, 2),)))
    torch.testing.assert_close(down.view(2, 2)[0], torch.tensor([1.5, 5.5]))
    # differentiable: every source cell gets gradient from the averaged cell
    x = x.clone().requires_grad_(True)
    resample_patches(x, (H, W), VisionLayout(1, (Block(2, 2),))).sum().backward()
    assert x.grad is not None and bool((x.grad > 0).all())


# ------------------------------------------------------------------------- each family
@pytest.mark.parametrize("family", list(FAMILIES))
def test_targets_are_the_models_own_tokens_on_the_layouts_grids(family, family_folders, tiny):
    """The targets W learns are the stock model's own vision tokens, block by block: for
    LLaVA-NeXT/OneVision the per-tile projector output the model's ``get_image_features``
    packs; for Qwen its merger output, in the order the model's forward scatters them."""
    from jmllm.align.features import FeatureExtractor, image_to_tensor
    from jmllm.align.testing import generated_images

    fx = FeatureExtractor.from_pretrained(tiny.owl, family_folders[family])
    images = [image_to_tensor(im) for im in generated_images(2, size=64, seed=5)]
    pair = fx(images)
    layout = fx.family.layout
    assert pair.target.shape[:2] == (2, layout.num_tokens)
    assert pair.source_patches.shape == (
        2,
        layout.num_tokens,
        fx.owl.config.vision_config.hidden_size,
    )
    pixels = fx.mllm_norm(images, fx.device)
    with torch.no_grad():
        theirs = fx.mllm.model.get_image_features(**fx.family.model_inputs(pixels))
    pooled = theirs.pooler_output if hasattr(theirs, "pooler_output") else theirs
    pooled = torch.stack(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled
    if family in ("llava_next", "llava_onevision"):
        g = layout.blocks[0].tokens
        # the packed sequence starts with the base grid, as the targets do
        torch.testing.assert_close(pooled[:, :g], pair.target[:, :g], rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(pooled, pair.target, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", NON_LLAVA)
def test_training_w_for_a_family_records_it_and_refuses_the_others(
    family, family_folders, tiny_config, tmp_path
):
    config = tiny_config.replace(target_model=str(family_folders[family]), epochs=1)
    result = train(config, tmp_path / "run")
    assert result.eval is not None and result.initial_eval is not None
    assert result.eval.mse < result.initial_eval.mse  # it learns the family's tokens
    layer = load_alignment(result.weights_path)
    assert layer.config.family == family
    from transformers import AutoConfig

    owl_config = AutoConfig.from_pretrained(tiny_config.source_model)
    own = AutoConfig.from_pretrained(family_folders[family])
    check_fits(layer.config, owl_config, own)
    other = AutoConfig.from_pretrained(family_folders["llava"])
    with pytest.raises(ValueError, match=f"trained for the '{family}' family") as info:
        check_fits(layer.config, owl_config, other)
    assert "\n" not in str(info.value)
    from safetensors import safe_open

    with safe_open(str(result.weights_path), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["family"] == family


def test_files_without_a_family_are_llava(tmp_path):
    """Weights written before the family was recorded were all LLaVA-1.5's."""
    data = AlignmentConfig("llava-mlp", in_dim=4, out_dim=8).to_dict()
    data.pop("family")
    assert AlignmentConfig.from_dict(data).family == "llava"


def test_an_unsupported_family_is_one_line_naming_the_supported():
    from transformers import AutoConfig

    with pytest.raises(UnsupportedFamilyError) as info:
        family_name(AutoConfig.for_model("blip-2"))
    message = str(info.value)
    assert "\n" not in message and "'blip-2'" in message
    assert ", ".join(FAMILIES) in message


# ------------------------------------------------------------------------- presets
PRESETS = {  # preset name -> (family, W's output width, tokens per image)
    "llava-next": ("llava_next", 4096, 576 * 5),
    "llava-onevision": ("llava_onevision", 896, 729 * 5),
    "qwen2-vl": ("qwen2_vl", 1536, 576),
    "qwen2.5-vl": ("qwen2_5_vl", 2048, 576),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_per_family_gives_ws_width_and_grid(preset):
    family, width, tokens = PRESETS[preset]
    config = load_preset(preset)
    assert config.target_model == PUBLISHED[family].model_id
    assert (config.architecture, config.lr, config.batch_size) == ("deep-mlp", 1e-4, 16)
    w = alignment_config_for(owlvit_b32_config(), published_config(family))
    assert (w.family, w.out_dim, w.num_tokens) == (family, width, tokens)
    assert str(width) in load_preset_comment(preset)


def load_preset_comment(name: str) -> str:
    from importlib import resources

    text = (resources.files("jmllm.align") / "presets" / f"{name}.json").read_text()
    return str(json.loads(text)["_comment"])


def test_a_checkpoint_may_set_the_qwen_token_grid():
    """A toy Qwen2-VL trained on small scenes keeps its own grid in its config.json."""
    from jmllm.align.families import TOKEN_GRID_KEY

    config = published_config("qwen2_vl")
    setattr(config, TOKEN_GRID_KEY, 6)
    assert vision_family(config).layout.describe() == "168 px: 6x6"
    assert config.to_dict()[TOKEN_GRID_KEY] == 6  # saved with the checkpoint
    setattr(config, TOKEN_GRID_KEY, 0)
    with pytest.raises(UnsupportedFamilyError, match="jmllm_token_grid must be a positive"):
        vision_family(config).layout.describe()


def test_published_layouts():
    """The grids J fills for each published model, as the docs state them."""
    described = {f: vision_family(published_config(f)).layout.describe() for f in FAMILIES}
    assert described == {
        "llava": "336 px: 24x24",
        "llava_next": "672 px: 24x24 + 4 crops of 24x24",
        "llava_onevision": "768 px: 27x27 + 4 crops of 27x27",
        "qwen2_vl": "672 px: 24x24",
        "qwen2_5_vl": "672 px: 24x24",
    }
