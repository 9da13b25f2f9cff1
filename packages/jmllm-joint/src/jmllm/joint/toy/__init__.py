"""The toy world: small OWL-ViT, LLaVA and W trained on synthetic scenes whose truth is known.

Every real checkpoint is out of reach offline, and random tiny models (:mod:`jmllm.joint.testing`)
prove code paths but nothing about meaning. The toy world trains the *real* model classes
(``OwlViTForObjectDetection``, ``LlavaForConditionalGeneration``) small, on seeded scenes of
coloured shapes (:mod:`~jmllm.joint.toy.scenes`), trains W with ``jmllm-align train``, and ships
the result inside this package, so J's answers, detections and GA maps can be checked against
ground truth. It is a testbed, never a substitute for the real checkpoints: it knows four shapes
in four colours on neutral backgrounds and nothing else.

- :func:`toy_paths`: the shipped (or a retrained) toy world's folders and files.
- :func:`load_toy_joint`: J loaded from them with :meth:`JointModel.from_pretrained`.
- :func:`toy_manifest`: its recipe, seeds, versions and held-out scores.
- Retrain: ``jmllm-joint toy train --out DIR [--seed S]`` (:mod:`~jmllm.joint.toy.train`).

Example:
    >>> from jmllm.joint.toy import load_toy_joint
    >>> from jmllm.joint.toy.scenes import make_scene
    >>> model = load_toy_joint()
    >>> scene = make_scene("heldout", 2)
    >>> model.generate(model.embed(scene.image), "What's the content of the image?")[0].text
    'a green square'
    >>> scene.caption  # the truth (docs/toy.md: how often J gets it right)
    'a green square'
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

WEIGHTS_PACKAGE_DIR = "weights"  # jmllm/joint/toy/weights/: the shipped toy world


class ToyWorldError(FileNotFoundError):
    """The toy world's files are missing or incomplete; the message names the folder."""


@dataclass(frozen=True)
class ToyPaths:
    """A toy world on disk: ``owl`` and ``llava`` folders, the W ``alignment`` file, the
    ``manifest`` JSON; the three model sources go straight to :meth:`JointModel.from_pretrained`.

    ``llava`` is the MLLM's folder whatever its family: ``qwen2_vl/`` for a toy world trained
    with ``--family qwen2_vl`` (``family`` says which).
    """

    root: Path
    owl: Path
    llava: Path
    alignment: Path
    manifest: Path
    family: str = "llava"


def toy_paths(root: str | os.PathLike[str] | None = None) -> ToyPaths:
    """The files of a toy world: the one shipped in this package, or one trained into ``root``.

    Args:
        root: a folder written by ``jmllm-joint toy train --out``; None: the shipped weights.

    Returns:
        :class:`ToyPaths`.

    Raises:
        ToyWorldError: a file or folder is missing (the message names it).

    Example:
        >>> paths = toy_paths()
        >>> sorted(p.name for p in (paths.owl, paths.llava, paths.alignment))
        ['alignment.safetensors', 'llava', 'owlvit']
    """
    from jmllm.joint.toy.train import ALIGNMENT_FILE, MANIFEST_NAME, MLLM_DIRS, OWL_DIR

    if root is None:
        base = Path(str(resources.files("jmllm.joint.toy") / WEIGHTS_PACKAGE_DIR))
    else:
        base = Path(root)
    family = "llava"
    with contextlib.suppress(OSError, ValueError, AttributeError):  # reported below if missing
        family = str(json.loads((base / MANIFEST_NAME).read_text("utf-8")).get("family", family))
    if family not in MLLM_DIRS:
        raise ToyWorldError(f"{base}: the manifest's family {family!r} is not a toy family")
    paths = ToyPaths(
        root=base,
        owl=base / OWL_DIR,
        llava=base / MLLM_DIRS[family],
        alignment=base / ALIGNMENT_FILE,
        manifest=base / MANIFEST_NAME,
        family=family,
    )
    for path, kind in (
        (paths.owl / "config.json", "toy OWL-ViT"),
        (paths.llava / "config.json", "toy LLaVA" if family == "llava" else "toy Qwen2-VL"),
        (paths.alignment, "toy W"),
        (paths.manifest, "toy manifest"),
    ):
        if not path.is_file():
            raise ToyWorldError(
                f"{base}: no {kind} ({path.relative_to(base)} is missing); train one with "
                "`jmllm-joint toy train --out DIR`"
            )
    return paths


def toy_manifest(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The manifest of a toy world (recipe, seeds, versions, held-out scores, sha256 of files).

    Example:
        >>> toy_manifest()["format"]
        'jmllm-toy-world'
    """
    result: dict[str, Any] = json.loads(toy_paths(root).manifest.read_text(encoding="utf-8"))
    return result


def toy_yes_no(root: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """How a toy world's language model answers yes/no questions: the words its recipe trained
    (``CaptionerRecipe.yes_no`` in the manifest; a manifest without it: lower case).

    Example:
        >>> toy_yes_no()  # the shipped toy LLaVA answers as LLaVA-1.5 does
        ('Yes', 'No')
    """
    from jmllm.joint.toy.scenes import YES_NO

    captioner = toy_manifest(root).get("recipe", {}).get("captioner", {})
    yes, no = captioner.get("yes_no", YES_NO)
    return str(yes), str(no)


def load_toy_joint(root: str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
    """The toy J (toy OWL-ViT + W + toy LLaVA), loaded through :meth:`JointModel.from_pretrained`.

    Args:
        root: a retrained toy world's folder; None: the weights shipped in this package.
        **kwargs: passed to ``from_pretrained`` (``device``, ``dtype``, ...); the default device
            is the CPU (the models are a few MB).

    Returns:
        :class:`~jmllm.joint.JointModel`.

    Example:
        >>> from jmllm.joint.toy.scenes import make_scene
        >>> model = load_toy_joint()
        >>> model.embed(make_scene("heldout", 1).image).t.shape
        torch.Size([1, 65, 64])
    """
    from jmllm.joint.model.joint import JointModel

    paths = toy_paths(root)
    kwargs.setdefault("device", "cpu")
    model = JointModel.from_pretrained(paths.owl, paths.llava, paths.alignment, **kwargs)
    from jmllm.joint.toy.inputs import toy_answer_check, toy_input_check

    model.input_check = toy_input_check  # a photo gets a warning (docs/toy.md)
    model.answer_check = toy_answer_check  # so does an answer the detector contradicts
    return model


__all__ = [
    "ToyPaths",
    "ToyWorldError",
    "load_toy_joint",
    "toy_manifest",
    "toy_paths",
    "toy_yes_no",
]
