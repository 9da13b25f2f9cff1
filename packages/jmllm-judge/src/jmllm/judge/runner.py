"""Step 3: judge every (system, image) caption, resuming from the cache.

:func:`run_judgements` plans one judgement per system and manifest image, looks every key up in the
:class:`~jmllm.judge.cache.JudgeCache`, sends only those without an answer (failures are sent again),
stores each reply or failure the moment it arrives, and returns :class:`RunResults` — which
:func:`save_results` writes as the JSON file that ``jmllm-judge report`` reads.

Two systems that gave the very same caption for an image share one judgement: the request is
identical, so it is sent once. Two runs on one cache share the work without sending anything twice:
each claims a judgement in the cache before sending it and waits for the ones another run is
sending (see :mod:`jmllm.judge.cache`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jmllm.judge.cache import HEARTBEAT_S, CachedJudgement, JudgeCache
from jmllm.judge.captions import SystemCaptions
from jmllm.judge.client import (
    JudgeClient,
    JudgeReply,
    JudgeSettings,
    build_messages,
    image_data_url,
    judgement_key,
    read_api_key,
    request_record,
    verified_image_bytes,
)
from jmllm.judge.errors import JudgeError
from jmllm.judge.files import atomic_write_text, read_json
from jmllm.judge.manifest import Manifest, ManifestImage
from jmllm.judge.parsing import parse_score

__all__ = [
    "RESULTS_FORMAT",
    "JudgementRecord",
    "RunResults",
    "judge_all",
    "load_results",
    "run_judgements",
    "save_results",
]

log = logging.getLogger(__name__)

RESULTS_FORMAT = "jmllm-judge/results"
RESULTS_VERSION = 1
POLL_S = 0.25  # how often a run looks whether judgements another run is sending are done


@dataclass(frozen=True)
class JudgementRecord:
    """The judgement of one system's caption for one image."""

    system: str
    image_id: str
    caption: str
    key: str
    status: str  # "answered", "failed" (no reply after every retry) or "pending" (never sent)
    reply: str | None = None  # the judge's raw reply, when answered
    error: str | None = None  # why it failed
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    score_parser: str = "strict"  # how ``score`` reads ``reply`` (jmllm.judge.parsing)

    @property
    def score(self) -> int | None:
        """The score as ``score_parser`` reads the reply; ``None`` unless answered validly."""
        return self.score_as(self.score_parser)

    def score_as(self, parser: str) -> int | None:
        """The score as the named reader (``"strict"`` or ``"authors"``) reads the reply."""
        return parse_score(self.reply, parser) if self.status == "answered" else None

    @property
    def invalid(self) -> bool:
        """Answered, but not with a score ``score_parser`` accepts."""
        return self.status == "answered" and self.score is None


@dataclass
class RunResults:
    """All judgements of a run, with the settings and systems that produced them."""

    settings: dict[str, Any]  # JudgeSettings.public()
    systems: list[str]
    records: list[JudgementRecord]
    n_images: int
    sent: int = 0  # judgements this run sent (the others were in the cache or sent by another run)
    origin: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {"answered": 0, "failed": 0, "pending": 0, "invalid": 0}
        for r in self.records:
            out[r.status] += 1
            out["invalid"] += r.invalid
        return out

    @property
    def complete(self) -> bool:
        return all(r.status == "answered" for r in self.records)


@dataclass(frozen=True)
class _Job:
    key: str
    image: ManifestImage
    caption: str


def _plan(
    manifest: Manifest, systems: Sequence[SystemCaptions], settings: JudgeSettings
) -> tuple[list[tuple[str, str, str, str]], dict[str, _Job]]:
    """``(system, image_id, caption, key)`` rows and the unique jobs behind them."""
    names = [s.system for s in systems]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise JudgeError(f"two caption files for the same system: {', '.join(duplicates)}")
    rows: list[tuple[str, str, str, str]] = []
    jobs: dict[str, _Job] = {}
    for system in systems:
        missing = system.missing(manifest)
        if missing:
            raise JudgeError(
                f"system {system.system!r} has no caption for {len(missing)} manifest images "
                f"(first: {', '.join(missing[:5])}); were its captions made for another manifest?"
            )
        for image in manifest.images:
            caption = system.captions[image.image_id]
            key = judgement_key(settings, image, caption)
            rows.append((system.system, image.image_id, caption, key))
            jobs.setdefault(key, _Job(key, image, caption))
    return rows, jobs


def _record(row: tuple[str, str, str, str], cached: CachedJudgement | None) -> JudgementRecord:
    system, image_id, caption, key = row
    if cached is None:
        return JudgementRecord(system, image_id, caption, key, "pending")
    return JudgementRecord(
        system,
        image_id,
        caption,
        key,
        cached.status,
        reply=cached.reply,
        error=cached.error,
        attempts=cached.attempts,
        prompt_tokens=cached.prompt_tokens,
        completion_tokens=cached.completion_tokens,
    )


async def judge_all(
    manifest: Manifest,
    systems: Sequence[SystemCaptions],
    settings: JudgeSettings,
    cache: JudgeCache,
    *,
    api_key: str,
    show_progress: bool = False,
    seed: int | None = None,
) -> RunResults:
    """Judge every caption of every system on every manifest image (async form of
    :func:`run_judgements`). Cancelling it (Ctrl-C) keeps everything stored so far.

    Args:
        api_key: the key itself; it goes to the openai client and nowhere else.
        show_progress: a progress bar on stderr (hidden when stderr is not a terminal).
        seed: seeds the retry jitter (tests).
    """
    rows, jobs = _plan(manifest, systems, settings)
    since = time.time()
    cached = cache.get_many(jobs)
    todo = [job for key, job in jobs.items() if key not in cached or not cached[key].answered]
    log.info(
        "%d judgements (%d distinct requests): %d answered in the cache, %d to send",
        len(rows), len(jobs), len(jobs) - len(todo), len(todo),
    )  # fmt: skip
    sent = 0
    if todo:
        # Fail before sending anything if an image is missing or changed since sampling.
        for image in {job.image.image_id: job.image for job in todo}.values():
            if image.path is not None:
                verified_image_bytes(image)
        from tqdm import tqdm

        client = JudgeClient(settings, api_key=api_key, seed=seed)
        bar = tqdm(
            total=len(todo), desc="judging", unit="req", disable=None if show_progress else True
        )
        beat = asyncio.ensure_future(_heartbeat(cache))
        try:
            sent = await _send(client, cache, todo, settings, bar.update, since)
        finally:
            beat.cancel()
            bar.close()
            cache.release()
            await client.aclose()
    final = cache.get_many(jobs)
    return RunResults(
        settings=settings.public(),
        systems=[s.system for s in systems],
        records=[_record(row, final.get(row[3])) for row in rows],
        n_images=len(manifest),
        sent=sent,
        origin={"manifest_seed": manifest.seed, "systems": {s.system: s.origin for s in systems}},
    )


async def _heartbeat(cache: JudgeCache) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        cache.heartbeat()


async def _send(
    client: JudgeClient,
    cache: JudgeCache,
    todo: Sequence[_Job],
    settings: JudgeSettings,
    progress: Callable[[int], object],
    since: float,
) -> int:
    """Send the judgements of ``todo`` this run can claim, wait for those another run is sending;
    returns how many this run sent."""

    async def one(job: _Job) -> None:
        outcome = await client.judge(
            # Built when a slot is free, so only the requests in flight hold an encoded image.
            lambda: build_messages(settings, image_data_url(job.image), job.caption),
            label=f"image {job.image.image_id}",
            on_attempt=lambda _: cache.count_attempt(job.key),
        )
        record = request_record(settings, job.image, job.caption)
        if isinstance(outcome, JudgeReply):
            cache.put_answer(
                job.key,
                model=settings.model,
                request=record,
                reply=outcome.reply,
                attempts=outcome.attempts,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                response_id=outcome.response_id,
            )
        else:
            cache.put_failure(
                job.key,
                model=settings.model,
                request=record,
                error=outcome.error,
                attempts=outcome.attempts,
            )
        progress(1)

    waiting = {job.key: job for job in todo}
    tasks: set[asyncio.Future[None]] = set()
    sent = 0
    told = False
    try:
        while waiting or tasks:
            if waiting:
                claims = cache.claim(list(waiting), since=since)
                for key in claims.claimed:
                    tasks.add(asyncio.ensure_future(one(waiting.pop(key))))
                sent += len(claims.claimed)
                for key in claims.done:
                    del waiting[key]
                progress(len(claims.done))
                if claims.busy and not told:
                    told = True
                    log.warning(
                        "%d judgements are being sent by another run on this cache; "
                        "waiting for them instead of sending them again",
                        len(claims.busy),
                    )
            if tasks:
                finished, tasks = await asyncio.wait(
                    tasks,
                    timeout=POLL_S if waiting else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                # a fatal error (e.g. the judge refused the key) stops the run; every finished
                # task's error is retrieved, so none is reported twice as "never retrieved"
                errors = [t.exception() for t in finished if not t.cancelled()]
                fatal = [e for e in errors if e is not None]
                if fatal:
                    raise fatal[0]
            elif waiting:
                await asyncio.sleep(POLL_S)
    finally:
        # On a fatal error or cancellation, stop the others; what was stored stays stored.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return sent


def run_judgements(
    manifest: Manifest,
    systems: Sequence[SystemCaptions],
    settings: JudgeSettings,
    cache: JudgeCache,
    *,
    environ: Mapping[str, str] | None = None,
    show_progress: bool = False,
) -> RunResults:
    """Judge every caption, sending only what the cache lacks. The API key is read from the
    environment variable ``settings.api_key_env``.

    >>> results = run_judgements(manifest, [gt, llava], JudgeSettings(model="gpt-4o"), cache)  # doctest: +SKIP
    """
    api_key = read_api_key(settings.api_key_env, os.environ if environ is None else environ)
    return asyncio.run(
        judge_all(manifest, systems, settings, cache, api_key=api_key, show_progress=show_progress)
    )


def save_results(path: str | os.PathLike[str], results: RunResults) -> Path:
    """Write the results JSON (atomically)."""
    payload = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "settings": results.settings,
        "systems": results.systems,
        "n_images": results.n_images,
        "origin": results.origin,
        "counts": results.counts(),
        "records": [{**asdict(r), "score": r.score, "invalid": r.invalid} for r in results.records],
    }
    return atomic_write_text(path, json.dumps(payload, ensure_ascii=False, indent=1) + "\n")


def load_results(path: str | os.PathLike[str]) -> RunResults:
    """Read a results JSON written by :func:`save_results` (``jmllm-judge run --out``).

    Raises:
        JudgeError: the file is unreadable, not a results file, or malformed (naming the field).
    """
    path = Path(path)
    data = read_json(path, "results")
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise JudgeError(
            f"{path} is not a jmllm-judge results file (write one with `jmllm-judge run`)"
        )
    fields = set(JudgementRecord.__dataclass_fields__)
    try:
        records = [
            JudgementRecord(**{k: v for k, v in r.items() if k in fields}) for r in data["records"]
        ]
        for r in records:
            if r.status not in ("answered", "failed", "pending"):
                raise ValueError(f"unknown status {r.status!r}")
            if r.reply is not None and not isinstance(r.reply, str):
                raise ValueError("a reply is not text")
        return RunResults(
            settings=dict(data["settings"]),
            systems=[str(s) for s in data["systems"]],
            records=records,
            n_images=int(data["n_images"]),
            origin=dict(data.get("origin", {})),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise JudgeError(f"results {path} are malformed ({type(e).__name__}: {e})") from None
