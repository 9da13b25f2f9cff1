"""The report of a POPE or CHAIR run on J: ``report.json``, ``report.md`` and one self-contained
``gallery.html`` with J's perceptual evidence for its hallucinations.

POPE (:func:`pope_report`): every split's metrics, their mean and the rows pooled, under the
chosen rule (``pope``) and under every rule (``pope_rules``), with which file and how many rows
produced each; the first-token rule's threshold curve (``first_token_curve.png``); how often the
rules disagree on the same answers; the AUROC of OWL-ViT's score for the truth and for J's "yes";
and J's wrong answers split by OWL-ViT's evidence on the same ``t`` (``perception_vs_language``).

CHAIR (:func:`chair_report`): CHAIR_s, CHAIR_i and recall (``chair``), every caption's mentions
with OWL-ViT's score and best box for the mentioned category, the same AUROCs and split of the
hallucinated mentions.

The gallery shows the hallucinations OWL-ViT was most sure of — a POPE question J got wrong, or a
caption's hallucinated object — each with OWL-ViT's boxes for the object and GA's map of the
answer's word against the object's query, as the paper's hallucination view does for one
answer; every CHAIR caption shown also gets its own interactive hallucination view
(``hallucinations/*.html``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jmllm.align.options import markdown_text
from jmllm.joint.audit.benchmark import BenchmarkResult, pope_answers
from jmllm.joint.audit.metrics import auroc
from jmllm.joint.audit.report import GALLERY_HTML, PICTURES_DIR, REPORT_JSON, REPORT_MD
from jmllm.joint.render.pages import asset, environment
from jmllm.joint.render.report import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

CURVE_PNG = "first_token_curve.png"
DEFAULT_OWL_THRESHOLD = 0.1  # the hallucination view's detection threshold (jmllm-joint detect)
DETECTION_MARGIN = 0.01  # boxes within 0.01 of the best, as the authors draw them
MAX_CARD_OBJECTS = 6  # GA maps per CHAIR caption in the gallery


@dataclass
class Card:
    """One gallery entry: a hallucination and its evidence."""

    rank: int
    image_id: str
    file: str
    title: str
    prompt: str
    answer: str
    side: str  # perception | language | no evidence
    segments: list[tuple[str, str]] = field(default_factory=list)  # (text, css class)
    facts: list[str] = field(default_factory=list)
    pictures: list[tuple[str, bytes]] = field(default_factory=list)  # (alt, PNG)
    page: str | None = None  # the caption's hallucination view, relative to the report
    error: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "image_id": self.image_id,
            "file": self.file,
            "title": self.title,
            "prompt": self.prompt,
            "answer": self.answer,
            "side": self.side,
            "page": self.page,
            "error": self.error,
            **self.data,
        }


@dataclass
class BenchmarkReport:
    """The written report: its metrics and files."""

    metrics: dict[str, Any]
    cards: list[Card]
    json_path: Path
    markdown_path: Path
    gallery_path: Path
    curve_path: Path | None = None


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------


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
        data: the :class:`~jmllm.joint.audit.pope.PopeData` the run answered.
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


def _pope_cards(
    data: Any,
    result: BenchmarkResult,
    rule: str,
    threshold: float,
    owl_threshold: float,
    top_k: int,
) -> list[Card]:
    """J's wrong answers (each distinct question once) that OWL-ViT was most sure of: a "yes"
    to an absent object by OWL-ViT's score, a "no" to a present one by one minus it."""
    from jmllm.joint.audit.pope import score_rows

    scored = score_rows(data.rows, pope_answers(result), rule, threshold)
    distinct = list({(s.row.image, s.row.text): s for s in scored}.values())
    wrong = [s for s in distinct if s.prediction in ("yes", "no") and s.prediction != s.row.label]

    def certainty(s: Any) -> float:
        score = s.answer.owl_score if s.answer.owl_score is not None else 0.0
        return score if s.prediction == "yes" else 1.0 - score

    wrong.sort(key=lambda s: -certainty(s))
    cards = []
    for rank, s in enumerate(wrong[:top_k], 1):
        score = s.answer.owl_score
        kind = "yes to an absent" if s.prediction == "yes" else "no to a present"
        if score is None:
            side = "no evidence"
        else:
            side = "perception" if (score >= owl_threshold) != s.row.present else "language"
        facts = [f"{kind} object; rule {rule}: {s.prediction}", f"splits: {_splits_of(data, s)}"]
        if score is not None:
            facts.append(
                f"OWL-ViT score for “{s.row.object}”: {score:.3f} (threshold "
                f"{owl_threshold}) — {side}"
            )
        cards.append(
            Card(
                rank=rank,
                image_id=s.row.image,
                file=s.row.image,
                title=f"{s.row.object or s.row.text} — J: {s.answer.answer!r}",
                prompt=result.settings.prompt(s.row.text),
                answer=s.answer.answer,
                side=side,
                facts=facts,
                data={
                    "question": s.row.text,
                    "object": s.row.object,
                    "label": s.row.label,
                    "prediction": s.prediction,
                    "owl_score": score,
                    "box": list(s.answer.box) if s.answer.box else None,
                    "margin": s.answer.margin,
                    "tokens": list(s.answer.tokens),
                },
            )
        )
    return cards


def _splits_of(data: Any, scored: Any) -> str:
    splits = [
        r.split for r in data.rows if r.image == scored.row.image and r.text == scored.row.text
    ]
    return ", ".join(dict.fromkeys(splits))


def curve_png(curve: dict[str, Any], splits: Sequence[str]) -> bytes:
    """The first-token rule's F1 and yes-ratio against its threshold, one line per split.

    Example:
        >>> curve_png({"thresholds": []}, [])[:4] == b"\\x89PNG"
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    thresholds = curve.get("thresholds", [])
    for i, metric in enumerate(("f1", "yes_ratio")):
        ax = fig.add_subplot(1, 2, i + 1)
        if not thresholds:
            ax.text(0.5, 0.5, "no first-token scores", ha="center", va="center")
        for split in [*splits, "mean"]:
            values = (
                [v if v is not None else float("nan") for v in curve[split][metric]]
                if thresholds
                else []
            )
            if values:
                style = "-" if split != "mean" else "--"
                ax.plot(thresholds, values, style, label=split)
        if thresholds:
            ax.axvline(0.0, color="#888", lw=0.8)
            ax.legend(fontsize=8)
        ax.set_xlabel("threshold on the first answer token's yes/no log-odds")
        ax.set_ylabel({"f1": "F1", "yes_ratio": "yes-ratio"}[metric])
        ax.set_title(f"First-token rule: {'F1' if metric == 'f1' else 'yes-ratio'}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# CHAIR
# ---------------------------------------------------------------------------------------------


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


def _chair_cards(metrics: dict[str, Any], result: BenchmarkResult, top_k: int) -> list[Card]:
    """Captions with hallucinated objects, the one OWL-ViT was most sure of first; then, to
    fill ``top_k``, captions without, the one whose mentions OWL-ViT saw least first."""

    def scores(c: dict[str, Any], hallucinated: bool) -> list[float]:
        return [m["owl_score"] or 0.0 for m in c["mentions"] if m["hallucinated"] == hallucinated]

    with_h = [c for c in metrics["captions"] if scores(c, True)]
    with_h.sort(key=lambda c: -max(scores(c, True)))
    clean = [c for c in metrics["captions"] if c["mentions"] and not scores(c, True)]
    clean.sort(key=lambda c: min(scores(c, False)))
    threshold = metrics["owl_threshold"]
    cards = []
    for rank, c in enumerate([*with_h, *clean][:top_k], 1):
        segments, cursor = [], 0
        text = c["caption"]
        for m in c["mentions"]:
            segments.append((text[cursor : m["start"]], ""))
            segments.append((text[m["start"] : m["end"]], "miss" if m["hallucinated"] else "hit"))
            cursor = m["end"]
        segments.append((text[cursor:], ""))
        hallucinated = [m for m in c["mentions"] if m["hallucinated"]]
        if hallucinated:
            top = max(hallucinated, key=lambda m: m["owl_score"] or 0.0)
            score = top["owl_score"]
            side = (
                "no evidence"
                if score is None
                else ("perception" if score >= threshold else "language")
            )
            title = f"{top['category']} (OWL-ViT {_score(score)}) — {side}"
        else:
            side = "no hallucination"
            title = "no hallucinated object"

        def listed(items: list[dict[str, Any]]) -> str:
            return ", ".join(
                f"{m['text']} → {m['category']} (OWL-ViT {_score(m['owl_score'])})" for m in items
            )

        facts = [
            f"hallucinated: {listed(hallucinated) or 'none'}",
            f"in the image: {listed([m for m in c['mentions'] if not m['hallucinated']]) or 'none'}",
            f"truth: {', '.join(c['truth']) or 'nothing'}",
        ]
        cards.append(
            Card(
                rank=rank,
                image_id=c["image_id"],
                file=c["file"] or c["image_id"],
                title=title,
                prompt=result.settings.question,
                answer=text,
                side=side,
                segments=segments,
                facts=facts,
                data={"mentions": c["mentions"], "truth": c["truth"]},
            )
        )
    return cards


def _score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def _answer_ids(model: Any, result: BenchmarkResult, card: Card) -> tuple[Any, Any]:
    import torch

    settings = result.settings
    line = result.lines[card.image_id]
    text = card.data.get("question", "")
    tokens = next(a["tokens"] for a in line["answers"] if a["text"] == text)
    prompt_ids = model.prompt_inputs(card.prompt, settings.template)["input_ids"][0].cpu()
    return prompt_ids, torch.tensor(tokens, dtype=torch.long)


def _pope_pictures(model: Any, result: BenchmarkResult, card: Card, image: Any) -> None:
    """OWL-ViT's boxes for the object and GA's map of the yes/no word against its query."""
    from jmllm.joint.hallucination.check import ForcedAnswer
    from jmllm.joint.render.report import draw_detections, png_bytes
    from jmllm.joint.saliency import GradientAlignment, answer_tokens, answer_words

    settings = result.settings
    obj = card.data.get("object")
    if not obj:
        card.error = "the question names no object: no OWL-ViT query"
        return
    emb = model.embed([image])
    score = card.data.get("owl_score") or 0.0
    dets = model.detect(
        emb, [obj], max(0.0, score - DETECTION_MARGIN), template=settings.query_template
    )[0]
    card.pictures.append(
        (f"OWL-ViT boxes for {obj}", png_bytes(draw_detections(emb.pil_image(0), dets, 5)))
    )
    if settings.vision != "joint":
        card.error = "stock LLaVA answered: GA explains J's answers only"
        return
    prompt_ids, answer_ids = _answer_ids(model, result, card)
    text, tokens = answer_tokens(model.tokenizer, answer_ids)
    if not tokens:
        card.error = "empty answer: no token to explain"
        return
    word = card.data["prediction"]
    target: int | str = next(
        (w.text for w in answer_words(text, tokens) if w.text.casefold() == word), 0
    )
    ga = GradientAlignment(model).attribute(
        emb,
        card.prompt,
        target,
        [obj],
        answer=ForcedAnswer(prompt_ids, answer_ids),
        template=settings.template,
        query_template=settings.query_template,
    )
    card.pictures.append((f"GA map of {ga.target}", _ga_png(emb, ga, 0, settings.query_template)))


def _ga_png(emb: Any, ga: Any, query: int, query_template: str) -> bytes:
    from jmllm.joint.render.explanation import heatmap_overlay_png, map_title

    label = query_template.format(ga.queries[query])
    return heatmap_overlay_png(
        emb.pil_image(0),
        ga.map("class", query=query),
        f"GA of “{ga.target}” vs query “{label}”",
        label=map_title("class", label),
    )


def _chair_pictures(
    model: Any, result: BenchmarkResult, card: Card, image: Any, threshold: float
) -> str | None:
    """The caption's hallucination view (best box of every mentioned category, GA of each
    category's first mention) as pictures on the card and a page of its own (returned)."""
    import torch

    from jmllm.joint.hallucination.check import (
        ForcedAnswer,
        HallucinationReport,
        MentionedObject,
        ObjectCheck,
    )
    from jmllm.joint.hallucination.page import detections_picture, render_hallucination_report
    from jmllm.joint.render.report import png_bytes
    from jmllm.joint.saliency import GradientAlignment

    settings = result.settings
    mentions = card.data["mentions"]
    categories = list(dict.fromkeys(m["category"] for m in mentions))[:MAX_CARD_OBJECTS]
    emb = model.embed([image])
    line = result.lines[card.image_id]
    answer_ids = torch.tensor(line["answers"][0]["tokens"], dtype=torch.long)
    prompt_ids = model.prompt_inputs(card.prompt, settings.template)["input_ids"][0].cpu()
    forced = ForcedAnswer(prompt_ids, answer_ids)
    ga = GradientAlignment(model)
    checks: dict[str, Any] = {}
    for q, category in enumerate(categories):
        first = next(m for m in mentions if m["category"] == category)
        box = first["box"] or [0.0, 0.0, 0.0, 0.0]
        score = first["owl_score"] or 0.0
        check = ObjectCheck(category, True, score, [float(v) for v in box], score >= threshold)
        if settings.vision == "joint":
            word = re.findall(r"[^\W_]+", first["text"])[-1]  # a two-word name: its head word
            before = card.answer[: first["start"]].lower()
            occurrence = len(re.findall(rf"(?<![\w-]){re.escape(word.lower())}(?![\w-])", before))
            try:
                check.ga = ga.attribute(
                    emb,
                    card.prompt,
                    word,
                    categories,
                    answer=forced,
                    template=settings.template,
                    occurrence=occurrence,
                    query_template=settings.query_template,
                )
                check.ga.meta["template"] = get_template_name(settings.template)
                check.ga.meta["query_index"] = q
                card.pictures.append(
                    (f"GA map of {word}", _ga_png(emb, check.ga, q, settings.query_template))
                )
            except ValueError as exc:  # GAError: a word the tokens do not spell
                card.error = f"GA of {word!r}: {' '.join(str(exc).split())}"
        checks[category] = check
    view = HallucinationReport(
        prompt=card.prompt,
        answer_text=card.answer,
        mentions=[
            MentionedObject(m["category"], m["text"], m["start"], m["end"])
            for m in mentions
            if m["category"] in checks
        ],
        objects=checks,
        threshold=threshold,
        image=emb.pil_image(0),
        image_size=emb.image_sizes[0],
        template=get_template_name(settings.template),
    )
    picture, _ = detections_picture(emb.pil_image(0), view)
    card.pictures.insert(0, ("best OWL-ViT box of every mentioned object", png_bytes(picture)))
    if settings.vision != "joint":
        card.error = "stock LLaVA answered: GA explains J's answers only"
    return render_hallucination_report(view)


def get_template_name(template: str) -> str:
    from jmllm.joint.chat.templates import get_template

    return get_template(template).name


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _md_cell(text: Any) -> str:
    """File and model text in Markdown: HTML and Markdown escaped, one line, at most 200
    characters (:func:`jmllm.align.options.markdown_text`)."""
    return markdown_text(text, limit=200)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "x"


def _pope_tables(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One table per rule: rows of splits, mean and pooled."""
    from jmllm.joint.audit.pope import POPE_METRICS, POPE_RULES

    tables = []
    for rule in POPE_RULES:
        m = metrics["pope_rules"][rule]
        chosen = rule == metrics["parse_rule"]
        rows = []
        for key in [*metrics["pope_rows"], "mean", "pooled"]:
            row = m[key]
            n = row.get("n", "")
            cells = [_fmt(row[k]) for k in POPE_METRICS]
            if chosen:  # the report's rule: its intervals too
                ci = metrics["pope_ci"][key]
                cells = [
                    f"{c} {_interval(ci[k])}" for c, k in zip(cells, POPE_METRICS, strict=True)
                ]
            rows.append({"name": key, "n": n, "other": row.get("other", ""), "cells": cells})
        tables.append(
            {
                "rule": rule,
                "chosen": rule == metrics["parse_rule"],
                "rows": rows,
                "headline": m["headline"],
            }
        )
    return tables


def _interval(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[—]"


def _markdown(metrics: dict[str, Any], run: dict[str, Any], cards: list[Card]) -> str:
    from jmllm.joint.audit.pope import POPE_METRICS

    s = run["settings"]
    lines = [f"# Hallucination benchmark: {metrics['benchmark'].upper()}", ""]
    lines += [f"- {_md_cell(note)}" for note in run["notes"]]
    lines += [
        f"- model: {_md_cell(json.dumps(run['model']))}",
        f"- prompt: {_md_cell(s['question'])} in template {_md_cell(s['template'])}, greedy, at "
        f"most {s['max_new_tokens']} new tokens, vision `{s['vision']}`; OWL-ViT query "
        f"{_md_cell(s['query_template'])}",
        f"- images: {metrics['images']} answered ({run['images_failed']} could not be read)",
        "",
    ]
    if metrics["benchmark"] == "pope":
        lines += [
            "## Rows",
            "",
            "| split | file | rows | answered | SHA-256 |",
            "| --- | --- | --- | --- | --- |",
        ]
        for split, doc in metrics["pope_rows"].items():
            lines.append(
                f"| {split} | {_md_cell(doc['file'])} | {doc['rows']} | {doc['answered']} | "
                f"`{doc['sha256'][:16]}…` |"
            )
        for table in _pope_tables(metrics):
            mark = (
                " (the report's rule; bootstrap intervals over images)" if table["chosen"] else ""
            )
            h = table["headline"]
            lines += [
                "",
                f"## Rule `{table['rule']}`{mark}",
                "",
                f"Headline: F1 {_fmt(h['value'])} ({h['source']}).",
                "",
                "| rows | n | neither yes nor no | " + " | ".join(POPE_METRICS) + " |",
                "| --- | --- | --- | " + " | ".join("---" for _ in POPE_METRICS) + " |",
            ]
            lines += [
                f"| {r['name']} | {r['n']} | {r['other']} | " + " | ".join(r["cells"]) + " |"
                for r in table["rows"]
            ]
        ft = metrics["first_token"]
        if ft.get("available"):
            best = ft["best_f1"]["mean"]
            lines += [
                "",
                f"First-token rule: AUROC of the yes/no log-odds for the truth "
                f"{_fmt(ft['auroc'])}; mean F1 at threshold {ft['threshold']}: "
                f"{_fmt(metrics['pope_rules']['first-token']['mean']['f1'])}; best mean F1 "
                f"{_fmt(best['f1'])} at {best['threshold']:.3f} (chosen on these rows: "
                "optimistic).",
                "",
                f"![first-token threshold curve]({_curve_name(metrics)})",
            ]
        lines += [
            "",
            "## Where the rules disagree",
            "",
            "| rules | rows | example answers |",
            "| --- | --- | --- |",
        ]
        for pair, d in metrics["rule_disagreements"].items():
            examples = "; ".join(repr(e) for e in d["examples"])
            lines.append(f"| {pair} | {d['rows']} | {_md_cell(examples)} |")
    else:
        c, ci = metrics["chair"], metrics["chair_ci"]
        sample = c.get("sample") or {}
        lines += [
            "## CHAIR",
            "",
            "| CHAIR_s | CHAIR_i | recall | captions | mentions | hallucinated mentions |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {_fmt(c['chair_s'])} {_interval(ci['chair_s'])} | {_fmt(c['chair_i'])} "
            f"{_interval(ci['chair_i'])} | {_fmt(c['recall'])} {_interval(ci['recall'])} | "
            f"{c['captions']} | {c['mentions']} | {c['hallucinated_mentions']} |",
            "",
            f"Synonyms: {_md_cell(c['synonyms'])}; truth: {c['truth']}; images: "
            f"{_md_cell(json.dumps(sample))}; {c['unfinished']} captions cut by the token limit.",
        ]
    pvl = metrics["perception_vs_language"]
    lines += [
        "",
        "## Perception or language?",
        "",
        f"Of J's {pvl['errors']} hallucinations with OWL-ViT evidence on the same `t` "
        f"(threshold {metrics['owl_threshold']}): perception {_fmt(pvl['perception'])} "
        f"(OWL-ViT already wrong), language {_fmt(pvl['language'])} (OWL-ViT right, the LLM "
        f"wrong); counts {pvl['counts']}.",
        "",
        f"AUROC of OWL-ViT's score for the truth: {_fmt(metrics['auroc_owl_predicts_truth'])}.",
        "",
        "## Gallery",
        "",
    ]
    if cards:
        lines += ["| # | image | title | side |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {c.rank} | `{_md_cell(c.file)}` | {_md_cell(c.title)} | {c.side} |" for c in cards
        ]
    else:
        lines.append("No hallucination to show.")
    return "\n".join(lines) + "\n"


def _curve_name(metrics: dict[str, Any]) -> str:
    return CURVE_PNG


def _gallery(
    metrics: dict[str, Any], run: dict[str, Any], cards: list[Card], curve: bytes | None
) -> str:
    """``templates/benchmark_gallery.html`` (autoescaped): every value is text; only the
    pictures' ``data:`` URLs are built here."""
    from jmllm.joint.audit.pope import POPE_METRICS
    from jmllm.joint.render.explanation import data_url

    context: dict[str, Any] = {
        "css": asset("audit_gallery.css"),
        "metrics": metrics,
        "run": run,
        "settings": run["settings"],
        "metric_names": POPE_METRICS,
        "cards": [
            {
                "card": c,
                "pictures": [(alt, data_url(png)) for alt, png in c.pictures],
            }
            for c in cards
        ],
        "curve": data_url(curve) if curve else None,
        "fmt": _fmt,
        "interval": _interval,
    }
    if metrics["benchmark"] == "pope":
        context["tables"] = _pope_tables(metrics)
    return environment().get_template("benchmark_gallery.html").render(**context)


def write_benchmark_report(
    result: BenchmarkResult,
    out: str | os.PathLike[str] | None = None,
    model: Any = None,
    *,
    pope: Any = None,
    chair: ChairInputs | None = None,
    rule: str = "llava",
    threshold: float = 0.0,
    owl_threshold: float = DEFAULT_OWL_THRESHOLD,
    top_k: int = 10,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    notes: Sequence[str] = (),
    progress: bool = False,
) -> BenchmarkReport:
    """Write a benchmark run's report into ``out`` (default the run's own folder).

    Args:
        result: from :func:`~jmllm.joint.audit.benchmark.run_benchmark`.
        out: the report folder.
        model: the :class:`~jmllm.joint.JointModel` that answered, for the gallery's pictures
            (None: the gallery lists the hallucinations without pictures).
        pope: the :class:`~jmllm.joint.audit.pope.PopeData` of a POPE run.
        chair: the :class:`ChairInputs` of a CHAIR run.
        rule: POPE: the rule of ``pope`` (every rule is in ``pope_rules``).
        threshold: POPE: the first-token rule's threshold.
        owl_threshold: OWL-ViT "sees" an object at or above this score.
        top_k: hallucinations in the gallery.
        n_resamples, confidence, seed: the percentile bootstrap over images of the intervals.
        notes: short notices shown at the top.
        progress: a progress bar over the gallery's pictures.

    Returns:
        :class:`BenchmarkReport`.

    Example:
        >>> report = write_benchmark_report(result, model=model, pope=data)  # doctest: +SKIP
        >>> report.metrics["pope"]["mean"]["f1"]  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    folder = Path(out) if out is not None else result.out
    if folder is None:
        raise ValueError("out: the run was in memory; give a report folder")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    if (pope is None) == (chair is None):
        raise ValueError("give pope= for a POPE run or chair= for a CHAIR run")
    benchmark = result.settings.benchmark
    if (benchmark == "pope") != (pope is not None):
        raise ValueError(f"a {benchmark} run: give {'pope' if benchmark == 'pope' else 'chair'}=")
    if pope is not None:
        metrics = pope_report(
            pope, result, rule, threshold, owl_threshold, n_resamples, confidence, seed
        )
        cards = _pope_cards(pope, result, rule, threshold, owl_threshold, top_k)
    else:
        assert chair is not None
        metrics = chair_report(chair, result, owl_threshold, n_resamples, confidence, seed)
        cards = _chair_cards(metrics, result, top_k)
    sources = {image.image_id: image for image in result.images}
    pages: dict[int, str] = {}
    for card in tqdm(cards, desc="gallery", unit="pic", disable=not (progress and model)):
        if model is None:
            break
        try:
            image = sources[card.image_id].load()
            if pope is not None:
                _pope_pictures(model, result, card, image)
            else:
                page = _chair_pictures(model, result, card, image, owl_threshold)
                if page is not None:
                    pages[card.rank] = page
        except (OSError, ValueError) as exc:  # an image gone since the run: say so, go on
            card.error = f"no pictures: {' '.join(str(exc).split())}"
            logger.warning("%s: %s", card.file, card.error)
    folder.mkdir(parents=True, exist_ok=True)
    for card in cards:
        stem = f"{card.rank:02d}_{_slug(card.image_id)}"
        for k, (_, png) in enumerate(card.pictures):
            atomic_write_bytes(folder / PICTURES_DIR / f"{stem}_{k}.png", png)
        if card.rank in pages:
            card.page = f"{PICTURES_DIR}/{stem}.html"
            atomic_write_text(folder / card.page, pages[card.rank])
    run = {
        "settings": result.settings.to_dict(),
        "model": dict(getattr(model, "sources", {}) or {}) if model else {},
        "images_failed": len(result.failed),
        "failed": result.failed,
        "processed": result.processed,
        "kept": result.kept,
        "rows_per_batch": result.rows_per_batch,
        "seconds": round(result.seconds, 3),
        "notes": list(notes),
    }
    metrics["hallucinations"] = [c.to_json() for c in cards]
    metrics["run"] = run
    curve = None
    curve_path = None
    if pope is not None:
        curve = curve_png(metrics["first_token"], pope.splits)
        curve_path = atomic_write_bytes(folder / CURVE_PNG, curve)
    json_path = atomic_write_text(
        folder / REPORT_JSON, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
    )
    md_path = atomic_write_text(folder / REPORT_MD, _markdown(metrics, run, cards))
    gallery = atomic_write_text(folder / GALLERY_HTML, _gallery(metrics, run, cards, curve))
    return BenchmarkReport(metrics, cards, json_path, md_path, gallery, curve_path)


__all__ = [
    "CURVE_PNG",
    "DEFAULT_OWL_THRESHOLD",
    "BenchmarkReport",
    "Card",
    "ChairInputs",
    "chair_report",
    "chair_scores",
    "curve_png",
    "pope_report",
    "write_benchmark_report",
]
