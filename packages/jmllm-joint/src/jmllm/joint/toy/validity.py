"""Are J's explanations right? Every check of the toy world against its truth, in one report.

On held-out toy scenes (:mod:`jmllm.joint.toy.scenes`), :func:`toy_validity` gathers:

- the models' own scores (:mod:`jmllm.joint.toy.evaluate`): detection AP50 per shape, caption
  accuracy of stock toy LLaVA and of J, QA accuracy;
- GA localisation (:func:`jmllm.joint.toy.localisation.ga_localisation`): MaxBoxAccV2 of GA's map
  of every object word J says against that object's true box, beside the plain-gradient,
  random-map and random-box baselines, and the cascading randomisation sanity check;
- :func:`absent_word_check`: a shape word explained on a scene where no object has that shape
  (teacher-forced ``The image shows a <colour> <absent shape>``): what GA and the detector do;
- :func:`hallucination_check`: the hallucination view (:func:`jmllm.joint.check_hallucinations`
  with the toy shapes as its vocabulary) on answers teacher-forced to name the scene's objects
  plus one absent object; an absent object flagged "mentioned, not detected" is a true positive,
  a present one flagged is a false positive.

Example:
    >>> from jmllm.joint.toy import load_toy_joint
    >>> report = toy_validity(load_toy_joint(), scenes=30)  # doctest: +SKIP
    >>> report["ga_maxboxacc_iou50"], report["hallucination_recall"]  # doctest: +SKIP
    (0.6, 1.0)
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from scipy.stats import mannwhitneyu

from jmllm.joint.saliency import GradientAlignment
from jmllm.joint.toy.localisation import TEMPLATE, ga_localisation, peak_in_box
from jmllm.joint.toy.scenes import (
    COLOURS,
    IN_IMAGE_PREFIX,
    IN_IMAGE_QUESTION,
    SHAPES,
    Scene,
    make_scene,
)

HALLUCINATION_THRESHOLD = 0.1  # check_hallucinations' default detection threshold


def _absent(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A (colour, shape) whose shape no object of the scene has (seeded choice)."""
    present = {o.shape for o in scene.objects}
    shapes = [s for s in SHAPES if s not in present]
    return str(rng.choice(list(COLOURS))), str(rng.choice(shapes))


def _on_objects(saliency: np.ndarray, scene: Scene) -> tuple[float, bool]:
    """(share of the map's mass inside the scene's object boxes, whether its peak is in one)."""
    inside = np.zeros(saliency.shape, dtype=bool)
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        inside[y0:y1, x0:x1] = True
    total = float(saliency.sum())
    share = float(saliency[inside].sum()) / total if total > 0 else 0.0
    return share, any(peak_in_box(saliency, o.box) for o in scene.objects)


def absent_word_check(
    model: Any, scenes: int = 20, seed: int = 0, start: int = 0, progress: bool = False
) -> dict[str, Any]:
    """GA of a shape word whose object is absent, beside the same for a present object.

    For every scene, J's answer is teacher-forced to ``The image shows a <colour> <shape>`` once
    with a shape no object has (``absent``) and once with the first object (``present``), and GA
    explains the shape word with the query ``a photo of a <shape>`` (the class map).

    Args:
        model: a toy :class:`~jmllm.joint.JointModel`.
        scenes, seed, start: held-out scenes ``start … start + scenes - 1`` of world ``seed``.
        progress: a tqdm bar.

    Returns:
        for ``absent`` and ``present``: mean ``detection_score`` (best sigmoid class score of the
        query over the patches), mean ``max_cosine`` (GA's largest raw class similarity before
        min–max normalisation), mean ``map_mass_on_objects`` (share of the map inside the
        scene's object boxes) and ``peak_on_an_object`` (fraction of maps whose peak lies in
        some object's box); ``object_area_share``, the boxes' mean share of the image (what a
        map spread evenly would put on objects).

    Example:
        >>> from jmllm.joint.toy import load_toy_joint
        >>> absent_word_check(load_toy_joint(), scenes=4)["absent"]["detection_score"] < 0.1  # doctest: +SKIP
        True
    """
    from tqdm.auto import tqdm

    ga = GradientAlignment(model, cache_size=2)
    rng = np.random.default_rng(seed + 1)
    rows: dict[str, list[tuple[float, float, float, bool]]] = {"absent": [], "present": []}
    areas = []
    for index in tqdm(range(start, start + scenes), desc="absent words", disable=not progress):
        scene = make_scene("heldout", index, seed)
        emb = model.embed([scene.image])
        colour, shape = _absent(scene, rng)
        first = scene.objects[0]
        for kind, (c, s) in (("absent", (colour, shape)), ("present", (first.colour, first.shape))):
            res = ga.attribute(
                emb, IN_IMAGE_QUESTION, s, [s], answer=f"{IN_IMAGE_PREFIX}a {c} {s}",
                template=TEMPLATE,
            )  # fmt: skip
            share, peak = _on_objects(res.map("class"), scene)
            rows[kind].append(
                (
                    float(res.class_scores[:, 0].max()),
                    float(res.similarities[:, 0].max()),
                    share,
                    peak,
                )
            )
        w, h = scene.image.size
        covered = sum((o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in scene.objects)
        areas.append(covered / (w * h))
    out: dict[str, Any] = {}
    for kind, values in rows.items():
        v = np.array(values, dtype=np.float64)
        out[kind] = {
            "detection_score": float(v[:, 0].mean()),
            "max_cosine": float(v[:, 1].mean()),
            "map_mass_on_objects": float(v[:, 2].mean()),
            "peak_on_an_object": float(v[:, 3].mean()),
        }
    out["object_area_share"] = float(np.mean(areas))
    out["scenes"] = scenes
    return out


def score_auroc(higher: list[float], lower: list[float]) -> float:
    """Probability that a score of ``higher`` exceeds one of ``lower`` (ties count half): the
    area under the ROC curve, as the Mann–Whitney U statistic over ``len(higher) * len(lower)``.
    NaN when either list is empty.

    Example:
        >>> score_auroc([0.9, 0.8], [0.1, 0.8])
        0.875
    """
    if not higher or not lower:
        return float("nan")
    u = mannwhitneyu(higher, lower, alternative="two-sided").statistic
    return float(u) / (len(higher) * len(lower))


def _phrase_list(names: list[str]) -> str:
    items = [f"a {n}" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def hallucination_check(
    model: Any,
    scenes: int = 20,
    seed: int = 0,
    start: int = 0,
    threshold: float = HALLUCINATION_THRESHOLD,
    progress: bool = False,
) -> dict[str, Any]:
    """Precision and recall of the hallucination view on answers that name an absent object.

    For every scene, J's answer is teacher-forced to ``The image shows <the scene's objects and
    one absent object>.`` (the absent one at a seeded position in the list) and
    :func:`~jmllm.joint.check_hallucinations` runs on it with the four shapes as its vocabulary.
    Each distinct shape mentioned is one case: positive when no object of the scene has it.

    Args:
        model: a toy :class:`~jmllm.joint.JointModel`.
        scenes, seed, start: held-out scenes ``start … start + scenes - 1`` of world ``seed``.
        threshold: the view's detection threshold (its default, 0.1).
        progress: a tqdm bar.

    Returns:
        ``precision``, ``recall`` (of "mentioned, not detected" for absent objects),
        ``false_flag_rate`` (present objects flagged), ``auroc`` (how well the detection score
        alone ranks present above absent mentions, threshold-free; Mann–Whitney U / (n⁺ n⁻)),
        the counts, mean scores of present and absent mentions, and a few ``examples``.

    Example:
        >>> from jmllm.joint.toy import load_toy_joint
        >>> hallucination_check(load_toy_joint(), scenes=4)["recall"]  # doctest: +SKIP
        1.0
    """
    from tqdm.auto import tqdm

    from jmllm.joint.hallucination.check import check_hallucinations

    ga = GradientAlignment(model, cache_size=1)
    rng = np.random.default_rng(seed + 2)
    scores: dict[bool, list[float]] = {True: [], False: []}  # absent? -> detection scores
    flagged: dict[bool, list[bool]] = {True: [], False: []}
    examples: list[dict[str, Any]] = []
    for index in tqdm(
        range(start, start + scenes), desc="hallucination view", disable=not progress
    ):
        scene = make_scene("heldout", index, seed)
        colour, shape = _absent(scene, rng)
        names = [o.name for o in scene.objects]
        names.insert(int(rng.integers(0, len(names) + 1)), f"{colour} {shape}")
        answer = f"{IN_IMAGE_PREFIX}{_phrase_list(names)}."
        report = check_hallucinations(
            model,
            model.embed([scene.image]),
            IN_IMAGE_QUESTION,
            answer=answer,
            objects=SHAPES,
            threshold=threshold,
            template=TEMPLATE,
            ga=ga,
        )
        present = {o.shape for o in scene.objects}
        for name, check in report.objects.items():
            if not check.mentioned:
                continue
            absent = name not in present
            scores[absent].append(check.score)
            flagged[absent].append(name in report.mentioned_not_detected)
        if len(examples) < 3:
            examples.append(
                {
                    "scene": index,
                    "answer": answer,
                    "absent": shape,
                    "mentioned_not_detected": report.mentioned_not_detected,
                }
            )
    tp = int(np.sum(flagged[True]))
    fp = int(np.sum(flagged[False]))
    positives, negatives = len(flagged[True]), len(flagged[False])
    auroc = score_auroc(scores[False], scores[True])
    return {
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / positives if positives else float("nan"),
        "false_flag_rate": fp / negatives if negatives else float("nan"),
        "auroc": auroc,
        "threshold": threshold,
        "absent_mentions": positives,
        "present_mentions": negatives,
        "flagged_absent": tp,
        "flagged_present": fp,
        "mean_score_absent": float(np.mean(scores[True])) if positives else float("nan"),
        "mean_score_present": float(np.mean(scores[False])) if negatives else float("nan"),
        "scenes": scenes,
        "examples": examples,
    }


def _group(loc: dict[str, Any], protocol: str, group: str) -> float | None:
    scores = loc[protocol].get(group)
    return None if scores is None else float(scores["maxboxacc_iou50"]["ga"])


def _value(scores: dict[str, Any], metric: str) -> float | None:
    return scores[metric]["ga"]["value"] if metric in scores else None


def toy_validity(
    model: Any,
    scenes: int = 30,
    metric_scenes: int = 100,
    seed: int = 0,
    start: int = 1000,
    reinit_seed: int = 12345,
    progress: bool = False,
    default_scenes: int = 300,
    sanity_scenes: int = 60,
    default_path: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every check of the toy J against the scenes' truth, with the headline figures on top.

    Args:
        model: a toy :class:`~jmllm.joint.JointModel`.
        scenes: held-out scenes for the explanation checks (GA localisation and its sanity
            checks, absent words, hallucination view).
        metric_scenes: held-out scenes for detection AP and caption/QA accuracy (cheap).
        seed: the toy world's seed.
        start: first held-out scene (the shipped manifest's scores use 0–299).
        reinit_seed: seed of the randomisation cascade.
        progress: tqdm bars.
        default_scenes: held-out scenes for the default path
            (:func:`~jmllm.joint.toy.default_path.default_path_localisation`, from ``start``).
        sanity_scenes: held-out scenes for the default path's randomisation cascade.
        default_path: the default-path report when already computed (e.g. by several
            processes, as ``benchmarks/toy_validity.py`` does); None computes it here.

    Returns:
        top-level floats in [0, 1]: on the default path (GA as the demo, ``explain`` and the
        explorer run it), ``ga_pointing_default`` (object words), ``colour_word_pointing_default``,
        ``ga_maxboxacc_iou50_default``, ``owl_pointing_default`` (OWL-ViT's own score, painted
        alike) and ``ga_pointing_default_same_shape``; ``detection_ap50`` (the lowest shape's AP50 of the boxes
        ``jmllm-joint detect`` gives with its defaults, see
        :func:`~jmllm.joint.toy.evaluate.detection_scores`), ``caption_accuracy_llava``,
        ``caption_accuracy_joint``, ``qa_accuracy_llava``, ``qa_accuracy_joint`` (``llava-1.5``
        template), ``ga_maxboxacc_iou30/50/70``, ``gradient_maxboxacc_iou50``,
        ``random_maxboxacc_iou50``, ``random_boxes_maxboxacc_iou50``,
        ``sanity_spearman_randomised_w``, ``hallucination_precision``, ``hallucination_recall``;
        beside them the GA score on single- and multi-object scenes, on the paper's one-object
        answers (``ga_named_maxboxacc_iou50``), the pointing game of GA and of random weights
        on OWL-ViT's boxes, and the correlation with every LLM layer randomised and with
        ``g_L`` replaced by noise (the floor);
        then the details: ``default_path`` (every figure with its interval),
        ``default_path_sanity``, ``detection``, ``answers``, ``localisation`` (the older
        protocols, see :func:`~jmllm.joint.toy.localisation.ga_localisation`),
        ``sanity_cascade``, ``absent_word``, ``hallucination``, ``seconds``.
    """
    from jmllm.joint.toy.default_path import default_path_localisation, default_path_sanity
    from jmllm.joint.toy.evaluate import answer_scores, detection_scores
    from jmllm.joint.toy.pool import ScenePool

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    if default_path is None:
        default_path = default_path_localisation(
            model, default_scenes, seed=seed, start=start, progress=progress
        )
        seconds["default_path"] = time.perf_counter() - clock
    clock = time.perf_counter()
    sanity = default_path_sanity(
        model, sanity_scenes, seed=seed, start=start, reinit_seed=reinit_seed, progress=progress
    )
    seconds["default_path_sanity"] = time.perf_counter() - clock
    clock = time.perf_counter()
    pool = ScenePool.render("heldout", metric_scenes, seed=seed, start=start, progress=progress)
    detection = detection_scores(model, pool)
    answers = answer_scores(model, pool, templates=(TEMPLATE,))
    seconds["model_scores"] = time.perf_counter() - clock
    clock = time.perf_counter()
    loc = ga_localisation(
        model, scenes, seed=seed, start=start, reinit_seed=reinit_seed, progress=progress,
        cascade=True,
    )  # fmt: skip
    seconds["ga_localisation"] = time.perf_counter() - clock
    clock = time.perf_counter()
    absent = absent_word_check(model, scenes, seed=seed, start=start, progress=progress)
    seconds["absent_word"] = time.perf_counter() - clock
    clock = time.perf_counter()
    hall = hallucination_check(model, scenes, seed=seed, start=start, progress=progress)
    seconds["hallucination"] = time.perf_counter() - clock
    caption = loc["caption"]["all"]
    objects, colours = default_path["object"], default_path["colour"]
    return {
        "ga_pointing_default": objects["all"]["pointing"]["ga"]["value"],
        "ga_maxboxacc_iou50_default": objects["all"]["maxboxacc_iou50"]["ga"]["value"],
        "colour_word_pointing_default": colours["all"]["pointing"]["ga"]["value"],
        "owl_pointing_default": objects["all"]["pointing"]["owl"]["value"],
        "ga_pointing_default_same_shape": _value(objects.get("same_shape", {}), "pointing"),
        "sanity_spearman_patches_randomised_w": sanity["stages"][0]["patches"],
        "sanity_spearman_painted_randomised_w": sanity["stages"][0]["painted"],
        "detection_ap50": min(detection["detection_ap50"].values()),
        "caption_accuracy_llava": answers["caption_accuracy"]["llava"][TEMPLATE],
        "caption_accuracy_joint": answers["caption_accuracy"]["joint"][TEMPLATE],
        "qa_accuracy_llava": answers["qa_accuracy"]["llava"][TEMPLATE],
        "qa_accuracy_joint": answers["qa_accuracy"]["joint"][TEMPLATE],
        "ga_maxboxacc_iou30": caption["maxboxacc_iou30"]["ga"],
        "ga_maxboxacc_iou50": caption["maxboxacc_iou50"]["ga"],
        "ga_maxboxacc_iou70": caption["maxboxacc_iou70"]["ga"],
        "gradient_maxboxacc_iou50": caption["maxboxacc_iou50"]["gradient"],
        "random_maxboxacc_iou50": caption["maxboxacc_iou50"]["random"],
        "random_boxes_maxboxacc_iou50": caption["maxboxacc_iou50"]["random_boxes"],
        "ga_maxboxacc_iou50_single_object": _group(loc, "caption", "single_object"),
        "ga_maxboxacc_iou50_multi_object": _group(loc, "caption", "multi_object"),
        "ga_named_maxboxacc_iou50": loc["name"]["all"]["maxboxacc_iou50"]["ga"],
        "ga_pointing": caption["pointing"]["ga"],
        "random_boxes_pointing": caption["pointing"]["random_boxes"],
        "sanity_spearman_randomised_w": loc["sanity_spearman_reinit_w"],
        "sanity_spearman_randomised_llm": loc["cascade"][-1]["spearman"],
        "sanity_spearman_noise_gradient": caption["spearman_with_ga"]["ga_random_gradient"],
        "hallucination_precision": hall["precision"],
        "hallucination_recall": hall["recall"],
        "scenes": scenes,
        "metric_scenes": metric_scenes,
        "first_scene": start,
        "words_explained": loc["objects"],
        "default_path": default_path,
        "default_path_sanity": sanity,
        "detection": detection,
        "answers": answers,
        "localisation": loc,
        "sanity_cascade": loc["cascade"],
        "absent_word": absent,
        "hallucination": hall,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "threads": torch.get_num_threads(),
    }


__all__ = ["absent_word_check", "hallucination_check", "score_auroc", "toy_validity"]
