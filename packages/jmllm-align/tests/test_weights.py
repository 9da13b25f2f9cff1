from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from jmllm.align import (
    AlignmentConfig,
    AlignmentLayer,
    AlignmentWeightsError,
    check_fits,
    import_authors_state_dict,
    load_alignment,
    read_metadata,
    save_alignment,
)
from jmllm.align.testing import tiny_llava_config, tiny_owl_config


def _layer(arch: str = "deep-mlp", **kw) -> AlignmentLayer:
    torch.manual_seed(0)
    config = AlignmentConfig(arch, in_dim=8, out_dim=12, hidden_dim=16, num_tokens=4, **kw)
    return AlignmentLayer(config)


@pytest.mark.parametrize("arch", ["deep-mlp", "llava-mlp", "transformer", "sequence-transformer"])
def test_round_trip_keeps_tensors_config_and_provenance(tmp_path, arch):
    layer = _layer(arch, num_heads=2, source_model="owl", target_model="llava")
    path = save_alignment(
        layer, tmp_path / "sub" / "w.safetensors", {"steps": 7, "final_loss": 0.5}
    )
    loaded = load_alignment(path)
    assert loaded.config == layer.config
    assert loaded.provenance == {"steps": 7, "final_loss": 0.5}
    x = torch.randn(2, 4, 8)
    assert torch.equal(loaded(x), layer.eval()(x))
    assert load_alignment(tmp_path / "sub").config == layer.config  # folder with one file
    assert not list((tmp_path / "sub").glob("*.tmp"))  # atomic write left nothing behind


def test_tensor_names_are_the_documented_ones(tmp_path):
    path = save_alignment(_layer(), tmp_path / "w.safetensors")
    names = set(load_file(str(path)))
    assert names == {
        "input_layer.weight", "input_layer.bias",
        "hidden_layers.0.weight", "hidden_layers.0.bias",
        "hidden_layers.1.weight", "hidden_layers.1.bias",
        "output_layer.weight", "output_layer.bias",
    }  # fmt: skip
    config, provenance = read_metadata(path)
    assert config.architecture == "deep-mlp" and provenance == {}


def _rewrite(path, tensors=None, metadata=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(
        tensors(data) if tensors else data, str(path), metadata=metadata(meta) if metadata else meta
    )


def test_wrong_shape_is_named(tmp_path):
    path = save_alignment(_layer(), tmp_path / "w.safetensors")
    _rewrite(path, tensors=lambda d: {**d, "output_layer.weight": torch.zeros(13, 16)})
    with pytest.raises(
        AlignmentWeightsError, match=r"output_layer.weight has shape \(13, 16\).*\(12, 16\)"
    ):
        load_alignment(path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    path = save_alignment(_layer(), tmp_path / "w.safetensors")
    _rewrite(
        path,
        tensors=lambda d: (
            {k: v for k, v in d.items() if k != "hidden_layers.1.bias"} | {"x": torch.zeros(1)}
        ),
    )
    with pytest.raises(
        AlignmentWeightsError, match=r"missing tensors hidden_layers.1.bias; unexpected tensors x"
    ):
        load_alignment(path)


def test_non_jmllm_and_corrupt_files(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(other))
    with pytest.raises(AlignmentWeightsError, match="not a jmllm alignment file"):
        load_alignment(other)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(
        AlignmentWeightsError, match=r"corrupt.safetensors: not a readable safetensors"
    ):
        load_alignment(corrupt)
    path = save_alignment(_layer(), tmp_path / "w.safetensors")
    _rewrite(
        path,
        metadata=lambda m: {**m, "config": json.dumps({"architecture": "deep-mlp", "bogus": 1})},
    )
    with pytest.raises(AlignmentWeightsError, match="invalid config"):
        load_alignment(path)
    with pytest.raises(AlignmentWeightsError, match="no such alignment weights file"):
        load_alignment(tmp_path / "absent.safetensors")


def test_weights_that_do_not_fit_the_models(tmp_path):
    owl, llava = tiny_owl_config(), tiny_llava_config(300, 299, 3)
    layer = load_alignment(save_alignment(_layer(), tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="input dimension 8 != OWL-ViT vision hidden size 32"):
        check_fits(layer.config, owl, llava)


def test_hub_repo_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(AlignmentWeightsError, match="not in the local Hugging Face cache"):
        load_alignment("nobody-jmllm-test/no-such-alignment")


def _authors_state(hidden_layers: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    state = {"input_layer.weight": torch.randn(16, 8), "input_layer.bias": torch.randn(16)}
    for i in range(hidden_layers):
        state[f"hidden_layers.{i}.weight"] = torch.randn(16, 16)
        state[f"hidden_layers.{i}.bias"] = torch.randn(16)
    state["output_layer.weight"] = torch.randn(12, 16)
    state["output_layer.bias"] = torch.randn(12)
    return state


def _reference_mlp(state, x):
    h = torch.relu(x @ state["input_layer.weight"].T + state["input_layer.bias"])
    i = 0
    while f"hidden_layers.{i}.weight" in state:
        h = torch.relu(h @ state[f"hidden_layers.{i}.weight"].T + state[f"hidden_layers.{i}.bias"])
        i += 1
    return h @ state["output_layer.weight"].T + state["output_layer.bias"]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_import_authors_state_dict_infers_architecture_and_matches_outputs(tmp_path, depth):
    state = _authors_state(depth)
    pth = tmp_path / "W.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, pth)  # DataParallel prefix too
    out = import_authors_state_dict(pth, tmp_path / "w.safetensors", num_tokens=4)
    layer = load_alignment(out)
    assert (layer.config.in_dim, layer.config.out_dim, layer.config.hidden_dim) == (8, 12, 16)
    assert layer.config.num_hidden_layers == depth
    assert layer.provenance["imported_from"] == "W.pth"
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(layer(x), _reference_mlp(state, x))


class Payload:  # a pickled object: weights_only loading must refuse to build it
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_import_refuses_pickled_non_tensor_content(tmp_path, capsys):
    pth = tmp_path / "evil.pth"
    torch.save({"input_layer.weight": Payload()}, pth)
    with pytest.raises(AlignmentWeightsError, match=r"evil.pth: not a readable tensor-only"):
        import_authors_state_dict(pth, tmp_path / "w.safetensors")
    assert "pickle code ran" not in capsys.readouterr().out
    plain = tmp_path / "plain.pth"
    torch.save({"input_layer.weight": torch.zeros(2, 2), "note": "text"}, plain)
    with pytest.raises(AlignmentWeightsError, match="expected a dict of tensors"):
        import_authors_state_dict(plain, tmp_path / "w.safetensors")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(AlignmentWeightsError, match=r"missing tensor input_layer.weight"):
        import_authors_state_dict(wrong, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


def test_version_1_transformer_files_load_as_the_sequence_transformer(tmp_path):
    """Before version 2 the project's whole-sequence network was called "transformer"."""
    layer = _layer("sequence-transformer", num_heads=2).eval()
    path = save_alignment(layer, tmp_path / "w.safetensors")
    config = json.loads(_metadata(path)["config"])
    for key in ("ffn_dim", "dropout", "family"):  # fields version 1 did not have
        config.pop(key)
    old = json.dumps({**config, "architecture": "transformer"})
    _rewrite(path, metadata=lambda m: {**m, "format_version": "1", "config": old})
    loaded = load_alignment(path)
    assert loaded.config.architecture == "sequence-transformer"
    assert loaded.config == layer.config
    x = torch.randn(2, 4, 8)
    assert torch.equal(loaded(x), layer(x))
    _rewrite(path, metadata=lambda m: {**m, "format_version": "4"})
    with pytest.raises(AlignmentWeightsError, match="format version '4' is not supported"):
        load_alignment(path)


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())
