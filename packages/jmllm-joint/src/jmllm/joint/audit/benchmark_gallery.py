"""The gallery of a benchmark report: the hallucinations OWL-ViT was most sure of, each a card
with its evidence drawn.

The gallery shows the hallucinations OWL-ViT was most sure of — a POPE question J got wrong, or a
caption's hallucinated object — each with OWL-ViT's boxes for the object and GA's map of the
answer's word against the object's query, as the paper's hallucination view does for one
answer; every CHAIR caption shown also gets its own interactive hallucination view
(``hallucinations/*.html``). :mod:`jmllm.joint.audit.benchmark_report` writes the cards into
``gallery.html``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from jmllm.joint.audit.benchmark import BenchmarkResult, pope_answers

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


__all__ = [
    "Card",
]
