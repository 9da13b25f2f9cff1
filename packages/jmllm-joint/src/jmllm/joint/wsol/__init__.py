"""Weakly-supervised object localisation: MaxBoxAccV2 as clovaai computes it, and GA maps scored with it.

The package's parts: :mod:`~jmllm.joint.wsol.metric` (MaxBoxAccV2: thresholds, predicted boxes,
IoU, the accumulator) and :mod:`~jmllm.joint.wsol.data` (the data folder's ``boxes.csv`` and
images), independent of each other; :mod:`~jmllm.joint.wsol.run` (GA over a folder and its report;
every name of the two is importable from there too); :mod:`~jmllm.joint.wsol.page` (the report's
HTML page, imported by nothing of the others but the report's ``save_page``).

Before 0.2 ``jmllm.joint.wsol`` was one module, now :mod:`jmllm.joint.wsol.run`; what it held is
importable from here as before.
"""

from jmllm.joint.compat import forward_to
from jmllm.joint.wsol import run as _run
from jmllm.joint.wsol.run import (
    AUTHORS_MAP_SIZE,
    IOU_THRESHOLDS,
    PIPELINES,
    PROTOCOLS,
    BoxAccumulator,
    BoxAccuracy,
    WsolDataError,
    WsolDependencyError,
    WsolItem,
    WsolReport,
    WsolSample,
    box_iou_inclusive,
    check_reference_map,
    component_boxes,
    cub_to_boxes_csv,
    default_thresholds,
    max_box_acc_v2,
    normalise_map,
    opencv,
    read_wsol_folder,
    reference_boxes,
    resize_boxes,
    run_wsol,
)

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

__getattr__ = forward_to(_run, __name__)
