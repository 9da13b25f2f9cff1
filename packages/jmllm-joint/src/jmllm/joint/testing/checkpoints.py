"""Tiny offline J: tiny OWL-ViT + a tiny MLLM of any family (from :mod:`jmllm.align.testing`
and :mod:`jmllm.align.testing_families`) + a matching W.

Everything is saved to folders and loaded back through :meth:`JointModel.from_pretrained`, the
path users take with Hub ids, so tests, the demo, the benchmarks and downstream packages exercise
the real loading code without the Hub. The weights are random: answers are gibberish and
detections arbitrary, but every shape, template and code path is the real one.

Example:
    >>> from jmllm.joint.testing.checkpoints import tiny_joint_model
    >>> model = tiny_joint_model("/tmp/jmllm-tiny")  # doctest: +SKIP
    >>> model.embed(generated_images(1)).t.shape  # doctest: +SKIP
    torch.Size([1, 37, 32])
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jmllm.align import AlignmentLayer, alignment_config_for, load_alignment, save_alignment
from jmllm.align.files import atomic_write_bytes, atomic_write_text, folder_mode
from jmllm.align.testing import (
    build_tiny_checkpoints,
    build_tiny_owlv2,
    generated_images,
    write_image_folder,
)
from jmllm.align.testing_families import (
    PUBLISHED,
    TINY_FAMILIES,
    build_tiny_family,
    key_fields,
    published_config,
    published_tokenizer,
)

__all__ = [
    "COCO_FIXTURE_CLASSES",
    "PUBLISHED",
    "TINY_FAMILIES",
    "TinyJoint",
    "build_tiny_family",
    "build_tiny_family_joint",
    "build_tiny_joint",
    "build_tiny_owlv2_joint",
    "generated_images",
    "key_fields",
    "published_config",
    "published_tokenizer",
    "real_shape_joint",
    "record_prompts",
    "tiny_family_joint_model",
    "tiny_joint_model",
    "write_coco_folder",
    "write_image_folder",
]

TINY_JOINT_VERSION = 2  # bump when the tiny W recipe changes, so cached files are rebuilt
TINY_HIDDEN_DIM = 64  # small deep-mlp width: the tiny W is about 9 k parameters
FIT_IMAGES = 24  # generated images the tiny W's output layer is fitted on


@dataclass(frozen=True)
class TinyJoint:
    """Sources of a tiny J, each loadable like the real one."""

    root: Path
    owl: Path  # OWL-ViT folder (the align tiny OWL-ViT with rescaled detection heads)
    llava: Path  # LLaVA folder
    alignment: Path  # W .safetensors file


def build_tiny_joint(root: str | os.PathLike[str], seed: int = 0) -> TinyJoint:
    """Build (or reuse) tiny OWL-ViT and LLaVA checkpoints and a random deep-mlp W that fits them.

    Args:
        root: folder for ``owlvit/``, ``llava/`` and ``alignment.safetensors``.
        seed: seed of all random weights.

    Returns:
        The three sources for :meth:`JointModel.from_pretrained`.

    Example:
        >>> paths = build_tiny_joint(tmp_path)  # doctest: +SKIP
        >>> JointModel.from_pretrained(paths.owl, paths.llava, paths.alignment)  # doctest: +SKIP
    """
    from transformers import AutoConfig

    ckpt = build_tiny_checkpoints(root, seed=seed)
    root = Path(root)
    target = root / "alignment.safetensors"
    owl_folder = root / "owlvit-joint"
    base_stamp = (root / "tiny.json").read_text() if (root / "tiny.json").is_file() else ""
    stamp = {"version": TINY_JOINT_VERSION, "seed": seed, "base": base_stamp}
    stamp_file = root / "tiny-joint.json"
    fresh = stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp
    if not (fresh and target.is_file() and owl_folder.is_dir()):
        _calibrated_owl(ckpt.owl, owl_folder)
        owl_config = AutoConfig.from_pretrained(owl_folder)
        llava_config = AutoConfig.from_pretrained(ckpt.llava)
        config = alignment_config_for(
            owl_config,
            llava_config,
            "deep-mlp",
            source_model=str(owl_folder),
            target_model=str(ckpt.llava),
            hidden_dim=TINY_HIDDEN_DIM,
            num_hidden_layers=1,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed + 2)
            layer = AlignmentLayer(config)
            final_loss = _fit_tiny_alignment(layer, owl_folder, ckpt.llava, seed)
        provenance = {
            "note": "tiny W for tests: output layer least-squares fitted to the tiny LLaVA",
            "seed": seed,
            "images": FIT_IMAGES,
            "final_loss": final_loss,
        }
        save_alignment(layer, target, provenance)
        atomic_write_text(stamp_file, json.dumps(stamp))
    return TinyJoint(root=root, owl=owl_folder, llava=ckpt.llava, alignment=target)


def _calibrated_owl(source: Path, target: Path) -> None:
    """The tiny OWL-ViT with its detection heads rescaled to a 1/sqrt(fan-in) initialisation.

    The heads of a freshly initialised ``OwlViTForObjectDetection`` have unit-variance weights,
    so every box saturates the sigmoid (zero-width boxes on the image border) and every score is
    0 or 1. Rescaled heads give patch-sized boxes and spread scores, so tiny detections, the
    demo's drawings and gradient-based explanations are well conditioned.
    """
    import shutil
    import tempfile

    from transformers import AutoProcessor, OwlViTForObjectDetection

    owl = OwlViTForObjectDetection.from_pretrained(source).eval()
    heads = [owl.box_head.dense0, owl.box_head.dense1, owl.box_head.dense2]
    heads += [owl.class_head.dense0, owl.class_head.logit_shift, owl.class_head.logit_scale]
    with torch.no_grad():
        for linear in heads:
            linear.weight.mul_(linear.weight.shape[1] ** -0.5)
    processor = AutoProcessor.from_pretrained(source)
    if target.exists():
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    owl.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.chmod(tmp, folder_mode())  # mkdtemp's 0700 would hide the cache from others
    os.replace(tmp, target)


def build_tiny_family_joint(root: str | os.PathLike[str], family: str, seed: int = 0) -> TinyJoint:
    """Build (or reuse) a tiny J of any family: the tiny OWL-ViT of :func:`build_tiny_joint`,
    the tiny checkpoint of ``family`` (:func:`jmllm.align.testing_families.build_tiny_family`)
    and a deep-mlp W for it, its output layer fitted to the family's own vision tokens.

    Args:
        root: cache folder (shared with :func:`build_tiny_joint`).
        family: a ``model_type`` of :data:`TINY_FAMILIES` (``"llava"`` is :func:`build_tiny_joint`).
        seed: seed of all random weights.

    Example:
        >>> paths = build_tiny_family_joint(tmp_path, "qwen2_vl")  # doctest: +SKIP
        >>> JointModel.from_pretrained(paths.owl, paths.llava, paths.alignment)  # doctest: +SKIP
    """
    from transformers import AutoConfig

    base = build_tiny_joint(root, seed=seed)
    if family == "llava":
        return base
    root = Path(root)
    folder = build_tiny_family(root, family, seed=seed)
    target = root / f"alignment-{family}.safetensors"
    stamp = {
        "version": TINY_JOINT_VERSION,
        "seed": seed,
        "base": (root / "tiny-joint.json").read_text(),
        "family": (root / f"{family}.json").read_text(),
    }
    stamp_file = root / f"tiny-joint-{family}.json"
    if not (
        stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and target.is_file()
    ):
        config = alignment_config_for(
            AutoConfig.from_pretrained(base.owl),
            AutoConfig.from_pretrained(folder),
            "deep-mlp",
            source_model=str(base.owl),
            target_model=str(folder),
            hidden_dim=TINY_HIDDEN_DIM,
            num_hidden_layers=1,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed + 2)
            layer = AlignmentLayer(config)
            final_loss = _fit_tiny_alignment(layer, base.owl, folder, seed)
        provenance = {
            "note": f"tiny W for tests: output layer least-squares fitted to the tiny {family}",
            "seed": seed,
            "images": FIT_IMAGES,
            "final_loss": final_loss,
        }
        save_alignment(layer, target, provenance)
        atomic_write_text(stamp_file, json.dumps(stamp))
    return TinyJoint(root=root, owl=base.owl, llava=folder, alignment=target)


def build_tiny_owlv2_joint(
    root: str | os.PathLike[str], family: str = "llava", seed: int = 0
) -> TinyJoint:
    """Build (or reuse) a tiny J whose vision side is OWLv2: the tiny OWLv2 of
    :func:`jmllm.align.testing.build_tiny_owlv2` (an 8×8 grid, resampled onto the tiny MLLMs'
    6×6), the tiny MLLM of ``family`` and a deep-mlp W fitted to it as for OWL-ViT.

    Example:
        >>> paths = build_tiny_owlv2_joint(tmp_path)  # doctest: +SKIP
        >>> JointModel.from_pretrained(paths.owl, paths.llava, paths.alignment)  # doctest: +SKIP
    """
    from transformers import AutoConfig

    base = build_tiny_family_joint(root, family, seed=seed)
    root = Path(root)
    owl = build_tiny_owlv2(root, seed=seed)
    target = root / f"alignment-owlv2-{family}.safetensors"
    stamp = {
        "version": TINY_JOINT_VERSION,
        "seed": seed,
        "owl": (root / "owlv2.json").read_text(),
        "mllm": str(base.llava),
    }
    stamp_file = root / f"tiny-joint-owlv2-{family}.json"
    if not (
        stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and target.is_file()
    ):
        config = alignment_config_for(
            AutoConfig.from_pretrained(owl),
            AutoConfig.from_pretrained(base.llava),
            "deep-mlp",
            source_model=str(owl),
            target_model=str(base.llava),
            hidden_dim=TINY_HIDDEN_DIM,
            num_hidden_layers=1,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed + 2)
            layer = AlignmentLayer(config)
            final_loss = _fit_tiny_alignment(layer, owl, base.llava, seed)
        provenance = {
            "note": f"tiny W for tests: OWLv2 to the tiny {family}, output layer fitted",
            "seed": seed,
            "images": FIT_IMAGES,
            "final_loss": final_loss,
        }
        save_alignment(layer, target, provenance)
        atomic_write_text(stamp_file, json.dumps(stamp))
    return TinyJoint(root=root, owl=owl, llava=base.llava, alignment=target)


def tiny_family_joint_model(
    root: str | os.PathLike[str], family: str, seed: int = 0, **kwargs: Any
) -> Any:
    """A loaded tiny :class:`~jmllm.joint.JointModel` of ``family`` (float32, CPU unless
    ``device`` is given), through :meth:`JointModel.from_pretrained`.

    Example:
        >>> model = tiny_family_joint_model(tmp_path, "llava_next")  # doctest: +SKIP
        >>> model.family.model_type  # doctest: +SKIP
        'llava_next'
    """
    from jmllm.joint.model.joint import JointModel

    paths = build_tiny_family_joint(root, family, seed=seed)
    kwargs.setdefault("device", "cpu")
    return JointModel.from_pretrained(paths.owl, paths.llava, paths.alignment, **kwargs)


def _fit_tiny_alignment(layer: AlignmentLayer, owl: Path, llava: Path, seed: int) -> float:
    """Fit W's output layer by least squares to the tiny MLLM's own vision tokens.

    Random W tokens are far larger than LLaVA's own and drown the prompt; with the output layer
    solved in closed form on generated images (the hidden layers stay random features), the tiny
    J answers much like the tiny LLaVA, so demos and comparisons are meaningful. Instant, unlike
    gradient steps on a busy 2-core machine.
    """
    from jmllm.align import FeatureExtractor, image_to_tensor

    net: Any = layer.net  # a DeepMLP (the tiny W is always deep-mlp)
    extractor = FeatureExtractor.from_pretrained(owl, llava)
    images = [image_to_tensor(im) for im in generated_images(FIT_IMAGES, size=96, seed=seed + 3)]
    with torch.no_grad():
        pair = extractor(images)
        source = pair.source_patches.reshape(-1, pair.source.shape[-1])  # (B·N, D_owl)
        target = pair.target.reshape(-1, pair.target.shape[-1])  # (B·N, D_llm)
        hidden = torch.relu(net.input_layer(source))  # (B·N, h)
        for linear in net.hidden_layers:
            hidden = torch.relu(linear(hidden))
        design = torch.cat([hidden, torch.ones(hidden.shape[0], 1)], dim=1).double()  # (B·N, h+1)
        ridge = 1e-3 * torch.eye(design.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(design.T @ design + ridge, design.T @ target.double())
        net.output_layer.weight.copy_(solution[:-1].T.float())  # (D_llm, h)
        net.output_layer.bias.copy_(solution[-1].float())
        loss = torch.nn.functional.mse_loss(layer(source.unsqueeze(0))[0], target)
    return float(loss)


def tiny_joint_model(root: str | os.PathLike[str], seed: int = 0, **kwargs: Any) -> Any:
    """A loaded tiny :class:`~jmllm.joint.JointModel` (float32, CPU unless ``device`` is given).

    Args:
        root: cache folder (built on first use).
        seed: seed of the random weights.
        **kwargs: passed to :meth:`JointModel.from_pretrained` (``dtype``, ``device``).
    """
    from jmllm.joint.model.joint import JointModel

    paths = build_tiny_joint(root, seed=seed)
    kwargs.setdefault("device", "cpu")
    return JointModel.from_pretrained(paths.owl, paths.llava, paths.alignment, **kwargs)


def tiny_alignment(paths: TinyJoint) -> AlignmentLayer:
    """The tiny W itself (for tests that need to tamper with it)."""
    return load_alignment(paths.alignment)


@contextlib.contextmanager
def record_prompts(tokenizations: list[str] | None = None) -> Iterator[list[str]]:
    """Record the prompt text of every :meth:`JointModel.prompt_inputs` call, as it is tokenised
    (before the image placeholder is expanded), for every J built in the block — the one
    funnel through which generation, chat and GA reach LLaVA. Tests use it to check which
    conversation template a command or API sends.

    Args:
        tokenizations: a list that also receives each call's tokenization name.

    Example:
        >>> with record_prompts() as sent:  # doctest: +SKIP
        ...     model.generate(emb, "What's in the image?", template="paper")
        >>> sent  # doctest: +SKIP
        ["<image>\\nUSER: What's in the image?\\nASSISTANT:"]
    """
    from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION
    from jmllm.joint.model.joint import JointModel

    sent: list[str] = []
    original = JointModel.prompt_inputs

    def recording(
        self: Any, prompts: Any, template: Any = None, tokenization: Any = None, **kwargs: Any
    ) -> Any:
        texts = self._prompt_texts(prompts, *(() if template is None else (template,)))
        sent.extend(texts)
        if tokenizations is not None:
            tokenizations.extend([tokenization or INTERACTIVE_TOKENIZATION] * len(texts))
        if template is not None:
            kwargs["template"] = template
        if tokenization is not None:
            kwargs["tokenization"] = tokenization
        return original(self, prompts, **kwargs)

    JointModel.prompt_inputs = recording  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        JointModel.prompt_inputs = original  # type: ignore[method-assign]


COCO_FIXTURE_CLASSES = ("person", "cat", "dog", "car", "apple", "teddy bear")


def write_coco_folder(
    root: str | os.PathLike[str],
    count: int = 6,
    classes: tuple[str, ...] = COCO_FIXTURE_CLASSES,
    size: int = 64,
    seed: int = 0,
) -> tuple[Path, Path]:
    """A small COCO-format dataset: ``root/instances.json`` and ``root/images/*.png``.

    Each image (from :func:`generated_images`) gets 0–3 annotated classes chosen with ``seed``
    (category ids start at 1, image ids at 100, as COCO's are not 0-based); the first image has
    two and the second none, so every fixture holds both cases. The annotations are made up:
    they exercise the format, not the pixels.

    Returns:
        (annotation file, image folder).

    Example:
        >>> ann, images = write_coco_folder(tmp_path)  # doctest: +SKIP
        >>> load_coco(ann, images).classes  # doctest: +SKIP
        ('person', 'cat', 'dog', 'car', 'apple', 'teddy bear')
    """
    import numpy as np

    root = Path(root)
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    doc: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [
            {"id": i + 1, "name": c, "supercategory": "x"} for i, c in enumerate(classes)
        ],
    }
    for i, image in enumerate(generated_images(count, size=size, seed=seed)):
        name = f"{i:04d}.png"
        atomic_write_bytes(folder / name, _png(image))
        image_id = 100 + i
        doc["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
        n = 2 if i == 0 else 0 if i == 1 else int(rng.integers(0, 4))
        for cat in rng.choice(len(classes), size=min(n, len(classes)), replace=False):
            for _ in range(int(rng.integers(1, 3))):  # a class may be annotated several times
                doc["annotations"].append(
                    {
                        "id": len(doc["annotations"]) + 1,
                        "image_id": image_id,
                        "category_id": int(cat) + 1,
                        "bbox": [1.0, 1.0, size / 3, size / 3],
                        "area": size * size / 9,
                        "iscrowd": 0,
                    }
                )
    annotations = atomic_write_text(root / "instances.json", json.dumps(doc))
    return annotations, folder


def _png(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def real_shape_joint(
    family: str,
    *,
    text_layers: int | None = 1,
    vision_layers: int | None = 2,
    w_hidden: int = 64,
    w_layers: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """J at the published shapes of ``family``'s real model, random weights, in memory.

    OWL-ViT B/32 (``OwlViTConfig()``), the MLLM from
    :func:`jmllm.align.testing_families.published_config` with ``text_layers`` language-model
    layers and ``vision_layers`` vision-tower layers (None: the published depth; every width, grid
    and vocabulary as published) and a deep-mlp W of the real input and output widths,
    ``w_hidden`` wide with ``w_layers`` hidden layers (8192 and 2: the paper's W). Built directly
    on ``device`` in ``dtype`` (no float32 copy of a 7 B model). Its tokenizer is word-level with
    the published special-token ids
    (:func:`jmllm.align.testing_families.published_tokenizer`), so prompts, generation and GA
    run as with the real checkpoint; OWL-ViT's is the tiny in-process one.

    Example:
        >>> model = real_shape_joint("qwen2_vl")  # doctest: +SKIP
        >>> model.num_image_tokens  # doctest: +SKIP
        576
    """
    from transformers import AutoModelForImageTextToText, OwlViTForObjectDetection

    from jmllm.align.testing import owlvit_b32_config, tiny_owl_tokenizer
    from jmllm.joint.model.joint import JointModel

    config = published_config(family, text_layers=text_layers, vision_layers=vision_layers)
    owl_config = owlvit_b32_config()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(), torch.device(device):
            torch.manual_seed(seed)
            owl = OwlViTForObjectDetection._from_config(owl_config, attn_implementation="eager")
            mllm = AutoModelForImageTextToText.from_config(config)
            w = AlignmentLayer(
                alignment_config_for(
                    owl_config,
                    config,
                    "deep-mlp",
                    hidden_dim=w_hidden,
                    num_hidden_layers=w_layers,
                )
            )
    finally:
        torch.set_default_dtype(previous)
    _calibrated_heads(owl)
    return JointModel(
        owl.eval(),
        mllm.eval(),
        w,
        tokenizer=published_tokenizer(family),
        owl_tokenizer=tiny_owl_tokenizer(),
        sources={"llava": f"{family} (published shapes, random weights)"},
    )


def _calibrated_heads(owl: Any) -> None:
    """Rescale OWL-ViT's detection heads to a 1/sqrt(fan-in) initialisation (see
    :func:`_calibrated_owl`): default-initialised heads saturate every score."""
    heads = [owl.box_head.dense0, owl.box_head.dense1, owl.box_head.dense2]
    heads += [owl.class_head.dense0, owl.class_head.logit_shift, owl.class_head.logit_scale]
    with torch.no_grad():
        for linear in heads:
            linear.weight.mul_(linear.weight.shape[1] ** -0.5)
