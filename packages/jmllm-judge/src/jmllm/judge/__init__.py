"""jmllm-judge: a reproducible, resumable GPT-as-a-judge harness for image captions.

Rebuilds the evaluation of the supplementary §1.1 and Table 1 of Giulivi & Boracchi, *Explaining
Multi-modal Large Language Models by Analyzing their Vision Perception* (BMVC 2024): captions of the
same random COCO images from each system, scored 1–10 by a judge model with the paper's prompts.

The steps, each also a ``jmllm-judge`` subcommand:

1. :mod:`~jmllm.judge.manifest` — ``sample``: the seeded image sample every system is judged on;
2. :mod:`~jmllm.judge.captions` — ``captions``: one caption per image and system;
3. :mod:`~jmllm.judge.runner` — ``run``: the judgements, through :mod:`~jmllm.judge.client` (the
   ``openai`` client, bounded concurrency, retries) and :mod:`~jmllm.judge.cache` (SQLite, resume);
4. :mod:`~jmllm.judge.report` — ``report``: Table 1 with CIs, paired comparisons, chart; its
   statistics (seeded bootstrap, Wilcoxon) in :mod:`~jmllm.judge.stats`.

:mod:`jmllm.judge.testing` holds the local fake judge server used by the tests and the benchmark.
"""

from __future__ import annotations

from jmllm.judge.cache import CachedJudgement, JudgeCache
from jmllm.judge.captions import (
    SystemCaptions,
    captions_from_ground_truth,
    captions_from_joint,
    captions_from_jsonl,
    load_captions,
    save_captions,
)
from jmllm.judge.client import (
    JudgeClient,
    JudgeConfigError,
    JudgeSettings,
    RetryPolicy,
    judgement_key,
)
from jmllm.judge.errors import JudgeError
from jmllm.judge.manifest import Manifest, ManifestImage, sample_coco, sample_dataset, sample_folder
from jmllm.judge.parsing import parse_score
from jmllm.judge.prompts import (
    CAPTION_PROMPT,
    JUDGE_SYSTEM_PROMPT,
    JUDGE_USER_PROMPT_TEMPLATE,
    JUDGE_USER_PROMPTS,
    SUPPLEMENTARY_USER_PROMPT_TEMPLATE,
    judge_prompt_template,
    judge_user_prompt,
)
from jmllm.judge.report import JudgeReport, build_report, write_report
from jmllm.judge.runner import (
    JudgementRecord,
    RunResults,
    judge_all,
    load_results,
    run_judgements,
    save_results,
)

__all__ = [
    "CAPTION_PROMPT",
    "JUDGE_SYSTEM_PROMPT",
    "JUDGE_USER_PROMPTS",
    "JUDGE_USER_PROMPT_TEMPLATE",
    "SUPPLEMENTARY_USER_PROMPT_TEMPLATE",
    "CachedJudgement",
    "JudgeCache",
    "JudgeClient",
    "JudgeConfigError",
    "JudgeError",
    "JudgeReport",
    "JudgeSettings",
    "JudgementRecord",
    "Manifest",
    "ManifestImage",
    "RetryPolicy",
    "RunResults",
    "SystemCaptions",
    "build_report",
    "captions_from_ground_truth",
    "captions_from_joint",
    "captions_from_jsonl",
    "judge_all",
    "judge_prompt_template",
    "judge_user_prompt",
    "judgement_key",
    "load_captions",
    "load_results",
    "parse_score",
    "run_judgements",
    "sample_coco",
    "sample_dataset",
    "sample_folder",
    "save_captions",
    "save_results",
    "write_report",
]
