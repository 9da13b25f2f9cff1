"""POPE's official question files: find, read and check a folder's split files
(``coco_pope_{split}.json``) and the images they name.

POPE (Li et al., EMNLP 2023) asks ``Is there a {object} in the image?`` about COCO val2014
images, half the objects present, half absent, in three splits that differ by how the absent
objects were drawn (``random``, ``popular``, ``adversarial``). Its official files
(``AoiDragon/POPE``, ``output/coco/coco_pope_{split}.json``) are JSON Lines with one question a
line: ``question_id``, ``image`` (a file name of the image folder), ``text`` and ``label``
(``yes``/``no``). :func:`load_pope` reads them as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jmllm.align.files import resolve_inside
from jmllm.align.options import clip
from jmllm.joint.audit.dataset import AuditError

POPE_SPLITS = ("random", "popular", "adversarial")
# The post-prompt of LLaVA-1.5's POPE question file (llava_pope_test.jsonl) and lmms-eval's task
SINGLE_WORD_PROMPT = "\nAnswer the question using a single word or phrase."
POPE_QUESTION = "{}" + SINGLE_WORD_PROMPT  # the file's question, then the post-prompt
# The rows of AoiDragon/POPE's random split at commit e3e3926, which LLaVA's evaluation pinned;
# later commits have 3,000 (AoiDragon/POPE#17).
RANDOM_ROWS_PINNED_BY_LLAVA = 2910
_QUESTION_OBJECT = re.compile(r"^\s*is there an? (.+?) in the image\s*\?", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PopeRow:
    """One POPE question as its file gives it.

    Attributes:
        split: ``random``, ``popular`` or ``adversarial``; line: its line in the file (1-based).
        question_id, image, text, label: the file's fields (label ``yes`` or ``no``).
        object: the object the question names (``Is there a {object} in the image?``), or None
            for a question of another form (no OWL-ViT evidence is read for it).
    """

    split: str
    line: int
    question_id: Any
    image: str
    text: str
    label: str
    object: str | None

    @property
    def present(self) -> bool:
        return self.label == "yes"


@dataclass(frozen=True)
class PopeSplitFile:
    """A split's file: where it is, how many rows, its SHA-256 (which version of POPE)."""

    split: str
    path: Path
    rows: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "file": str(self.path),
            "rows": self.rows,
            "sha256": self.sha256,
        }
        if self.split == "random" and self.rows == RANDOM_ROWS_PINNED_BY_LLAVA:
            doc["note"] = (
                "2,910 rows: POPE's random split as of commit e3e3926, the version LLaVA's "
                "evaluation pinned (later versions have 3,000)"
            )
        return doc


@dataclass
class PopeData:
    """POPE's questions (every split given) and the folder of their images."""

    rows: list[PopeRow]
    files: dict[str, PopeSplitFile]
    images: Path
    excluded_images: int = 0  # left out by ``limit``

    @property
    def splits(self) -> list[str]:
        return [s for s in POPE_SPLITS if s in self.files]

    def image_names(self) -> list[str]:
        """Every image, once, in the order of first appearance (splits in POPE's order)."""
        return list(dict.fromkeys(r.image for r in self.rows))

    def questions(self) -> dict[str, list[PopeRow]]:
        """image → its distinct questions (one row per distinct text, first appearance): the
        splits share their positive questions, which are asked once."""
        out: dict[str, dict[str, PopeRow]] = {}
        for row in self.rows:
            out.setdefault(row.image, {}).setdefault(row.text, row)
        return {image: list(rows.values()) for image, rows in out.items()}


def find_pope_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """The split files of a folder: ``*pope_{split}.json`` or ``.jsonl`` (POPE's
    ``coco_pope_random.json`` …), in the folder or its ``pope/`` subfolder.

    Raises:
        AuditError: no such folder, no split file, or two files for one split.

    Example:
        >>> find_pope_files("POPE/output/coco")  # doctest: +SKIP
        {'random': PosixPath('POPE/output/coco/coco_pope_random.json'), ...}
    """
    root = Path(folder)
    if not root.is_dir():
        raise AuditError(f"{root}: no such POPE folder")
    for where in (root, root / "pope"):
        found: dict[str, Path] = {}
        for split in POPE_SPLITS:
            names = sorted(
                p
                for pattern in (f"*pope_{split}.json", f"*pope_{split}.jsonl")
                for p in where.glob(pattern)
                if p.is_file()
            )
            if len(names) > 1:
                listed = ", ".join(p.name for p in names)
                raise AuditError(f"{where}: several files for POPE's {split} split ({listed})")
            if names:
                found[split] = names[0]
        if found:
            return found
    raise AuditError(
        f"{root}: no POPE split file (expected *pope_random.json, *pope_popular.json, "
        "*pope_adversarial.json, here or in pope/)"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def question_object(text: str) -> str | None:
    """The object of a POPE question, or None for another form.

    Example:
        >>> question_object("Is there a dining table in the image?"), question_object("Why?")
        ('dining table', None)
    """
    match = _QUESTION_OBJECT.match(text)
    return " ".join(match.group(1).split()) if match else None


def _image_name(value: Any, where: str, images: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = clip(repr(value)) if isinstance(value, str) else type(value).__name__
        raise AuditError(f"{where}: 'image' must be a non-empty file name, got {shown}")
    name = value.strip()
    try:  # inside the image folder: no absolute path, no "..", no link that leads out
        resolve_inside(images, name, f"{where}: image")
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    return name


def read_split(path: str | os.PathLike[str], split: str, images: Path) -> list[PopeRow]:
    """The rows of one split file (JSON Lines; blank lines skipped).

    Raises:
        AuditError: unreadable file, a line that is not a JSON object with ``question_id``,
            ``image``, ``text`` and a ``label`` of ``yes``/``no``, or a question id twice.
    """
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"{file}: cannot read ({exc})") from None
    rows: list[PopeRow] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AuditError(f"{where}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise AuditError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(doc, dict):
            raise AuditError(f"{where}: expected a JSON object")
        missing = [k for k in ("question_id", "image", "text", "label") if k not in doc]
        if missing:
            raise AuditError(f"{where}: missing {', '.join(missing)}")
        label = str(doc["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise AuditError(f"{where}: label must be yes or no, got {clip(repr(doc['label']))}")
        text = doc["text"]
        if not isinstance(text, str) or not text.strip():
            raise AuditError(f"{where}: 'text' must be a non-empty question")
        key = json.dumps(doc["question_id"])
        if key in seen:
            raise AuditError(f"{where}: question_id {doc['question_id']!r} appears twice")
        seen.add(key)
        rows.append(
            PopeRow(
                split=split,
                line=number,
                question_id=doc["question_id"],
                image=_image_name(doc["image"], where, images),
                text=text.strip(),
                label=label,
                object=question_object(text),
            )
        )
    if not rows:
        raise AuditError(f"{file}: no questions")
    return rows


def load_pope(
    folder: str | os.PathLike[str],
    images: str | os.PathLike[str],
    splits: Sequence[str] | None = None,
    limit: int | None = None,
) -> PopeData:
    """POPE's question files of a folder (:func:`find_pope_files`) and their image folder.

    Args:
        folder: the folder of ``coco_pope_{split}.json`` (e.g. ``POPE/output/coco``).
        images: the folder the files' ``image`` names are in (COCO ``val2014``).
        splits: the splits to read (default every split found).
        limit: keep only the first ``limit`` images (order of first appearance) and their rows.

    Returns:
        :class:`PopeData`.

    Raises:
        AuditError: a missing folder or split, a malformed file.

    Example:
        >>> data = load_pope("POPE/output/coco", "coco/val2014")  # doctest: +SKIP
        >>> {s: f.rows for s, f in data.files.items()}  # doctest: +SKIP
        {'random': 3000, 'popular': 3000, 'adversarial': 3000}
    """
    image_folder = Path(images)
    if not image_folder.is_dir():
        raise AuditError(f"{image_folder}: no such image folder")
    found = find_pope_files(folder)
    wanted = list(splits) if splits is not None else list(found)
    for split in wanted:
        if split not in POPE_SPLITS:
            raise AuditError(f"split: {split!r} is not one of {', '.join(POPE_SPLITS)}")
        if split not in found:
            raise AuditError(f"{folder}: no file for POPE's {split} split")
    rows: list[PopeRow] = []
    files: dict[str, PopeSplitFile] = {}
    for split in POPE_SPLITS:
        if split not in wanted:
            continue
        split_rows = read_split(found[split], split, image_folder)
        files[split] = PopeSplitFile(split, found[split], len(split_rows), _sha256(found[split]))
        rows.extend(split_rows)
    excluded = 0
    if limit is not None:
        if limit < 1:
            raise AuditError(f"limit: must be at least 1, got {limit}")
        names = list(dict.fromkeys(r.image for r in rows))
        kept = set(names[:limit])
        excluded = len(names) - len(kept)
        rows = [r for r in rows if r.image in kept]
    return PopeData(rows, files, image_folder, excluded)


__all__ = [
    "POPE_QUESTION",
    "POPE_SPLITS",
    "SINGLE_WORD_PROMPT",
    "PopeData",
    "PopeRow",
    "PopeSplitFile",
    "find_pope_files",
    "load_pope",
    "question_object",
    "read_split",
]
