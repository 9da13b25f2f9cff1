"""The authors' three W modules, rebuilt here from their documented architecture with their tensor
names, imported with ``import_authors_state_dict`` and compared output for output.

The reference modules below are written from the paper's supplementary and the authors'
``projection_modules.py`` as documented (never imported from it): a deep MLP, LLaVA's projector
with a 768-wide first layer, and a small transformer built exactly as theirs is (no
``batch_first``, so attention runs over the batch axis; token-wise at batch 1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jmllm.align import (
    AlignmentConfig,
    AlignmentLayer,
    AlignmentWeightsError,
    import_authors_state_dict,
    load_alignment,
)
from jmllm.align.testing import tiny_llava_config

IN, HIDDEN, OUT = 8, 16, 12
# the reference module is built as the authors' is, without batch_first, which PyTorch warns about
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (LayerNorm's ones and zeros included), so a swapped tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return module.eval()


class AuthorsTransformer(nn.Module):
    """The authors' transformer as documented: Linear(in→h), a 2-layer ``nn.TransformerEncoder``
    of ``nn.TransformerEncoderLayer(h, nhead=8, dim_feedforward=h)`` (PyTorch defaults: post-norm,
    ReLU, dropout 0.1, sequence-first), Linear(h→out). The template layer is an attribute too, as
    in theirs, so its tensors are in the state dict."""

    def __init__(self, heads: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.linear_in = nn.Linear(IN, HIDDEN)
        self.transformer_layer = nn.TransformerEncoderLayer(
            d_model=HIDDEN, nhead=heads, dim_feedforward=HIDDEN
        )
        self.transformer_encoder = nn.TransformerEncoder(self.transformer_layer, num_layers=layers)
        self.linear_out = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.transformer_encoder(self.linear_in(x)))


def _token_formula(state: dict[str, torch.Tensor], x: torch.Tensor, layers: int) -> torch.Tensor:
    """What one token goes through at batch 1, written out: attention over its single key is its
    value projection, then the post-norm residual blocks."""
    h = x @ state["linear_in.weight"].T + state["linear_in.bias"]
    for i in range(layers):
        p = f"transformer_encoder.layers.{i}."
        w_v = state[p + "self_attn.in_proj_weight"][2 * HIDDEN :]
        b_v = state[p + "self_attn.in_proj_bias"][2 * HIDDEN :]
        attn = (h @ w_v.T + b_v) @ state[p + "self_attn.out_proj.weight"].T
        attn = attn + state[p + "self_attn.out_proj.bias"]
        h = nn.functional.layer_norm(
            h + attn, (HIDDEN,), state[p + "norm1.weight"], state[p + "norm1.bias"]
        )
        ff = torch.relu(h @ state[p + "linear1.weight"].T + state[p + "linear1.bias"])
        ff = ff @ state[p + "linear2.weight"].T + state[p + "linear2.bias"]
        h = nn.functional.layer_norm(
            h + ff, (HIDDEN,), state[p + "norm2.weight"], state[p + "norm2.bias"]
        )
    return h @ state["linear_out.weight"].T + state["linear_out.bias"]


@pytest.mark.parametrize("layers", [1, 2])
def test_authors_transformer_imports_and_reproduces_their_batch_1_outputs(tmp_path, layers):
    authors = _randomise(AuthorsTransformer(layers=layers), seed=layers)
    state = authors.state_dict()
    assert any(k.startswith("transformer_layer.") for k in state)  # their unused template layer
    torch.save(state, tmp_path / "projector_laion.pth")
    out = import_authors_state_dict(tmp_path / "projector_laion.pth", tmp_path / "w.safetensors")
    w = load_alignment(out)
    config = w.config
    assert (config.architecture, config.in_dim, config.out_dim) == ("transformer", IN, OUT)
    assert (config.hidden_dim, config.num_heads, config.ffn_dim) == (HIDDEN, 8, HIDDEN)
    assert (config.num_hidden_layers, config.dropout) == (layers, 0.1)
    assert w.token_wise
    assert w.provenance["dropped_unused_tensors"] == sorted(
        k for k in state if k.startswith("transformer_layer.")
    )

    torch.manual_seed(0)
    images = torch.randn(3, 5, IN)  # a batch of 3 images of 5 tokens
    ours = w(images)
    with torch.no_grad():
        for i in range(3):
            # the authors run one image at a time: (1, 5, in) read as a sequence of 1
            torch.testing.assert_close(ours[i], authors(images[i : i + 1])[0])
            torch.testing.assert_close(ours[i], _token_formula(state, images[i], layers))
            torch.testing.assert_close(w(images[i : i + 1])[0], ours[i])  # batch-independent
        # their module on a whole batch attends across its images: what the import avoids
        assert not torch.allclose(authors(images)[0], authors(images[:1])[0], atol=1e-3)


def test_authors_llava_mlp_imports_with_and_without_their_wrapper(tmp_path):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    projector = LlavaMultiModalProjector(tiny_llava_config(100, 99, 0))
    projector.linear_1 = nn.Linear(IN, projector.linear_2.in_features)  # as CopyProjectionModule
    projector = _randomise(projector, seed=3)
    hidden = projector.linear_2.out_features
    x = torch.randn(2, 5, IN)
    for name, state in (
        ("projector_oi.pth", projector.state_dict()),  # what CopyProjectionModule loads
        ("wrapped.pth", {f"token_projection.{k}": v for k, v in projector.state_dict().items()}),
    ):
        torch.save(state, tmp_path / name)
        w = load_alignment(import_authors_state_dict(tmp_path / name, tmp_path / f"{name}.st"))
        assert (w.config.architecture, w.config.in_dim, w.config.out_dim) == (
            "llava-mlp",
            IN,
            hidden,
        )
        with torch.no_grad():
            torch.testing.assert_close(w(x), projector(x))


def _deep_mlp_reference(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ state["input_layer.weight"].T + state["input_layer.bias"])
    i = 0
    while f"hidden_layers.{i}.weight" in state:
        h = torch.relu(h @ state[f"hidden_layers.{i}.weight"].T + state[f"hidden_layers.{i}.bias"])
        i += 1
    return h @ state["output_layer.weight"].T + state["output_layer.bias"]


def test_authors_deep_mlp_imports(tmp_path):
    g = torch.Generator().manual_seed(4)
    state = {
        "input_layer.weight": torch.randn(HIDDEN, IN, generator=g),
        "input_layer.bias": torch.randn(HIDDEN, generator=g),
        "hidden_layers.0.weight": torch.randn(HIDDEN, HIDDEN, generator=g),
        "hidden_layers.0.bias": torch.randn(HIDDEN, generator=g),
        "hidden_layers.1.weight": torch.randn(HIDDEN, HIDDEN, generator=g),
        "hidden_layers.1.bias": torch.randn(HIDDEN, generator=g),
        "output_layer.weight": torch.randn(OUT, HIDDEN, generator=g),
        "output_layer.bias": torch.randn(OUT, generator=g),
    }
    torch.save(state, tmp_path / "projector_deepermlp.pth")
    w = load_alignment(
        import_authors_state_dict(tmp_path / "projector_deepermlp.pth", tmp_path / "w.st")
    )
    assert (w.config.architecture, w.config.hidden_dim, w.config.num_hidden_layers) == (
        "deep-mlp",
        HIDDEN,
        2,
    )
    x = torch.randn(2, 5, IN)
    torch.testing.assert_close(w(x), _deep_mlp_reference(state, x))


def test_unrecognised_or_incomplete_state_dicts_are_named(tmp_path):
    cases = {
        "other.pth": ({"fc.weight": torch.zeros(2, 2)}, "not one of the authors' state dicts"),
        "half_llava.pth": (
            {"linear_1.weight": torch.zeros(4, 2)},
            "missing tensor linear_2.weight",
        ),
        "half_transformer.pth": (
            {"linear_in.weight": torch.zeros(16, 8), "linear_out.weight": torch.zeros(4, 16)},
            "missing tensor transformer_encoder.layers.0.linear1.weight",
        ),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(AlignmentWeightsError, match=rf"{name}: .*{message}"):
            import_authors_state_dict(tmp_path / name, tmp_path / "w.st")
    # a transformer whose width the given number of heads does not divide
    torch.save(_randomise(AuthorsTransformer(), 0).state_dict(), tmp_path / "t.pth")
    with pytest.raises(AlignmentWeightsError, match="not divisible by num_heads 5"):
        import_authors_state_dict(tmp_path / "t.pth", tmp_path / "w.st", num_heads=5)
    assert not (tmp_path / "w.st").exists()


def test_real_size_authors_transformer_on_meta():
    """The authors' defaults: width 4096, 8 heads, feed-forward 4096, two layers, 768 → 4096."""
    from transformers import OwlViTConfig

    from jmllm.align import alignment_config_for
    from jmllm.align.testing import llava_1_5_7b_config

    config = alignment_config_for(OwlViTConfig(), llava_1_5_7b_config(), "transformer")
    assert (config.hidden_dim, config.num_heads, config.ffn_dim, config.dropout) == (
        4096,
        8,
        4096,
        0.1,
    )
    with torch.device("meta"):
        w = AlignmentLayer(config)
        assert w(torch.empty(2, 576, 768)).shape == (2, 576, 4096)
    per_layer = 3 * 4096 * 4096 + 3 * 4096 + 4096 * 4096 + 4096  # attention in/out projections
    per_layer += 2 * (4096 * 4096 + 4096) + 4 * 4096  # feed-forward and two norms
    expected = 768 * 4096 + 4096 + 2 * per_layer + 4096 * 4096 + 4096
    assert sum(p.numel() for p in w.parameters()) == expected


def test_sequence_transformer_keeps_mixing_tokens_under_its_own_name():
    torch.manual_seed(0)
    x = torch.randn(1, 4, IN)
    y = x.clone()
    y[0, 3] += 1.0
    seq = AlignmentLayer(
        AlignmentConfig(
            "sequence-transformer", in_dim=IN, out_dim=OUT, hidden_dim=16, num_heads=2, num_tokens=4
        )
    ).eval()
    assert not seq.token_wise and not torch.allclose(seq(x)[0, :3], seq(y)[0, :3])
    tokenwise = AlignmentLayer(
        AlignmentConfig("transformer", in_dim=IN, out_dim=OUT, hidden_dim=16, num_heads=2)
    ).eval()
    assert tokenwise.token_wise and torch.equal(tokenwise(x)[0, :3], tokenwise(y)[0, :3])
