"""Judge harness throughput: jmllm-judge (async, concurrency 16) beside a sequential client.

DESIGN.md §5: wall time for 100 judgements against a local judge server with injected latency and
faults, beside a sequential client, in the same run. Both clients face the same server behaviour
(jmllm.judge.testing.FakeJudgeServer on 127.0.0.1: 50 ms latency per request, 10% of requests —
first tries and retries alike — answered with a fault: 429 with Retry-After, 500, a dropped
connection, or a reply slower than the 1 s timeout) and use the same retry policy (exponential
backoff with full jitter, Retry-After honoured); they differ only in how many requests are in
flight. The sequential client is the plain loop one would write without the harness: the official
synchronous ``openai.OpenAI`` client, one request at a time, retried until answered.

Prints JSON (and writes it to ``--json-out``): wall seconds of each, the ratio, judgements lost
(asked for but not answered: must be 0), requests sent and faults met. Target: ratio >= 8.

    python benchmarks/judge_throughput.py [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jmllm.judge.cache import JudgeCache
from jmllm.judge.captions import SystemCaptions
from jmllm.judge.client import (
    JudgeSettings,
    RetryPolicy,
    build_messages,
    image_data_url,
    retry_after_s,
)
from jmllm.judge.manifest import Manifest, sample_folder
from jmllm.judge.parsing import parse_score
from jmllm.judge.runner import judge_all
from jmllm.judge.testing import FakeJudgeConfig, FakeJudgeProcess, FakeJudgeServer, make_test_images

API_KEY = "benchmark-key"  # the fake server accepts any key
TARGET_RATIO = 8.0


def sequential_client(
    manifest: Manifest, captions: SystemCaptions, settings: JudgeSettings
) -> tuple[dict[str, int | None], int]:
    """The baseline: one request at a time with the synchronous openai client and the same retry
    policy. Returns (score per image, judgements lost)."""
    import openai

    client = openai.OpenAI(
        api_key=API_KEY, base_url=settings.base_url, max_retries=0, timeout=settings.timeout_s
    )
    rng = random.Random(0)
    policy = settings.retry
    scores: dict[str, int | None] = {}
    lost = 0
    for image in manifest.images:
        messages = build_messages(
            settings, image_data_url(image), captions.captions[image.image_id]
        )
        for attempt in range(1, policy.max_attempts + 1):
            retry_after = None
            try:
                completion = client.chat.completions.create(
                    model=settings.model,
                    messages=messages,  # type: ignore[arg-type]
                    temperature=settings.temperature,
                )
                scores[image.image_id] = parse_score(completion.choices[0].message.content)
                break
            except openai.APIStatusError as e:
                retry_after = retry_after_s(e.response.headers)
            except openai.APIConnectionError:  # timeouts included
                pass
            if attempt == policy.max_attempts:
                lost += 1
            else:
                time.sleep(policy.delay_s(attempt, retry_after, rng))
    client.close()
    return scores, lost


def harness(
    manifest: Manifest, captions: SystemCaptions, settings: JudgeSettings, cache_path: Path
) -> tuple[dict[str, int | None], int]:
    with JudgeCache(cache_path) as cache:
        results = asyncio.run(
            judge_all(manifest, [captions], settings, cache, api_key=API_KEY, seed=0)
        )
    lost = sum(r.status != "answered" for r in results.records)
    return {r.image_id: r.score for r in results.records}, lost


def measure(name: str, run: Any, config: FakeJudgeConfig) -> dict[str, Any]:
    """One timed run against a fresh server (so every run meets the same faults)."""
    with FakeJudgeProcess(config) as server:
        start, cpu_start = time.perf_counter(), time.process_time()
        scores, lost = run(server.base_url)
        wall_s = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_start  # the client's own CPU (the server is elsewhere)
        outcomes = dict(server.outcomes())
    print(
        f"{name}: {wall_s:.2f} s (CPU {cpu_s:.2f} s), lost {lost}, server saw {outcomes}",
        file=sys.stderr,
    )
    return {
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "judgements": len(scores),
        "lost": lost,
        "requests": sum(outcomes.values()),
        "outcomes": outcomes,
        "scores": scores,
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median wall time over the repeats, and the worst case of everything else."""
    last = runs[-1]
    return {
        "wall_s": round(statistics.median(r["wall_s"] for r in runs), 3),
        "wall_s_runs": [round(r["wall_s"], 3) for r in runs],
        "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 3),
        "judgements": last["judgements"],
        "lost": max(r["lost"] for r in runs),
        "requests": last["requests"],
        "outcomes": last["outcomes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out", type=Path, help="also write the JSON result here")
    parser.add_argument(
        "--quick", action="store_true", help="40 judgements instead of 100 (smoke test)"
    )
    parser.add_argument(
        "--judgements", type=int, default=None, help="default: 100 (40 with --quick)"
    )
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--fault-rate", type=float, default=0.10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=0.5,
        help="per-request timeout of both clients (10x latency)",
    )
    parser.add_argument(
        "--retry-after-ms",
        type=float,
        default=250.0,
        help="a 429's retry-after-ms header (Retry-After: 1 is sent too); 0: Retry-After alone",
    )
    parser.add_argument("--seed", type=int, default=0, help="fault schedule seed")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs of each (median); default 3, 1 with --quick"
    )
    args = parser.parse_args()
    n = args.judgements or (40 if args.quick else 100)
    repeats = args.repeats or (1 if args.quick else 3)

    config = FakeJudgeConfig(
        latency_s=args.latency_ms / 1000,
        fault_rate=args.fault_rate,
        fault_kinds=("429", "500", "drop", "slow"),
        retry_after_s=1,
        retry_after_ms=args.retry_after_ms or None,
        slow_s=args.timeout_s + 0.5,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="judge-bench-") as tmp:
        make_test_images(Path(tmp) / "images", n)
        manifest = sample_folder(Path(tmp) / "images", n, seed=0)
        captions = SystemCaptions(
            "bench", {im.image_id: f"A caption of image {im.image_id}." for im in manifest.images}
        )

        def settings(base_url: str, concurrency: int) -> JudgeSettings:
            return JudgeSettings(
                model="fake-judge",
                base_url=base_url,
                concurrency=concurrency,
                timeout_s=args.timeout_s,
                retry=RetryPolicy(max_attempts=10),
            )

        # Warm-up (not timed): imports and the openai client's first-request setup, in both paths.
        with FakeJudgeServer() as server:
            warm = Manifest(manifest.images[:1], seed=0)
            harness(warm, captions, settings(server.base_url, 1), Path(tmp) / "warm.sqlite")
            sequential_client(warm, captions, settings(server.base_url, 1))

        sequential_runs, harness_runs = [], []
        for repeat in range(repeats):  # interleaved, so that machine noise hits both alike
            sequential_runs.append(
                measure(
                    "sequential",
                    lambda url: sequential_client(manifest, captions, settings(url, 1)),
                    config,
                )
            )
            cache = Path(tmp) / f"cache-{repeat}.sqlite"  # empty: every judgement is sent
            harness_runs.append(
                measure(
                    "harness",
                    lambda url, cache=cache: harness(
                        manifest, captions, settings(url, args.concurrency), cache
                    ),
                    config,
                )
            )

    agree = all(r["scores"] == sequential_runs[0]["scores"] for r in sequential_runs + harness_runs)
    sequential, concurrent = summary(sequential_runs), summary(harness_runs)
    ratio = sequential["wall_s"] / concurrent["wall_s"]
    result = {
        "benchmark": "judge_throughput",
        "judgements": n,
        "latency_ms": args.latency_ms,
        "fault_rate": args.fault_rate,
        "fault_kinds": list(config.fault_kinds),
        "retry_after_s": config.retry_after_s,
        "retry_after_ms": config.retry_after_ms,
        "timeout_s": args.timeout_s,
        "concurrency": args.concurrency,
        "repeats": repeats,
        "harness": concurrent,
        "sequential": sequential,
        "ratio": round(ratio, 2),
        "target_ratio": TARGET_RATIO,
        "lost_judgements": concurrent["lost"] + sequential["lost"],
        "same_scores": agree,
        "meets_target": ratio >= TARGET_RATIO and concurrent["lost"] == 0,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2),  # other work competing for the CPUs
            "platform": platform.platform(),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
