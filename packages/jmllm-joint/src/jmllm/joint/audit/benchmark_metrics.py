"""The numbers of a POPE or CHAIR run's report (``report.json``), JSON-ready.

POPE (:func:`pope_report`): every split's metrics, their mean and the rows pooled, under the
chosen rule (``pope``) and under every rule (``pope_rules``), with which file and how many rows
produced each; the first-token rule's threshold curve (``first_token_curve.png``); how often the
rules disagree on the same answers; the AUROC of OWL-ViT's score for the truth and for J's "yes";
and J's wrong answers split by OWL-ViT's evidence on the same ``t`` (``perception_vs_language``).

CHAIR (:func:`chair_report`): CHAIR_s, CHAIR_i and recall (``chair``), every caption's mentions
with OWL-ViT's score and best box for the mentioned category, the same AUROCs and split of the
hallucinated mentions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jmllm.joint.audit.benchmark import BenchmarkResult, pope_answers
from jmllm.joint.audit.metrics import auroc

DEFAULT_OWL_THRESHOLD = 0.1  # the hallucination view's detection threshold (jmllm-joint detect)


def pope_report(
    data: Any,
    result: BenchmarkResult,
    rule: str = "llava",
    threshold: float = 0.0,
    owl_threshold: float = DEFAULT_OWL_THRESHOLD,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Every number of a POPE run (see the module docstring), JSON-ready.

    Args:
        data: the :class:`~jmllm.joint.audit.pope_files.PopeData` the run answered.
        result: the run.
        rule: the rule of ``pope`` (every rule is in ``pope_rules``); its numbers get percentile
            bootstrap intervals over images (``pope_ci``: ``n_resamples``, ``confidence``,
            ``seed``).
        threshold: the ``first-token`` rule's threshold.
        owl_threshold: OWL-ViT "sees" an object at or above this score.

    Example:
        >>> m = pope_report(data, result)  # doctest: +SKIP
        >>> m["pope"]["adversarial"]["f1"], m["perception_vs_language"]["perception"]  # doctest: +SKIP
    """
    from jmllm.joint.audit.pope import (
        HEADLINES,
        POPE_RULES,
        bootstrap_intervals,
        disagreements,
        perception_vs_language,
        score_rows,
        split_metrics,
        threshold_curve,
    )

    answers = pope_answers(result)
    splits = data.splits
    by_rule: dict[str, Any] = {}
    for name in POPE_RULES:
        scored = score_rows(data.rows, answers, name, threshold)
        metrics = split_metrics(scored, name, splits)
        over, source = HEADLINES[name]
        metrics["headline"] = {
            "metric": "f1",
            "over": over,
            "value": metrics[over]["f1"],
            "source": source,
        }
        by_rule[name] = metrics
    chosen = score_rows(data.rows, answers, rule, threshold)
    distinct = list({(s.row.image, s.row.text): s for s in chosen}.values())
    with_owl = [s for s in distinct if s.answer.owl_score is not None]
    owl = [float(s.answer.owl_score or 0.0) for s in with_owl]
    parsed = [s for s in with_owl if s.prediction in ("yes", "no")]
    rows: dict[str, Any] = {}
    for split in splits:
        doc = data.files[split].to_json()
        doc["answered"] = sum(1 for s in chosen if s.row.split == split)
        rows[split] = doc
    curve = threshold_curve(score_rows(data.rows, answers, "first-token", threshold), splits)
    return {
        "benchmark": "pope",
        "parse_rule": rule,
        "pope": {**by_rule[rule], "rule": rule},
        "pope_ci": bootstrap_intervals(chosen, rule, splits, n_resamples, confidence, seed),
        "bootstrap": _bootstrap_info(n_resamples, confidence, seed),
        "pope_rules": by_rule,
        "pope_rows": rows,
        "questions": len(data.rows),
        "distinct_questions": len(answers),
        "images": len(result.lines),
        "images_excluded_by_limit": data.excluded_images,
        "first_token": {"threshold": threshold, **curve},
        "rule_disagreements": disagreements(data.rows, answers, threshold),
        "auroc_owl_predicts_truth": auroc(owl, [s.row.present for s in with_owl]),
        "auroc_owl_predicts_yes": auroc(
            [float(s.answer.owl_score or 0.0) for s in parsed],
            [s.prediction == "yes" for s in parsed],
        ),
        "perception_vs_language": perception_vs_language(distinct, owl_threshold).to_json(),
        "owl_threshold": owl_threshold,
    }


@dataclass
class ChairInputs:
    """What CHAIR needs besides the answers: the vocabulary, every image's truth, and how the
    images were chosen (shown in the report)."""

    vocabulary: Any
    truth: dict[str, set[str]]
    sample: dict[str, Any] = field(default_factory=dict)
    truth_source: str = "instances"


def chair_scores(inputs: ChairInputs, result: BenchmarkResult) -> list[Any]:
    """Every answered caption's CHAIR reading, in the run's image order."""
    from jmllm.joint.audit.chair import score_caption

    return [
        score_caption(
            inputs.vocabulary, image_id, line["answers"][0]["answer"], inputs.truth[image_id]
        )
        for image_id, line in result.lines.items()
    ]


def _bootstrap_info(n_resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    return {"method": "percentile", "unit": "image", "resamples": n_resamples,
            "confidence": confidence, "seed": seed}  # fmt: skip


def chair_report(
    inputs: ChairInputs,
    result: BenchmarkResult,
    owl_threshold: float = DEFAULT_OWL_THRESHOLD,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Every number of a CHAIR run (see the module docstring), JSON-ready; CHAIR_s, CHAIR_i and
    recall with percentile bootstrap intervals over images (``chair_ci``).

    Example:
        >>> m = chair_report(inputs, result)  # doctest: +SKIP
        >>> m["chair"]["chair_s"], m["chair"]["chair_i"], m["chair"]["recall"]  # doctest: +SKIP
    """
    from jmllm.joint.audit.chair import chair_intervals, chair_metrics
    from jmllm.joint.audit.pope import PerceptionSplit

    scores = chair_scores(inputs, result)
    split = PerceptionSplit(owl_threshold)
    captions = []
    truth_scores, truth_labels, mention_scores, mentioned_labels = [], [], [], []
    for score in scores:
        owl = result.lines[score.image_id].get("owl", {})
        mentioned = {m.category for m in score.mentions}
        for category in inputs.vocabulary.categories:
            if category in owl:
                truth_scores.append(owl[category][0])
                truth_labels.append(category in score.truth)
                mention_scores.append(owl[category][0])
                mentioned_labels.append(category in mentioned)
        rows = []
        for mention, hallucinated in zip(score.mentions, score.hallucinated, strict=True):
            evidence = owl.get(mention.category)
            if hallucinated:
                split.add("positive", None if evidence is None else evidence[0] >= owl_threshold)
            rows.append(
                {
                    "word": mention.word,
                    "text": mention.text,
                    "category": mention.category,
                    "start": mention.start,
                    "end": mention.end,
                    "hallucinated": hallucinated,
                    "owl_score": evidence[0] if evidence else None,
                    "box": evidence[1:] if evidence else None,
                }
            )
        captions.append(
            {
                "image_id": score.image_id,
                "file": result.lines[score.image_id].get("file"),
                "caption": score.caption,
                "finished": result.lines[score.image_id]["answers"][0].get("finished"),
                "truth": sorted(score.truth),
                "mentions": rows,
            }
        )
    s = result.settings
    metrics = chair_metrics(scores)
    metrics.update(
        prompt=s.question,
        max_new_tokens=s.max_new_tokens,
        synonyms=inputs.vocabulary.name,
        truth=inputs.truth_source,
        sample=inputs.sample,
        unfinished=sum(1 for c in captions if not c["finished"]),
    )
    return {
        "benchmark": "chair",
        "chair": metrics,
        "chair_ci": chair_intervals(scores, n_resamples, confidence, seed),
        "bootstrap": _bootstrap_info(n_resamples, confidence, seed),
        "images": len(scores),
        "auroc_owl_predicts_truth": auroc(truth_scores, truth_labels),
        "auroc_owl_predicts_mention": auroc(mention_scores, mentioned_labels),
        "perception_vs_language": split.to_json(),
        "owl_threshold": owl_threshold,
        "captions": captions,
    }


__all__ = [
    "DEFAULT_OWL_THRESHOLD",
    "ChairInputs",
    "chair_report",
    "chair_scores",
    "pope_report",
]
