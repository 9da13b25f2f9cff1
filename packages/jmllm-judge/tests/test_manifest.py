from __future__ import annotations

import json
from pathlib import Path

import pytest

from jmllm.judge.errors import JudgeError
from jmllm.judge.files import sha256_file
from jmllm.judge.manifest import Manifest, sample_coco, sample_dataset, sample_folder


def test_coco_sample_is_seeded_and_has_one_ground_truth_each(
    coco_file: Path, images_dir: Path
) -> None:
    a = sample_coco(coco_file, 8, seed=0, images_dir=images_dir)
    b = sample_coco(coco_file, 8, seed=0, images_dir=images_dir)
    c = sample_coco(coco_file, 8, seed=1, images_dir=images_dir)
    assert [im.image_id for im in a.images] == [im.image_id for im in b.images]
    assert [im.ground_truth for im in a.images] == [im.ground_truth for im in b.images]
    assert [im.image_id for im in a.images] != [im.image_id for im in c.images]
    assert len(a) == 8 and len({im.image_id for im in a.images}) == 8
    coco = json.loads(coco_file.read_text())
    captions: dict[str, set[str]] = {}
    for ann in coco["annotations"]:
        captions.setdefault(str(ann["image_id"]), set()).add(ann["caption"].strip())
    for image in a.images:
        assert image.ground_truth in captions[image.image_id]  # one of that image's own, stripped
        assert image.path is not None and image.sha256 == sha256_file(image.path)
    assert a.origin["kind"] == "coco" and a.origin["candidates"] == 12


def test_coco_sample_without_images_dir_uses_urls(coco_file: Path) -> None:
    manifest = sample_coco(coco_file, 5, seed=3)
    assert all(
        im.path is None and im.url and im.url.startswith("http://images.cocodataset.org/")
        for im in manifest.images
    )


def test_unreadable_images_are_skipped_and_listed(coco_file: Path, images_dir: Path) -> None:
    victims = sorted(images_dir.iterdir())[:3]
    victims[0].write_bytes(b"not an image at all")
    victims[1].write_bytes(victims[1].read_bytes()[:40])  # truncated
    victims[2].unlink()
    manifest = sample_coco(coco_file, 9, seed=0, images_dir=images_dir)
    assert len(manifest) == 9
    assert len(manifest.origin["skipped"]) == 3
    assert {Path(im.path).name for im in manifest.images if im.path} & {
        v.name for v in victims
    } == set()
    with pytest.raises(JudgeError, match="only 9 of 12"):
        sample_coco(coco_file, 10, seed=0, images_dir=images_dir)


def test_manifest_round_trip_keeps_paths_portable(tmp_path: Path, manifest: Manifest) -> None:
    path = manifest.save(tmp_path / "manifest.json")
    stored = json.loads(path.read_text())
    assert all(
        not Path(im["path"]).is_absolute() for im in stored["images"]
    )  # images/ is beside it
    loaded = Manifest.load(path)
    assert loaded.images == manifest.images and loaded.seed == manifest.seed


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"images": []}', "not a COCO captions file"),
        ('{"images": [{"file_name": "x.jpg"}], "annotations": []}', "has no 'id'"),
        (
            '{"images": [{"id": 1}], "annotations": [{"image_id": 1}]}',
            "needs 'image_id' and 'caption'",
        ),
    ],
)
def test_malformed_coco_files_get_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(JudgeError, match=message):
        sample_coco(path, 1)


def test_not_a_manifest(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(JudgeError, match="not a jmllm-judge manifest"):
        Manifest.load(path)


def test_folder_sample_with_ground_truth(tmp_path: Path, images_dir: Path) -> None:
    names = sorted(p.name for p in images_dir.iterdir())
    truths = tmp_path / "gt.jsonl"
    truths.write_text(
        "\n".join(
            json.dumps({"image": name, "caption": [f"{name} a", f"{name} b"]}) for name in names[:6]
        )
        + "\n"
    )
    manifest = sample_folder(images_dir, 4, seed=5, ground_truth=truths)
    assert len(manifest) == 4
    for image in manifest.images:
        assert image.image_id in names[:6]
        assert image.ground_truth in (f"{image.image_id} a", f"{image.image_id} b")
    assert sample_folder(images_dir, 12, seed=0).images[0].ground_truth is None


def test_dataset_sample(tmp_path: Path, images_dir: Path) -> None:
    datasets = pytest.importorskip("datasets")
    paths = sorted(images_dir.iterdir())
    table = datasets.Dataset.from_dict(
        {
            "image": [str(p) for p in paths],
            "caption": [[f"caption {i}", f"other {i}"] for i in range(len(paths))],
            "uid": [f"u{i}" for i in range(len(paths))],
        }
    ).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "ds"))
    manifest = sample_dataset(tmp_path / "ds", tmp_path / "run", 5, seed=2, id_column="uid")
    assert len(manifest) == 5
    for image in manifest.images:
        i = int(image.image_id[1:])
        assert image.ground_truth in (f"caption {i}", f"other {i}")
        assert (
            image.path is not None and image.path.parent == (tmp_path / "run" / "images").resolve()
        )
        assert (
            image.path.read_bytes() == paths[i].read_bytes()
        )  # the original bytes, not re-encoded
    with pytest.raises(JudgeError, match="no column 'text'"):
        sample_dataset(tmp_path / "ds", tmp_path / "run", 5, caption_column="text")


@pytest.mark.parametrize(
    ("where", "reason"),
    [("dotdot", "leaves its folder"), ("absolute", "absolute path"), ("link", "leads out")],
)
def test_coco_file_names_stay_in_the_images_folder(
    tmp_path, coco_file, images_dir, where, reason
) -> None:
    """A file_name that leaves --images-dir (``..``, an absolute path, a link pointing out) is
    skipped and counted, never read and never sent to the judge."""
    first = sorted(images_dir.iterdir())[0]
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(first.read_bytes())
    name = {"dotdot": "../outside/secret.png", "absolute": str(secret), "link": "inside.png"}[where]
    if where == "link":
        (images_dir / "inside.png").symlink_to(secret)
    doc = json.loads(coco_file.read_text())
    doc["images"][0]["file_name"] = name
    coco_file.write_text(json.dumps(doc))
    total = len(doc["images"])
    manifest = sample_coco(coco_file, total - 1, seed=0, images_dir=images_dir)
    skipped = manifest.origin["skipped"]
    assert len(skipped) == 1 and skipped[0]["image_id"] == str(doc["images"][0]["id"])
    assert "file_name" in skipped[0]["reason"] and reason in skipped[0]["reason"]
    assert all(image.path is not None and image.path.parent == images_dir.resolve()
               for image in manifest.images)  # fmt: skip
    with pytest.raises(JudgeError, match="usable"):
        sample_coco(coco_file, total, seed=0, images_dir=images_dir)
