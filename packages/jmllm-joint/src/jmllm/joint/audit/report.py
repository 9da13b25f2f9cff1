"""The hallucination audit's report: ``report.json``, ``report.md``, the authors' confidence
histograms (``confidence_histograms.png``) and one self-contained HTML gallery
(``gallery.html``: pictures as data URLs, inline CSS, no network request, every text escaped).

The gallery shows the metrics with their intervals, the histograms, the most confident positive
hallucinations — J said "yes" to a class that is not annotated, sorted by OWL-ViT's score for
that class on the same ``t``, as the authors show them — each with OWL-ViT's detections of the
class (boxes scoring within 0.01 of the best, as in the authors' notebook) and the GA map of the
answer's "yes" against the class query, and the per-class rates.
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

import numpy as np

from jmllm.align.options import markdown_text
from jmllm.joint.audit.metrics import POPE_METRICS, audit_metrics
from jmllm.joint.audit.run import (
    LOCK_FILE,
    RESULTS_FILE,
    SETTINGS_FILE,
    AuditRecord,
    AuditResult,
    YesNoAuditor,
)
from jmllm.joint.render.explanation import data_url, heatmap_overlay_png, map_title
from jmllm.joint.render.pages import asset, environment
from jmllm.joint.render.report import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
HISTOGRAMS_PNG = "confidence_histograms.png"
GALLERY_HTML = "gallery.html"
AUTHORS_DTYPE = "float32"  # the authors' notebook loaded both models in float32
PICTURES_DIR = "hallucinations"
# everything the audit writes directly in its --out (the folder is claimed for these names)
AUDIT_OUTPUTS = (
    RESULTS_FILE,
    SETTINGS_FILE,
    LOCK_FILE,
    REPORT_JSON,
    REPORT_MD,
    HISTOGRAMS_PNG,
    GALLERY_HTML,
    PICTURES_DIR,
)
DETECTION_MARGIN = 0.01  # the authors draw the boxes scoring at least (best score − 0.01)


@dataclass
class Hallucination:
    """One positive hallucination shown in the gallery, with its pictures (PNG bytes)."""

    rank: int
    record: AuditRecord
    question: str
    detections_png: bytes | None = None
    ga_png: bytes | None = None
    boxes: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "rank": self.rank,
            "image_id": r.image_id,
            "file": r.file,
            "class": r.class_name,
            "owl_score": r.owl_score,
            "answer": r.answer,
            "question": self.question,
            "detections": self.boxes,
            "error": self.error,
        }


@dataclass
class AuditReport:
    """The written report: its metrics and files."""

    metrics: dict[str, Any]
    hallucinations: list[Hallucination]
    json_path: Path
    markdown_path: Path
    histograms_path: Path
    gallery_path: Path


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def confidence_histograms_png(records: Sequence[AuditRecord], rule: str = "authors") -> bytes:
    """The authors' figure, for present and absent classes side by side: stacked histograms
    (10 bins over the panel's range) of OWL-ViT's score for the class, split by J's answer.

    Example:
        >>> confidence_histograms_png([])[:4] == b"\\x89PNG"
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    panels = (
        (True, "Present classes — a “no” is a negative hallucination"),
        (False, "Absent classes — a “yes” is a positive hallucination"),
    )
    for i, (present, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        groups = {"yes": [], "no": []}  # type: dict[str, list[float]]
        for r in records:
            p = r.parsed(rule)
            if r.present == present and p in groups:
                groups[p].append(r.owl_score)
        data = [groups["yes"], groups["no"]]
        labels = [
            f"J: yes (n={len(groups['yes'])}"
            + (f", mean {np.mean(groups['yes']):.3f})" if groups["yes"] else ")"),
            f"J: no (n={len(groups['no'])}"
            + (f", mean {np.mean(groups['no']):.3f})" if groups["no"] else ")"),
        ]
        if any(data):
            ax.hist(data, bins=10, stacked=True, label=labels, color=["#d55e00", "#0072b2"])
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no yes/no answer", ha="center", va="center")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("OWL-ViT max score for the class (same t)")
        ax.set_ylabel("questions")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _top_hallucinations(records: Sequence[AuditRecord], rule: str, top_k: int) -> list[AuditRecord]:
    picked = [r for r in records if not r.present and r.parsed(rule) == "yes"]
    # stable: ties keep dataset order
    return sorted(picked, key=lambda r: -r.owl_score)[:top_k]


def _yes_target(answer: str, tokens: Sequence[Any]) -> int | str:
    """The answer's "yes" word to explain (its first token when the answer has none)."""
    from jmllm.joint.saliency import answer_words

    for word in answer_words(answer, tokens):
        if word.text.casefold() == "yes":
            return word.text
    return 0


def _pictures(model: Any, auditor: YesNoAuditor, item: Hallucination, image: Any) -> None:
    """Detections of the class and the GA map of J's "yes" against the class query."""
    import torch

    from jmllm.joint.hallucination.check import ForcedAnswer
    from jmllm.joint.render.report import draw_detections, png_bytes
    from jmllm.joint.saliency import GradientAlignment, answer_tokens

    r = item.record
    settings = auditor.settings
    query_template = settings.query_template
    emb = model.embed([image], preprocessing=settings.preprocessing)
    threshold = max(0.0, r.owl_score - DETECTION_MARGIN)
    dets = model.detect(emb, [r.class_name], threshold=threshold, template=query_template)[0]
    item.boxes = dets.to_records()[:5]
    item.detections_png = png_bytes(draw_detections(emb.pil_image(0), dets, max_boxes=5))
    prompt_ids, question = auditor.prompt(r.class_name)
    answer_ids = torch.tensor(r.tokens, dtype=torch.long)
    text, tokens = answer_tokens(model.tokenizer, answer_ids)
    if not tokens:
        item.error = "empty answer: no token to explain"
        return
    ga = GradientAlignment(model).attribute(
        emb,
        question,
        _yes_target(text, tokens),
        [r.class_name],
        answer=ForcedAnswer(prompt_ids, answer_ids),
        template=settings.template,
        query_template=query_template,
        tokenization=settings.tokenization,
    )
    query = query_template.format(r.class_name)
    item.ga_png = heatmap_overlay_png(
        emb.pil_image(0),
        ga.map("class", query=0),
        f"GA of “{ga.target}” vs query “{query}”",
        label=map_title("class", query),  # the bar says what it shows
    )


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(interval: Any) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "—"


def _markdown(metrics: dict[str, Any], info: dict[str, Any], items: list[Hallucination]) -> str:
    pope, ci = metrics["pope"], metrics["pope_ci"]
    conf, counts = metrics["owl_confidence"], metrics["owl_confidence_counts"]
    boot = metrics["bootstrap"]
    lines = [
        "# Hallucination audit",
        "",
        f"- dataset: {_md_cell(info['dataset'])} — {metrics['images']} images audited"
        f" ({info['images_failed']} could not be read), {metrics['questions']} questions",
        f"- protocol: sampling {_md_cell(info['settings']['sampling'])}, template "
        f"{_md_cell(info['settings']['template'])}, question "
        f"{_md_cell(info['settings']['question'])}, OWL-ViT query "
        f"{_md_cell(info['settings']['query_template'])}",
        f"- inputs: tokenization {_md_cell(str(info['settings'].get('tokenization')))}, "
        f"preprocessing {_md_cell(str(info['settings'].get('preprocessing')))}, dtype "
        f"{_md_cell(str(info.get('dtype')))}",
        f"- answers (rule `{metrics['parse_rule']}`): {metrics['answers']['yes']} yes, "
        f"{metrics['answers']['no']} no, {metrics['unparsed']} unparsed (left out of the metrics)",
        "",
        "## POPE metrics",
        "",
        f"| metric | value | {int(boot['confidence'] * 100)} % interval |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {m} | {_fmt(pope[m])} | {_ci(ci[m])} |" for m in POPE_METRICS]
    lines += [
        "",
        f"TP {pope['tp']}, FP {pope['fp']}, TN {pope['tn']}, FN {pope['fn']}. Intervals: "
        f"percentile bootstrap over images, {boot['resamples']} resamples, seed {boot['seed']}.",
        "",
        "## OWL-ViT's confidence behind J's answers",
        "",
        "| class is | J says yes | J says no |",
        "| --- | --- | --- |",
        f"| present | {_fmt(conf['yes_present'])} (n={counts['yes_present']}) | "
        f"{_fmt(conf['no_present'])} (n={counts['no_present']}) |",
        f"| absent | {_fmt(conf['yes_absent'])} (n={counts['yes_absent']}) | "
        f"{_fmt(conf['no_absent'])} (n={counts['no_absent']}) |",
        "",
        f"AUROC of OWL-ViT's score for predicting J's yes: all "
        f"{_fmt(metrics['auroc_owl_predicts_yes'])}, present classes "
        f"{_fmt(metrics['auroc_owl_predicts_yes_present'])}, absent classes "
        f"{_fmt(metrics['auroc_owl_predicts_yes_absent'])}.",
        "",
        f"![confidence histograms]({HISTOGRAMS_PNG})",
        "",
        "## Most confident positive hallucinations",
        "",
    ]
    if items:
        lines += [
            "| # | image | class | OWL-ViT score | answer |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {h.rank} | {_md_cell(h.record.file)} | {_md_cell(h.record.class_name)} | "
            f"{h.record.owl_score:.3f} | {_md_cell(h.record.answer)} |"
            for h in items
        ]
    else:
        lines.append("None: J said yes to no absent class.")
    lines += [
        "",
        "## Per class",
        "",
        "| class | present q. | recall | absent q. | hallucination rate | unparsed "
        "| mean OWL present | mean OWL absent |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {_md_cell(c['class'])} | {c['present_questions']} | {_fmt(c['recall'])} | "
        f"{c['absent_questions']} | {_fmt(c['hallucination_rate'])} | {c['unparsed']} | "
        f"{_fmt(c['mean_owl_present'])} | {_fmt(c['mean_owl_absent'])} |"
        for c in metrics["per_class"]
    ]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    """File and model text in Markdown: HTML and Markdown escaped, one line, at most 200
    characters (:func:`jmllm.align.options.markdown_text`)."""
    return markdown_text(text, limit=200)


def _gallery(
    metrics: dict[str, Any], info: dict[str, Any], items: list[Hallucination], histograms: bytes
) -> str:
    """The gallery page (``templates/audit_gallery.html``, autoescaped): every value below is
    text, escaped by the template; only the pictures' ``data:`` URLs are built here."""
    pope, ci = metrics["pope"], metrics["pope_ci"]
    conf, counts = metrics["owl_confidence"], metrics["owl_confidence_counts"]
    cards = [
        {
            "rank": h.rank,
            "record": h.record,
            "owl_score": f"{h.record.owl_score:.3f}",
            "question": h.question,
            "error": h.error,
            "detections": data_url(h.detections_png) if h.detections_png else None,
            "ga": data_url(h.ga_png) if h.ga_png else None,
        }
        for h in items
    ]
    return (
        environment()
        .get_template("audit_gallery.html")
        .render(
            css=asset("audit_gallery.css"),
            notes=info.get("notes", []),
            info=info,
            settings=info["settings"],
            metrics=metrics,
            pope=pope,
            pope_rows=[(m, _fmt(pope[m]), _ci(ci[m])) for m in POPE_METRICS],
            confidence_rows=[
                (
                    side,
                    _fmt(conf["yes_" + side]),
                    counts["yes_" + side],
                    _fmt(conf["no_" + side]),
                    counts["no_" + side],
                )
                for side in ("present", "absent")
            ],
            auroc=[
                _fmt(metrics[k])
                for k in (
                    "auroc_owl_predicts_yes",
                    "auroc_owl_predicts_yes_present",
                    "auroc_owl_predicts_yes_absent",
                )
            ],
            interval=int(metrics["bootstrap"]["confidence"] * 100),
            boot=metrics["bootstrap"],
            histograms=data_url(histograms),
            margin=DETECTION_MARGIN,
            cards=cards,
            classes=[
                {
                    **c,
                    **{
                        k: _fmt(c[k])
                        for k in (
                            "recall",
                            "hallucination_rate",
                            "mean_owl_present",
                            "mean_owl_absent",
                        )
                    },
                }
                for c in metrics["per_class"]
            ],
        )
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "x"


def write_audit_report(
    result: AuditResult,
    out: str | os.PathLike[str] | None = None,
    model: Any = None,
    *,
    rule: str = "authors",
    top_k: int = 25,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    notes: Sequence[str] = (),
    progress: bool = False,
) -> AuditReport:
    """Write the audit's report into ``out`` (default the audit's own folder).

    Args:
        result: from :func:`~jmllm.joint.audit.run_audit`.
        out: the report folder.
        model: the audited :class:`~jmllm.joint.JointModel`, for the gallery's detections and
            GA maps (None: the gallery lists the hallucinations without pictures).
        rule: answer parsing rule (``authors``, ``strict`` or ``pope``).
        top_k: how many positive hallucinations the gallery shows (the authors show 25).
        n_resamples, confidence, seed: the bootstrap intervals.
        notes: short notices shown at the top of the gallery.
        progress: progress bar over the gallery's pictures.

    Returns:
        :class:`AuditReport` with the metrics and the paths written.

    Example:
        >>> report = write_audit_report(result, model=model)  # doctest: +SKIP
        >>> report.metrics["pope"]["f1"], report.gallery_path.name  # doctest: +SKIP
        (0.84, 'gallery.html')
    """
    from tqdm.auto import tqdm

    folder = Path(out) if out is not None else result.out
    if folder is None:
        raise ValueError("out: the audit ran in memory; give a report folder")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    metrics = audit_metrics(result.records, rule, n_resamples, confidence, seed)
    auditor = YesNoAuditor(model, result.settings, _classes(result)) if model else None
    items = []
    for rank, record in enumerate(_top_hallucinations(result.records, rule, top_k), 1):
        question = _question(result, record)
        items.append(Hallucination(rank, record, question))
    sources = {im.image_id: im for im in result.dataset.images} if result.dataset else {}
    for item in tqdm(items, desc="gallery", unit="pic", disable=not (progress and model)):
        if auditor is None:
            break
        image = sources.get(item.record.image_id)
        if image is None:
            item.error = "image not in the dataset given"
            continue
        try:
            _pictures(model, auditor, item, image.load())
        except (OSError, ValueError) as exc:  # an image gone since the audit: say so, go on
            item.error = f"no pictures: {' '.join(str(exc).split())}"
            logger.warning("%s: %s", item.record.file, item.error)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = folder / PICTURES_DIR
    for item in items:
        stem = f"{item.rank:02d}_{_slug(item.record.image_id)}_{_slug(item.record.class_name)}"
        if item.detections_png:
            atomic_write_bytes(pictures / f"{stem}_detections.png", item.detections_png)
        if item.ga_png:
            atomic_write_bytes(pictures / f"{stem}_ga.png", item.ga_png)
    dtype = str(model.dtype).removeprefix("torch.") if model is not None else None
    notes = list(notes)
    if dtype is not None and dtype != AUTHORS_DTYPE:
        notes.append(
            f"J ran in {dtype}, not in {AUTHORS_DTYPE} as the authors' notebook did: answers "
            "and scores can differ from theirs (run with --dtype float32 to match)."
        )
    info = {
        "dataset": result.dataset.name if result.dataset else "",
        "images_failed": len(result.failed),
        "failed": result.failed,
        "settings": result.settings.to_dict(),
        "model": dict(getattr(model, "sources", {}) or {}) if model else {},
        "dtype": dtype,
        "notes": notes,
        "excluded_by_sampling": len(result.plan.excluded),
    }
    doc = {**metrics, "hallucinations": [h.to_json() for h in items], "run": info}
    histograms = confidence_histograms_png(result.records, rule)
    json_path = atomic_write_text(
        folder / REPORT_JSON, json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    )
    md_path = atomic_write_text(folder / REPORT_MD, _markdown(metrics, info, items))
    hist_path = atomic_write_bytes(folder / HISTOGRAMS_PNG, histograms)
    gallery = atomic_write_text(folder / GALLERY_HTML, _gallery(metrics, info, items, histograms))
    return AuditReport(metrics, items, json_path, md_path, hist_path, gallery)


def _classes(result: AuditResult) -> list[str]:
    if result.dataset is not None:
        return list(result.dataset.classes)
    return list(dict.fromkeys(r.class_name for r in result.records))


def _question(result: AuditResult, record: AuditRecord) -> str:
    from jmllm.joint.audit.data import question_text

    s = result.settings
    return question_text(record.class_name, s.question, s.articles)


__all__ = [
    "AuditReport",
    "Hallucination",
    "confidence_histograms_png",
    "write_audit_report",
]
