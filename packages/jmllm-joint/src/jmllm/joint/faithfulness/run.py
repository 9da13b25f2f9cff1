"""The faithfulness run: every method × every metric for every target of a source, one image at
a time, resumable and split between processes like the hallucination audit.

For each image: J's targets (:mod:`~jmllm.joint.faithfulness.data`); per target, every method's
map on the trained J; then the randomisation cascade (:mod:`~jmllm.joint.faithfulness.cascade`)
recomputes every map on every randomised stage, compared with the trained map (Spearman, SSIM);
then, on the trained J again, the deletion and insertion curves of the trained maps **and** of
the fully randomised model's maps (in ``t`` and in pixels, all in one batched forward per space),
the pointing game and MaxBoxAccV2's IoUs of both. A map "explains the model" on a metric when its
trained version scores better than its randomised one (the report's ``separation``).

With ``out``, one JSON line per finished image is appended to ``out/results.jsonl`` (with the
settings' digest) at once; a rerun skips finished images, and under ``accelerate launch
--num_processes N`` the processes split the remaining images and append to the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jmllm.align.files import append_jsonl, read_jsonl
from jmllm.joint.faithfulness.cascade import CASCADES, RandomisationCascade
from jmllm.joint.faithfulness.data import FaithfulnessDataError, Item, Source, Truth
from jmllm.joint.faithfulness.metrics import (
    CURVES,
    DEFAULT_STEPS,
    SPACES,
    CurveScorer,
    pointing,
    spearman,
    ssim,
)
from jmllm.joint.saliency.attribution import (
    BASELINES,
    CORE_METHODS,
    IG_STEPS,
    METHODS,
    AttributionError,
    make_methods,
    prepare_request,
)

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SETTINGS_FILE = "settings.json"
LOCK_FILE = ".jmllm-faithfulness.lock"
LOCK_OWNER = "jmllm-joint faithfulness"
# Every method by default: the seven of the report, GA's other weightings and attention rollout.
DEFAULT_METHODS: tuple[str, ...] = (
    *CORE_METHODS[:1],
    "ga_coord",
    "ga_any",
    *CORE_METHODS[1:5],
    "attention_rollout",
    *CORE_METHODS[5:],
)
DEFAULT_MAP_SIDE = 224  # maps are scored at most this large (the WSOL authors' map size)
FORMAT = 1


class FaithfulnessError(ValueError):
    """Bad faithfulness input (settings, output folder); the message names it and says why."""


@dataclass(frozen=True)
class FaithfulnessSettings:
    """How the benchmark explains and scores (everything that changes a number).

    Attributes:
        methods: the methods, GA first (the paired tests compare every other method with the
            first one named ``ga``).
        steps: K, the deletion/insertion curves' steps (K + 1 points).
        baseline: what replaces a removed patch (``blank``, ``blur``, ``zero``), also
            integrated gradients' path start.
        spaces: where patches are removed: ``t`` and/or ``pixels``.
        ig_steps: integrated gradients' steps (trapezoid rule; 64, see
            :class:`~jmllm.joint.saliency.attribution.IntegratedGradientsMethod`).
        cascade: the randomisation cascade, ``full``, ``final`` or ``none``.
        cascade_seed: its seed (the toy world's validity report uses the same default).
        protocol: MaxBoxAccV2's protocol (``wsolevaluation`` or ``exact``, :mod:`jmllm.joint.wsol`).
        map_side: maps are painted, and boxes scaled, so the image's longest side is at most this.
        seed: ties in a ranking, the random method.
        separation: also score the fully randomised J's maps (pointing, MaxBoxAccV2, curves on
            the trained J), to tell whether each metric separates the two; it doubles the
            curves' forwards.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    steps: int = DEFAULT_STEPS
    baseline: str = "blank"
    spaces: tuple[str, ...] = SPACES
    ig_steps: int = IG_STEPS
    cascade: str = "full"
    cascade_seed: int = 12345
    protocol: str = "wsolevaluation"
    map_side: int = DEFAULT_MAP_SIDE
    seed: int = 0
    separation: bool = True

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise FaithfulnessError(
                f"methods: {', '.join(map(repr, unknown)) or 'none given'}; "
                f"known: {', '.join(METHODS)}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise FaithfulnessError(f"methods: {list(self.methods)} names one twice")
        for name, value, low in (("steps", self.steps, 1), ("ig_steps", self.ig_steps, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise FaithfulnessError(f"{name}: must be an integer >= {low}, got {value!r}")
        if not isinstance(self.map_side, int) or self.map_side < 8:
            raise FaithfulnessError(f"map_side: must be an integer >= 8, got {self.map_side!r}")
        if self.baseline not in BASELINES:
            raise FaithfulnessError(
                f"baseline: {self.baseline!r} is not one of {', '.join(BASELINES)}"
            )
        if not self.spaces or any(s not in SPACES for s in self.spaces):
            raise FaithfulnessError(f"spaces: {list(self.spaces)}; known: {', '.join(SPACES)}")
        if self.cascade not in CASCADES:
            raise FaithfulnessError(
                f"cascade: {self.cascade!r} is not one of {', '.join(CASCADES)}"
            )
        from jmllm.joint.wsol.run import PROTOCOLS

        if self.protocol not in PROTOCOLS:
            raise FaithfulnessError(
                f"protocol: {self.protocol!r} is not one of {', '.join(PROTOCOLS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"], d["spaces"] = list(self.methods), list(self.spaces)
        return d


def settings_digest(settings: FaithfulnessSettings, source: Source, model: Any) -> str:
    """A short hash of the settings, the source and the model identity: records made otherwise
    are not reused on resume."""
    from jmllm.joint.audit.run import model_identity

    doc = {
        "settings": settings.to_dict(),
        "source": source.describe(),
        "model": model_identity(model),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------


def scoring_size(image_size: tuple[int, int], side: int) -> tuple[int, int]:
    """The size maps are scored at: the image's, shrunk (aspect kept) so its longest side is at
    most ``side``.

    Example:
        >>> scoring_size((640, 480), 224), scoring_size((128, 128), 224)
        ((224, 168), (128, 128))
    """
    width, height = image_size
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _floor4(values: np.ndarray) -> list[float]:
    # IoUs kept to 4 decimals rounded down, so "IoU ≥ δ" reads the same after the round trip
    return [math.floor(float(v) * 1e4) / 1e4 for v in values]


class ItemScorer:
    """Everything measured on one image: its targets, every method's maps on the trained and
    randomised J, the curves, localisation and similarity.

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        settings: the run's :class:`FaithfulnessSettings`.
        batch_size: rows per forward of the curves and of integrated gradients' steps (None:
            all at once).
    """

    def __init__(
        self, model: Any, settings: FaithfulnessSettings, batch_size: int | None = None
    ) -> None:
        from jmllm.joint.wsol.run import BoxAccumulator

        self.model = model
        self.settings = settings
        self.methods = make_methods(
            settings.methods,
            model,
            ig_steps=settings.ig_steps,
            baseline=settings.baseline,
            seed=settings.seed,
            batch_size=batch_size,
        )
        self.cascade = RandomisationCascade(model, settings.cascade_seed, settings.cascade)
        self.scorer = CurveScorer(
            model,
            steps=settings.steps,
            baseline=settings.baseline,
            spaces=settings.spaces,
            batch_size=batch_size,
            seed=settings.seed,
        )
        self.boxes = BoxAccumulator(protocol=settings.protocol)

    def score(self, source: Source, item: Item, emb: Any) -> dict[str, Any]:
        """The record of one image (one JSON line of ``results.jsonl``)."""
        truths, unscored = source.targets(self.model, emb, item)
        targets = [self.score_target(source, emb, truth) for truth in truths]
        return {
            "item_id": item.item_id,
            "file": item.file,
            "unscored": unscored,
            "targets": targets,
        }

    def score_target(self, source: Source, emb: Any, truth: Truth) -> dict[str, Any]:
        request = prepare_request(
            self.model,
            emb,
            source.prompt,
            truth.target,
            truth.answer,
            queries=truth.queries,
            template=source.template,
            occurrence=truth.occurrence,
        )
        trained = {name: m.attribute_request(request) for name, m in self.methods.items()}
        size = scoring_size(request.image_size, self.settings.map_side)
        maps = {name: a.map(size) for name, a in trained.items()}
        stages: dict[str, dict[str, dict[str, float]]] = {name: {} for name in trained}
        randomised = {}
        for stage, variant in self.cascade.stages():
            for name, method in self.methods.items():
                attribution = method.bound_to(variant).attribute_request(request)
                stage_map = attribution.map(size)
                stages[name][stage] = {
                    "spearman": round(spearman(maps[name], stage_map), 6),
                    "ssim": round(ssim(maps[name], stage_map), 6),
                }
                if self.settings.separation:
                    randomised[name] = (attribution, stage_map)
        keyed = {("trained", n): a for n, a in trained.items()}
        keyed.update({("randomised", n): a for n, (a, _) in randomised.items()})
        curves = self.scorer.curves(request, keyed)
        scale_x, scale_y = size[0] / request.image_size[0], size[1] / request.image_size[1]
        extent = truth.boxes * np.array([scale_x, scale_y, scale_x, scale_y])
        from jmllm.joint.wsol.run import resize_boxes

        inclusive = resize_boxes(truth.inclusive, request.image_size, size)
        methods: dict[str, Any] = {}
        for name in trained:
            record = self._localisation(maps[name], extent, inclusive)
            record.update(self._aucs(curves, ("trained", name)))
            record["cascade"] = stages[name]
            if name in randomised:
                shuffled = self._localisation(randomised[name][1], extent, inclusive)
                shuffled.update(self._aucs(curves, ("randomised", name)))
                record["randomised"] = shuffled
            methods[name] = record
        return {
            "name": truth.name,
            "label": request.label,
            "answer": request.answer_text,
            "positions": request.positions,
            "map_size": list(size),
            "clean_probability": round(curves.clean, 7),
            "empty_probability": {k: round(v, 7) for k, v in curves.empty.items()},
            "methods": methods,
            "curves": {
                f"{space}/{curve}": {
                    name: [
                        round(float(v), 6)
                        for v in curves.probabilities[(space, curve)][("trained", name)]
                    ]
                    for name in trained
                }
                for space in self.settings.spaces
                for curve in CURVES
            },
        }

    def _localisation(
        self, saliency: np.ndarray, extent: np.ndarray, inclusive: np.ndarray
    ) -> dict[str, Any]:
        return {
            "pointing": bool(pointing(saliency, extent)),
            "ious": _floor4(self.boxes.best_ious(saliency, inclusive)),
        }

    def _aucs(self, curves: Any, key: tuple[str, str]) -> dict[str, float]:
        out = {}
        for space in self.settings.spaces:
            suffix = "" if space == "t" else f"_{space}"
            for curve in CURVES:
                out[f"{curve}_auc{suffix}"] = round(curves.auc(space, curve, key), 7)
        return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class FaithfulnessResult:
    """What :func:`run_faithfulness` produced.

    Attributes:
        settings: how it explained and scored; source: what (its description).
        lines: the finished images' records, in source order.
        failed: image id → why it could not be scored (unreadable image …); retried on rerun.
        processed: images scored by this run (all processes); kept: finished before.
        out: the output folder, if any; seconds: wall time.
    """

    settings: FaithfulnessSettings
    source: dict[str, Any]
    lines: list[dict[str, Any]]
    failed: dict[str, str] = field(default_factory=dict)
    processed: int = 0
    kept: int = 0
    out: Path | None = None
    seconds: float = 0.0

    @property
    def targets(self) -> int:
        return sum(len(line["targets"]) for line in self.lines)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _finished(path: Path, digest: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Records of ``results.jsonl`` made with these settings (a later line wins)."""
    found: dict[str, dict[str, Any]] = {}
    for line in read_jsonl(path):
        item_id = str(line.get("item_id"))
        if (
            line.get("settings") == digest
            and item_id in wanted
            and isinstance(line.get("targets"), list)
        ):
            found[item_id] = line
    return found


def run_faithfulness(
    model: Any,
    source: Source,
    out: str | os.PathLike[str] | None = None,
    settings: FaithfulnessSettings | None = None,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    on_item: Callable[[str], None] | None = None,
) -> FaithfulnessResult:
    """Run the faithfulness benchmark of J on a source (resumable, splittable).

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        source: :class:`~jmllm.joint.faithfulness.data.ToySource`,
            :func:`~jmllm.joint.faithfulness.data.coco_source` or
            :func:`~jmllm.joint.faithfulness.data.boxes_source`.
        out: folder for ``settings.json`` and ``results.jsonl`` (None: in memory, one process).
        settings: the methods and metrics (default: every method, every metric).
        batch_size: rows per forward of the curves and of integrated gradients' steps (None:
            all at once; set it to bound the memory of a large model).
        progress: show a progress bar.
        on_item: called with each image id once its record is saved (tests, monitors).

    Returns:
        :class:`FaithfulnessResult`; write the report with
        :func:`jmllm.joint.faithfulness.report.write_faithfulness_report`.

    Raises:
        FaithfulnessError: bad settings, an output folder holding another run or being written
            by another run.

    Example:
        >>> from jmllm.joint.faithfulness import ToySource, run_faithfulness
        >>> result = run_faithfulness(model, ToySource(scenes=100), "faith-out")  # doctest: +SKIP
    """
    from jmllm.joint.audit.run import claim_folder, exclusive_folder, model_identity, process_state

    settings = settings or FaithfulnessSettings()
    started = time.perf_counter()
    if settings.protocol == "wsolevaluation":
        from jmllm.joint.wsol.run import WsolDependencyError, opencv

        try:
            opencv()
        except WsolDependencyError as exc:
            raise FaithfulnessError(f"protocol: {exc}") from None
    digest = settings_digest(settings, source, model)
    state = process_state()
    folder = Path(out) if out is not None else None
    if folder is None and state.num_processes > 1:
        raise FaithfulnessError("out: required when the run is split between processes")
    scorer = ItemScorer(model, settings, batch_size)
    with exclusive_folder(
        folder, state, owner=LOCK_OWNER, lock_file=LOCK_FILE, error=FaithfulnessError
    ):
        results = folder / RESULTS_FILE if folder else None
        if folder is not None:
            doc = {
                "settings": settings.to_dict(),
                "source": source.describe(),
                "model": model_identity(model),
                "digest": digest,
                "format": FORMAT,
            }
            claim_folder(
                folder,
                SETTINGS_FILE,
                doc,
                write=state.is_main_process,
                what="a faithfulness run",
                error=FaithfulnessError,
            )
        state.wait_for_everyone()
        wanted = {item.item_id for item in source.items}
        done = _finished(results, digest, wanted) if results else {}
        todo = [item for item in source.items if item.item_id not in done]
        if done:
            logger.info("keeping %d finished image(s), scoring %d", len(done), len(todo))
        lines = dict(done)
        failed = _score_items(
            model, source, scorer, todo, results, lines, digest, state, progress, on_item
        )
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            gathered = gather_object([failed])
            failed = {k: v for part in gathered for k, v in part.items()}
            state.wait_for_everyone()
            assert results is not None
            lines = _finished(results, digest, wanted)  # every process's images
    return FaithfulnessResult(
        settings=settings,
        source=source.describe(),
        lines=[lines[i.item_id] for i in source.items if i.item_id in lines],
        failed=failed,
        processed=len(todo) - len(failed),
        kept=len(done),
        out=folder,
        seconds=time.perf_counter() - started,
    )


def _score_items(
    model: Any,
    source: Source,
    scorer: ItemScorer,
    todo: Sequence[Item],
    results: Path | None,
    lines: dict[str, dict[str, Any]],
    digest: str,
    state: Any,
    progress: bool,
    on_item: Callable[[str], None] | None,
) -> dict[str, str]:
    from tqdm.auto import tqdm

    from jmllm.joint.model.joint import JointModelError

    failed: dict[str, str] = {}
    with state.split_between_processes(list(todo)) as share:
        bar = tqdm(
            share,
            desc=f"faithfulness [process {state.process_index}]",
            unit="img",
            disable=not progress,
            position=state.process_index,
        )
        for item in bar:
            try:
                emb = model.embed([item.load()])
            except (JointModelError, OSError) as exc:  # an image J cannot take: counted
                failed[item.item_id] = _one_line(exc)
                logger.warning("%s: skipped (%s)", item.file, failed[item.item_id])
                continue
            try:
                line = scorer.score(source, item, emb)
            except (AttributionError, FaithfulnessDataError) as exc:
                failed[item.item_id] = _one_line(exc)
                logger.warning("%s: skipped (%s)", item.file, failed[item.item_id])
                continue
            line["settings"] = digest
            if results is not None:
                append_jsonl(results, line)  # at once: a kill loses at most the next image
            lines[item.item_id] = line
            if on_item is not None:
                on_item(item.item_id)
        bar.close()
    return failed


__all__ = [
    "DEFAULT_MAP_SIDE",
    "DEFAULT_METHODS",
    "RESULTS_FILE",
    "SETTINGS_FILE",
    "FaithfulnessError",
    "FaithfulnessResult",
    "FaithfulnessSettings",
    "ItemScorer",
    "run_faithfulness",
    "scoring_size",
    "settings_digest",
]
