"""Is GA faithful? Attribution methods × faithfulness metrics on J, with intervals.

The package's parts, each importing only those before it:
:mod:`~jmllm.joint.faithfulness.metrics` (deletion and insertion curves, pointing, similarity),
:mod:`~jmllm.joint.faithfulness.cascade` (the model-randomisation cascade, in place),
:mod:`~jmllm.joint.faithfulness.data` (what is explained: the toy world, COCO, a boxes folder),
:mod:`~jmllm.joint.faithfulness.run` (the resumable, splittable run),
:mod:`~jmllm.joint.faithfulness.summary` (the aggregate with intervals and paired tests),
:mod:`~jmllm.joint.faithfulness.figures` (its pictures) and
:mod:`~jmllm.joint.faithfulness.report` (its files: the tables and the page; every name of the
two before it is importable from there too). The methods are
:mod:`jmllm.joint.saliency.attribution`.

Example:
    >>> from jmllm.joint.faithfulness import ToySource, run_faithfulness
    >>> from jmllm.joint.faithfulness.report import write_faithfulness_report
    >>> result = run_faithfulness(model, ToySource(scenes=100), "faith-out")  # doctest: +SKIP
    >>> report = write_faithfulness_report(result, "faith-out")  # doctest: +SKIP
    >>> report.summary["methods"]["ga"]["deletion_auc"]  # doctest: +SKIP
"""

from __future__ import annotations

from jmllm.joint.faithfulness.cascade import CASCADES, RandomisationCascade
from jmllm.joint.faithfulness.data import (
    BoxedSource,
    FaithfulnessDataError,
    Item,
    Source,
    ToySource,
    Truth,
    boxes_source,
    coco_source,
)
from jmllm.joint.faithfulness.metrics import Curves, CurveScorer, auc, pointing, ssim
from jmllm.joint.faithfulness.run import (
    DEFAULT_METHODS,
    FaithfulnessError,
    FaithfulnessResult,
    FaithfulnessSettings,
    run_faithfulness,
)

__all__ = [
    "CASCADES",
    "DEFAULT_METHODS",
    "BoxedSource",
    "CurveScorer",
    "Curves",
    "FaithfulnessDataError",
    "FaithfulnessError",
    "FaithfulnessResult",
    "FaithfulnessSettings",
    "Item",
    "RandomisationCascade",
    "Source",
    "ToySource",
    "Truth",
    "auc",
    "boxes_source",
    "coco_source",
    "pointing",
    "run_faithfulness",
    "ssim",
]
