"""GA as users run it by default, scored against the toy world's truth.

The path every picture of the project shows (``jmllm-joint demo``, ``explain``, the explorer's
word click, the user-study pictures): J answers the demo's question ``What's the content of the
image?`` greedily in the interactive template (``llava-1.5``), GA explains the answer's words
against **all four shape queries** with its default class channel (``matching``: the query of
the object the word refers to, :func:`jmllm.joint.saliency.matching_query`), and each map is
scored as its picture shows it (:meth:`jmllm.joint.saliency.GAResult.shown`: 0 the median patch,
1 the top patch). For every object J's caption names correctly (``<colour> <shape>``), both
words are scored against that object's true box: the shape word (``object`` words) and the
colour word (``colour`` words, whose matching channel is the shape's query).

Beside GA, on the same items and painted the same way:

- ``owl``: OWL-ViT's own detection score for the named shape on every patch's box — the bar GA
  must beat to show that it adds the language side (it sees nothing of the answer);
- ``gradient``: the plain gradient ``‖∂ logit / ∂ t‖`` per patch, on its grid cell;
- ``stock_gradient``: the same answer teacher-forced into **stock** LLaVA (its own vision tower
  and projector, no W, no OWL-ViT): ``‖∂ logit / ∂ token_k‖`` per image token, on its grid cell
  — where the language model itself is sensitive, whatever GA makes of it;
- ``random_boxes``: seeded random weights on OWL-ViT's boxes (GA's painting without GA);
- ``random``: seeded random weights on the patch grid.

Scores: the pointing game (the peak of the map in the object's box) and MaxBoxAccV2 at IoU
0.3/0.5/0.7 (:class:`jmllm.joint.wsol.BoxAccumulator`), over all items and split by scene: one
object, several objects, and several objects **of one shape** (only the language side can tell
those apart). Every figure has a 95 % percentile-bootstrap interval that resamples scenes (the
items of a scene are not independent).

:func:`default_path_sanity` is the Adebayo et al. (NeurIPS 2018) cascade on this path: the same
answers explained by J with W, then the language model's head, then its layers, re-initialised
top-down; the Spearman correlation with the trained maps is reported on the painted maps and
on the per-patch weights themselves (painting every patch's box makes any two maps alike), with
the noise-gradient floor (``g_L`` replaced by Gaussian noise) beside it.

Example:
    >>> from jmllm.joint.toy import load_toy_joint
    >>> report = default_path_localisation(load_toy_joint(), scenes=20)  # doctest: +SKIP
    >>> report["object"]["all"]["pointing"]["ga"]["value"]  # doctest: +SKIP
    0.7
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from jmllm.joint.chat.templates import INTERACTIVE_MAX_NEW_TOKENS, INTERACTIVE_TEMPLATE
from jmllm.joint.saliency import GAResult, GradientAlignment, paint_boxes, patch_grid_map
from jmllm.joint.toy.localisation import (
    _inclusive,
    peak_in_box,
    randomisation_cascade,
    spearman,
)
from jmllm.joint.toy.scenes import CONTENT_QUESTION, SHAPES, Scene, ToyObject, make_scene
from jmllm.joint.wsol.run import IOU_THRESHOLDS, BoxAccumulator

QUESTION = CONTENT_QUESTION  # the demo's first question: J's caption
QUERIES = SHAPES  # explain --tiny and the demo query every toy shape
TEMPLATE = INTERACTIVE_TEMPLATE
KINDS = ("object", "colour")
METHODS = ("ga", "owl", "gradient", "stock_gradient", "random_boxes", "random")
GROUPS = ("all", "single_object", "multi_object", "same_shape")
MAX_NEW_TOKENS = INTERACTIVE_MAX_NEW_TOKENS  # the demo's and explain's answer length


@dataclass
class _Item:
    """One scored word: its scene, kind, groups and each method's best IoU per threshold."""

    scene: int
    kind: str
    groups: tuple[str, ...]
    pointing: dict[str, bool] = field(default_factory=dict)
    best_ious: dict[str, np.ndarray] = field(default_factory=dict)


def named_objects(text: str, scene: Scene) -> list[tuple[int, int, ToyObject]]:
    """``(colour word index, shape word index, object)`` for every ``<colour> <shape>`` of
    ``text`` that names an object of ``scene`` (word indices as :func:`answer_words` counts).

    Example:
        >>> scene = make_scene("heldout", 103)
        >>> [(c, s, o.name) for c, s, o in named_objects("a blue triangle, a red cross", scene)]
        [(1, 2, 'blue triangle'), (4, 5, 'red cross')]
    """
    words = [m.group().lower() for m in re.finditer(r"[^\W_]+(?:['’-][^\W_]+)*", text)]
    by_name = {(o.colour, o.shape): o for o in scene.objects}
    found = []
    for i in range(len(words) - 1):
        obj = by_name.get((words[i], words[i + 1]))
        if obj is not None:
            found.append((i, i + 1, obj))
    return found


def shown_painting(values: torch.Tensor | np.ndarray, result: GAResult) -> np.ndarray:
    """Per-patch ``values`` (N,) painted as GA's pictures paint their weights: rescaled so 0 is
    the median patch and 1 the top patch (clipped), each patch's box filled, pixel-wise maximum
    (:meth:`GAResult.shown`'s painting for any per-patch score, e.g. OWL-ViT's own)."""
    v = torch.as_tensor(np.asarray(values, dtype=np.float32))
    low, high = v.median(), v.max()
    v = ((v - low) / (high - low)).clamp(0, 1) if bool(high > low) else torch.zeros_like(v)
    return paint_boxes(v, result.boxes_xyxy, result.image_size)


def scene_interval(
    per_scene: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """A percentile-bootstrap interval (``scipy.stats.bootstrap``, seeded) of a statistic of
    per-scene sums, resampling scenes: ``per_scene`` (S, D) holds each scene's sums (e.g. hits
    and items), ``statistic`` maps summed rows (..., D) to the figure (...). None with fewer
    than two scenes.

    Example:
        >>> hits = np.array([[1, 1], [0, 2], [2, 2], [1, 1]], dtype=float)  # (hits, items)
        >>> low, high = scene_interval(hits, lambda s: s[..., 0] / s[..., 1], 500)
        >>> low <= 4 / 6 <= high
        True
    """
    import warnings

    from scipy.stats import bootstrap

    data = np.asarray(per_scene, dtype=np.float64)
    if data.shape[0] < 2:
        return None
    point = float(statistic(data.sum(axis=0)))
    if all(float(statistic(row)) == point for row in data):
        return point, point  # every scene gives the same figure: no spread to resample

    def resampled(index: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(data[index.astype(np.int64)].sum(axis=-2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = bootstrap(
            (np.arange(data.shape[0]),),
            resampled,
            n_resamples=n_resamples,
            vectorized=True,
            method="percentile",
            confidence_level=confidence,
            rng=np.random.default_rng(seed),
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _figure(per_scene: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray]) -> dict:
    value = float(statistic(per_scene.sum(axis=0)))
    interval = scene_interval(per_scene, statistic)
    return {
        "value": value,
        "ci_low": None if interval is None else interval[0],
        "ci_high": None if interval is None else interval[1],
    }


def _score(items: Sequence[_Item], thresholds: np.ndarray) -> dict:
    """Pointing and MaxBoxAccV2 (IoU 0.3/0.5/0.7) of every method over ``items``, with
    intervals resampling the scenes they come from."""
    # the clusters: the scenes with items in this group
    order = {s: i for i, s in enumerate(sorted({it.scene for it in items}))}
    out: dict[str, Any] = {"items": len(items), "scenes": len(order)}
    if not items:
        return out
    scenes = list(order)
    pointing: dict[str, Any] = {}
    boxacc: dict[str, dict[str, Any]] = {
        f"maxboxacc_iou{round(d * 100)}": {} for d in IOU_THRESHOLDS
    }
    for method in METHODS:
        hits = np.zeros((len(scenes), 2))  # (S, hits + items)
        for it in items:
            hits[order[it.scene]] += (float(it.pointing[method]), 1.0)
        pointing[method] = _figure(hits, lambda s: s[..., 0] / s[..., 1])
        for delta in IOU_THRESHOLDS:
            correct = np.zeros((len(scenes), thresholds.size + 1))  # per τ, then items
            for it in items:
                correct[order[it.scene], :-1] += it.best_ious[method] >= delta
                correct[order[it.scene], -1] += 1
            boxacc[f"maxboxacc_iou{round(delta * 100)}"][method] = _figure(
                correct, lambda s: (s[..., :-1] / s[..., -1:]).max(axis=-1)
            )
    out["pointing"] = pointing
    out.update(boxacc)
    return out


def default_path_items(
    model: Any,
    indices: Sequence[int],
    seed: int = 0,
    progress: bool = False,
    protocol: str = "wsolevaluation",
) -> tuple[list[_Item], dict[str, int]]:
    """The scored words of held-out scenes ``indices`` (see :func:`default_path_localisation`),
    and caption counts (``exact``, ``without_named_object``); a part of the scenes can be run in
    each of several processes and the items pooled."""
    from tqdm.auto import tqdm

    ga = GradientAlignment(model)  # the defaults: class_query="matching", as the CLI
    accumulator = BoxAccumulator(protocol=protocol)
    items: list[_Item] = []
    counts = {"exact": 0, "without_named_object": 0}
    for index in tqdm(indices, desc="GA, default path", disable=not progress):
        scene = make_scene("heldout", index, seed)
        emb = model.embed([scene.image])
        answer = model.generate(emb, QUESTION, max_new_tokens=MAX_NEW_TOKENS, template=TEMPLATE)
        named = named_objects(answer[0].text, scene)
        truth = sorted(o.name for o in scene.objects)
        counts["exact"] += sorted(o.name for _, _, o in named) == truth
        if not named:
            counts["without_named_object"] += 1
            continue
        words = [w for colour_word, shape_word, _ in named for w in (shape_word, colour_word)]
        results = dict(zip(words, _word_results(ga, emb, answer[0], words), strict=True))
        stock = dict(zip(words, _stock_gradients(model, emb, answer[0], words), strict=True))
        shapes = [o.shape for o in scene.objects]
        rng = np.random.default_rng([seed, index])  # the random baselines: seeded per scene
        for colour_word, shape_word, obj in named:
            groups = ["all", "single_object" if len(shapes) == 1 else "multi_object"]
            if shapes.count(obj.shape) > 1:
                groups.append("same_shape")
            gt = _inclusive(obj.box)
            owl_scores = results[shape_word].class_scores[:, QUERIES.index(obj.shape)]
            for kind, word in (("object", shape_word), ("colour", colour_word)):
                res = results[word]
                n = res.boxes.shape[0]
                maps = {
                    "ga": res.shown("class"),
                    "owl": shown_painting(owl_scores, res),
                    "gradient": res.shown("gradient"),
                    "stock_gradient": patch_grid_map(stock[word], res.image_size),
                    "random_boxes": shown_painting(rng.random(n), res),
                    "random": patch_grid_map(rng.random(n), res.image_size),
                }
                item = _Item(index, kind, tuple(groups))
                for method, saliency in maps.items():
                    item.pointing[method] = peak_in_box(saliency, obj.box)
                    item.best_ious[method] = accumulator.best_ious(saliency, gt)
                items.append(item)
    return items, counts


def default_path_scores(
    items: Sequence[_Item], indices: Sequence[int], counts: dict[str, int]
) -> dict[str, Any]:
    """The report of :func:`default_path_localisation` from pooled items."""
    thresholds = BoxAccumulator(protocol="exact").thresholds
    report: dict[str, Any] = {}
    for kind in KINDS:
        report[kind] = {
            group: _score(
                [it for it in items if it.kind == kind and group in it.groups], thresholds
            )
            for group in GROUPS
        }
    report["captions"] = {
        "scenes": len(indices),
        "exact": counts["exact"] / len(indices),
        "scenes_without_a_named_object": counts["without_named_object"],
        "words": len(items),
    }
    return report


def default_path_localisation(
    model: Any,
    scenes: int = 300,
    seed: int = 0,
    start: int = 1000,
    progress: bool = False,
    protocol: str = "wsolevaluation",
) -> dict[str, Any]:
    """GA's pointing and MaxBoxAccV2 on J's own captions of held-out scenes, as users see it.

    Args:
        model: a toy :class:`~jmllm.joint.JointModel`.
        scenes: held-out scenes (``heldout`` split of world ``seed``, from ``start``).
        seed: the toy world's seed, also the seed of the random baselines.
        start: index of the first held-out scene.
        progress: a tqdm bar over scenes.
        protocol: MaxBoxAccV2's protocol (:class:`~jmllm.joint.wsol.BoxAccumulator`).

    Returns:
        ``{"object": {group: scores}, "colour": {group: scores}, "captions": …, "setting":
        …}``: per word kind and scene group (``all``, ``single_object``, ``multi_object``,
        ``same_shape``), ``items``, ``scenes``, ``pointing`` and ``maxboxacc_iou30/50/70``,
        each ``{method: {"value", "ci_low", "ci_high"}}`` for the methods ``ga``, ``owl``,
        ``gradient``, ``random_boxes``, ``random``; ``captions``: how many captions name
        every object right, and the words explained.
    """
    indices = list(range(start, start + scenes))
    items, counts = default_path_items(model, indices, seed, progress, protocol)
    report = default_path_scores(items, indices, counts)
    template = model.conversation_template(TEMPLATE).name
    report["setting"] = default_path_setting(seed, start, protocol, template)
    return report


def default_path_setting(
    seed: int, start: int, protocol: str, template: str = TEMPLATE
) -> dict[str, Any]:
    """What the default-path figures were computed with (recorded beside them); ``template``
    is the format J prompted in (a toy Qwen2-VL J asked for ``llava-1.5`` uses ``qwen2-vl``)."""
    return {
        "question": QUESTION,
        "template": template,
        "queries": list(QUERIES),
        "class_query": "matching",
        "map": "GAResult.shown('class'): 0 the median patch, 1 the top patch",
        "answers": "J's greedy caption",
        "first_scene": start,
        "seed": seed,
        "protocol": protocol,
        "interval": "95 % percentile bootstrap over scenes (2000 resamples, seed 0)",
    }


def default_path_sanity(
    model: Any,
    scenes: int = 100,
    seed: int = 0,
    start: int = 1000,
    reinit_seed: int = 12345,
    progress: bool = False,
) -> dict[str, Any]:
    """The randomisation cascade on the default path: per stage, the mean Spearman correlation
    of the object words' maps with the trained model's, on the painted maps (``painted``) and on
    the 64 per-patch class weights of the matched channel (``patches``); ``noise_gradient``:
    the same with ``g_L`` replaced by seeded Gaussian noise (nothing of W or the language model
    left), the floor a model-free map reaches.

    Returns:
        ``{"stages": [{"stage", "painted", "patches"}, …], "noise_gradient": {"painted",
        "patches"}, "words": n}``.
    """
    from tqdm.auto import tqdm

    from jmllm.joint.toy.localisation import _sharing

    ga = GradientAlignment(model, cache_size=2)
    stages = [
        (name, _sharing(variant, ga)) for name, variant in randomisation_cascade(model, reinit_seed)
    ]
    rng = np.random.default_rng(seed)
    rhos: dict[str, dict[str, list[float]]] = {
        name: {"painted": [], "patches": []} for name, _ in [*stages, ("noise_gradient", None)]
    }
    words = 0
    for index in tqdm(range(start, start + scenes), desc="GA cascade", disable=not progress):
        scene = make_scene("heldout", index, seed)
        emb = model.embed([scene.image])
        answer = model.generate(emb, QUESTION, max_new_tokens=MAX_NEW_TOKENS, template=TEMPLATE)[0]
        named = named_objects(answer.text, scene)
        if not named:
            continue
        targets = [shape_word for _, shape_word, _ in named]
        trained = _word_results(ga, emb, answer, targets)
        variants = {name: _word_results(g, emb, answer, targets) for name, g in stages}
        variants["noise_gradient"] = [_noise_result(ga, emb, r, rng) for r in trained]
        for k, res in enumerate(trained):
            words += 1
            for name, results in variants.items():
                other = results[k]
                rhos[name]["painted"].append(spearman(res.shown("class"), other.shown("class")))
                rhos[name]["patches"].append(
                    spearman(res.weights("class").numpy(), other.weights("class").numpy())
                )
    return {
        "stages": [
            {"stage": name, **{k: float(np.mean(v)) for k, v in rhos[name].items()}}
            for name, _ in stages
        ],
        "noise_gradient": {k: float(np.mean(v)) for k, v in rhos["noise_gradient"].items()},
        "words": words,
        "scenes": scenes,
    }


def _word_results(
    ga: GradientAlignment, emb: Any, answer: Any, word_indices: Sequence[int]
) -> list[GAResult]:
    """GA results of some words of ``answer`` (a ``JointAnswer``), exactly as
    :meth:`GradientAlignment.explain_answer` computes each word (the sum of its tokens' logits),
    but with one backward per requested word only."""
    from jmllm.joint.model.joint import DEFAULT_QUERY_TEMPLATE
    from jmllm.joint.saliency import answer_tokens, answer_words

    t, size, _ = ga.embedding(emb)
    text, tokens = answer_tokens(ga.model.tokenizer, answer.token_ids)
    words = answer_words(text, tokens)
    prepared = ga.prepare(t, size, list(QUERIES), DEFAULT_QUERY_TEMPLATE)
    groups = [list(words[i].positions) for i in word_indices]
    grads = ga.llm_gradients(t, answer.prompt_ids, answer.token_ids, groups)
    return [
        ga._result(
            prepared,
            g,
            prepared.heads.numerators(g),
            [tokens[p] for p in group],
            words[i].text,
            text,
        )
        for g, group, i in zip(grads, groups, word_indices, strict=True)
    ]


def _stock_gradients(
    model: Any, emb: Any, answer: Any, word_indices: Sequence[int]
) -> list[torch.Tensor]:
    """Per image token ‖∂ logit / ∂ token_k‖ (N,) of each word of ``answer`` (the sum of its
    tokens' logits) teacher-forced into stock LLaVA: its own image tokens, no W."""
    from jmllm.joint.saliency import answer_tokens, answer_words

    text, tokens = answer_tokens(model.tokenizer, answer.token_ids)
    words = answer_words(text, tokens)
    ids = torch.cat([answer.prompt_ids.cpu(), answer.token_ids.cpu()]).unsqueeze(0)
    ids = ids.to(model.llava_device)
    prompt = int(answer.prompt_ids.numel())
    image_tokens = model.stock_image_tokens(emb).detach().requires_grad_(True)  # (1, N, D)
    norms = []
    with torch.enable_grad():
        logits = model.logits_from_image_tokens(image_tokens, ids)  # (1, L, V)
        for k, index in enumerate(word_indices):
            positions = list(words[index].positions)
            rows = torch.tensor([prompt + p - 1 for p in positions], device=logits.device)
            cols = answer.token_ids[positions].to(logits.device)
            score = logits[0, rows, cols].float().sum()
            (grad,) = torch.autograd.grad(
                score, image_tokens, retain_graph=k < len(word_indices) - 1
            )
            norms.append(grad[0].float().norm(dim=-1).cpu())
    return norms


def _noise_result(
    ga: GradientAlignment, emb: Any, res: GAResult, rng: np.random.Generator
) -> GAResult:
    """``res`` with ``g_L`` replaced by seeded Gaussian noise (same OWL side, same channel)."""
    from jmllm.joint.model.joint import DEFAULT_QUERY_TEMPLATE

    t, size, _ = ga.embedding(emb)
    prepared = ga.prepare(t, size, res.queries, DEFAULT_QUERY_TEMPLATE)
    noise = torch.from_numpy(rng.standard_normal(tuple(prepared.t.shape)).astype(np.float32))
    g = noise.to(device=prepared.t.device)
    noisy = ga._result(
        prepared, g, prepared.heads.numerators(g), res.tokens, res.target, res.answer_text
    )
    return noisy


__all__ = [
    "GROUPS",
    "KINDS",
    "METHODS",
    "QUERIES",
    "QUESTION",
    "default_path_items",
    "default_path_localisation",
    "default_path_sanity",
    "default_path_scores",
    "default_path_setting",
    "named_objects",
    "scene_interval",
    "shown_painting",
]
