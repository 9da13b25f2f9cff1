"""Hostile and broken weight files: refused with one line naming the file and the field, before
anything large is allocated; pickled code never runs and torch's unsafe advice is never repeated."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from jmllm.align import AlignmentConfig, AlignmentLayer, load_alignment, save_alignment
from jmllm.align.cli import main
from jmllm.align.weights import (
    FORMAT_NAME,
    FORMAT_VERSION,
    AlignmentWeightsError,
    import_authors_state_dict,
    read_metadata,
)


def _good() -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    torch.manual_seed(0)
    layer = AlignmentLayer(AlignmentConfig("deep-mlp", in_dim=4, out_dim=6, hidden_dim=8))
    return dict(layer.net.state_dict()), layer.config.to_dict()


def _write(path, tensors, config, **meta) -> None:
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config if isinstance(config, str) else json.dumps(config),
        "provenance": "{}",
        **meta,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[0] = float("-inf")
    return t


TENSOR_CORRUPTIONS = [
    ("input_layer.weight", _nan, "tensor input_layer.weight holds 1 NaN or infinite"),
    ("output_layer.bias", _inf, "tensor output_layer.bias holds 1 NaN or infinite"),
    ("hidden_layers.0.weight", lambda t: t.to(torch.int32), "hidden_layers.0.weight has dtype I32"),
    ("input_layer.bias", lambda t: t.to(torch.int64), "input_layer.bias has dtype I64"),
    ("output_layer.weight", lambda t: t[:, :3], "output_layer.weight has shape (6, 3)"),
]
CONFIG_CORRUPTIONS = [
    ({"in_dim": True}, "in_dim must be a positive integer, got True"),
    ({"drop_cls": "no"}, "drop_cls must be true or false, got 'no'"),
    ({"hidden_dim": 10**12}, "hidden_dim=1000000000000"),
    ({"num_tokens": "576"}, "num_tokens must be a positive integer"),
    ({"source_model": 3}, "source_model must be text"),
    ({"source_layer": 1.5}, "source_layer must be an integer"),
    ({"architecture": ["deep-mlp"]}, "unknown alignment architecture"),
    ({"colour": "red"}, "unknown fields: colour"),
]


@pytest.mark.parametrize(("name", "corrupt", "message"), TENSOR_CORRUPTIONS)
def test_bad_tensors_are_refused_naming_file_and_tensor(tmp_path, capsys, name, corrupt, message):
    tensors, config = _good()
    tensors[name] = corrupt(tensors[name])
    path = tmp_path / "bad.safetensors"
    _write(path, tensors, config)
    with pytest.raises(AlignmentWeightsError, match=r"bad\.safetensors: ") as info:
        load_alignment(path)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("change", "message"), CONFIG_CORRUPTIONS)
def test_ill_typed_metadata_is_refused_naming_file_and_field(tmp_path, capsys, change, message):
    tensors, config = _good()
    path = tmp_path / "meta.safetensors"
    _write(path, tensors, {**config, **change})
    with pytest.raises(AlignmentWeightsError, match=r"meta\.safetensors: invalid config") as info:
        load_alignment(path)
    assert message in str(info.value)
    code = main(["info", str(path)])  # the CLI: one line, bad input
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    ("config", "message"),
    [("[1, 2]", "'config' is not a JSON object"), ("{", "not valid JSON")],
)
def test_malformed_config_json(tmp_path, config, message):
    tensors, _ = _good()
    path = tmp_path / "m.safetensors"
    _write(path, tensors, config)
    with pytest.raises(AlignmentWeightsError, match=message):
        read_metadata(path)


def test_non_finite_weights_are_never_written(tmp_path):
    layer = AlignmentLayer(AlignmentConfig("llava-mlp", in_dim=4, out_dim=8, num_tokens=4))
    with torch.no_grad():
        layer.net.linear_1.weight[0, 0] = float("nan")
    with pytest.raises(AlignmentWeightsError, match=r"linear_1\.weight holds NaN"):
        save_alignment(layer, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- import-pth
def _authors_state(hidden: int = 16, depth: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {"input_layer.weight": torch.randn(hidden, 8), "input_layer.bias": torch.randn(hidden)}
    for i in range(depth):
        state[f"hidden_layers.{i}.weight"] = torch.randn(hidden, hidden)
        state[f"hidden_layers.{i}.bias"] = torch.randn(hidden)
    state["output_layer.weight"] = torch.randn(12, hidden)
    state["output_layer.bias"] = torch.randn(12)
    return state


def test_import_refuses_to_overwrite_its_input(tmp_path, capsys):
    pth = tmp_path / "X.pth"
    torch.save(_authors_state(), pth)
    before = pth.read_bytes()
    for out in (pth, tmp_path / "." / "X.pth"):
        code = main(["import-pth", str(pth), str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "refusing to overwrite" in err and err.count("\n") == 1
    (tmp_path / "link.pth").hardlink_to(pth)
    code = main(["import-pth", str(pth), str(tmp_path / "link.pth")])
    assert code == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert pth.read_bytes() == before


class Payload:  # a pickled object: weights_only loading must refuse to build it
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_refused_pth_never_repeats_torch_unsafe_advice(tmp_path, capsys):
    pth = tmp_path / "evil.pth"
    torch.save({"input_layer.weight": Payload()}, pth)
    code = main(["import-pth", str(pth), str(tmp_path / "o.safetensors")])
    out, err = capsys.readouterr()
    assert code == 2 and "pickle code ran" not in out
    assert err.count("\n") == 1 and "evil.pth" in err and "print" in err
    assert "weights_only" not in err and "\x1b" not in err and "trust" not in err
    assert "pickled code is never run" in err


def test_import_checks_sizes_before_allocating(tmp_path):
    """A small .pth whose first tensor declares a 20000-wide W with a 1 x 1 hidden layer: the
    old importer built the 20000 x 20000 network (1.6 GB) before noticing. Run in a child
    process so its peak memory is measured on its own."""
    pth = tmp_path / "liar.pth"
    torch.save(
        {
            "input_layer.weight": torch.zeros(20000, 1),
            "input_layer.bias": torch.zeros(20000),
            "hidden_layers.0.weight": torch.zeros(1, 1),
            "hidden_layers.0.bias": torch.zeros(1),
            "output_layer.weight": torch.zeros(4, 1),
            "output_layer.bias": torch.zeros(4),
        },
        pth,
    )
    assert pth.stat().st_size < 200_000
    script = textwrap.dedent(
        f"""
        import sys
        from jmllm.align.testing import peak_rss_mb
        from jmllm.align.cli import main
        code = main(["import-pth", {str(pth)!r}, {str(tmp_path / "o.safetensors")!r}])
        peak_mb = peak_rss_mb()
        print(f"PEAK {{peak_mb:.0f}}", file=sys.stderr)
        sys.exit(code)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    peak = float(proc.stderr.split("PEAK")[-1])
    assert proc.returncode == 2, proc.stderr
    assert "hidden_layers.0.weight has shape (1, 1)" in proc.stderr
    assert "(20000, 20000)" in proc.stderr
    assert peak < 1200, f"peak RSS {peak} MB: the network was allocated"
    assert not (tmp_path / "o.safetensors").exists()


def test_import_of_a_good_pth_is_exact(tmp_path):
    state = _authors_state(depth=2)
    pth = tmp_path / "W.pth"
    torch.save(state, pth)
    layer = load_alignment(import_authors_state_dict(pth, tmp_path / "w.safetensors"))
    for name, tensor in state.items():
        assert torch.equal(layer.net.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "architecture", ["deep-mlp", "llava-mlp", "transformer", "sequence-transformer"]
)
def test_size_limit_counts_parameters_exactly(architecture):
    """The limit is applied to a count made without building the network: it must be exact."""
    from jmllm.align.architectures import ARCHITECTURES

    assert architecture in ARCHITECTURES
    config = AlignmentConfig(
        architecture, in_dim=8, out_dim=12, hidden_dim=16, num_hidden_layers=2, num_heads=4,
        num_tokens=6,
    )  # fmt: skip
    built = sum(p.numel() for p in AlignmentLayer(config).parameters())
    assert config.num_parameters() == built
