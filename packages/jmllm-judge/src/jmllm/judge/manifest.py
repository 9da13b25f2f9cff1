"""Step 1: the sample of images every system is judged on, written once as a manifest.

The paper judges captions of "the same 100 random COCO images" for every model (supplementary
§1.1). A :class:`Manifest` fixes that sample: which images (seeded), where their pixels are (a local
file with its SHA-256, or a URL), and one ground-truth caption each, so that ground truth can be
judged as a system too.

Three sources:

* :func:`sample_coco` — a COCO-captions annotation file (``captions_train2017.json`` format), with
  the images either in a local folder (``--images``) or referenced by their ``coco_url``;
* :func:`sample_folder` — a plain folder of images, optionally with a JSONL of ground-truth captions;
* :func:`sample_dataset` — a Hugging Face ``datasets`` dataset (the ``datasets`` extra); the sampled
  images are written next to the manifest.

Sampling is a seeded shuffle of the candidates, taken in order until ``n`` usable images are found:
local images that cannot be decoded are skipped and listed in ``origin["skipped"]`` (never silently
dropped), and the same seed always gives the same manifest.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jmllm.judge.conventions import ImageLoadError, UnsafePathError, open_image, resolve_inside
from jmllm.judge.errors import JudgeError
from jmllm.judge.files import (
    atomic_write_bytes,
    atomic_write_text,
    read_json,
    read_jsonl,
    sha256_file,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_FORMAT",
    "Manifest",
    "ManifestImage",
    "check_image",
    "sample_coco",
    "sample_dataset",
    "sample_folder",
]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "jmllm-judge/manifest"
MANIFEST_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ManifestImage:
    """One sampled image. Exactly one of ``path`` (local) and ``url`` (remote) is set."""

    image_id: str
    path: Path | None = None
    url: str | None = None
    # SHA-256 of the local file's bytes; part of every cache key, checked again before judging.
    sha256: str | None = None
    ground_truth: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.url is None):
            raise ValueError(f"image {self.image_id!r}: give exactly one of path and url")
        if self.path is not None and self.sha256 is None:
            raise ValueError(f"image {self.image_id!r}: a local image needs its sha256")

    @property
    def location(self) -> str:
        """The path or URL, for messages."""
        return str(self.path) if self.path is not None else str(self.url)


@dataclass
class Manifest:
    """The fixed sample of images, in sampling order."""

    images: list[ManifestImage]
    seed: int
    # Where the sample came from and what was skipped on the way (JSON-serialisable).
    origin: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for image in self.images:
            if image.image_id in seen:
                raise JudgeError(f"manifest: image id {image.image_id!r} appears twice")
            seen.add(image.image_id)

    def __len__(self) -> int:
        return len(self.images)

    def by_id(self) -> dict[str, ManifestImage]:
        return {image.image_id: image for image in self.images}

    def to_json(self, base: Path | None = None) -> dict[str, Any]:
        """JSON form; local paths under ``base`` are stored relative to it (portable folders)."""
        images = []
        for image in self.images:
            record: dict[str, Any] = {"image_id": image.image_id}
            if image.path is not None:
                record["path"] = _portable(image.path, base)
                record["sha256"] = image.sha256
            else:
                record["url"] = image.url
            record["ground_truth"] = image.ground_truth
            images.append(record)
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "seed": self.seed,
            "n": len(self.images),
            "origin": self.origin,
            "images": images,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        base = path.resolve().parent
        text = json.dumps(self.to_json(base), ensure_ascii=False, indent=1) + "\n"
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read a manifest written by :meth:`save` (``jmllm-judge sample``).

        Raises:
            JudgeError: the file is unreadable, not a manifest, or a field has the wrong type
                (naming the file and the field).
        """
        path = Path(path)
        data = read_json(path, "manifest")
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise JudgeError(
                f"{path} is not a jmllm-judge manifest (write one with `jmllm-judge sample`)"
            )
        if data.get("version") != MANIFEST_VERSION:
            raise JudgeError(f"manifest {path}: unsupported version {data.get('version')!r}")
        records = data.get("images", [])
        if not isinstance(records, list):
            raise JudgeError(
                f"manifest {path}: 'images' must be a list, got {type(records).__name__}"
            )
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise JudgeError(f"manifest {path}: 'seed' must be an integer, got {seed!r}")
        origin = data.get("origin", {})
        if not isinstance(origin, dict):
            raise JudgeError(f"manifest {path}: 'origin' must be an object")
        base = path.resolve().parent
        images = []
        for i, record in enumerate(records):
            where = f"manifest {path}: images[{i}]"
            if not isinstance(record, dict):
                raise JudgeError(f"{where} must be an object, got {type(record).__name__}")
            for name in ("path", "url", "sha256", "ground_truth"):
                if record.get(name) is not None and not isinstance(record[name], str):
                    raise JudgeError(f"{where}.{name} must be a string")
            if not isinstance(record.get("image_id"), (str, int)) or isinstance(
                record.get("image_id"), bool
            ):
                raise JudgeError(f"{where}.image_id must be a string or an integer")
            try:
                local = record.get("path")
                images.append(
                    ManifestImage(
                        image_id=str(record["image_id"]),
                        path=(base / local) if local is not None else None,
                        url=record.get("url"),
                        sha256=record.get("sha256"),
                        ground_truth=record.get("ground_truth"),
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise JudgeError(f"{where} is malformed ({e})") from None
        return cls(images=images, seed=seed, origin=origin)


def _portable(path: Path, base: Path | None) -> str:
    resolved = path.resolve()
    if base is not None:
        try:
            return resolved.relative_to(base).as_posix()
        except ValueError:
            pass
    return str(resolved)


def check_image(path: Path) -> str | None:
    """``None`` if the file decodes as an image, else the reason it does not. The pixel limit
    (:data:`~jmllm.judge.conventions.MAX_IMAGE_PIXELS`) is checked from the header first, so an
    image too large is refused without being decoded."""
    if not path.is_file():
        return "file not found"
    try:
        open_image(path, name=path.name).close()  # full decode: catches truncated files too
    except ImageLoadError as e:
        return str(e).removeprefix(f"{path.name}: ")
    return None


def _clean_caption(caption: Any, where: str) -> str:
    if not isinstance(caption, str):
        raise JudgeError(f"{where}: caption must be a string, got {type(caption).__name__}")
    return caption.strip()


def _pick_caption(captions: Sequence[str], seed: int, image_id: str) -> str:
    # Seeded per image, so an image's ground truth does not depend on which other images were
    # drawn or skipped.
    return random.Random(f"{seed}:{image_id}").choice(list(captions))


def _take(
    candidates: Sequence[str],
    n: int,
    seed: int,
    make: Any,
    what: str,
) -> tuple[list[ManifestImage], list[dict[str, str]]]:
    """Shuffle ``candidates`` with ``seed`` and call ``make(candidate)`` in that order until ``n``
    images are made; ``make`` returns a ManifestImage or a reason string for a skipped candidate."""
    if n < 1:
        raise JudgeError(f"the sample size must be at least 1, got {n}")
    order = list(candidates)
    random.Random(seed).shuffle(order)
    chosen: list[ManifestImage] = []
    skipped: list[dict[str, str]] = []
    for candidate in order:
        if len(chosen) == n:
            break
        made = make(candidate)
        if isinstance(made, str):
            log.warning("skipping %s: %s", candidate, made)
            skipped.append({"image_id": str(candidate), "reason": made})
        else:
            chosen.append(made)
    if len(chosen) < n:
        raise JudgeError(
            f"{what}: asked for {n} images but only {len(chosen)} of {len(order)} candidates are "
            f"usable ({len(skipped)} skipped, see the log)"
        )
    return chosen, skipped


def _local_image(image_id: str, path: Path, ground_truth: str | None) -> ManifestImage | str:
    reason = check_image(path)
    if reason is not None:
        return f"{path}: {reason}"
    return ManifestImage(
        image_id=image_id, path=path.resolve(), sha256=sha256_file(path), ground_truth=ground_truth
    )


def sample_coco(
    annotations: str | os.PathLike[str],
    n: int = 100,
    *,
    seed: int = 0,
    images_dir: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Sample ``n`` images with one ground-truth caption each from a COCO-captions annotation file.

    Args:
        annotations: a ``captions_*.json`` file (keys ``images`` and ``annotations``).
        n: how many images (the paper uses 100).
        seed: sampling seed; the same seed and file give the same manifest.
        images_dir: folder with the images' ``file_name``s (e.g. ``train2017/``). Without it the
            images are referenced by ``coco_url`` and the judge fetches them itself.

    Returns:
        The manifest; images that cannot be decoded are skipped and listed in ``origin``.

    >>> manifest = sample_coco("captions_train2017.json", 100, seed=0, images_dir="train2017")  # doctest: +SKIP
    """
    annotations = Path(annotations)
    data = read_json(annotations, "COCO annotations")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise JudgeError(
            f"{annotations} is not a COCO captions file: expected an object with lists "
            "'images' and 'annotations'"
        )

    images: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "id" not in entry:
            raise JudgeError(f"{annotations}: images[{i}] has no 'id'")
        images[str(entry["id"])] = entry
    captions: dict[str, list[tuple[Any, str]]] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise JudgeError(f"{annotations}: annotations[{i}] needs 'image_id' and 'caption'")
        text = _clean_caption(ann["caption"], f"{annotations}: annotations[{i}]")
        captions.setdefault(str(ann["image_id"]), []).append((ann.get("id", i), text))
    candidates = sorted(
        (image_id for image_id in captions if image_id in images),
        key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s),  # numeric ids in number order
    )
    folder = Path(images_dir) if images_dir is not None else None
    if folder is not None and not folder.is_dir():
        raise JudgeError(f"images folder {folder} does not exist")

    def make(image_id: str) -> ManifestImage | str:
        entry = images[image_id]
        ordered = [text for _, text in sorted(captions[image_id], key=lambda c: str(c[0]))]
        truth = _pick_caption(ordered, seed, image_id)
        if folder is not None:
            if "file_name" not in entry:
                return "no 'file_name' in the annotation file"
            try:  # inside --images-dir: no absolute path, no "..", no link that leads out
                path = resolve_inside(folder, entry["file_name"], "file_name")
            except UnsafePathError as exc:
                return str(exc)
            return _local_image(image_id, path, truth)
        url = entry.get("coco_url") or entry.get("flickr_url")
        if not url:
            return "no 'coco_url' in the annotation file (pass --images)"
        return ManifestImage(image_id=image_id, url=str(url), ground_truth=truth)

    chosen, skipped = _take(candidates, n, seed, make, str(annotations))
    origin = {
        "kind": "coco",
        "annotations": str(annotations.resolve()),
        "annotations_sha256": sha256_file(annotations),
        "images_dir": str(folder.resolve()) if folder is not None else None,
        "candidates": len(candidates),
        "skipped": skipped,
    }
    return Manifest(images=chosen, seed=seed, origin=origin)


def sample_folder(
    folder: str | os.PathLike[str],
    n: int = 100,
    *,
    seed: int = 0,
    ground_truth: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Sample ``n`` images from a folder (searched recursively for image files).

    Args:
        folder: the images.
        n: how many images.
        seed: sampling seed.
        ground_truth: optional JSONL with one object per image, ``{"image": "<path relative to the
            folder, or file name>", "caption": "..."}`` (``caption`` may be a list: one is picked,
            seeded). When given, only images that have a caption are sampled.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise JudgeError(f"images folder {folder} does not exist")
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise JudgeError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    truths: dict[str, list[str]] | None = None
    if ground_truth is not None:
        truths = _read_truths(Path(ground_truth), files)
        files = [f for f in files if f in truths]

    def make(rel: str) -> ManifestImage | str:
        truth = None if truths is None else _pick_caption(truths[rel], seed, rel)
        return _local_image(rel, folder / rel, truth)

    chosen, skipped = _take(files, n, seed, make, str(folder))
    origin = {
        "kind": "folder",
        "folder": str(folder.resolve()),
        "ground_truth": str(Path(ground_truth).resolve()) if ground_truth is not None else None,
        "candidates": len(files),
        "skipped": skipped,
    }
    return Manifest(images=chosen, seed=seed, origin=origin)


def _read_truths(path: Path, files: Iterable[str]) -> dict[str, list[str]]:
    by_name: dict[str, list[str]] = {}
    for rel in files:
        by_name.setdefault(Path(rel).name, []).append(rel)
    truths: dict[str, list[str]] = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        where = f"{path}:{number}"
        if "image" not in record or "caption" not in record:
            raise JudgeError(f"{where}: needs 'image' and 'caption'")
        image = str(record["image"]).replace(os.sep, "/")
        if image in by_name.get(Path(image).name, []):
            rel = image
        elif len(by_name.get(image, [])) == 1:
            rel = by_name[image][0]
        else:
            raise JudgeError(
                f"{where}: image {image!r} is not in the folder (or its name is ambiguous)"
            )
        raw = record["caption"]
        items = raw if isinstance(raw, list) else [raw]
        truths.setdefault(rel, []).extend(_clean_caption(c, where) for c in items)
    return truths


def sample_dataset(
    dataset: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    n: int = 100,
    *,
    seed: int = 0,
    split: str = "train",
    image_column: str = "image",
    caption_column: str | None = "caption",
    id_column: str | None = None,
) -> Manifest:
    """Sample ``n`` images from a Hugging Face ``datasets`` dataset (needs the ``datasets`` extra).

    Args:
        dataset: a folder written by ``Dataset.save_to_disk`` or a dataset name for
            ``load_dataset`` (from the local cache when ``HF_DATASETS_OFFLINE=1``).
        out_dir: the sampled images' original bytes are written to ``out_dir/images/``.
        n, seed: sample size and seed.
        split: the split of a ``DatasetDict``.
        image_column: an ``Image`` feature, or a string column with local paths or URLs.
        caption_column: ground-truth caption (a string, or a list of strings: one is picked,
            seeded); ``None`` for no ground truth.
        id_column: column with a stable image id; default ``row-<index>``.
    """
    try:
        import datasets
    except ImportError as e:
        raise JudgeError(
            "sampling from a `datasets` dataset needs the datasets extra: "
            "pip install 'jmllm-judge[datasets]'"
        ) from e

    source = Path(dataset)
    try:
        if source.exists():
            loaded = datasets.load_from_disk(str(source))
        else:
            loaded = datasets.load_dataset(str(dataset), split=split)
    except Exception as e:  # datasets raises many types; the message is what matters here
        raise JudgeError(f"cannot load dataset {dataset}: {type(e).__name__}: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise JudgeError(
                f"dataset {dataset} has no split {split!r} (splits: {', '.join(loaded)})"
            )
        loaded = loaded[split]
    columns = loaded.column_names
    for name in (image_column, caption_column, id_column):
        if name is not None and name not in columns:
            raise JudgeError(
                f"dataset {dataset} has no column {name!r} (columns: {', '.join(columns)})"
            )
    if isinstance(loaded.features[image_column], datasets.Image):
        loaded = loaded.cast_column(
            image_column, datasets.Image(decode=False)
        )  # keep original bytes

    out_dir = Path(out_dir)
    ids = [str(v) for v in loaded[id_column]] if id_column is not None else None

    def make(index: int) -> ManifestImage | str:
        row = loaded[int(index)]
        image_id = ids[index] if ids is not None else f"row-{index}"
        truth = None
        if caption_column is not None:
            raw = row[caption_column]
            items = [c for c in (raw if isinstance(raw, list) else [raw]) if isinstance(c, str)]
            if not items:
                return f"row {index}: no caption in column {caption_column!r}"
            truth = _pick_caption([c.strip() for c in items], seed, image_id)
        value = row[image_column]
        if isinstance(value, str):
            if value.startswith(("http://", "https://")):
                return ManifestImage(image_id=image_id, url=value, ground_truth=truth)
            return _local_image(image_id, Path(value), truth)
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            data = value.get("bytes") or Path(value["path"]).read_bytes()
            return _export_image(image_id, index, data, out_dir, truth)
        return f"row {index}: unsupported image value {type(value).__name__}"

    indices = list(range(len(loaded)))
    chosen, skipped = _take(indices, n, seed, make, str(dataset))  # type: ignore[arg-type]
    origin = {
        "kind": "datasets",
        "dataset": str(source.resolve()) if source.exists() else str(dataset),
        "split": split,
        "image_column": image_column,
        "caption_column": caption_column,
        "candidates": len(indices),
        "skipped": skipped,
    }
    return Manifest(images=chosen, seed=seed, origin=origin)


def _export_image(
    image_id: str, index: int, data: bytes, out_dir: Path, truth: str | None
) -> ManifestImage | str:
    try:
        im = open_image(data, name=f"row {index}")
    except ImageLoadError as e:
        return str(e)
    suffix = "." + (im.format or "png").lower().replace("jpeg", "jpg")
    im.close()
    path = atomic_write_bytes(out_dir / "images" / f"{index:08d}{suffix}", data)
    return ManifestImage(
        image_id=image_id, path=path.resolve(), sha256=sha256_file(path), ground_truth=truth
    )
