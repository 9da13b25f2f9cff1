from __future__ import annotations

import pytest
import torch
from transformers import OwlViTConfig

from jmllm.align import (
    AlignmentConfig,
    AlignmentLayer,
    alignment_config_for,
    check_fits,
    encoder_dims,
)
from jmllm.align.testing import llava_1_5_7b_config, tiny_llava_config, tiny_owl_config


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_real_size_deep_mlp_on_meta_is_768_to_4096_with_174m_parameters():
    config = alignment_config_for(OwlViTConfig(), llava_1_5_7b_config(), "deep-mlp")
    assert (config.in_dim, config.out_dim, config.num_tokens) == (768, 4096, 576)
    with torch.device("meta"):
        layer = AlignmentLayer(config)
    # 768*8192+8192 + 2*(8192*8192+8192) + 8192*4096+4096
    assert _params(layer) == 174_092_288
    assert abs(_params(layer) - 174e6) < 0.5e6  # "about 174 M" (paper)
    out = layer(torch.empty(2, 576, 768, device="meta"))
    assert out.shape == (2, 576, 4096)


def test_real_size_llava_mlp_and_transformer_shapes_on_meta():
    owl, llava = OwlViTConfig(), llava_1_5_7b_config()
    for arch in ("llava-mlp", "transformer", "sequence-transformer"):
        with torch.device("meta"):
            layer = AlignmentLayer(alignment_config_for(owl, llava, arch))
            assert layer(torch.empty(1, 576, 768)).shape == (1, 576, 4096)
    with torch.device("meta"):
        llava_mlp = AlignmentLayer(alignment_config_for(owl, llava, "llava-mlp"))
    assert _params(llava_mlp) == 768 * 4096 + 4096 + 4096 * 4096 + 4096


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("deep-mlp", 8 * 32 + 32 + 2 * (32 * 32 + 32) + 32 * 16 + 16),
        ("llava-mlp", 8 * 16 + 16 + 16 * 16 + 16),
    ],
)
def test_small_parameter_counts(arch, expected):
    layer = AlignmentLayer(AlignmentConfig(arch, in_dim=8, out_dim=16, hidden_dim=32, num_tokens=4))
    assert _params(layer) == expected
    assert layer(torch.randn(3, 5, 8)).shape == (3, 5, 16)
    assert layer.token_wise


def test_token_wise_layers_treat_tokens_independently_and_sequence_transformer_mixes():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8)
    y = x.clone()
    y[0, 3] += 1.0  # change only the last token
    mlp = AlignmentLayer(AlignmentConfig("deep-mlp", in_dim=8, out_dim=16, hidden_dim=32))
    assert torch.equal(mlp(x)[0, :3], mlp(y)[0, :3])
    tr = AlignmentLayer(
        AlignmentConfig(
            "sequence-transformer", in_dim=8, out_dim=16, hidden_dim=16, num_heads=2, num_tokens=4
        )
    )
    assert not tr.token_wise
    assert not torch.allclose(tr(x)[0, :3], tr(y)[0, :3])
    with pytest.raises(ValueError, match="expects 4 tokens"):
        tr(torch.randn(1, 5, 8))


def test_wrong_input_dimension_is_named():
    layer = AlignmentLayer(AlignmentConfig("llava-mlp", in_dim=8, out_dim=16))
    with pytest.raises(ValueError, match="dimension 8, got 9"):
        layer(torch.randn(1, 4, 9))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown alignment architecture"):
        AlignmentConfig("resnet")
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer"):
        AlignmentConfig(hidden_dim=0)
    with pytest.raises(ValueError, match="unknown fields: colour"):
        AlignmentConfig.from_dict({"colour": 1})


def test_dims_come_from_the_configs_and_check_fits_names_the_dimension():
    owl, llava = tiny_owl_config(), tiny_llava_config(300, 299, 3)
    dims = encoder_dims(owl, llava)
    assert (dims.in_dim, dims.out_dim, dims.source_grid, dims.num_tokens) == (32, 48, (6, 6), 36)
    check_fits(alignment_config_for(owl, llava), owl, llava)
    wrong = AlignmentConfig("deep-mlp", in_dim=32, out_dim=4096, num_tokens=36)
    with pytest.raises(ValueError, match="output dimension 4096 != LLaVA text hidden size 48"):
        check_fits(wrong, owl, llava)
    # grids that differ are resampled (OWL-ViT's 24x24 onto the tiny LLaVA's 6x6), and said so
    resampled = encoder_dims(OwlViTConfig(), llava)
    assert resampled.resampled and resampled.num_tokens == 36
    assert resampled.notes == [
        "OWL-ViT's 24x24 patches are resampled onto LLaVA's grids (84 px: 6x6)"
    ]
    assert not dims.resampled and dims.notes == []
