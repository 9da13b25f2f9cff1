"""Helpers for tests, demos and benchmarks: answer files as the questionnaire would export them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes, atomic_write_text
from .randomisation import participant_order, participant_seed
from .score import ANSWERS_FORMAT
from .spec import StudySpec

__all__ = ["answers_document", "write_answers", "write_png_header"]


def answers_document(
    spec: StudySpec, participant_id: str, correct: Collection[str]
) -> dict[str, Any]:
    """The answer document a participant exports after answering exactly the questions with ids
    in ``correct`` correctly (and the others wrongly), in their seeded order.

    Args:
        spec: The study spec.
        participant_id: The id as the questionnaire records it (its normal form, see
            :mod:`jmllm.userstudy.participants`; pass another form to imitate older files).
        correct: Ids of the questions to answer correctly.

    Returns:
        A JSON-ready dict in the questionnaire's export format.

    >>> import tempfile
    >>> from jmllm.userstudy.example import write_example
    >>> from jmllm.userstudy.spec import load_spec
    >>> spec = load_spec(write_example(tempfile.mkdtemp()))
    >>> len(answers_document(spec, "P1", correct=["q1"])["answers"])
    5
    """
    flip = {"A1": "A2", "A2": "A1"}
    entries = []
    for shown in participant_order([q.id for q in spec.questions], spec.seed, participant_id):
        q = spec.question(shown.question_id)
        spec_choice = q.correct if q.id in correct else flip[q.correct]
        # "Explanation 1" on screen is the page's second file when swapped, and the page holds
        # the spec's pair reversed when page_flipped.
        reversed_on_screen = shown.swapped != q.page_flipped
        entries.append(
            {
                "position": shown.position,
                "question_id": shown.question_id,
                "swapped": shown.swapped,
                "choice": flip[spec_choice] if reversed_on_screen else spec_choice,
            }
        )
    return {
        "format": ANSWERS_FORMAT,
        "study_title": spec.title,
        "spec_fingerprint": spec.fingerprint(),
        "study_seed": spec.seed,
        "participant_id": participant_id,
        "participant_seed": participant_seed(spec.seed, participant_id),
        "started_at": "2024-01-01T00:00:00.000Z",
        "finished_at": "2024-01-01T00:05:00.000Z",
        "answers": entries,
    }


def write_answers(
    spec: StudySpec,
    out_dir: str | Path,
    participant_id: str,
    correct: Collection[str],
    file_name: str | None = None,
) -> Path:
    """Write :func:`answers_document` as ``answers-<participant_id>.json`` (or ``file_name``),
    with characters other than letters, digits, ``_`` and ``-`` replaced by ``_`` as the
    questionnaire does.

    Returns:
        The path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", participant_id)[:40]
    path = out / (file_name or f"answers-{safe}.json")
    atomic_write_text(path, json.dumps(answers_document(spec, participant_id, correct), indent=2))
    return path


def write_png_header(path: str | os.PathLike[str], width: int, height: int) -> Path:
    """A PNG file of a few hundred bytes whose header claims ``width`` x ``height`` pixels: a
    decompression bomb for any reader that trusts the header (the pixel data is a stub).

    >>> import tempfile
    >>> bomb = write_png_header(Path(tempfile.mkdtemp()) / "bomb.png", 28_000, 28_000)
    >>> bomb.stat().st_size < 1000
    True
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    data += chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")
    path = Path(path)
    atomic_write_bytes(path, data)
    return path
