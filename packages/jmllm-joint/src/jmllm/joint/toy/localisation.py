"""Do GA maps land on the objects J names? MaxBoxAccV2 against the toy scenes' true boxes.

For every held-out scene, J answers the paper's WSOL question ``What's in the image?`` (greedy,
``llava-1.5`` template, as :func:`jmllm.joint.wsol.run_wsol` prompts); for every object of the
scene that the answer names correctly (``<colour> <shape>``), GA explains the shape word (its
occurrence in the answer) with the query ``a photo of a <shape>``, and the map is scored against
that object's box with MaxBoxAccV2 (:class:`jmllm.joint.wsol.BoxAccumulator`, IoU 0.3/0.5/0.7).
The same GA result gives the plain-gradient baseline (per-patch ``‖∂ logit / ∂ t‖``); a random
per-patch map is the chance baseline.

Sanity check in the manner of Adebayo et al. (NeurIPS 2018): W is re-initialised (same
architecture, fresh seed), the same answers are explained again (teacher-forced, same tokens),
and the Spearman rank correlation between each trained map and its re-initialised counterpart
is reported, with the re-initialised maps' MaxBoxAccV2. A method that explains the model must
give different, worse maps once the model is destroyed.

Example:
    >>> from jmllm.joint.toy import load_toy_joint
    >>> report = ga_localisation(load_toy_joint(), scenes=20)  # doctest: +SKIP
    >>> report["maxboxacc_iou50"]["ga"]  # doctest: +SKIP
    0.9
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from jmllm.joint.saliency import WEIGHTINGS, GradientAlignment, patch_grid_map
from jmllm.joint.toy.scenes import IN_IMAGE_QUESTION, SHAPES, make_scene
from jmllm.joint.wsol import BoxAccumulator

TEMPLATE = "llava-1.5"  # what GradientAlignment uses for text answers, and run_wsol


def reinitialised(model: Any, seed: int) -> Any:
    """A copy of J sharing OWL-ViT and LLaVA but with a freshly initialised W (same config)."""
    from jmllm.align import AlignmentLayer
    from jmllm.joint.model import JointModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = AlignmentLayer(model.alignment.config)
    w = next(model.alignment.parameters())
    return JointModel(
        model.owl,
        model.llava,
        layer.to(device=w.device, dtype=w.dtype),
        tokenizer=model.tokenizer,
        owl_tokenizer=model.owl_tokenizer,
        owl_norm=model.owl_norm,
        llava_norm=model.llava_norm,
    )


def _mentions(text: str) -> list[tuple[str, str, int]]:
    """(colour, shape, occurrence of that shape word among the answer's words) per mention."""
    seen: dict[str, int] = {}
    out = []
    for m in re.finditer(r"\b([a-z]+)\s+(" + "|".join(SHAPES) + r")\b", text.lower()):
        shape = m.group(2)
        out.append((m.group(1), shape, seen.get(shape, 0)))
        seen[shape] = seen.get(shape, 0) + 1
    return out


def _inclusive(box: tuple[int, int, int, int]) -> np.ndarray:
    """A scene box (exclusive ends) in MaxBoxAccV2's inclusive-pixel convention."""
    x0, y0, x1, y1 = box
    return np.array([[x0, y0, x1 - 1, y1 - 1]], dtype=np.float64)


def ga_localisation(
    model: Any,
    scenes: int = 40,
    seed: int = 0,
    start: int = 0,
    reinit_seed: int = 12345,
    progress: bool = False,
) -> dict[str, Any]:
    """GA's MaxBoxAccV2 on the objects J names in held-out scenes, beside the baselines.

    Args:
        model: a toy :class:`~jmllm.joint.JointModel`.
        scenes: held-out scenes to explain (``heldout`` split of world ``seed``, from ``start``).
        reinit_seed: seed of the re-initialised W of the sanity check.
        progress: a tqdm bar over scenes.

    Returns:
        ``{"maxboxacc_iou50": {method: value in [0, 1]}, "maxboxacc": {method: MaxBoxAccV2
        (mean over IoU 0.3/0.5/0.7) in [0, 1]}, "per_iou": {...}, "objects": n explained,
        "objects_not_named": n, "sanity_spearman_reinit_w": mean ρ, ...}``; methods are ``ga``
        (class weighting, the default map), ``ga_coord``, ``ga_any``, ``gradient``, ``random``,
        ``ga_reinit_w``.
    """
    from tqdm.auto import tqdm

    ga = GradientAlignment(model)
    ga_random_w = GradientAlignment(reinitialised(model, reinit_seed))
    rng = np.random.default_rng(seed)
    methods = ("ga", "ga_coord", "ga_any", "gradient", "random", "ga_reinit_w")
    acc = {m: BoxAccumulator() for m in methods}
    rhos: list[float] = []
    named = missed = 0
    records = []
    for index in tqdm(range(start, start + scenes), desc="GA localisation", disable=not progress):
        scene = make_scene("heldout", index, seed)
        emb = model.embed([scene.image])
        answer = model.generate(emb, IN_IMAGE_QUESTION, max_new_tokens=24, template=TEMPLATE)[0]
        by_name = {(o.colour, o.shape): o for o in scene.objects}
        for colour, shape, occurrence in _mentions(answer.text):
            obj = by_name.get((colour, shape))
            if obj is None:
                missed += 1  # a wrong or hallucinated object: no true box to score against
                continue
            named += 1
            args = (emb, IN_IMAGE_QUESTION, shape, [shape])
            res = ga.attribute(*args, answer=answer, occurrence=occurrence)
            res_r = ga_random_w.attribute(*args, answer=answer, occurrence=occurrence)
            gt = _inclusive(obj.box)
            maps = {
                "ga": res.maps["class"],
                "ga_coord": res.maps["coord"],
                "ga_any": res.maps["any"],
                "gradient": res.maps["gradient"],
                "random": patch_grid_map(rng.random(res.boxes.shape[0]), res.image_size),
                "ga_reinit_w": res_r.maps["class"],
            }
            for m, saliency in maps.items():
                acc[m].add(saliency, gt)
            rho = spearmanr(maps["ga"].ravel(), maps["ga_reinit_w"].ravel()).statistic
            rhos.append(float(np.nan_to_num(rho)))
            records.append(
                {"scene": index, "object": obj.name, "box": list(obj.box), "answer": answer.text}
            )
    if not named:
        raise ValueError(
            f"no object named correctly in {scenes} held-out scenes: nothing to explain"
        )
    results = {m: a.result() for m, a in acc.items()}
    return {
        "maxboxacc_iou50": {m: r.per_iou[0.5] / 100.0 for m, r in results.items()},
        "maxboxacc": {m: r.value / 100.0 for m, r in results.items()},
        "per_iou": {
            m: {str(k): v / 100.0 for k, v in r.per_iou.items()} for m, r in results.items()
        },
        "best_threshold_iou50": {m: r.best_threshold[0.5] for m, r in results.items()},
        "objects": named,
        "objects_not_named": missed,
        "scenes": scenes,
        "sanity_spearman_reinit_w": float(np.mean(rhos)),
        "sanity_spearman_reinit_w_median": float(np.median(rhos)),
        "setting": {
            "question": IN_IMAGE_QUESTION,
            "template": TEMPLATE,
            "target": "the shape word of each correctly named object (J's own answer)",
            "query": "a photo of a <shape>",
            "weightings": list(WEIGHTINGS),
            "reinit_seed": reinit_seed,
        },
        "examples": records[:5],
    }
