"""The alignment weight format shared by every jmllm package (DESIGN §3).

One ``.safetensors`` file. Tensor names are the module names of :class:`AlignmentLayer`'s network,
which are the authors' names for the paper's three architectures (``deep-mlp``:
``input_layer.{weight,bias}``, ``hidden_layers.N.{weight,bias}``, ``output_layer.{weight,bias}``;
``llava-mlp``: ``linear_1.*``, ``linear_2.*``; ``transformer``: ``linear_in.*``,
``transformer_encoder.layers.N.*`` (PyTorch ``TransformerEncoderLayer`` names), ``linear_out.*``;
``sequence-transformer``: ``input_projection.*``, ``positions``, ``encoder.layers.N.*``,
``output_projection.*``). The file's metadata holds:

- ``format``: ``"jmllm-alignment"``; ``format_version``: ``"3"``;
- ``config``: JSON of :class:`AlignmentConfig` (architecture, dims, source model and layer, target
  model and its family — the transformers ``model_type``, e.g. ``llava``, ``qwen2_vl`` —, CLS
  handling);
- ``provenance``: JSON of how the weights were made (steps, images, final loss, ...).

Version 1 files still load: their ``transformer`` was the project's whole-sequence network, now
named ``sequence-transformer`` (version 2 gave the name to the authors' token-wise transformer).
Version 1 and 2 files have no ``family``: they were all trained for LLaVA-1.5 (``llava``).
Version 3 added the family, so that a W trained for one family refuses to load into another.

Only safetensors (or ``torch.load(weights_only=True)`` for the authors' ``.pth``) is ever read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from jmllm.align.architectures import AlignmentConfig, AlignmentLayer
from jmllm.align.files import atomic_write

FORMAT_NAME = "jmllm-alignment"
FORMAT_VERSION = "3"
READABLE_VERSIONS = ("1", "2", "3")
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
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in layer.net.state_dict().items()}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AlignmentWeightsError(
                f"{path}: refusing to write W: tensor {name} holds NaN or infinite values"
            )
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(layer.config.to_dict(), sort_keys=True),
        "provenance": json.dumps(provenance or {}, sort_keys=True, default=str),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


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
        provenance = json.loads(metadata.get("provenance", "{}"))
    except KeyError:
        raise AlignmentWeightsError(f"{path}: metadata holds no 'config'") from None
    except json.JSONDecodeError as exc:
        raise AlignmentWeightsError(f"{path}: metadata is not valid JSON ({exc})") from None
    except RecursionError:
        raise AlignmentWeightsError(
            f"{path}: metadata is not valid JSON (nested too deeply)"
        ) from None
    if not isinstance(data, dict):
        raise AlignmentWeightsError(f"{path}: metadata 'config' is not a JSON object")
    if not isinstance(provenance, dict):
        raise AlignmentWeightsError(f"{path}: metadata 'provenance' is not a JSON object")
    if version == "1":
        arch = str(data.get("architecture"))
        data["architecture"] = _V1_ARCHITECTURES.get(arch, arch)

    try:
        config = AlignmentConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise AlignmentWeightsError(f"{path}: invalid config in metadata: {exc}") from None
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
    from safetensors import safe_open

    path = resolve_alignment_path(source, revision=revision, filename=filename)
    config, provenance = read_metadata(path)
    with torch.device("meta"):
        expected = AlignmentLayer(config).net.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # shapes and dtypes come from the header: checked before any tensor is read
            names = list(f.keys())  # a safetensors handle is not iterable
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
            dtypes = {name: str(f.get_slice(name).get_dtype()) for name in names}
            check_state_shapes(path, config, shapes, expected)
            for name, stored in dtypes.items():
                if stored not in _FLOAT_DTYPES:
                    raise AlignmentWeightsError(
                        f"{path}: tensor {name} has dtype {stored}; alignment weights must be "
                        "floating point (F32, F16, BF16 or F64)"
                    )
            tensors = {name: f.get_tensor(name) for name in shapes}
    except AlignmentWeightsError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise AlignmentWeightsError(f"{path}: tensors could not be read ({exc})") from None
    check_finite_tensors(path, tensors)
    layer = AlignmentLayer(config)
    layer.net.load_state_dict(tensors)
    layer.provenance = provenance
    return layer.to(device=device, dtype=dtype).eval()


_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def check_state_shapes(
    path: str | os.PathLike[str],
    config: AlignmentConfig,
    shapes: dict[str, tuple[int, ...]],
    expected: dict[str, torch.Tensor] | None = None,
) -> None:
    """Refuse tensors that do not form ``config``'s network: missing, unexpected or misshapen
    (named), before anything of that size is allocated.

    Args:
        path: the file, for messages.
        config: the architecture the tensors must fit.
        shapes: tensor name → shape, as stored.
        expected: the network's state dict on the ``meta`` device (built from ``config`` if None).

    Raises:
        AlignmentWeightsError: naming the file and the first mismatched tensor.
    """
    if expected is None:
        with torch.device("meta"):
            expected = AlignmentLayer(config).net.state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {', '.join(unexpected)}")
        raise AlignmentWeightsError(
            f"{path}: tensors do not match the {config.architecture} config: " + "; ".join(parts)
        )
    for name, ref in expected.items():
        if tuple(shapes[name]) != tuple(ref.shape):
            raise AlignmentWeightsError(
                f"{path}: tensor {name} has shape {tuple(shapes[name])}, "
                f"the config ({config.architecture}, in_dim={config.in_dim}, out_dim={config.out_dim}, "
                f"hidden_dim={config.hidden_dim}) needs {tuple(ref.shape)}"
            )


def check_finite_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse floating tensors with NaN or infinite values (naming the file and tensor), and
    non-floating tensors."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AlignmentWeightsError(
                f"{path}: tensor {name} has dtype {tensor.dtype}; alignment weights must be "
                "floating point"
            )
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AlignmentWeightsError(
                f"{path}: tensor {name} holds {bad} NaN or infinite value(s)"
            )


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
    if not looks_like_repo_id(text):
        raise AlignmentWeightsError(f"{text}: no such alignment weights file or folder")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from jmllm.align.hub import HubUnavailableError, prepare_hub

    try:
        prepare_hub([text])  # an unreachable Hub: one line, no retries
    except HubUnavailableError as exc:
        raise AlignmentWeightsError(str(exc)) from None
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


def looks_like_repo_id(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` can only be a Hub repo id (``user/name``) rather than a local path.

    Example:
        >>> looks_like_repo_id("jmllm/w-paper"), looks_like_repo_id("runs/w.safetensors")
        (True, False)
    """
    text = str(source)
    return (
        text.count("/") == 1
        and not text.startswith((".", "/", "~"))
        and not Path(text).suffix
        and not Path(text).exists()
    )


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
    out = Path(out)
    if out.exists() and (out.resolve() == pth.resolve() or os.path.samefile(out, pth)):
        raise AlignmentWeightsError(
            f"{out}: is the input state dict; refusing to overwrite it (choose another output)"
        )
    state = torch_load_tensors(pth)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AlignmentWeightsError(f"{pth}: expected a dict of tensors (a state dict)")
    for prefix in _PREFIXES:
        state = {str(k).removeprefix(prefix): v for k, v in state.items()}
    try:
        config, state, dropped = authors_config(
            state,
            pth,
            num_heads=num_heads,
            num_tokens=num_tokens,
            source_model=source_model,
            target_model=target_model,
        )
    except AlignmentWeightsError:
        raise
    except (ValueError, TypeError) as exc:  # a tensor of the wrong rank, a size over the limit
        raise AlignmentWeightsError(
            f"{pth}: tensors do not form one of the authors' modules ({exc})"
        ) from None
    # Every size is checked against the tensors actually in the file before anything is built:
    # the network is created on the meta device and takes the file's (memory-mapped) tensors,
    # so a small file that declares a huge architecture cannot make this allocate gigabytes.
    try:
        check_state_shapes(pth, config, {k: tuple(v.shape) for k, v in state.items()})
    except AlignmentWeightsError as exc:
        raise AlignmentWeightsError(
            f"{exc} (the authors' {config.architecture}: {AUTHORS_MODULES[config.architecture]})"
        ) from None
    check_finite_tensors(pth, state)
    with torch.device("meta"):
        layer = AlignmentLayer(config)
    layer.net.load_state_dict(state, assign=True)
    provenance: dict[str, Any] = {"imported_from": pth.name}
    if dropped:
        provenance["dropped_unused_tensors"] = dropped
    return save_alignment(layer, out, provenance)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _torch_load_reason(exc: BaseException) -> str:
    """What was wrong with a file ``torch.load(weights_only=True)`` refused, without torch's
    advice to load it with ``weights_only=False`` (never do that: it runs pickled code)."""
    if isinstance(exc, KeyError):  # torch's legacy reader on a file that is no torch file
        return "not a PyTorch file"
    text = _ANSI.sub("", str(exc))
    kept = []
    for line in text.splitlines():
        line = re.split(r"\bPlease use\b", line)[0]  # torch's allow-listing instructions
        line = re.sub(r"^\s*(\(\d\)\s*)?(WeightsUnpickler error:\s*)?", "", line).strip()
        if not line or any(marker in line for marker in _TORCH_ADVICE):
            continue
        kept.append(line)
    return " ".join(kept) or type(exc).__name__


# Phrases of torch's advice on refused files, never repeated: it suggests weights_only=False,
# which runs the file's pickled code.
_TORCH_ADVICE = (
    "weights_only",
    "Weights only load failed",
    "trust",
    "documentation",
    "http",
    "Alternatively",
)


def torch_load_tensors(path: str | os.PathLike[str], what: str = "tensor-only state dict") -> Any:
    """``torch.load(path, weights_only=True)``, memory-mapped where the format allows, with
    failures as one :class:`AlignmentWeightsError` line naming the file (no pickled code runs,
    and the message never suggests ``weights_only=False``).

    Example:
        >>> torch_load_tensors("W.pth")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # the legacy (pre-zip) format cannot be memory-mapped; it is read whole
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AlignmentWeightsError(
            f"{path}: not a readable {what} ({_torch_load_reason(exc)}); pickled code is never run"
        ) from None
