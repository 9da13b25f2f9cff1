"""``jmllm-joint sample-data``: toy scenes in the COCO and CUB formats, read back by the readers
the workflows use, and equal to the scenes' truth."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from jmllm.joint import cli
from jmllm.joint.toy.scenes import make_scene
from jmllm.joint.wsol import read_wsol_folder


def test_sample_data_is_the_truth_in_coco_and_cub_formats(tmp_path, capsys):
    out = tmp_path / "sample"
    assert cli.main(["sample-data", "--out", str(out), "-n", "5", "--num-wsol-images", "3"]) == 0
    assert "sample data ->" in capsys.readouterr().out
    captions = json.loads((out / "coco" / "captions.json").read_text())
    instances = json.loads((out / "coco" / "instances.json").read_text())
    assert [c["name"] for c in instances["categories"]] == ["circle", "square", "triangle", "cross"]
    names = {c["id"]: c["name"] for c in instances["categories"]}
    assert len(captions["images"]) == 5
    for entry in captions["images"]:
        index = int(entry["file_name"][len("toy-heldout-") : -len(".png")])
        scene = make_scene("heldout", index)
        pixels = np.asarray(Image.open(out / "coco" / "images" / entry["file_name"]))
        assert np.array_equal(pixels, np.asarray(scene.image))
        (caption,) = [a["caption"] for a in captions["annotations"] if a["image_id"] == entry["id"]]
        assert caption == scene.caption
        boxes = sorted(
            (names[a["category_id"]], tuple(a["bbox"]))
            for a in instances["annotations"]
            if a["image_id"] == entry["id"]
        )
        truth = sorted(
            (o.shape, (o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]))
            for o in scene.objects
        )
        assert boxes == truth
    # CUB layout: the wsol reader takes it; one object per image, its true box
    items = read_wsol_folder(out / "cub")
    rows = (out / "cub" / "boxes.csv").read_text().splitlines()
    assert rows[0] == "image_id,x0,y0,x1,y1,label" and len(rows) == 4
    for row in rows[1:]:
        name, *box, label = row.split(",")
        scene = make_scene("heldout", int(name[len("toy-heldout-") : -len(".png")]))
        x0, y0, x1, y1 = scene.objects[0].box  # exclusive; the CSV holds inclusive last pixels
        assert len(scene.objects) == 1 and tuple(int(v) for v in box) == (x0, y0, x1 - 1, y1 - 1)
        assert label == scene.objects[0].shape  # the word wsol explains in this image
        assert (out / "cub" / "images" / name).is_file()
    assert len(items) == 3 and all(item.path.is_file() for item in items)
    assert [item.label for item in items] == [row.split(",")[-1] for row in rows[1:]]


def test_sample_data_bad_count_is_refused(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:  # argparse: the number is checked at the CLI
        cli.main(["sample-data", "--out", str(tmp_path / "s"), "-n", "0"])
    assert exit_info.value.code == 2
    assert "must be in [1, 10000], got 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
