"""Weakly supervised object localisation (WSOL) check of GA maps with MaxBoxAccV2 (DESIGN §1.8).

The metric — MaxBoxAccV2, in the reference ``wsolevaluation`` protocol (default) or the
``exact`` one — is :mod:`jmllm.joint.wsol.metric`; reading the data folder is
:mod:`jmllm.joint.wsol.data`. This module runs GA over a folder (:func:`run_wsol`) and keeps its
report (:class:`WsolReport`); every name of the other two is importable from here as well.

The runner (:func:`run_wsol`) also offers two pipelines: ``authors`` (default, the authors' CUB
script: maps painted at 224 × 224 px, ground-truth boxes resized to 224 px as wsolevaluation does,
``int(x · 224 / width)``) and ``original`` (maps and boxes at the image's own resolution).

Dataset layout (CUB-200-2011 style), ``DATA_DIR``:

    DATA_DIR/images/<image_id>           # e.g. 001.Black_footed_Albatross/Black_..._0046_18.jpg
    DATA_DIR/boxes.csv                   # header ``image_id,x0,y0,x1,y1``; one row per box,
                                         # several rows for an image with several objects;
                                         # an optional 6th column ``label``: the object word
                                         # explained in that image (default ``bird``)

:func:`cub_to_boxes_csv` writes ``boxes.csv`` for the 5,794 test images of an unpacked
CUB-200-2011 (``images.txt``, ``bounding_boxes.txt`` ``x y w h``, ``train_test_split.txt``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jmllm.align.files import atomic_write_text as atomic_write_text
from jmllm.align.files import resolve_inside as resolve_inside
from jmllm.align.preprocessing import PAPER_PREPROCESSING
from jmllm.joint.chat.tokenization import PAPER_TOKENIZATION
from jmllm.joint.wsol.data import BOXES_HEADER as BOXES_HEADER
from jmllm.joint.wsol.data import (
    WsolDataError,
    WsolItem,
    _write_atomic,
    cub_to_boxes_csv,
    read_wsol_folder,
)
from jmllm.joint.wsol.metric import (
    IOU_THRESHOLDS,
    PROTOCOLS,
    BoxAccumulator,
    BoxAccuracy,
    WsolDependencyError,
    _check_choice,
    box_iou_inclusive,
    check_reference_map,
    component_boxes,
    default_thresholds,
    max_box_acc_v2,
    normalise_map,
    opencv,
    reference_boxes,
    resize_boxes,
)

logger = logging.getLogger(__name__)

# The paper's WSOL setting: prompt "What's in the image? ASSISTANT: The image shows a", token
# "bird", query "a photo of a bird". The part after ASSISTANT: is J's (teacher-forced) answer.
WSOL_QUESTION = "What's in the image?"
WSOL_ANSWER = "The image shows a bird"
WSOL_TARGET = "bird"
WSOL_QUERY = "bird"  # with J's template "a photo of a {}"
METHODS = ("ga", "gradient")
PIPELINES = ("authors", "original")
AUTHORS_MAP_SIZE = 224  # wsolevaluation's _RESIZE_LENGTH; the authors paint their maps at it
PAGE_SAMPLES = 8  # images whose maps and boxes the HTML page shows
PAGE_PICTURE_SIDE = 512  # their pictures' longer side


@dataclass
class WsolSample:
    """One image kept for the WSOL page: its picture, maps and boxes, and the best box at every τ.

    Attributes:
        image_id: the image's id in ``boxes.csv``.
        picture: the image as scored (squashed to the map size under the authors' pipeline), at
            its drawing size.
        map_size: (width, height) of the scored maps; gt_boxes: (G, 4) ground truth in its pixels.
        maps: method → the map resized to the picture (for drawing only).
        best: method → (IoUs (T,), boxes (T, 4)) of :meth:`BoxAccumulator.best_boxes`.
    """

    image_id: str
    picture: Any
    map_size: tuple[int, int]
    gt_boxes: np.ndarray
    maps: dict[str, np.ndarray]
    best: dict[str, tuple[np.ndarray, np.ndarray]]

    def at(self, method: str, tau_index: int) -> tuple[list[int], float]:
        """The best predicted box (map pixels) and its IoU at threshold index ``tau_index``."""
        ious, boxes = self.best[method]
        return [int(v) for v in boxes[tau_index]], float(ious[tau_index])


@dataclass
class WsolReport:
    """MaxBoxAccV2 of GA beside the plain-gradient baseline on one WSOL folder.

    Attributes:
        results: method (``ga``, ``gradient``) → :class:`BoxAccuracy`.
        num_images: images scored; skipped: image id → reason (unreadable images, counted).
        seconds: wall time; setting: the prompt, token, query and weighting used.
    """

    results: dict[str, BoxAccuracy]
    num_images: int
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    setting: dict[str, Any] = field(default_factory=dict)
    samples: list[WsolSample] = field(default_factory=list)

    @property
    def sample_iou_threshold(self) -> float:
        """The IoU threshold δ whose best τ the page's sample boxes are drawn at: the middle
        one (0.5 by default)."""
        deltas = sorted(next(iter(self.results.values())).per_iou)
        return deltas[len(deltas) // 2]

    def sample_records(self) -> list[dict[str, Any]]:
        """Per sampled image and method: the best τ of :attr:`sample_iou_threshold`, the
        predicted box with the best IoU at it (map pixels) and that IoU."""
        delta = self.sample_iou_threshold
        records = []
        for sample in self.samples:
            record: dict[str, Any] = {
                "image_id": sample.image_id,
                "map_size": list(sample.map_size),
                "gt_boxes": sample.gt_boxes.astype(float).tolist(),
            }
            for method, result in self.results.items():
                if method not in sample.best:
                    continue
                tau = result.best_threshold[delta]
                box, iou = sample.at(method, result.thresholds.index(tau))
                record[method] = {"threshold": tau, "iou_threshold": delta, "box": box, "iou": iou}
            records.append(record)
        return records

    def to_json(self) -> dict[str, Any]:
        return {
            "max_box_acc_v2": {m: r.value for m, r in self.results.items()},
            "results": {m: r.to_json() for m, r in self.results.items()},
            "num_images": self.num_images,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "setting": self.setting,
            "samples": self.sample_records(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON (atomically)."""
        _write_atomic(Path(path), json.dumps(self.to_json(), indent=2) + "\n")
        return Path(path)

    def save_page(
        self, path: str | os.PathLike[str], maps_dir: str | os.PathLike[str] | None = None
    ) -> Path:
        """Write the report's self-contained HTML page (:mod:`jmllm.joint.wsol.page`): the
        metric at each IoU threshold with its best threshold, the BoxAcc curves, and the sampled
        images' maps with their ground-truth and predicted boxes and IoUs.

        Args:
            path: the page (``.html``).
            maps_dir: also write every sample picture of the page there as a PNG
                (:func:`~jmllm.joint.wsol.page.map_file_name`), the folder made if needed.

        Returns:
            ``path``.

        Example:
            >>> report.save_page("cub.html", "cub_maps")  # doctest: +SKIP
            PosixPath('cub.html')
        """
        from jmllm.joint.render.report import atomic_write_bytes
        from jmllm.joint.wsol.page import wsol_page_parts

        page, pictures = wsol_page_parts(self)
        if maps_dir is not None:
            folder = Path(maps_dir)
            folder.mkdir(parents=True, exist_ok=True)
            for name, png in pictures.items():
                atomic_write_bytes(folder / name, png)
        _write_atomic(Path(path), page)
        return Path(path)


def run_wsol(
    model: Any,
    data_dir: str | os.PathLike[str],
    weighting: str = "class",
    limit: int | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    progress: bool = True,
    *,
    template: str = "paper",
    protocol: str = "wsolevaluation",
    pipeline: str = "authors",
    box_rounding: str = "truncate",
    class_query: str = "matching",
    samples: int = PAGE_SAMPLES,
    tokenization: str = PAPER_TOKENIZATION,
    preprocessing: str = PAPER_PREPROCESSING,
    target: str | None = None,
) -> WsolReport:
    """GA maps (and the plain-gradient baseline) for every image of a WSOL folder, scored.

    Each image is explained with the paper's setting: question ``What's in the image?`` in the
    authors' conversation template, J's answer teacher-forced to ``The image shows a bird``,
    token ``bird``, query ``a photo of a bird`` — or, for another object word (``target``, or
    the image's ``label`` in ``boxes.csv``), ``The image shows a <word>``, its tokens, and the
    query ``a photo of a <word>``. One GA computation yields both maps: the GA map of
    ``weighting`` and the baseline (per-patch ‖∂ logit / ∂ t‖ painted on its grid cell). Every
    default is the authors' protocol (``docs/fidelity.md``).

    Args:
        model: a ``JointModel``.
        data_dir: the folder (layout in the module docstring).
        weighting: GA map weighting (``class``, ``coord``, ``any``).
        limit: score only the first ``limit`` images.
        thresholds: τ grid (default 0..0.99 step 0.01).
        progress: show a tqdm bar.
        template: conversation template, ``"paper"`` (default, the authors' CUB script:
            ``<image>\\nUSER: What's in the image?\\nASSISTANT: The image shows a``) or
            ``"llava-1.5"``.
        protocol: MaxBoxAccV2 protocol, ``"wsolevaluation"`` (default) or ``"exact"``.
        pipeline: ``"authors"`` (default: maps painted at 224 × 224 px, ground-truth boxes
            resized to 224 px as wsolevaluation does) or ``"original"`` (both at the image's
            own resolution).
        box_rounding, class_query: GA painting (see :class:`GradientAlignment`).
        samples: how many images, spread evenly over the folder, keep their pictures, maps and
            best boxes for the HTML page (:meth:`WsolReport.save_page`); 0 keeps none.
        tokenization: ``"legacy"`` (default: the authors' token ids) or ``"checkpoint"``
            (:mod:`jmllm.joint.chat.tokenization`).
        preprocessing: ``"authors"`` (default: the stored pixels, the HF processors' resize)
            or ``"exif"`` (:mod:`jmllm.align.preprocessing`).
        target: the object word (one word) explained in every image (default: each image's
            ``label`` from ``boxes.csv``, else the paper's ``bird``).

    Returns:
        :class:`WsolReport`. Unreadable images are skipped and listed, never silently dropped.

    Example:
        >>> report = run_wsol(model, "CUB_test/")  # doctest: +SKIP
        >>> report.to_json()["max_box_acc_v2"]  # doctest: +SKIP
        {'ga': 61.2, 'gradient': 48.3}
    """
    from jmllm.joint.chat.templates import get_template
    from jmllm.joint.model.joint import JointModelError
    from jmllm.joint.saliency import WEIGHTINGS, GradientAlignment

    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    template = get_template(template).name
    inputs = model.input_record(template, tokenization, preprocessing)  # names checked here
    _check_choice("pipeline", pipeline, PIPELINES)
    accumulators = {m: BoxAccumulator(thresholds, protocol=protocol) for m in METHODS}
    ga = GradientAlignment(model, box_rounding=box_rounding, class_query=class_query)
    items = read_wsol_folder(data_dir)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit}")
        items = items[:limit]
    if samples < 0:
        raise ValueError(f"samples: must be >= 0, got {samples}")
    skipped: dict[str, str] = {}
    kept: list[WsolSample] = []
    # the page's sample: spread evenly over the folder, so it is not only its first class
    chosen = set(np.linspace(0, len(items) - 1, min(samples, len(items))).round().astype(int))
    start = time.perf_counter()
    iterator: Iterable[WsolItem] = items
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="WSOL", unit="image")
    size = (AUTHORS_MAP_SIZE, AUTHORS_MAP_SIZE) if pipeline == "authors" else None
    for index, item in enumerate(iterator):
        try:
            source = model.embed(item.path, preprocessing=preprocessing)
            word = target or item.label or WSOL_TARGET
            result = ga.attribute(
                source,
                WSOL_QUESTION,
                word,
                [word],
                answer=WSOL_ANSWER.replace(WSOL_TARGET, word),
                template=template,
                tokenization=tokenization,
            )
        except JointModelError as exc:
            skipped[item.image_id] = str(exc)
            logger.warning("skipping %s: %s", item.image_id, exc)
            continue
        gt = item.boxes
        if size is not None:
            gt = resize_boxes(item.boxes, result.image_size, size)
        maps = {
            "ga": result.map(weighting, size=size),
            "gradient": result.map("gradient", size=size),
        }
        for method, saliency in maps.items():
            accumulators[method].add(saliency, gt)
        if index in chosen:
            kept.append(_sample(item.image_id, source, maps, gt, accumulators))
    if not accumulators["ga"].count:
        raise WsolDataError(f"{data_dir}: no image could be scored ({len(skipped)} skipped)")
    return WsolReport(
        results={m: a.result() for m, a in accumulators.items()},
        num_images=accumulators["ga"].count,
        skipped=skipped,
        seconds=time.perf_counter() - start,
        samples=kept,
        setting={
            "question": WSOL_QUESTION,
            **_wsol_words(target, items),
            "weighting": weighting,
            **inputs,  # template, tokenization, preprocessing, dtype
            "protocol": protocol,
            "pipeline": pipeline,
            "map_size": list(size) if size is not None else "original",
            "box_rounding": box_rounding,
            "class_query": class_query,
        },
    )


def _wsol_words(target: str | None, items: Sequence[WsolItem]) -> dict[str, str]:
    """The report's ``answer``, ``target`` and ``query`` settings: the explained word's."""
    words = {target or item.label or WSOL_TARGET for item in items}
    if len(words) == 1:
        (word,) = words
        return {"answer": WSOL_ANSWER.replace(WSOL_TARGET, word), "target": word, "query": word}
    return {
        "answer": WSOL_ANSWER.replace(WSOL_TARGET, "<label>"),
        "target": "each image's label (boxes.csv)",
        "query": "each image's label",
    }


def _sample(
    image_id: str,
    emb: Any,
    maps: dict[str, np.ndarray],
    gt: np.ndarray,
    accumulators: dict[str, BoxAccumulator],
) -> WsolSample:
    """A :class:`WsolSample`: the picture as scored, the maps at its size, the best boxes."""
    from PIL import Image

    from jmllm.joint.render.drawing import fit_picture, picture_size

    height, width = next(iter(maps.values())).shape
    shown = picture_size((width, height), max_side=PAGE_PICTURE_SIDE, min_side=PAGE_PICTURE_SIDE)
    picture = fit_picture(emb.pil_image(0), shown=shown)  # squashed like the maps, if they are
    small = {
        m: np.asarray(
            Image.fromarray(np.asarray(v, dtype=np.float32), "F").resize(
                shown, Image.Resampling.BILINEAR
            )
        )
        for m, v in maps.items()
    }
    best = {m: accumulators[m].best_boxes(v, gt) for m, v in maps.items()}
    gt_boxes = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    return WsolSample(image_id, picture, (width, height), gt_boxes, small, best)


__all__ = [
    "AUTHORS_MAP_SIZE",
    "IOU_THRESHOLDS",
    "PIPELINES",
    "PROTOCOLS",
    "BoxAccumulator",
    "BoxAccuracy",
    "WsolDataError",
    "WsolDependencyError",
    "WsolItem",
    "WsolReport",
    "WsolSample",
    "box_iou_inclusive",
    "check_reference_map",
    "component_boxes",
    "cub_to_boxes_csv",
    "default_thresholds",
    "max_box_acc_v2",
    "normalise_map",
    "opencv",
    "read_wsol_folder",
    "reference_boxes",
    "resize_boxes",
    "run_wsol",
]
