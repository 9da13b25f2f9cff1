"""The hallucination audit at dataset scale: the authors' yes/no protocol on J (DESIGN §1.4).

For every image of a COCO-format dataset and every class of its question plan
(:mod:`jmllm.joint.audit.questions`: all present and all absent classes, or POPE's sampling), J
is asked ``Is there a {class} in the image? Only answer with 'yes' or 'no'.`` in the ``paper``
template with the authors' token ids (``legacy`` tokenization) on the authors' pixels
(``authors`` preprocessing), and OWL-ViT's maximum score for the bare class name is read from
the **same** embedding ``t``. A "yes" to an absent class whose OWL-ViT score is high started in perception;
one with a low score started in the language model.

Its parts: :mod:`jmllm.joint.audit.settings` (how J is asked), :mod:`jmllm.joint.audit.asking`
(the questions about one image, fast and exactly: ``t`` once, the shared prompt prefix once, the
questions in batches; :func:`ask_one_by_one` is the reference loop),
:mod:`jmllm.joint.audit.results` (answers, records and the lines of ``results.jsonl``) and
:mod:`jmllm.joint.audit.output_folder` (one run at a time per folder); this module runs the
audit over the dataset and still exports every name of those parts.

Scale: :func:`run_audit` appends one JSON line per finished image to ``results.jsonl``; a rerun
skips finished images (a kill loses at most the image in progress); under ``accelerate launch``
the processes split the remaining images and append to the same file.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

from jmllm.align.files import (
    append_jsonl,
    atomic_write_text,  # noqa: F401
    folder_lock,  # noqa: F401
    read_jsonl,  # noqa: F401
    refuse_link,
)
from jmllm.align.options import check_template  # noqa: F401
from jmllm.align.preprocessing import (
    PAPER_PREPROCESSING,  # noqa: F401
    get_preprocessing,
)
from jmllm.joint.audit.asking import (
    DEFAULT_KV_CACHE_GIB,
    AnsweredQuestion,
    YesNoAuditor,
    _shared_prefix_length,  # noqa: F401
    ask_one_by_one,
    kv_cache_bytes,
)
from jmllm.joint.audit.data import (
    ARTICLES,  # noqa: F401
    AUTHORS_QUESTION,  # noqa: F401
    SAMPLINGS,  # noqa: F401
    AuditDataset,
    AuditError,
    AuditImage,
    QuestionPlan,
    plan_questions,
    question_text,  # noqa: F401
)
from jmllm.joint.audit.output_folder import (
    LOCK_FILE,  # noqa: F401
    LOCK_OWNER,  # noqa: F401
    claim_folder,
    exclusive_folder,
    process_state,
)
from jmllm.joint.audit.results import (
    PARSE_RULES,
    AuditRecord,
    AuditResult,
    _Fingerprints,
    _finished_lines,
    _record_line,
    _records_from_line,
    parse_answer,
)
from jmllm.joint.audit.settings import (
    AUTHORS_QUERY_TEMPLATE,
    DEFAULT_MAX_NEW_TOKENS,  # noqa: F401
    AuditSettings,
    _model_identity,
    model_identity,
    settings_digest,
)
from jmllm.joint.chat.templates import (
    PAPER_TEMPLATE,  # noqa: F401
    ConversationTemplate,  # noqa: F401
    PromptError,  # noqa: F401
    format_prompt,  # noqa: F401
    get_template,  # noqa: F401
)
from jmllm.joint.chat.tokenization import (
    PAPER_TOKENIZATION,  # noqa: F401
    TokenizationError,  # noqa: F401
    check_tokenization,  # noqa: F401
)

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SETTINGS_FILE = "audit.json"


def _prefetched(
    images: Sequence[AuditImage], ahead: int = 2, exif_orientation: bool = True
) -> Iterator[tuple[AuditImage, Any]]:
    """(image, (decoded PIL image, its SHA-256) or the exception) in order, decoding ``ahead``
    images in a background thread while the model works on the current one."""
    from jmllm.align import load_image

    def decode(item: AuditImage) -> Any:
        try:
            return load_image(item.load(), exif_orientation=exif_orientation), item.fingerprint()
        except Exception as exc:  # reported per image by the caller
            return exc

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-decode") as pool:
        queue: deque[tuple[AuditImage, Future[Any]]] = deque()
        upcoming = iter(images)
        for item in islice(upcoming, ahead + 1):
            queue.append((item, pool.submit(decode, item)))
        while queue:
            item, decoded = queue.popleft()
            following = next(upcoming, None)
            if following is not None:
                queue.append((following, pool.submit(decode, following)))
            yield item, decoded.result()


def run_audit(
    model: Any,
    dataset: AuditDataset,
    out: str | os.PathLike[str] | None = None,
    settings: AuditSettings | None = None,
    *,
    batch_size: int | None = None,
    kv_cache_gib: float = DEFAULT_KV_CACHE_GIB,
    progress: bool = True,
    on_image: Callable[[str], None] | None = None,
) -> AuditResult:
    """Run the hallucination audit of J on a dataset (resumable, splittable).

    With ``out``, each finished image is appended to ``out/results.jsonl`` at once (with the
    settings' digest and its questions), and images already there are skipped; launched with
    ``accelerate launch --num_processes N``, the N processes split the remaining images and
    every process returns the whole result. One run at a time writes a folder: another run
    into it is refused while this one holds its lock.

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        dataset: from :func:`~jmllm.joint.audit.data.load_coco` or
            :func:`~jmllm.joint.audit.data.load_objects_dataset`.
        out: folder for ``audit.json`` and ``results.jsonl`` (None: in memory, one process).
        settings: the protocol (default: the authors').
        batch_size, kv_cache_gib: questions per language-model batch (None: as many as
            ``kv_cache_gib`` of KV cache hold), see :class:`~jmllm.joint.audit.asking.YesNoAuditor`.
        progress: show a progress bar.
        on_image: called with each image id once its answers are saved (tests, monitors).

    Returns:
        :class:`~jmllm.joint.audit.results.AuditResult`; write the report with
        :func:`jmllm.joint.audit.report.write_audit_report`.

    Raises:
        AuditError: bad settings, an output folder holding another audit or being written by
            another run, a vocabulary the models cannot take.

    Example:
        >>> from jmllm.joint.audit.data import load_coco
        >>> ds = load_coco("instances_val2017.json", "val2017", limit=1000)  # doctest: +SKIP
        >>> result = run_audit(model, ds, "audit-out")  # doctest: +SKIP
        >>> len(result.records)  # 80 questions per image  # doctest: +SKIP
        80000
    """
    settings = settings or AuditSettings()
    started = time.perf_counter()
    plan = plan_questions(dataset, settings.sampling, settings.k, settings.seed)
    auditor = YesNoAuditor(model, settings, dataset.classes, batch_size, kv_cache_gib)
    digest = settings_digest(settings, model)
    state = process_state()
    folder = Path(out) if out is not None else None
    if folder is None and state.num_processes > 1:
        raise AuditError("out: required when the audit is split between processes")
    with exclusive_folder(folder, state):
        return _audit_images(
            model,
            dataset,
            folder,
            settings,
            plan,
            auditor,
            digest,
            state,
            progress,
            on_image,
            started,
        )


def _audit_images(
    model: Any,
    dataset: AuditDataset,
    folder: Path | None,
    settings: AuditSettings,
    plan: QuestionPlan,
    auditor: YesNoAuditor,
    digest: str,
    state: Any,
    progress: bool,
    on_image: Callable[[str], None] | None,
    started: float,
) -> AuditResult:
    from tqdm.auto import tqdm

    results = folder / RESULTS_FILE if folder else None
    if folder is not None:
        # every process checks (a refused folder must stop all of them, not leave some waiting
        # at the barrier); audit.json is written once a first image has its answers
        _claim_folder(folder, settings, model, digest, write=False)
    state.wait_for_everyone()
    fingerprints = _Fingerprints(dataset.images)
    done = _finished_lines(results, digest, plan, fingerprints) if results else {}
    recorded = folder is None
    by_id = {image.image_id: image for image in dataset.images}
    todo = [by_id[i] for i in plan.questions if i not in done]
    if done:
        logger.info("keeping %d finished image(s), auditing %d", len(done), len(todo))
    lines: dict[str, dict[str, Any]] = dict(done)
    failed: dict[str, str] = {}
    with (
        state.split_between_processes(todo) as share,
        tqdm(  # closed on an error too: the error's line is not glued to the bar's
            total=len(share),
            desc=f"audit [process {state.process_index}]",
            unit="img",
            disable=not progress,
            position=state.process_index,
        ) as bar,
    ):
        exif = get_preprocessing(settings.preprocessing).exif_orientation
        for image, decoded in _prefetched(list(share), exif_orientation=exif):
            if isinstance(decoded, Exception):
                failed[image.image_id] = _one_line(decoded)
                logger.warning("%s: skipped (%s)", image.file, failed[image.image_id])
                bar.update(1)
                continue
            planned = plan.questions[image.image_id]
            pixels, fingerprint = decoded
            fingerprints.remember(image.image_id, fingerprint)
            try:
                emb = model.embed([pixels], preprocessing=settings.preprocessing)
            except ValueError as exc:  # JointModelError: an image J cannot take
                failed[image.image_id] = _one_line(exc)
                bar.update(1)
                continue
            answered = auditor.ask(emb.t, [q.class_name for q in planned])
            line = _record_line(image, answered, planned, digest, fingerprint)
            if not recorded:  # the settings are the folder's once a question has succeeded
                assert folder is not None
                _claim_folder(folder, settings, model, digest, write=True)
                recorded = True
            if results is not None:
                append_jsonl(results, line)  # at once: a kill loses at most the next image
            lines[image.image_id] = line
            if on_image is not None:
                on_image(image.image_id)
            bar.update(1)
    processed = len(todo) - len(failed)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([failed])
        failed = {k: v for part in gathered for k, v in part.items()}
        processed = len(todo) - len(failed)
        state.wait_for_everyone()
        assert results is not None
        lines = _finished_lines(results, digest, plan, fingerprints)  # every process's images
    records = [r for i in plan.questions if i in lines for r in _records_from_line(lines[i])]
    return AuditResult(
        settings=settings,
        plan=plan,
        records=records,
        failed=failed,
        processed=processed,
        kept=len(done),
        out=folder,
        dataset=dataset,
        seconds=time.perf_counter() - started,
    )


def _one_line(exc: BaseException) -> str:
    from jmllm.align.options import one_line

    return one_line(exc)


def _claim_folder(
    folder: Path, settings: AuditSettings, model: Any, digest: str, write: bool = True
) -> None:
    """Check that ``audit.json`` (if any) describes this same audit; write it if ``write``."""
    doc = {
        "settings": settings.to_dict(),
        "model": _model_identity(model),
        "digest": digest,
        "format": 1,
    }
    for name in (SETTINGS_FILE, RESULTS_FILE):  # refused now, not after the first image's work
        refuse_link(folder / name)
    claim_folder(folder, SETTINGS_FILE, doc, write=write, what="an audit")


__all__ = [
    "AUTHORS_QUERY_TEMPLATE",
    "PARSE_RULES",
    "AnsweredQuestion",
    "AuditRecord",
    "AuditResult",
    "AuditSettings",
    "YesNoAuditor",
    "ask_one_by_one",
    "claim_folder",
    "exclusive_folder",
    "kv_cache_bytes",
    "model_identity",
    "parse_answer",
    "process_state",
    "run_audit",
    "settings_digest",
]
