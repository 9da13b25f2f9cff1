"""Step 2: one caption per manifest image for each system under evaluation.

Every system answers the paper's caption prompt, ``What's the content of the image?``
(:data:`~jmllm.judge.prompts.CAPTION_PROMPT`). A system's captions come from one of:

* the manifest's ground truth (:func:`captions_from_ground_truth`): ground truth is judged like any
  other system, as in Table 1's "COCO GT" column;
* a JSONL file produced by any other system (:func:`captions_from_jsonl`);
* the joint model J or stock LLaVA-1.5, generated here through the optional ``joint`` extra
  (:func:`captions_from_joint`).

Whatever the source, the result is a :class:`SystemCaptions` saved as a captions file: JSONL, one
``{"system", "image_id", "caption", "prompt"}`` object per manifest image, in manifest order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jmllm.judge.errors import JudgeError
from jmllm.judge.files import read_jsonl, write_jsonl
from jmllm.judge.manifest import Manifest, ManifestImage
from jmllm.judge.prompts import CAPTION_PROMPT

__all__ = [
    "SystemCaptions",
    "captions_from_ground_truth",
    "captions_from_joint",
    "captions_from_jsonl",
    "load_captions",
    "save_captions",
]

log = logging.getLogger(__name__)


@dataclass
class SystemCaptions:
    """The captions of one system, keyed by manifest image id."""

    system: str
    captions: dict[str, str]
    prompt: str = CAPTION_PROMPT
    # Where the captions came from, for the record (JSON-serialisable).
    origin: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.system or not self.system.strip():
            raise JudgeError("a system needs a non-empty name")

    def missing(self, manifest: Manifest) -> list[str]:
        """Manifest image ids this system has no caption for."""
        return [image.image_id for image in manifest.images if image.image_id not in self.captions]


def save_captions(
    path: str | os.PathLike[str], captions: SystemCaptions, manifest: Manifest
) -> Path:
    """Write a captions file (atomically), one line per manifest image in manifest order."""
    missing = captions.missing(manifest)
    if missing:
        raise JudgeError(
            f"system {captions.system!r} has no caption for {len(missing)} manifest images "
            f"(first: {', '.join(missing[:5])})"
        )
    return write_jsonl(
        path,
        (
            {
                "system": captions.system,
                "image_id": image.image_id,
                "caption": captions.captions[image.image_id],
                "prompt": captions.prompt,
            }
            for image in manifest.images
        ),
    )


def load_captions(path: str | os.PathLike[str]) -> SystemCaptions:
    """Read a captions file written by :func:`save_captions` (or ``jmllm-judge captions``)."""
    path = Path(path)
    system: str | None = None
    prompt = CAPTION_PROMPT
    captions: dict[str, str] = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        where = f"{path}:{number}"
        try:
            name, image_id, caption = (
                str(record["system"]),
                str(record["image_id"]),
                record["caption"],
            )
        except KeyError as e:
            raise JudgeError(
                f"{where}: a captions file needs 'system', 'image_id' and 'caption' on every line "
                f"(missing {e}); convert other formats with `jmllm-judge captions --from-jsonl`"
            ) from e
        if not isinstance(caption, str):
            raise JudgeError(f"{where}: caption must be a string")
        if system is None:
            system = name
            prompt = str(record.get("prompt", CAPTION_PROMPT))
        elif name != system:
            raise JudgeError(
                f"{where}: system {name!r} differs from {system!r} on line 1; one system per file"
            )
        if image_id in captions:
            raise JudgeError(f"{where}: image {image_id!r} has two captions")
        captions[image_id] = caption
    if system is None:
        raise JudgeError(f"captions file {path} is empty")
    return SystemCaptions(
        system=system, captions=captions, prompt=prompt, origin={"file": str(path)}
    )


def captions_from_ground_truth(manifest: Manifest, system: str = "COCO GT") -> SystemCaptions:
    """The manifest's ground-truth captions as a system."""
    missing = [image.image_id for image in manifest.images if image.ground_truth is None]
    if missing:
        raise JudgeError(
            f"the manifest has no ground-truth caption for {len(missing)} images "
            f"(first: {', '.join(missing[:5])}); sample with ground truth to judge it"
        )
    return SystemCaptions(
        system=system,
        captions={image.image_id: str(image.ground_truth) for image in manifest.images},
        origin={"kind": "ground-truth"},
    )


def captions_from_jsonl(
    manifest: Manifest,
    path: str | os.PathLike[str],
    system: str,
    *,
    caption_field: str = "caption",
) -> SystemCaptions:
    """Captions of any system from its own JSONL output.

    Each line is a JSON object with the caption in ``caption_field`` and the image named by
    ``image_id`` (the manifest's id, e.g. the COCO image id) or ``image`` (a path, file name or URL
    matched against the manifest). Lines for images outside the manifest are ignored; a manifest
    image without a caption is an error (every system is judged on every image, so that the
    comparisons are paired).
    """
    path = Path(path)
    lookup = _image_lookup(manifest)
    captions: dict[str, str] = {}
    ignored = 0
    for number, record in enumerate(read_jsonl(path), start=1):
        where = f"{path}:{number}"
        if caption_field not in record:
            raise JudgeError(
                f"{where}: no {caption_field!r} field (choose it with --caption-field)"
            )
        caption = record[caption_field]
        if not isinstance(caption, str):
            raise JudgeError(f"{where}: {caption_field!r} must be a string")
        image_id = _match(record, lookup, manifest, where)
        if image_id is None:
            ignored += 1
            continue
        if image_id in captions:
            raise JudgeError(f"{where}: image {image_id!r} has two captions")
        captions[image_id] = caption.strip()
    if ignored:
        log.info("%s: %d lines are for images outside the manifest (ignored)", path, ignored)
    result = SystemCaptions(
        system=system, captions=captions, origin={"kind": "jsonl", "file": str(path.resolve())}
    )
    missing = result.missing(manifest)
    if missing:
        raise JudgeError(
            f"{path}: no caption for {len(missing)} of the {len(manifest)} manifest images "
            f"(first: {', '.join(missing[:5])})"
        )
    return result


def _image_lookup(manifest: Manifest) -> dict[str, str]:
    """Names by which a JSONL line may refer to a manifest image: path, file name, URL."""
    names: dict[str, str] = {}
    for image in manifest.images:
        keys = [image.location]
        if image.path is not None:
            keys.append(image.path.name)
        elif image.url is not None:
            keys.append(image.url.rsplit("/", 1)[-1])
        for key in keys:
            names.setdefault(key, image.image_id)
    return names


def _match(
    record: dict[str, Any], lookup: dict[str, str], manifest: Manifest, where: str
) -> str | None:
    ids = manifest.by_id()
    if "image_id" in record:
        image_id = str(record["image_id"])
        return image_id if image_id in ids else None
    if "image" in record:
        image = str(record["image"])
        return lookup.get(image) or lookup.get(Path(image).name)
    raise JudgeError(
        f"{where}: name the image with 'image_id' (manifest id) or 'image' (path or URL)"
    )


# The one place that knows jmllm-joint's API; adapt it here if that API moves.
def _joint_generate(
    images: Sequence[str],
    prompts: Sequence[str],
    *,
    owl: str | None,
    llava: str | None,
    alignment: str | None,
    vision: str,
    max_new_tokens: int,
    template: str = "paper",
    model: Any = None,
    tokenization: str = "legacy",
    preprocessing: str = "authors",
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[Any, list[str]]:
    """Load J once (when ``model`` is None) and caption a batch of image files greedily; returns
    ``(model, answers)``. ``vision="llava"`` runs stock LLaVA's own vision tower on the same images.
    The images are embedded with the named ``preprocessing``, the prompts tokenised with the
    named ``tokenization`` (jmllm-joint's names)."""
    try:
        from jmllm.joint import JointModel, JointModelError, PromptError
    except ImportError as e:
        raise JudgeError(
            f"captions from J or stock LLaVA need the joint extra: pip install 'jmllm-judge[joint]' ({e})"
        ) from e
    try:
        if model is None:
            sources = {"owl": owl, "llava": llava, "alignment": alignment}
            given: dict[str, Any] = {k: v for k, v in sources.items() if v is not None}
            if device not in (None, "auto"):
                given["device"] = device
            if dtype not in (None, "auto"):
                given["dtype"] = dtype  # by name: jmllm-joint turns it into torch's
            model = JointModel.from_pretrained(**given)  # unset: jmllm-joint's defaults
        emb = model.embed(list(images), preprocessing=preprocessing)
        answers = model.generate(
            emb,
            list(prompts),
            max_new_tokens=max_new_tokens,
            vision=vision,
            template=template,
            tokenization=tokenization,
        )
    except (JointModelError, PromptError) as e:
        raise JudgeError(f"jmllm-joint: {e}") from e
    return model, [answer.text for answer in answers]


def captions_from_joint(
    manifest: Manifest,
    system: str,
    *,
    owl: str | None = None,
    llava: str | None = None,
    alignment: str | None = None,
    vision: str = "joint",
    max_new_tokens: int = 256,
    batch_size: int = 4,
    model: Any = None,
    progress: Callable[[int], object] | None = None,
    template: str = "paper",
    tokenization: str = "legacy",
    preprocessing: str = "authors",
    device: str | None = None,
    dtype: str | None = None,
) -> SystemCaptions:
    """Captions from the joint model J (``vision="joint"``: OWL-ViT + W + LLaVA) or from stock
    LLaVA-1.5 (``vision="llava"``) through the ``joint`` extra, greedy decoding, the paper's caption
    prompt. ``owl`` and ``llava`` default to jmllm-joint's defaults; ``alignment`` (W) is required
    by :meth:`jmllm.joint.JointModel.from_pretrained` in both cases. Pass an already loaded
    ``model`` instead to caption J and stock LLaVA with one load; ``device`` and ``dtype``
    (``"float32"``, ``"bfloat16"``, ``"float16"``; None or ``"auto"``: jmllm-joint's choice) are
    where and how it is loaded. Only local images are supported (sample with ``--images``). Both J and stock LLaVA are prompted in the conversation
    ``template``: ``"paper"`` (default: the authors' ``<image>\\nUSER: {question}\\nASSISTANT:``,
    how Table 1's captions were made) or ``"llava-1.5"`` (the model card's). The prompt's token
    ids follow ``tokenization``: ``"legacy"`` (default, the authors' ids) or ``"checkpoint"``; the
    images are embedded with ``preprocessing``: ``"authors"`` (default, the stored pixels resized
    as the HF processors do) or ``"exif"``. The captions' ``origin`` records all three and the
    dtype J ran in.

    >>> j = captions_from_joint(manifest, "J", alignment="w.safetensors")  # doctest: +SKIP
    >>> llava = captions_from_joint(manifest, "LLaVA", vision="llava", model=loaded_joint_model)  # doctest: +SKIP
    """
    if vision not in ("joint", "llava"):
        raise JudgeError(f"vision must be 'joint' (J) or 'llava' (stock LLaVA), got {vision!r}")
    remote = [image.image_id for image in manifest.images if image.path is None]
    if remote:
        raise JudgeError(
            f"captions from a model need local images; {len(remote)} manifest images are URLs "
            "(sample again with --images)"
        )
    captions: dict[str, str] = {}
    for start in range(0, len(manifest), batch_size):
        batch: list[ManifestImage] = manifest.images[start : start + batch_size]
        model, answers = _joint_generate(
            [str(image.path) for image in batch],  # J decodes files itself (odd modes included)
            [CAPTION_PROMPT] * len(batch),
            owl=owl,
            llava=llava,
            alignment=alignment,
            vision=vision,
            max_new_tokens=max_new_tokens,
            template=template,
            model=model,
            tokenization=tokenization,
            preprocessing=preprocessing,
            device=device,
            dtype=dtype,
        )
        if len(answers) != len(batch):
            raise JudgeError(f"the model returned {len(answers)} answers for {len(batch)} images")
        for image, answer in zip(batch, answers, strict=True):
            captions[image.image_id] = answer.strip()
        if progress is not None:
            progress(len(batch))
    dtype = getattr(model, "dtype", None)
    origin = {
        "kind": "joint",
        "vision": vision,
        "template": template,
        "tokenization": tokenization,
        "preprocessing": preprocessing,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "owl": owl,
        "llava": llava,
        "alignment": alignment,
    }
    return SystemCaptions(system=system, captions=captions, origin=origin)
