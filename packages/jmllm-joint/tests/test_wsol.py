"""MaxBoxAccV2 on maps whose answer is known by construction, and the WSOL runner.

The geometric tests use the ``exact`` protocol (boxes end at the component's last pixel); the
reference protocol's quirks and its parity with an independent implementation are in
``test_wsol_reference.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jmllm.joint.wsol import (
    BoxAccumulator,
    WsolDataError,
    box_iou_inclusive,
    component_boxes,
    cub_to_boxes_csv,
    max_box_acc_v2,
    read_wsol_folder,
    run_wsol,
)


def _blob(shape, box, value=1.0, base=None):
    m = np.zeros(shape) if base is None else base
    x0, y0, x1, y1 = box
    m[y0 : y1 + 1, x0 : x1 + 1] = value
    return m


def test_perfect_map_scores_100():
    gt = np.array([[10, 5, 29, 19]])
    res = max_box_acc_v2([_blob((40, 50), gt[0])], [gt], protocol="exact")
    assert res.value == 100.0 and res.per_iou == {0.3: 100.0, 0.5: 100.0, 0.7: 100.0}


def test_wrong_region_scores_0():
    gt = np.array([[0, 0, 9, 9]])
    for protocol in ("exact", "wsolevaluation"):
        res = max_box_acc_v2([_blob((40, 40), (25, 25, 39, 39))], [gt], protocol=protocol)
        assert res.value == 0.0


def test_needs_every_contour():
    """A strong blob on the object and a weaker distractor: at a low τ the pixels above τ span
    both, so one box around all of them would miss; a box per component finds the object. At a
    high τ only the object survives. Either way, scoring every contour gets it right."""
    gt = np.array([[2, 2, 11, 11]])
    m = _blob((60, 60), gt[0], 1.0)
    m = _blob((60, 60), (40, 40, 55, 55), 0.6, base=m)
    acc = BoxAccumulator(thresholds=[0.3], protocol="exact")  # τ below the distractor
    assert acc.best_ious(m, gt)[0] == pytest.approx(1.0)
    union_box = np.array([[2, 2, 55, 55]])
    assert box_iou_inclusive(union_box, gt)[0, 0] < 0.3  # the single-box answer would fail
    assert max_box_acc_v2([m], [gt], thresholds=[0.3], protocol="exact").value == 100.0
    # the reference also boxes every contour (its boxes end one pixel past: IoU 100/121)
    reference = BoxAccumulator(thresholds=[0.3]).best_ious(m, gt)[0]
    assert reference == pytest.approx(100 / 121)


def test_any_gt_box_counts_and_best_tau_per_delta():
    gts = np.array([[0, 0, 4, 4], [20, 20, 29, 29]])
    m = _blob((40, 40), gts[1])  # matches the second object only
    assert max_box_acc_v2([m], [gts], protocol="exact").value == 100.0
    # two images: the best τ is chosen per δ over the dataset, then averaged over δ
    good = _blob((30, 30), (5, 5, 14, 14))
    half = _blob((30, 30), (5, 5, 14, 14), 0.5, base=_blob((30, 30), (5, 5, 24, 14), 0.2))
    gt = np.array([[5, 5, 14, 14]])
    res = max_box_acc_v2([good, half], [gt, gt], thresholds=[0.1, 0.6], protocol="exact")
    # τ=0.1: `half` gives the 20×10 box (IoU 0.5) → right at δ 0.3 and 0.5; τ=0.6: exact
    assert res.per_iou == {0.3: 100.0, 0.5: 100.0, 0.7: 100.0}
    assert res.best_threshold[0.7] == 0.6
    assert res.curve[0.7] == [50.0, 100.0]


def test_constant_and_nan_maps_do_not_divide_by_zero():
    gt = np.array([[0, 0, 3, 3]])
    maps = [np.full((10, 10), 0.7), np.full((10, 10), np.nan)]
    res = max_box_acc_v2(maps, [gt, gt], protocol="exact")
    assert res.value == 0.0 and res.num_images == 2
    # the reference refuses what it cannot score, naming the map
    with pytest.raises(ValueError, match="map 1: contains NaN"):
        max_box_acc_v2(maps, [gt, gt])
    with pytest.raises(ValueError, match=r"map 0: values must lie in \[0, 1\].*got \[2, 2\]"):
        max_box_acc_v2([np.full((10, 10), 2.0)], [gt])


def test_component_boxes_use_8_connectivity():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[4, 4] = mask[4, 5] = True
    assert component_boxes(mask).tolist() == [[0, 0, 1, 1], [4, 4, 5, 4]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one ground-truth box"):
        max_box_acc_v2([np.ones((4, 4))], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="2 maps for 1"):
        max_box_acc_v2([np.ones((4, 4))] * 2, [np.array([[0, 0, 1, 1]])])
    with pytest.raises(ValueError, match="iou_thresholds"):
        BoxAccumulator(iou_thresholds=(0.0,))
    with pytest.raises(ValueError, match="protocol: 'clova' is not one of wsolevaluation, exact"):
        BoxAccumulator(protocol="clova")


@pytest.fixture
def cub_folder(tmp_path, sample_images):
    """A CUB-style folder: images in class subfolders, one image with two boxes, one corrupt."""
    root = tmp_path / "cub"
    (root / "images" / "001.Bird").mkdir(parents=True)
    rows = ["image_id,x0,y0,x1,y1"]
    for i, image in enumerate(sample_images):
        name = f"001.Bird/bird_{i}.jpg"
        image.save(root / "images" / name)
        w, h = image.size
        rows.append(f"{name},{w // 4},{h // 4},{3 * w // 4},{3 * h // 4}")
    rows.append("001.Bird/bird_0.jpg,0,0,5,5")  # a second object in image 0
    (root / "images" / "001.Bird" / "broken.jpg").write_bytes(b"not a jpeg")
    rows.append("001.Bird/broken.jpg,1,1,4,4")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    return root


def test_read_folder_groups_boxes(cub_folder):
    items = read_wsol_folder(cub_folder)
    assert items[0].image_id == "001.Bird/bird_0.jpg"
    assert items[0].boxes.shape == (2, 4) and len(items) == 4


def test_runner_scores_ga_beside_the_baseline(tiny_joint, cub_folder, tmp_path):
    report = run_wsol(tiny_joint, cub_folder, progress=False)
    assert set(report.results) == {"ga", "gradient"}
    # every default is the authors' protocol
    assert {k: report.setting[k] for k in ("template", "protocol", "pipeline", "map_size")} == {
        "template": "paper",
        "protocol": "wsolevaluation",
        "pipeline": "authors",
        "map_size": [224, 224],
    }
    # one query: the matching channel is that query, the authors' class_id=[0]
    assert (report.setting["box_rounding"], report.setting["class_query"]) == (
        "truncate",
        "matching",
    )
    assert (report.setting["target"], report.setting["query"]) == ("bird", "bird")
    assert report.num_images == 3 and list(report.skipped) == ["001.Bird/broken.jpg"]
    for res in report.results.values():
        assert 0.0 <= res.value <= 100.0 and res.num_images == 3
    saved = json.loads(report.save(tmp_path / "wsol.json").read_text())
    assert set(saved["max_box_acc_v2"]) == {"ga", "gradient"}
    assert saved["setting"]["target"] == "bird"
    # the page's sample: spread over the folder, pictures at the scored (224 px) geometry
    assert [s.image_id for s in report.samples] == [s["image_id"] for s in saved["samples"]]
    assert len(report.samples) == 3 and all(s.map_size == (224, 224) for s in report.samples)
    report.save_page(tmp_path / "wsol.html", tmp_path / "maps")
    assert len(list((tmp_path / "maps").glob("*.png"))) == 6
    none = run_wsol(tiny_joint, cub_folder, progress=False, samples=0)
    assert none.samples == [] and none.to_json()["samples"] == []
    assert none.results["ga"].value == report.results["ga"].value  # sampling changes no score


@pytest.mark.parametrize("protocol", ["exact", "wsolevaluation"])
def test_best_boxes_are_the_boxes_behind_the_best_ious(protocol):
    if protocol == "wsolevaluation":
        pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    gt = np.array([[2, 2, 11, 11], [30, 8, 45, 20]])
    m = _blob((60, 60), gt[0], 1.0)
    m = _blob((60, 60), (40, 40, 55, 55), 0.6, base=m)
    m = np.clip(m + rng.uniform(0, 0.2, m.shape), 0, 1)
    acc = BoxAccumulator(protocol=protocol)
    ious, boxes = acc.best_boxes(m, gt)
    np.testing.assert_allclose(ious, acc.best_ious(m, gt))
    for iou, box in zip(ious, boxes, strict=True):  # each box really scores its IoU
        if iou > 0:
            assert box_iou_inclusive(box[None], gt).max() == pytest.approx(iou)


def test_bad_folders(tmp_path):
    with pytest.raises(WsolDataError, match="no such folder"):
        read_wsol_folder(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(WsolDataError, match=r"boxes\.csv: missing"):
        read_wsol_folder(tmp_path)
    (tmp_path / "boxes.csv").write_text("id,a,b,c,d\n")
    with pytest.raises(WsolDataError, match=":1: header"):
        read_wsol_folder(tmp_path)
    (tmp_path / "boxes.csv").write_text("image_id,x0,y0,x1,y1\na.jpg,1,2,x,4\n")
    with pytest.raises(WsolDataError, match=":2: coordinates must be numbers"):
        read_wsol_folder(tmp_path)
    (tmp_path / "boxes.csv").write_text("image_id,x0,y0,x1,y1\na.jpg,5,2,1,4\n")
    with pytest.raises(WsolDataError, match=":2: need 0 <= x0 <= x1"):
        read_wsol_folder(tmp_path)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("../secret.jpg", "leaves its folder"), ("/etc/passwd", "absolute path"),
     ("in.jpg", "leads out")],
)  # fmt: skip
def test_image_ids_stay_in_the_images_folder(tmp_path, name, reason):
    (tmp_path / "images").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (tmp_path / "images" / "in.jpg").symlink_to(tmp_path / "secret.jpg")
    (tmp_path / "boxes.csv").write_text(f"image_id,x0,y0,x1,y1\nok.jpg,1,1,2,2\n{name},1,1,2,2\n")
    with pytest.raises(WsolDataError, match=reason) as info:
        read_wsol_folder(tmp_path)
    assert ":3" in str(info.value) and "\n" not in str(info.value)


def test_cub_conversion(tmp_path):
    (tmp_path / "images.txt").write_text("1 001.A/a.jpg\n2 001.A/b.jpg\n")
    (tmp_path / "train_test_split.txt").write_text("1 1\n2 0\n")
    (tmp_path / "bounding_boxes.txt").write_text("1 1 2 3 4\n2 10.0 20.0 30.0 40.0\n")
    assert cub_to_boxes_csv(tmp_path, tmp_path / "out" / "boxes.csv") == 1
    lines = (tmp_path / "out" / "boxes.csv").read_text().splitlines()
    assert lines == ["image_id,x0,y0,x1,y1", "001.A/b.jpg,10.0,20.0,40.0,60.0"]


def test_missing_opencv_is_one_clear_error(monkeypatch, cli_env, tmp_path, capsys):
    import sys

    from jmllm.joint.cli import main
    from jmllm.joint.wsol import WsolDependencyError

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    with pytest.raises(WsolDependencyError, match=r"pip install 'jmllm-joint\[wsol\]'"):
        max_box_acc_v2([np.zeros((4, 4))], [np.array([[0, 0, 1, 1]])])
    # the exact protocol needs no OpenCV
    blob = _blob((8, 8), (0, 0, 3, 3))
    assert max_box_acc_v2([blob], [np.array([[0, 0, 3, 3]])], protocol="exact").value == 100.0
    (tmp_path / "images").mkdir()
    (tmp_path / "boxes.csv").write_text("image_id,x0,y0,x1,y1\na.png,0,0,1,1\n")
    assert main(["wsol", str(tmp_path), "--tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--protocol wsolevaluation: " in err and "[wsol]" in err
