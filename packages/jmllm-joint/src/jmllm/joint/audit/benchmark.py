"""POPE and CHAIR on J at scale: batched answers across images, OWL-ViT's evidence from the same
embedding, resumable and split between processes like the authors' audit.

For every image of the benchmark, J answers its prompts (POPE: the image's distinct questions
over all splits, the splits sharing their positive questions; CHAIR: one caption prompt) and
OWL-ViT scores the image's objects (POPE: the objects its questions name; CHAIR: every category
of the synonym list) on the **same** ``t``: the best patch's score and box. The answers of many
images run as one batch through :meth:`JointModel.generate` (prompts left-padded, one batched
``generate``, greedy answers equal to the one-at-a-time ones); POPE also keeps each answer's
first-token yes/no log-odds (:func:`jmllm.joint.audit.pope_rules.first_token_margin`).

Like :func:`jmllm.joint.audit.run_audit`: each finished batch appends one JSON line per image to
``results.jsonl`` (a kill loses at most the batch in progress), a rerun skips the finished
images, ``audit.json`` records the settings (another benchmark or other settings in the same
folder are refused), one run at a time writes a folder, and under ``accelerate launch`` the
processes split the images.

Example:
    >>> from jmllm.joint.audit.pope import load_pope
    >>> data = load_pope("POPE/output/coco", "coco/val2014")  # doctest: +SKIP
    >>> result = run_benchmark(model, pope_images(data), "pope-out",
    ...                        BenchmarkSettings("pope"))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from jmllm.align.files import append_jsonl, read_jsonl
from jmllm.align.options import check_template
from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING, get_preprocessing
from jmllm.joint.audit.data import AuditError, _file_fingerprint, _pixels_fingerprint
from jmllm.joint.audit.run import (
    DEFAULT_KV_CACHE_GIB,
    RESULTS_FILE,
    _claim_folder,
    _Fingerprints,
    _one_line,
    _prefetched,
    exclusive_folder,
    kv_cache_bytes,
    process_state,
    settings_digest,
)
from jmllm.joint.chat.templates import INTERACTIVE_TEMPLATE, PromptError, get_template
from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION, check_tokenization

BENCHMARKS = ("pope", "chair")
CHAIR_PROMPT = "Please describe this image in detail."  # OPERA's CHAIR prompt, widely reused
DEFAULT_MAX_NEW_TOKENS = {"pope": 128, "chair": 512}  # LLaVA's POPE loader; OPERA's CHAIR
MAX_ROWS_PER_BATCH = 64


@dataclass(frozen=True)
class BenchmarkSettings:
    """How J is asked (everything that changes an answer or a score).

    Attributes:
        benchmark: ``pope`` or ``chair``.
        question: POPE: a format string with one ``{}`` for the file's question (default the
            file's question and LLaVA's ``Answer the question using a single word or phrase.``);
            CHAIR: the caption prompt (default ``Please describe this image in detail.``).
        template: the conversation template (default ``llava-1.5``, the model card's).
        max_new_tokens: answer limit (default 128 for POPE, as LLaVA's loader; 512 for CHAIR).
        query_template: OWL-ViT's query for an object (default the bare name, as the authors).
        vision: ``joint`` (W(t)) or ``llava`` (stock LLaVA's own vision tower, for comparison).
        tokenization: how prompts become token ids (default ``checkpoint``, with the model
            card's template; ``legacy``: the authors' ids; :mod:`jmllm.joint.chat.tokenization`).
        preprocessing: how images become the models' inputs (default ``exif``; ``authors``:
            the stored pixels, the HF processors' resize; :mod:`jmllm.align.preprocessing`).
    """

    benchmark: str
    question: str = ""
    template: str = INTERACTIVE_TEMPLATE
    max_new_tokens: int = 0
    query_template: str = "{}"
    vision: str = "joint"
    tokenization: str = INTERACTIVE_TOKENIZATION
    preprocessing: str = INTERACTIVE_PREPROCESSING

    def __post_init__(self) -> None:
        from jmllm.joint.audit.pope import POPE_QUESTION

        if self.benchmark not in BENCHMARKS:
            raise AuditError(f"benchmark: {self.benchmark!r} is not one of {', '.join(BENCHMARKS)}")
        if not self.question:
            default = POPE_QUESTION if self.benchmark == "pope" else CHAIR_PROMPT
            object.__setattr__(self, "question", default)
        if not self.max_new_tokens:
            object.__setattr__(self, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS[self.benchmark])
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 4096:
            raise AuditError(f"max_new_tokens: must be in 1..4096, got {self.max_new_tokens!r}")
        try:
            check_template(self.query_template, "query template")
            if self.benchmark == "pope":
                check_template(self.question, "question")
            elif not self.question.strip():
                raise AuditError("prompt: empty caption prompt")
            get_template(self.template)
            check_tokenization(self.tokenization)
            get_preprocessing(self.preprocessing)
        except (ValueError, PromptError) as exc:
            raise AuditError(str(exc)) from None
        if self.vision not in ("joint", "llava"):
            raise AuditError(f"vision: {self.vision!r} is neither 'joint' nor 'llava'")

    def prompt(self, text: str) -> str:
        """The question J is asked for a POPE question (or the CHAIR prompt)."""
        return self.question.format(text) if self.benchmark == "pope" else self.question

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BenchmarkImage:
    """One image of a benchmark and what is asked about it.

    Attributes:
        image_id: the record key (POPE: the file name; CHAIR: the COCO image id).
        source: its path (or a loader).
        file: the name shown in reports.
        texts: POPE: its distinct questions as the file writes them; CHAIR: ``("",)``.
        owl_classes: the objects OWL-ViT scores on its ``t``.
    """

    image_id: str
    source: str | os.PathLike[str] | Callable[[], Any]
    file: str
    texts: tuple[str, ...]
    owl_classes: tuple[str, ...]

    def load(self) -> Any:
        return self.source() if callable(self.source) else self.source

    def fingerprint(self) -> str:
        """SHA-256 of the image's file (a loader: of its pixels): a resumed run keeps an
        image's answers only while the image is the same."""
        if callable(self.source):
            return _pixels_fingerprint(self.source())
        return _file_fingerprint(self.source)


@dataclass
class BenchmarkResult:
    """What :func:`run_benchmark` produced.

    Attributes:
        settings: how J was asked; images: the benchmark's images.
        lines: image id → its record (answers, tokens, margins, OWL-ViT evidence).
        failed: image id → why it could not be answered (retried on rerun).
        processed: images answered by this run (all processes); kept: finished before.
        rows_per_batch: answers per batched ``generate``.
    """

    settings: BenchmarkSettings
    images: list[BenchmarkImage]
    lines: dict[str, dict[str, Any]]
    failed: dict[str, str] = field(default_factory=dict)
    processed: int = 0
    kept: int = 0
    out: Path | None = None
    seconds: float = 0.0
    rows_per_batch: int = 0


def pope_images(data: Any) -> list[BenchmarkImage]:
    """The images of :class:`~jmllm.joint.audit.pope_files.PopeData`, each with its distinct questions and
    their objects."""
    out = []
    for image, rows in data.questions().items():
        objects = tuple(dict.fromkeys(r.object for r in rows if r.object))
        out.append(
            BenchmarkImage(
                image_id=image,
                source=data.images / image,
                file=image,
                texts=tuple(r.text for r in rows),
                owl_classes=objects,
            )
        )
    return out


def chair_images(
    files: dict[str, str], folder: str | os.PathLike[str], categories: Sequence[str]
) -> list[BenchmarkImage]:
    """CHAIR's images (image id → file name in ``folder``), each scored for every category."""
    root = Path(folder)
    classes = tuple(categories)
    return [
        BenchmarkImage(image_id, root / name, name, ("",), classes)
        for image_id, name in files.items()
    ]


# ---------------------------------------------------------------------------------------------
# One batch
# ---------------------------------------------------------------------------------------------


class Asker:
    """Answers the prompts of several images in batched ``generate`` calls and reads OWL-ViT's
    evidence for their objects from the same embeddings.

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        settings: the benchmark's settings.
        classes: every object OWL-ViT may be asked about (encoded once).
        rows_per_batch: answers per ``generate`` call.

    Example:
        >>> asker = Asker(model, BenchmarkSettings("chair"), ["dog", "cat"], 16)  # doctest: +SKIP
        >>> lines = asker.answer(images, decoded)  # doctest: +SKIP
    """

    def __init__(
        self, model: Any, settings: BenchmarkSettings, classes: Sequence[str], rows_per_batch: int
    ) -> None:
        from jmllm.joint.audit.pope import yes_no_token_ids

        self.model = model
        self.settings = settings
        self.rows_per_batch = rows_per_batch
        self.classes = list(dict.fromkeys(classes))
        self._index = {c: i for i, c in enumerate(self.classes)}
        self._queries = None
        if self.classes:
            try:
                self._queries = model.encode_queries(self.classes, settings.query_template)
            except PromptError as exc:
                raise AuditError(f"objects: {exc}") from None
        self.yes_ids: list[int] = []
        self.no_ids: list[int] = []
        if settings.benchmark == "pope":
            self.yes_ids, self.no_ids = yes_no_token_ids(model.tokenizer)

    def evidence(self, t: torch.Tensor, size: tuple[int, int], classes: Sequence[str]) -> dict:
        """class → [score, x0, y0, x1, y1]: OWL-ViT's best patch for each class on ``t`` (its
        sigmoid score, its box in pixels of the original image)."""
        from jmllm.joint.detection.heads import cxcywh_to_xyxy

        if not classes or self._queries is None:
            return {}
        rows = torch.tensor([self._index[c] for c in classes], device=self._queries.device)
        with torch.no_grad():
            logits, boxes = self.model.detection_heads(t.to(self.model.device), self._queries[rows])
        scores = torch.sigmoid(logits[0].float()).cpu()  # (N, Q)
        best = scores.argmax(dim=0)  # (Q,)
        width, height = size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        xyxy = cxcywh_to_xyxy(boxes[0].float().cpu()[best]) * scale  # (Q, 4) pixels
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        return {
            c: [round(float(scores[best[q], q]), 7), *(round(float(v), 2) for v in xyxy[q])]
            for q, c in enumerate(classes)
        }

    @torch.no_grad()
    def answer(self, images: Sequence[BenchmarkImage], emb: Any) -> list[dict[str, Any]]:
        """One record per image: the answers to its prompts (batched across the images) and
        OWL-ViT's evidence. ``emb`` holds the images' embeddings in the same order."""
        s = self.settings
        rows = [(k, text) for k, image in enumerate(images) for text in image.texts]
        answers: list[Any] = []
        for start in range(0, len(rows), self.rows_per_batch):
            chunk = rows[start : start + self.rows_per_batch]
            answers += self.model.generate(
                emb.select([k for k, _ in chunk]),
                [s.prompt(text) for _, text in chunk],
                max_new_tokens=s.max_new_tokens,
                template=s.template,
                tokenization=s.tokenization,
                vision=s.vision,
                first_token_logits=s.benchmark == "pope",
            )
        records: list[dict[str, Any]] = [
            {
                "image_id": image.image_id,
                "file": image.file,
                "answers": [],
                "owl": self.evidence(emb.t[k : k + 1], emb.image_sizes[k], image.owl_classes),
            }
            for k, image in enumerate(images)
        ]
        from jmllm.joint.audit.pope import first_token_margin

        for (k, text), answer in zip(rows, answers, strict=True):
            entry: dict[str, Any] = {
                "text": text,
                "answer": answer.text,
                "tokens": [int(v) for v in answer.token_ids],
                "finished": bool(answer.finished),
            }
            if s.benchmark == "pope" and answer.first_logits is not None:
                margin = first_token_margin(answer.first_logits, self.yes_ids, self.no_ids)
                entry["margin"] = None if margin is None else round(margin, 6)
                entry["first_token"] = int(answer.first_logits.argmax())
            records[k]["answers"].append(entry)
        return records


def rows_per_batch(
    model: Any,
    settings: BenchmarkSettings,
    batch_size: int | None = None,
    kv_cache_gib: float = DEFAULT_KV_CACHE_GIB,
    prompt_tokens: int | None = None,
) -> int:
    """Answers per batched ``generate``: ``batch_size``, or as many as ``kv_cache_gib`` of KV
    cache hold at the longest (prompt + answer limit), at most 64.

    Example:
        >>> rows_per_batch(model, BenchmarkSettings("chair"))  # 7b, bf16: 8 GiB / 0.6 GiB  # doctest: +SKIP
        14
    """
    if batch_size is not None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise AuditError(f"batch_size: must be a positive integer, got {batch_size!r}")
        return batch_size
    if not math.isfinite(kv_cache_gib) or kv_cache_gib <= 0:
        raise AuditError(f"kv_cache_gib: must be a positive number, got {kv_cache_gib!r}")
    tokens = (prompt_tokens or model.num_image_tokens + 64) + settings.max_new_tokens
    per_row = kv_cache_bytes(model.llava.config.text_config, model.llava.dtype, tokens)
    return int(max(1, min(MAX_ROWS_PER_BATCH, kv_cache_gib * 2**30 // max(1, per_row))))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _finished(
    path: Path, digest: str, planned: dict[str, BenchmarkImage], fingerprints: _Fingerprints
) -> dict[str, Any]:
    """Records of ``results.jsonl`` made with these settings that answer exactly the image's
    planned prompts, hold its OWL-ViT evidence and were made from the same image file (its
    SHA-256); a later line for an image wins."""
    found: dict[str, dict[str, Any]] = {}
    for line in read_jsonl(path):
        image_id = line.get("image_id")
        image = planned.get(image_id) if isinstance(image_id, str) else None
        if image is None or line.get("settings") != digest:
            continue
        if line.get("sha256") is None or line.get("sha256") != fingerprints.of(image.image_id):
            continue
        try:
            texts = [str(a["text"]) for a in line["answers"]]
            owl = line["owl"]
        except (KeyError, TypeError):
            continue
        if (
            texts == list(image.texts)
            and isinstance(owl, dict)
            and set(image.owl_classes) <= set(owl)
        ):
            found[image.image_id] = line
    return found


def _groups(
    images: Sequence[BenchmarkImage], rows: int, exif_orientation: bool = True
) -> Iterator[list[tuple[BenchmarkImage, Any]]]:
    """Consecutive (image, decoded) groups holding about ``rows`` prompts each (an image's
    prompts stay together), images decoded ahead in a background thread."""
    group: list[tuple[BenchmarkImage, Any]] = []
    count = 0
    # _prefetched only calls .load() on each item
    for item, decoded in _prefetched(list(images), exif_orientation=exif_orientation):  # type: ignore[arg-type]
        image = cast(BenchmarkImage, item)
        group.append((image, decoded))
        count += len(image.texts)
        if count >= rows:
            yield group
            group, count = [], 0
    if group:
        yield group


def _embed_group(
    model: Any,
    group: list[tuple[BenchmarkImage, Any]],
    failed: dict[str, str],
    fingerprints: _Fingerprints,
    preprocessing: str = INTERACTIVE_PREPROCESSING,
):
    """The embeddings of a group's readable images (one batch through OWL-ViT), and those
    images; an image that could not be read, or that J cannot take, is recorded in ``failed``
    (the others are then embedded one by one). Each read image's SHA-256 is remembered."""
    from jmllm.joint.model.joint import JointEmbedding

    readable = []
    for image, decoded in group:
        if isinstance(decoded, Exception):
            failed[image.image_id] = _one_line(decoded)
        else:
            pixels, fingerprint = decoded
            fingerprints.remember(image.image_id, fingerprint)
            readable.append((image, pixels))
    if not readable:
        return [], None
    try:
        embedded = model.embed([d for _, d in readable], preprocessing=preprocessing)
        return [image for image, _ in readable], embedded
    except ValueError:  # JointModelError: some image J cannot take; find it
        pass
    kept, embeddings = [], []
    for image, decoded in readable:
        try:
            embeddings.append(model.embed([decoded], preprocessing=preprocessing))
        except ValueError as exc:
            failed[image.image_id] = _one_line(exc)
            continue
        kept.append(image)
    if not kept:
        return [], None
    emb = JointEmbedding(
        t=torch.cat([e.t for e in embeddings]),
        image_sizes=[e.image_sizes[0] for e in embeddings],
        images=[im for e in embeddings for im in e.images],
        preprocessing=preprocessing,
    )
    return kept, emb


def run_benchmark(
    model: Any,
    images: Sequence[BenchmarkImage],
    out: str | os.PathLike[str] | None,
    settings: BenchmarkSettings,
    *,
    batch_size: int | None = None,
    kv_cache_gib: float = DEFAULT_KV_CACHE_GIB,
    progress: bool = True,
    on_batch: Callable[[list[str]], None] | None = None,
) -> BenchmarkResult:
    """Answer a benchmark's images with J (resumable, splittable; see the module docstring).

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        images: from :func:`pope_images` or :func:`chair_images`.
        out: folder of ``audit.json`` and ``results.jsonl`` (None: in memory, one process).
        settings: the prompts, template, limits.
        batch_size: answers per batched ``generate`` (None: as many as ``kv_cache_gib`` hold).
        kv_cache_gib: the KV-cache budget of one batch.
        progress: show a progress bar.
        on_batch: called with the image ids of each saved batch (tests, monitors).

    Returns:
        :class:`BenchmarkResult`.

    Raises:
        AuditError: an output folder holding another audit or written by another run.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    planned = {image.image_id: image for image in images}
    if len(planned) != len(images):
        raise AuditError("images: an image id appears twice")
    classes = list(dict.fromkeys(c for image in images for c in image.owl_classes))
    per_batch = rows_per_batch(model, settings, batch_size, kv_cache_gib)
    asker = Asker(model, settings, classes, per_batch)
    digest = settings_digest(settings, model)  # type: ignore[arg-type]
    state = process_state()
    folder = Path(out) if out is not None else None
    if folder is None and state.num_processes > 1:
        raise AuditError("out: required when the benchmark is split between processes")
    results = folder / RESULTS_FILE if folder else None
    failed: dict[str, str] = {}
    fingerprints = _Fingerprints(list(images))  # type: ignore[arg-type]
    with exclusive_folder(folder, state):
        if folder is not None:  # audit.json is written once a first batch has its answers
            _claim_folder(folder, settings, model, digest, write=False)  # type: ignore[arg-type]
        state.wait_for_everyone()
        recorded = folder is None
        done = _finished(results, digest, planned, fingerprints) if results else {}
        lines: dict[str, dict[str, Any]] = dict(done)
        todo = [image for image in images if image.image_id not in done]
        with state.split_between_processes(todo) as share:
            bar = tqdm(
                total=len(share),
                desc=f"{settings.benchmark} [process {state.process_index}]",
                unit="img",
                disable=not progress,
                position=state.process_index,
            )
            exif = get_preprocessing(settings.preprocessing).exif_orientation
            for group in _groups(share, per_batch, exif):
                kept, emb = _embed_group(model, group, failed, fingerprints, settings.preprocessing)
                records = asker.answer(kept, emb) if kept else []
                if records and not recorded:  # the settings are the folder's from now on
                    assert folder is not None
                    _claim_folder(folder, settings, model, digest, write=True)  # type: ignore[arg-type]
                    recorded = True
                for record in records:
                    record["settings"] = digest
                    record["sha256"] = fingerprints.of(record["image_id"])
                    if results is not None:
                        append_jsonl(results, record)  # at once: a kill loses the next batch
                    lines[record["image_id"]] = record
                if on_batch is not None and records:
                    on_batch([r["image_id"] for r in records])
                bar.update(len(group))
            bar.close()
        processed = len(todo) - len(failed)
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            gathered = gather_object([failed])
            failed = {k: v for part in gathered for k, v in part.items()}
            processed = len(todo) - len(failed)
            state.wait_for_everyone()
            assert results is not None
            lines = _finished(results, digest, planned, fingerprints)  # every process's images
    return BenchmarkResult(
        settings=settings,
        images=list(images),
        lines={i.image_id: lines[i.image_id] for i in images if i.image_id in lines},
        failed=failed,
        processed=processed,
        kept=len(done),
        out=folder,
        seconds=time.perf_counter() - started,
        rows_per_batch=per_batch,
    )


def pope_answers(result: BenchmarkResult) -> dict[tuple[str, str], Any]:
    """(image, question text) → :class:`~jmllm.joint.audit.pope.PopeAnswer` of a POPE run, with
    OWL-ViT's score and box for the question's object."""
    from jmllm.joint.audit.pope import PopeAnswer, question_object

    out = {}
    for image_id, line in result.lines.items():
        owl = line.get("owl", {})
        for entry in line["answers"]:
            obj = question_object(entry["text"])
            evidence = owl.get(obj) if obj else None
            out[(image_id, entry["text"])] = PopeAnswer(
                answer=entry["answer"],
                finished=bool(entry.get("finished", True)),
                margin=entry.get("margin"),
                owl_score=evidence[0] if evidence else None,
                box=tuple(evidence[1:]) if evidence else None,
                tokens=tuple(int(v) for v in entry.get("tokens", ())),
            )
    return out


__all__ = [
    "BENCHMARKS",
    "CHAIR_PROMPT",
    "DEFAULT_MAX_NEW_TOKENS",
    "Asker",
    "BenchmarkImage",
    "BenchmarkResult",
    "BenchmarkSettings",
    "chair_images",
    "pope_answers",
    "pope_images",
    "rows_per_batch",
    "run_benchmark",
]
