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

Two further baselines separate what GA owes to the language side from what it owes to OWL-ViT's
boxes: ``random_boxes`` paints every patch's *predicted box* with a seeded random weight (GA's
painting without GA's weights), and ``ga_random_gradient`` is GA with the language model's
gradient ``g_L`` replaced by seeded Gaussian noise (the cosine against OWL-ViT's gradients is
kept, nothing of W or the LLM is). Beside MaxBoxAccV2, ``pointing`` is the pointing game (Zhang et
al., ECCV 2016): the fraction of maps whose peak (the centre of mass of their maximal pixels) lies
in the object's box.

Sanity check in the manner of Adebayo et al. (NeurIPS 2018): W is re-initialised (same
architecture, fresh seed), the same answers are explained again (same tokens), and the Spearman
rank correlation between each trained map and its re-initialised counterpart is reported with the
re-initialised maps' MaxBoxAccV2. A method that explains the model must give different maps once
the model is destroyed. With ``cascade=True`` the randomisation goes on top-down, cumulatively
(:func:`randomisation_cascade`): W, then the language model's output head (with its final norm),
then its decoder layers from the last to the first; the ``caption`` maps of every stage are
correlated with the trained model's.

Example:
    >>> from jmllm.joint.toy import load_toy_joint
    >>> report = ga_localisation(load_toy_joint(), scenes=20)  # doctest: +SKIP
    >>> report["caption"]["single_object"]["maxboxacc_iou50"]["ga"]  # doctest: +SKIP
    0.9
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from jmllm.joint.saliency import GAResult, GradientAlignment, paint_boxes, patch_grid_map
from jmllm.joint.toy.scenes import IN_IMAGE_PREFIX, IN_IMAGE_QUESTION, SHAPES, make_scene
from jmllm.joint.wsol.run import BoxAccumulator

TEMPLATE = "llava-1.5"  # what GradientAlignment uses for text answers, and run_wsol
METHODS = (
    "ga",
    "ga_coord",
    "ga_any",
    "gradient",
    "random",
    "random_boxes",
    "ga_random_gradient",
    "ga_reinit_w",
)
GROUPS = ("all", "single_object", "multi_object")
PROTOCOLS = ("caption", "name")


def reinitialised(model: Any, seed: int) -> Any:
    """A copy of J sharing OWL-ViT and LLaVA but with a freshly initialised W (same config)."""
    from jmllm.align import AlignmentLayer
    from jmllm.joint.model.joint import JointModel

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


def _joint_with(model: Any, alignment: Any, llava: Any) -> Any:
    from jmllm.joint.model.joint import JointModel

    return JointModel(
        model.owl,
        llava,
        alignment,
        tokenizer=model.tokenizer,
        owl_tokenizer=model.owl_tokenizer,
        owl_norm=model.owl_norm,
        llava_norm=model.llava_norm,
    )


def reinitialise_(module: torch.nn.Module, std: float) -> None:
    """Re-initialise a module in place as a fresh Llama is: linear and embedding weights
    N(0, std²), biases 0, norm weights 1."""
    with torch.no_grad():
        for sub in module.modules():
            weight = getattr(sub, "weight", None)
            bias = getattr(sub, "bias", None)
            if isinstance(sub, torch.nn.Linear | torch.nn.Embedding):
                sub.weight.normal_(0.0, std)
            elif isinstance(weight, torch.nn.Parameter) and weight.dim() == 1:
                weight.fill_(1.0)  # RMSNorm / LayerNorm gains
            if isinstance(bias, torch.nn.Parameter):
                bias.zero_()


def randomisation_cascade(model: Any, seed: int = 12345) -> list[tuple[str, Any]]:
    """Cumulative top-down randomisations of J's language side (Adebayo et al., NeurIPS 2018).

    Stage 1 re-initialises W (:func:`reinitialised`); every further stage keeps the previous ones
    and re-initialises the next block of the language model from the top: the output head with
    its final norm (``head``), then decoder layer ``L-1``, …, ``0`` (``layer_<i>``). OWL-ViT and
    the token embeddings are never touched (GA's OWL side must stay the same for the maps to be
    comparable). Each stage is a separate J (a copy of LLaVA, a few MB for the toy world).

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        seed: seed of the re-initialisations (stage ``k`` uses ``seed + k``).

    Returns:
        ``[(stage name, J), ...]`` in cascade order: ``w``, ``head``, ``layer_<L-1>``, …

    Example:
        >>> from jmllm.joint.toy import load_toy_joint
        >>> [name for name, _ in randomisation_cascade(load_toy_joint())]
        ['w', 'head', 'layer_2', 'layer_1', 'layer_0']
    """
    from jmllm.joint.model.internals import cascade_blocks, initializer_std, language_container

    random_w = reinitialised(model, seed)
    std = initializer_std(model)
    stages: list[tuple[str, Any]] = [("w", random_w)]
    done: list[str] = []
    for k, (name, paths) in enumerate(cascade_blocks(model), start=1):
        done += paths
        llava = copy.deepcopy(language_container(model))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            for path in done:
                reinitialise_(llava.get_submodule(path), std)
        stages.append((name, _joint_with(model, random_w.alignment, llava)))
    return stages


def peak_in_box(saliency: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    """Pointing game: whether the centre of mass of the map's maximal pixels lies in ``box``
    (``x0, y0, x1, y1``, ends exclusive).

    Example:
        >>> m = np.zeros((10, 10)); m[2:4, 6:8] = 1.0
        >>> peak_in_box(m, (6, 2, 8, 4)), peak_in_box(m, (0, 0, 5, 5))
        (True, False)
    """
    m = np.asarray(saliency, dtype=np.float64)
    ys, xs = np.nonzero(m >= m.max())
    x, y = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres
    x0, y0, x1, y1 = box
    return bool(x0 <= x <= x1 and y0 <= y <= y1)


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
        self.pointing: dict[str, dict[str, list[bool]]] = {
            g: {m: [] for m in METHODS} for g in GROUPS
        }
        self.by_shape = {s: {m: BoxAccumulator() for m in METHODS} for s in SHAPES}
        self.rhos: dict[str, list[float]] = {g: [] for g in GROUPS}
        self.rho_methods: dict[str, list[float]] = {m: [] for m in METHODS}

    def add(self, maps: dict[str, np.ndarray], obj: Any, single: bool) -> None:
        gt = _inclusive(obj.box)
        rho = spearman(maps["ga"], maps["ga_reinit_w"])
        for method, saliency in maps.items():
            self.by_shape[obj.shape][method].add(saliency, gt)
            self.rho_methods[method].append(spearman(maps["ga"], saliency))
        for group in ("all", "single_object" if single else "multi_object"):
            for method, saliency in maps.items():
                self.acc[group][method].add(saliency, gt)
                self.pointing[group][method].append(peak_in_box(saliency, obj.box))
            self.rhos[group].append(rho)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for group in GROUPS:
            if not self.acc[group]["ga"].count:
                continue
            results = {m: a.result() for m, a in self.acc[group].items()}
            out[group] = {
                "objects": self.acc[group]["ga"].count,
                "maxboxacc_iou30": {m: r.per_iou[0.3] / 100.0 for m, r in results.items()},
                "maxboxacc_iou50": {m: r.per_iou[0.5] / 100.0 for m, r in results.items()},
                "maxboxacc_iou70": {m: r.per_iou[0.7] / 100.0 for m, r in results.items()},
                "maxboxacc": {m: r.value / 100.0 for m, r in results.items()},
                "best_threshold_iou50": {m: r.best_threshold[0.5] for m, r in results.items()},
                "pointing": {m: float(np.mean(v)) for m, v in self.pointing[group].items()},
                "sanity_spearman_reinit_w": float(np.mean(self.rhos[group])),
            }
        if "all" in out:
            # how much any map shares with GA's ranks; the baselines that keep OWL-ViT's boxes
            # (random_boxes, ga_random_gradient) give the floor no model-free map goes below
            out["all"]["spearman_with_ga"] = {
                m: float(np.mean(v)) for m, v in self.rho_methods.items()
            }
            out["all"]["by_shape_maxboxacc_iou50"] = {
                shape: {
                    "objects": accs["ga"].count,
                    **{m: a.result().per_iou[0.5] / 100.0 for m, a in accs.items()},
                }
                for shape, accs in self.by_shape.items()
                if accs["ga"].count
            }
        return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps' pixels (``scipy.stats.spearmanr``, ties averaged);
    0 when either map is constant (no ranking to compare)."""
    return float(np.nan_to_num(spearmanr(np.ravel(a), np.ravel(b)).statistic))


def _noise_map(
    ga: GradientAlignment, t: torch.Tensor, res: GAResult, rng: np.random.Generator
) -> np.ndarray:
    """The class map of ``res``'s target with ``g_L`` replaced by seeded Gaussian noise: the
    same OWL side (queries, norms, boxes), nothing of W or the language model."""
    from jmllm.joint.model.joint import DEFAULT_QUERY_TEMPLATE

    prepared = ga.prepare(t, res.image_size, res.queries, DEFAULT_QUERY_TEMPLATE)
    noise = torch.from_numpy(rng.standard_normal(tuple(prepared.t.shape)).astype(np.float32))
    g = noise.to(device=prepared.t.device)
    noisy = ga._result(prepared, g, prepared.heads.numerators(g), res.tokens, res.target, "")
    return noisy.map("class")


def _sharing(model: Any, ga: GradientAlignment) -> GradientAlignment:
    """GA on a variant of J that shares ``ga``'s OWL-ViT: the OWL side (gradient norms, boxes)
    of an (image, queries) depends on OWL-ViT and ``t`` only, so the variant reuses ``ga``'s."""
    variant = GradientAlignment(model, cache_size=ga.cache_size)
    variant._cache = ga._cache
    return variant


def ga_localisation(
    model: Any,
    scenes: int = 40,
    seed: int = 0,
    start: int = 0,
    reinit_seed: int = 12345,
    progress: bool = False,
    cascade: bool = False,
) -> dict[str, Any]:
    """GA's MaxBoxAccV2 on the objects J names in held-out scenes, beside the baselines.

    Args:
        model: a toy :class:`~jmllm.joint.JointModel`.
        scenes: held-out scenes to explain (``heldout`` split of world ``seed``, from ``start``).
        seed: the toy world's seed (scenes), also the seed of the random baselines.
        start: index of the first held-out scene.
        reinit_seed: seed of the re-initialised W of the sanity check (and of the cascade).
        progress: a tqdm bar over scenes.
        cascade: also run the cumulative randomisation cascade (:func:`randomisation_cascade`)
            on the ``caption`` protocol's words.

    Returns:
        ``{"caption": {group: scores}, "name": {group: scores}, "maxboxacc_iou50": …,
        "sanity_spearman_reinit_w": …, ...}``: per protocol and scene group (``all``,
        ``single_object``, ``multi_object``), ``objects`` explained, ``maxboxacc_iou30``,
        ``maxboxacc_iou50``, ``maxboxacc_iou70`` and ``maxboxacc`` (their mean) per method in
        [0, 1], ``pointing`` (pointing game) per method, and the mean Spearman correlation of GA
        maps with W re-initialised; ``all`` also has ``by_shape_maxboxacc_iou50``. Methods:
        ``ga`` (class weighting, the default map), ``ga_coord``, ``ga_any``, ``gradient``,
        ``random``, ``random_boxes``, ``ga_random_gradient``, ``ga_reinit_w``; ``all`` also has ``spearman_with_ga`` per method
        (the floor a model-free map reaches). The top-level
        ``maxboxacc_iou50`` and ``sanity_spearman_reinit_w`` are the ``caption`` protocol's over
        all scenes. With ``cascade``: ``"cascade": [{"stage", "spearman", "maxboxacc_iou50"},
        ...]`` from ``trained`` (correlation 1) down to every layer re-initialised.

    Example:
        >>> from jmllm.joint.toy import load_toy_joint
        >>> report = ga_localisation(load_toy_joint(), scenes=20)  # doctest: +SKIP
        >>> report["caption"]["all"]["maxboxacc_iou50"]["ga"]  # doctest: +SKIP
        0.55
    """
    from tqdm.auto import tqdm

    ga = GradientAlignment(model, cache_size=4)
    stages = (
        randomisation_cascade(model, reinit_seed)
        if cascade
        else [("w", reinitialised(model, reinit_seed))]
    )
    stage_ga = [(name, _sharing(variant, ga)) for name, variant in stages]
    ga_random_w = stage_ga[0][1]
    rng = np.random.default_rng(seed)
    tallies = {p: _Tally() for p in PROTOCOLS}
    cascade_rhos: dict[str, list[float]] = {name: [] for name, _ in stages}
    cascade_acc = {name: BoxAccumulator() for name in ("trained", *cascade_rhos)}
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
                "random_boxes": paint_boxes(
                    rng.random(res.boxes.shape[0]), res.boxes_xyxy, res.image_size
                ),
                "ga_random_gradient": _noise_map(ga, emb.t, res, rng),
                "ga_reinit_w": res_r.maps["class"],
            }
            tallies[protocol].add(maps, obj, single)
            if cascade and protocol == "caption":
                gt = _inclusive(obj.box)
                cascade_acc["trained"].add(maps["ga"], gt)
                for name, variant in stage_ga:
                    stage_map = (
                        maps["ga_reinit_w"]
                        if variant is ga_random_w
                        else variant.attribute(*args, answer=said, occurrence=occurrence).map(
                            "class"
                        )
                    )
                    cascade_rhos[name].append(spearman(maps["ga"], stage_map))
                    cascade_acc[name].add(stage_map, gt)
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
    if cascade:
        report["cascade"] = [
            {
                "stage": name,
                "spearman": float(np.mean(cascade_rhos[name])) if name in cascade_rhos else 1.0,
                "maxboxacc_iou50": cascade_acc[name].result().per_iou[0.5] / 100.0,
            }
            for name in cascade_acc
        ]
    return report
