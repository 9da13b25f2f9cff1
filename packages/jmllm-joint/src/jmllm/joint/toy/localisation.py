"""Do GA maps land on the objects J names? MaxBoxAccV2 against the toy scenes' true boxes.

Every explained word is scored against the true box of the object it names, with MaxBoxAccV2
(:class:`jmllm.joint.wsol.BoxAccumulator`, IoU 0.3/0.5/0.7), beside the plain-gradient baseline
(per-patch ``‖∂ logit / ∂ t‖``, from the same GA result) and a random per-patch map. Two
protocols, both with the paper's WSOL question ``What's in the image?`` in the ``llava-1.5``
template (as :func:`jmllm.joint.wsol.run_wsol` prompts) and the query ``a photo of a <shape>``:

``caption``
    J answers greedily; for every object of the scene its answer names correctly
    (``<colour> <shape>``), GA explains that shape word (its occurrence in the answer).
``name``
    The paper's WSOL answer form: J's answer is teacher-forced to ``The image shows a <colour>
    <shape>`` for each object whose colour no other object of the scene has (so the words name
    one object), and GA explains the shape word.

Each is reported over all scenes and split into single-object scenes (the WSOL setting: CUB has
one bird per image) and scenes with several objects, where a caption word's logit may also
depend on the other objects (the toy captions order objects left to right).

Sanity check in the manner of Adebayo et al. (NeurIPS 2018): W is re-initialised (same
architecture, fresh seed), the same answers are explained again (same tokens), and the Spearman
rank correlation between each trained map and its re-initialised counterpart is reported with the
re-initialised maps' MaxBoxAccV2. A method that explains the model must give different maps once
the model is destroyed.

Example:
    >>> from jmllm.joint.toy import load_toy_joint
    >>> report = ga_localisation(load_toy_joint(), scenes=20)  # doctest: +SKIP
    >>> report["caption"]["single_object"]["maxboxacc_iou50"]["ga"]  # doctest: +SKIP
    0.9
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from jmllm.joint.saliency import GradientAlignment, patch_grid_map
from jmllm.joint.toy.scenes import IN_IMAGE_PREFIX, IN_IMAGE_QUESTION, SHAPES, make_scene
from jmllm.joint.wsol import BoxAccumulator

TEMPLATE = "llava-1.5"  # what GradientAlignment uses for text answers, and run_wsol
METHODS = ("ga", "ga_coord", "ga_any", "gradient", "random", "ga_reinit_w")
GROUPS = ("all", "single_object", "multi_object")
PROTOCOLS = ("caption", "name")


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


class _Tally:
    """MaxBoxAccV2 accumulators and rank correlations of one protocol, per scene group."""

    def __init__(self) -> None:
        self.acc = {g: {m: BoxAccumulator() for m in METHODS} for g in GROUPS}
        self.rhos: dict[str, list[float]] = {g: [] for g in GROUPS}

    def add(self, maps: dict[str, np.ndarray], gt: np.ndarray, single: bool) -> None:
        rho = spearmanr(maps["ga"].ravel(), maps["ga_reinit_w"].ravel()).statistic
        for group in ("all", "single_object" if single else "multi_object"):
            for method, saliency in maps.items():
                self.acc[group][method].add(saliency, gt)
            self.rhos[group].append(float(np.nan_to_num(rho)))

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for group in GROUPS:
            if not self.acc[group]["ga"].count:
                continue
            results = {m: a.result() for m, a in self.acc[group].items()}
            out[group] = {
                "objects": self.acc[group]["ga"].count,
                "maxboxacc_iou50": {m: r.per_iou[0.5] / 100.0 for m, r in results.items()},
                "maxboxacc": {m: r.value / 100.0 for m, r in results.items()},
                "best_threshold_iou50": {m: r.best_threshold[0.5] for m, r in results.items()},
                "sanity_spearman_reinit_w": float(np.mean(self.rhos[group])),
            }
        return out


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
        ``{"caption": {group: scores}, "name": {group: scores}, "maxboxacc_iou50": …,
        "sanity_spearman_reinit_w": …, ...}``: per protocol and scene group (``all``,
        ``single_object``, ``multi_object``), ``objects`` explained, ``maxboxacc_iou50`` and
        ``maxboxacc`` (mean over IoU 0.3/0.5/0.7) per method in [0, 1], and the mean Spearman
        correlation of GA maps with W re-initialised. Methods: ``ga`` (class weighting, the
        default map), ``ga_coord``, ``ga_any``, ``gradient``, ``random``, ``ga_reinit_w``. The
        top-level ``maxboxacc_iou50`` and ``sanity_spearman_reinit_w`` are the ``caption``
        protocol's over all scenes.
    """
    from tqdm.auto import tqdm

    ga = GradientAlignment(model)
    ga_random_w = GradientAlignment(reinitialised(model, reinit_seed))
    rng = np.random.default_rng(seed)
    tallies = {p: _Tally() for p in PROTOCOLS}
    misnamed = 0
    examples: list[dict[str, Any]] = []
    for index in tqdm(range(start, start + scenes), desc="GA localisation", disable=not progress):
        scene = make_scene("heldout", index, seed)
        single = len(scene.objects) == 1
        emb = model.embed([scene.image])
        answer = model.generate(emb, IN_IMAGE_QUESTION, max_new_tokens=24, template=TEMPLATE)[0]
        by_name = {(o.colour, o.shape): o for o in scene.objects}
        items = []  # (protocol, object, answer, occurrence)
        for colour, shape, occurrence in _mentions(answer.text):
            obj = by_name.get((colour, shape))
            if obj is None:
                misnamed += 1  # a wrong or hallucinated object: no true box to score against
                continue
            items.append(("caption", obj, answer, occurrence))
        colours = Counter(o.colour for o in scene.objects)
        for obj in scene.objects:
            if colours[obj.colour] == 1:
                items.append(("name", obj, f"{IN_IMAGE_PREFIX}a {obj.name}", 0))
        for protocol, obj, said, occurrence in items:
            args = (emb, IN_IMAGE_QUESTION, obj.shape, [obj.shape])
            res = ga.attribute(*args, answer=said, occurrence=occurrence)
            res_r = ga_random_w.attribute(*args, answer=said, occurrence=occurrence)
            maps = {
                "ga": res.maps["class"],
                "ga_coord": res.maps["coord"],
                "ga_any": res.maps["any"],
                "gradient": res.maps["gradient"],
                "random": patch_grid_map(rng.random(res.boxes.shape[0]), res.image_size),
                "ga_reinit_w": res_r.maps["class"],
            }
            tallies[protocol].add(maps, _inclusive(obj.box), single)
            if len(examples) < 5 and protocol == "caption":
                examples.append({"scene": index, "object": obj.name, "answer": answer.text})
    if not tallies["caption"].acc["all"]["ga"].count:
        raise ValueError(
            f"no object named correctly in {scenes} held-out scenes: nothing to explain"
        )
    report: dict[str, Any] = {p: tallies[p].report() for p in PROTOCOLS}
    report.update(
        {
            "maxboxacc_iou50": report["caption"]["all"]["maxboxacc_iou50"],
            "sanity_spearman_reinit_w": report["caption"]["all"]["sanity_spearman_reinit_w"],
            "objects": report["caption"]["all"]["objects"],
            "objects_misnamed": misnamed,
            "scenes": scenes,
            "setting": {
                "question": IN_IMAGE_QUESTION,
                "template": TEMPLATE,
                "caption": "J's own greedy answer; the shape word of each correctly named object",
                "name": f"answer teacher-forced to '{IN_IMAGE_PREFIX}a <colour> <shape>' for "
                "objects whose colour is unique in the scene; the shape word",
                "query": "a photo of a <shape>",
                "map": "class weighting (ga); coord and any weightings beside it",
                "reinit_seed": reinit_seed,
            },
            "examples": examples,
        }
    )
    return report
