"""The alignment weight format shared by every jmllm package (DESIGN §3).

One ``.safetensors`` file. Tensor names are the module names of :class:`AlignmentLayer`'s network,
which are the authors' names for the paper's three architectures (``deep-mlp``:
``input_layer.{weight,bias}``, ``hidden_layers.N.{weight,bias}``, ``output_layer.{weight,bias}``;
``llava-mlp``: ``linear_1.*``, ``linear_2.*``; ``transformer``: ``linear_in.*``,
``transformer_encoder.layers.N.*`` (PyTorch ``TransformerEncoderLayer`` names), ``linear_out.*``;
``sequence-transformer``: ``input_projection.*``, ``positions``, ``encoder.layers.N.*``,
``output_projection.*``). The file's metadata holds:

- ``format``: ``"jmllm-alignment"``; ``format_version``: ``"2"``;
- ``config``: JSON of :class:`AlignmentConfig` (architecture, dims, source model and layer, target
  model, CLS handling);
- ``provenance``: JSON of how the weights were made (steps, images, final loss, ...).

Version 1 files still load: their ``transformer`` was the project's whole-sequence network, now
named ``sequence-transformer`` (version 2 gave the name to the authors' token-wise transformer).

Only safetensors (or ``torch.load(weights_only=True)`` for the authors' ``.pth``) is ever read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from jmllm.align.architectures import AlignmentConfig, AlignmentLayer

FORMAT_NAME = "jmllm-alignment"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
# Version 1 named the project's whole-sequence transformer "transformer".
_V1_ARCHITECTURES = {"transformer": "sequence-transformer"}
DEFAULT_FILENAME = "alignment.safetensors"


class AlignmentWeightsError(ValueError):
    """An alignment weights file is missing, malformed, or does not fit its models."""


def save_alignment(
    layer: AlignmentLayer,
    path: str | os.PathLike[str],
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write W and its config to one ``.safetensors`` file, atomically.

    Args:
        layer: the alignment layer.
        path: target file (``.safetensors``); its folder is created.
        provenance: JSON-serialisable facts about how the weights were made.

    Returns:
        The path written.

    Example:
        >>> from jmllm.align import AlignmentConfig, AlignmentLayer
        >>> w = AlignmentLayer(AlignmentConfig("llava-mlp", in_dim=4, out_dim=8, num_tokens=4))
        >>> save_alignment(w, tmp_path / "w.safetensors", {"steps": 0}).name  # doctest: +SKIP
        'w.safetensors'
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in layer.net.state_dict().items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(layer.config.to_dict(), sort_keys=True),
        "provenance": json.dumps(provenance or {}, sort_keys=True, default=str),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: str | os.PathLike[str]) -> tuple[AlignmentConfig, dict[str, Any]]:
    """Read the config and provenance of a weights file without loading its tensors."""
    from safetensors import safe_open

    path = _existing_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise AlignmentWeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise AlignmentWeightsError(
            f"{path}: not a jmllm alignment file (metadata 'format' is {metadata.get('format')!r}); "
            "convert the authors' .pth with `jmllm-align import-pth`"
        )
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise AlignmentWeightsError(
            f"{path}: format version {version!r} is not supported "
            f"(this jmllm reads versions {', '.join(READABLE_VERSIONS)})"
        )
    try:
        data = json.loads(metadata["config"])
        if version == "1" and isinstance(data, dict):
            arch = str(data.get("architecture"))
            data["architecture"] = _V1_ARCHITECTURES.get(arch, arch)
        config = AlignmentConfig.from_dict(data)
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise AlignmentWeightsError(f"{path}: invalid config in metadata ({exc})") from None
    return config, provenance


def load_alignment(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    filename: str = DEFAULT_FILENAME,
) -> AlignmentLayer:
    """Load W from a ``.safetensors`` file, a folder holding ``alignment.safetensors``, or a Hub repo id.

    The tensors are checked against the stored config: a missing, unexpected or misshapen tensor
    is an :class:`AlignmentWeightsError` naming it.

    Args:
        source: file path, folder, or Hugging Face Hub repo id (``user/name``).
        device: where to put the weights.
        dtype: cast floating weights to this dtype (default: as stored).
        revision: Hub revision, for repo ids.
        filename: file name inside a folder or Hub repo.

    Example:
        >>> w = load_alignment("runs/w/alignment.safetensors")  # doctest: +SKIP
        >>> w.config.architecture  # doctest: +SKIP
        'deep-mlp'
    """
    from safetensors.torch import load_file

    path = resolve_alignment_path(source, revision=revision, filename=filename)
    config, provenance = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise AlignmentWeightsError(f"{path}: tensors could not be read ({exc})") from None
    with torch.device("meta"):
        expected = AlignmentLayer(config).net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {', '.join(unexpected)}")
        raise AlignmentWeightsError(
            f"{path}: tensors do not match the stored {config.architecture} config: "
            + "; ".join(parts)
        )
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise AlignmentWeightsError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                f"the config ({config.architecture}, in_dim={config.in_dim}, out_dim={config.out_dim}, "
                f"hidden_dim={config.hidden_dim}) needs {tuple(ref.shape)}"
            )
    layer = AlignmentLayer(config)
    layer.net.load_state_dict(tensors)
    layer.provenance = provenance
    return layer.to(device=device, dtype=dtype).eval()


def resolve_alignment_path(
    source: str | os.PathLike[str], *, revision: str | None = None, filename: str = DEFAULT_FILENAME
) -> Path:
    """Turn a file, folder or Hub repo id into a local file path (downloading for repo ids)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return candidate
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise AlignmentWeightsError(f"{path}: folder holds no {filename}")
    text = str(source)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/")) and not path.suffix
    if not looks_like_repo:
        raise AlignmentWeightsError(f"{text}: no such alignment weights file or folder")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(text, filename, revision=revision))
    except LocalEntryNotFoundError:
        raise AlignmentWeightsError(
            f"{text}: alignment weights are not in the local Hugging Face cache and the Hub "
            "cannot be reached (offline?); pass a local file instead"
        ) from None
    except HfHubHTTPError as exc:
        raise AlignmentWeightsError(
            f"{text}: could not download {filename} from the Hub ({exc})"
        ) from None


def _existing_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise AlignmentWeightsError(f"{path}: no such file")
    return path


# The authors' modules (their projection_modules.py) and the tensors that identify each.
AUTHORS_MODULES = {
    "deep-mlp": "DeeperMLPProjectionModule (input_layer, hidden_layers.N, output_layer)",
    "llava-mlp": "CopyProjectionModule / LlavaMultiModalProjector (linear_1, linear_2)",
    "transformer": "TransformerProjectionModule (linear_in, transformer_encoder.layers.N, linear_out)",
}
# Prefixes their saved dicts may carry: DataParallel's, and CopyProjectionModule's own
# state_dict() (its projector is the attribute token_projection).
_PREFIXES = ("module.", "token_projection.")


def _layer_indices(state: dict[str, torch.Tensor], prefix: str, pth: Path) -> list[int]:
    indices = sorted({int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)})
    if indices != list(range(len(indices))):
        raise AlignmentWeightsError(f"{pth}: {prefix}N layers are not numbered 0..N-1: {indices}")
    return indices


def authors_config(
    state: dict[str, torch.Tensor],
    pth: Path,
    *,
    num_heads: int = 8,
    **common: Any,
) -> tuple[AlignmentConfig, dict[str, torch.Tensor], list[str]]:
    """Recognise which of the authors' three modules a state dict holds and its dimensions.

    Returns:
        the :class:`AlignmentConfig`, the tensors under the project's names (the authors' own
        for these architectures) and the names of tensors dropped as unused by the forward pass
        (the transformer's template layer ``transformer_layer.*``).
    """
    dropped: list[str] = []
    if "input_layer.weight" in state and "output_layer.weight" in state:
        hidden_dim, in_dim = state["input_layer.weight"].shape
        config = AlignmentConfig(
            architecture="deep-mlp",
            in_dim=int(in_dim),
            out_dim=int(state["output_layer.weight"].shape[0]),
            hidden_dim=int(hidden_dim),
            num_hidden_layers=len(_layer_indices(state, "hidden_layers.", pth)),
            **common,
        )
    elif "linear_1.weight" in state or "linear_2.weight" in state:
        for key in ("linear_1.weight", "linear_2.weight"):
            if key not in state:
                raise AlignmentWeightsError(
                    f"{pth}: missing tensor {key}; expected the authors' LLaVA MLP "
                    f"({AUTHORS_MODULES['llava-mlp']})"
                )
        out_dim, in_dim = state["linear_1.weight"].shape
        config = AlignmentConfig(
            architecture="llava-mlp",
            in_dim=int(in_dim),
            out_dim=int(out_dim),
            hidden_dim=int(out_dim),  # LLaVA's projector: its hidden width is the output's
            **common,
        )
    elif "linear_in.weight" in state or "linear_out.weight" in state:
        for key in (
            "linear_in.weight",
            "linear_out.weight",
            "transformer_encoder.layers.0.linear1.weight",
        ):
            if key not in state:
                raise AlignmentWeightsError(
                    f"{pth}: missing tensor {key}; expected the authors' transformer "
                    f"({AUTHORS_MODULES['transformer']})"
                )
        dropped = sorted(k for k in state if k.startswith("transformer_layer."))
        state = {k: v for k, v in state.items() if k not in dropped}
        hidden_dim, in_dim = state["linear_in.weight"].shape
        try:
            config = AlignmentConfig(
                architecture="transformer",
                in_dim=int(in_dim),
                out_dim=int(state["linear_out.weight"].shape[0]),
                hidden_dim=int(hidden_dim),
                num_hidden_layers=len(_layer_indices(state, "transformer_encoder.layers.", pth)),
                num_heads=num_heads,
                ffn_dim=int(state["transformer_encoder.layers.0.linear1.weight"].shape[0]),
                **common,
            )
        except ValueError as exc:  # e.g. a width the number of heads does not divide
            raise AlignmentWeightsError(f"{pth}: {exc}") from None
    else:
        known = "; ".join(AUTHORS_MODULES.values())
        raise AlignmentWeightsError(
            f"{pth}: not one of the authors' state dicts (missing tensor input_layer.weight, "
            f"linear_1.weight or linear_in.weight); expected {known}"
        )
    return config, state, dropped


def import_authors_state_dict(
    pth: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    source_model: str = "google/owlvit-base-patch32",
    target_model: str = "llava-hf/llava-1.5-7b-hf",
    num_tokens: int = 576,
    num_heads: int = 8,
) -> Path:
    """Convert one of the paper authors' PyTorch state dicts into the jmllm format.

    All three of their modules (``projection_modules.py``) are recognised by their tensor names,
    and the architecture's dimensions and depth are read from the tensors:

    - the deep MLP (``input_layer.*``, ``hidden_layers.N.*``, ``output_layer.*``) → ``deep-mlp``;
    - the LLaVA-shaped MLP (``linear_1.*``, ``linear_2.*``, optionally under
      ``token_projection.``) → ``llava-mlp``;
    - the transformer (``linear_in.*``, ``transformer_encoder.layers.N.*``, ``linear_out.*``; the
      unused template layer ``transformer_layer.*`` is dropped) → ``transformer``, token-wise as
      their code runs at batch 1. Its number of heads is not in the tensors: ``num_heads``
      (theirs: 8).

    The file is read with ``torch.load(weights_only=True)``: no pickled code is ever executed.

    Args:
        pth: the ``.pth`` / ``.pt`` state dict.
        out: the ``.safetensors`` file to write.
        source_model, target_model: recorded in the config (the models the weights were trained for).
        num_tokens: image tokens per image (576 for the default pair).
        num_heads: attention heads of a transformer (the authors': 8).

    Example:
        >>> import_authors_state_dict("projector_deepermlp.pth", "w.safetensors")  # doctest: +SKIP
    """
    pth = _existing_file(pth)
    try:
        state = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AlignmentWeightsError(
            f"{pth}: not a loadable tensor-only state dict ({exc})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AlignmentWeightsError(f"{pth}: expected a dict of tensors (a state dict)")
    for prefix in _PREFIXES:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    config, state, dropped = authors_config(
        state,
        pth,
        num_heads=num_heads,
        num_tokens=num_tokens,
        source_model=source_model,
        target_model=target_model,
    )
    layer = AlignmentLayer(config)
    try:
        layer.net.load_state_dict(state)
    except RuntimeError as exc:
        raise AlignmentWeightsError(
            f"{pth}: tensors do not form the authors' {config.architecture} "
            f"({AUTHORS_MODULES[config.architecture]}): {' '.join(str(exc).split())}"
        ) from None
    provenance: dict[str, Any] = {"imported_from": pth.name}
    if dropped:
        provenance["dropped_unused_tensors"] = dropped
    return save_alignment(layer, out, provenance)
