"""The client against a real local judge server that misbehaves."""

from __future__ import annotations

import asyncio
import base64
import random
from pathlib import Path

import pytest

from jmllm.judge.cache import JudgeCache
from jmllm.judge.captions import SystemCaptions
from jmllm.judge.client import JudgeConfigError, JudgeSettings, RetryPolicy, retry_after_s
from jmllm.judge.manifest import Manifest
from jmllm.judge.prompts import JUDGE_SYSTEM_PROMPT, judge_user_prompt
from jmllm.judge.runner import RunResults, judge_all
from jmllm.judge.testing import FAULT_KINDS, caption_of

KEY = "sk-test-client"


def judge(
    manifest: Manifest, systems: list[SystemCaptions], settings: JudgeSettings, cache_path: Path
) -> RunResults:
    with JudgeCache(cache_path) as cache:
        return asyncio.run(judge_all(manifest, systems, settings, cache, api_key=KEY, seed=0))


def test_every_judgement_completes_despite_every_kind_of_fault(
    manifest: Manifest, make_captions, judge_server, fast_settings, tmp_path: Path
) -> None:
    server = judge_server(latency_s=0.01, fault_rate=0.5, slow_s=1.5, seed=7, retry_after_ms=50)
    systems = [make_captions(manifest, name) for name in ("A", "B", "C")]
    results = judge(manifest, systems, fast_settings(server, timeout_s=1.0), tmp_path / "c.sqlite")

    assert results.complete and len(results.records) == 3 * len(manifest)
    assert all(r.score is not None for r in results.records)
    outcomes = server.outcomes()
    assert all(outcomes[kind] > 0 for kind in FAULT_KINDS), outcomes  # every fault was exercised
    assert set(server.answered().values()) == {1}  # one answer per judgement, never two
    assert server.requests_after_answer() == []
    assert max(r.attempts for r in results.records) > 1


def test_the_request_is_the_papers(
    manifest: Manifest, judge_server, fast_settings, tmp_path: Path
) -> None:
    server = judge_server()
    tricky = {
        im.image_id: f'<img src=x onerror=alert(1)> "{im.image_id}" | it\'s\nmultiline {{0}} <caption>'
        for im in manifest.images
    }
    judge(manifest, [SystemCaptions("S", tricky)], fast_settings(server), tmp_path / "c.sqlite")

    by_id = manifest.by_id()
    assert len(server.served) == len(manifest)
    for served in server.served:
        body = served.body
        assert body["model"] == "fake-judge" and body["temperature"] == 0
        system, user = body["messages"]
        assert system == {"role": "system", "content": JUDGE_SYSTEM_PROMPT}
        text, image = user["content"]
        caption = caption_of(text["text"])
        assert caption in tricky.values()
        assert text == {
            "type": "text",
            "text": judge_user_prompt(caption),
        }  # caption intact, prompt intact
        image_id = next(k for k, v in tricky.items() if v == caption)
        url = image["image_url"]["url"]
        path = by_id[image_id].path
        assert path is not None
        mime, data = url.split(",", 1)
        if path.suffix == ".bmp":  # not accepted by the API: converted
            assert mime == "data:image/png;base64"
        else:
            assert mime == f"data:image/{'jpeg' if path.suffix == '.jpg' else 'png'};base64"
            assert base64.b64decode(data) == path.read_bytes()  # the file's own bytes
        assert served.authorization == f"Bearer {KEY}"


def test_remote_images_are_sent_as_urls(
    coco_file: Path, judge_server, fast_settings, tmp_path: Path
) -> None:
    from jmllm.judge.manifest import sample_coco

    remote = sample_coco(coco_file, 3)
    server = judge_server()
    judge(
        remote,
        [SystemCaptions("S", {im.image_id: "c" for im in remote.images})],
        fast_settings(server),
        tmp_path / "c",
    )
    urls = {s.body["messages"][1]["content"][1]["image_url"]["url"] for s in server.served}
    assert urls == {im.url for im in remote.images}


def test_retry_after_is_honoured(
    manifest: Manifest, make_captions, judge_server, fast_settings, tmp_path: Path
) -> None:
    server = judge_server(
        fault_plan=lambda served: "429" if served.attempt == 1 else None, retry_after_s=1
    )
    one = Manifest(manifest.images[:2], seed=0)
    judge(one, [make_captions(one, "A")], fast_settings(server), tmp_path / "c.sqlite")
    for key in server.received():
        first, second = (s for s in server.served if s.key == key)
        assert (first.outcome, second.outcome) == ("429", "answered")
        assert second.at_s - first.at_s >= 1.0  # waited at least Retry-After, not our 20 ms backoff


def test_retry_after_ms_header(
    manifest: Manifest, make_captions, judge_server, fast_settings, tmp_path: Path
) -> None:
    server = judge_server(
        fault_plan=lambda served: "429" if served.attempt == 1 else None, retry_after_ms=300
    )
    one = Manifest(manifest.images[:1], seed=0)
    judge(one, [make_captions(one, "A")], fast_settings(server), tmp_path / "c.sqlite")
    first, second = server.served
    assert 0.3 <= second.at_s - first.at_s < 1.0  # the precise header wins over Retry-After: 1


def test_retry_after_parsing() -> None:
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=8.0)
    rng = random.Random(0)
    for retry, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = [policy.delay_s(retry, None, rng) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= cap
        assert max(delays) > 0.8 * cap  # spread over the whole range
    assert all(policy.delay_s(1, 2.5, rng) >= 2.5 for _ in range(50))


def test_exhausted_retries_are_stored_as_failures_not_scores(
    manifest: Manifest, make_captions, judge_server, fast_settings, tmp_path: Path
) -> None:
    one = Manifest(manifest.images[:3], seed=0)
    doomed = one.images[1].image_id
    systems = [make_captions(one, "A")]
    doomed_caption = systems[0].captions[doomed]
    server = judge_server(
        fault_plan=lambda served: "500" if served.caption == doomed_caption else None
    )
    settings = fast_settings(server, retry=RetryPolicy(max_attempts=3, base_delay_s=0.01))
    results = judge(one, systems, settings, tmp_path / "c.sqlite")
    failed = [r for r in results.records if r.status == "failed"]
    assert [r.image_id for r in failed] == [doomed]
    assert failed[0].score is None and failed[0].reply is None and failed[0].attempts == 3
    assert "HTTP 500" in (failed[0].error or "")
    assert server.outcomes()["500"] == 3  # max_attempts, and no hidden retries by the openai client

    server.config.fault_plan = None  # the server recovers: the rerun sends only the failed one
    before = len(server.served)
    results = judge(one, systems, settings, tmp_path / "c.sqlite")
    assert results.complete and len(server.served) == before + 1
    with JudgeCache(tmp_path / "c.sqlite") as cache:
        row = cache.get(next(r.key for r in results.records if r.image_id == doomed))
    assert row is not None and row.answered and row.attempts == 4


def test_a_rejected_request_fails_that_judgement_only(
    manifest: Manifest, make_captions, judge_server, fast_settings, tmp_path: Path
) -> None:
    systems = [make_captions(manifest, "A")]
    rejected = systems[0].captions[manifest.images[2].image_id]
    server = judge_server(fault_plan=lambda served: "400" if served.caption == rejected else None)
    results = judge(manifest, systems, fast_settings(server), tmp_path / "c.sqlite")
    failed = [r for r in results.records if r.status == "failed"]
    assert len(failed) == 1 and failed[0].caption == rejected
    assert failed[0].attempts == 1 and failed[0].error == "HTTP 400: image too large"
    assert sum(r.status == "answered" for r in results.records) == len(manifest) - 1


def test_client_errors_are_not_retried_and_bad_credentials_stop_the_run(
    manifest: Manifest, make_captions, judge_server, fast_settings, tmp_path: Path
) -> None:
    server = judge_server(api_key="the-right-key")
    with pytest.raises(JudgeConfigError, match=r"refused the request .*HTTP 401"):
        judge(
            manifest,
            [make_captions(manifest, "A")],
            fast_settings(server, concurrency=1),
            tmp_path / "c.sqlite",
        )
    assert len(server.served) == 1  # stopped at the first refusal
    with JudgeCache(tmp_path / "c.sqlite") as cache:
        assert cache.counts() == {}  # a configuration error is not a judgement failure


def test_concurrency_is_bounded_and_used(
    manifest: Manifest, make_captions, judge_server, fast_settings, tmp_path: Path
) -> None:
    server = judge_server(latency_s=0.15)
    systems = [make_captions(manifest, "A"), make_captions(manifest, "B")]
    judge(manifest, systems, fast_settings(server, concurrency=4), tmp_path / "c.sqlite")
    assert server.max_in_flight == 4


def test_identical_requests_are_sent_once(
    manifest: Manifest, judge_server, fast_settings, tmp_path: Path
) -> None:
    same = {im.image_id: "the same caption" for im in manifest.images}
    server = judge_server()
    results = judge(
        manifest,
        [SystemCaptions("A", same), SystemCaptions("B", same)],
        fast_settings(server),
        tmp_path / "c",
    )
    assert len(server.served) == len(manifest)
    assert results.complete and len(results.records) == 2 * len(manifest)


def test_a_reply_past_the_timeout_is_retried(
    manifest: Manifest, make_captions, judge_server, fast_settings, tmp_path: Path
) -> None:
    server = judge_server(
        fault_plan=lambda served: "slow" if served.attempt == 1 else None, slow_s=1.5
    )
    one = Manifest(manifest.images[:2], seed=0)
    results = judge(
        one, [make_captions(one, "A")], fast_settings(server, timeout_s=0.3), tmp_path / "c"
    )
    assert results.complete and all(r.attempts == 2 for r in results.records)


def test_judge_settings_validate() -> None:
    from jmllm.judge.errors import JudgeError

    with pytest.raises(JudgeError):
        JudgeSettings(model="")
    with pytest.raises(JudgeError):
        JudgeSettings(model="m", concurrency=0)
    with pytest.raises(JudgeError):
        RetryPolicy(max_attempts=0)
