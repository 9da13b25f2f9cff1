"""Sample data for every workflow, from the toy world, in one command: ``jmllm-joint sample-data``.

Real data sets (COCO, CUB-200-2011) are large and downloaded; the toy world's held-out scenes
(:mod:`jmllm.joint.toy.scenes`) carry their truth, so they can be written in the formats the
workflows read, offline and in a second, and the built-in models (``--tiny``) answer about them
correctly. :func:`write_sample_data` writes into ``OUT``:

- ``coco/images/toy-heldout-NNNN.png``: held-out toy scenes (128 × 128 px, 1–3 shapes);
- ``coco/captions.json``: COCO captions format (``captions_train2017.json``: ``images`` with
  ``id``, ``file_name``, ``width``, ``height``; ``annotations`` with ``image_id`` and
  ``caption``, the scene's caption) for ``jmllm-judge sample --coco … --images …``;
- ``coco/instances.json``: COCO instances format (``categories`` the four shapes, one
  annotation per object with ``bbox`` ``[x, y, w, h]`` in pixels, ``area``, ``iscrowd`` 0), and
  the images also serve ``jmllm-joint chat/explain/hallucinations`` and ``jmllm-align train
  --images``;
- ``pope/toy_pope_{random,popular,adversarial}.json``: POPE's three splits in POPE's own format
  (JSON Lines of ``question_id``, ``image``, ``text`` ``Is there a {shape} in the image?``,
  ``label``), over the ``coco`` scenes: per scene its first shape (a "yes") and one absent shape
  (a "no") drawn as POPE draws its negatives (:func:`jmllm.joint.audit.questions.plan_questions`
  with ``k=1``): uniformly, the most frequent shape, or the shape most often seen with the
  positive one; for ``jmllm-joint hallucination-audit --benchmark pope``;
- ``chair/synonyms.txt``: a CHAIR-style synonym list of the four shapes (one shape a line, its
  name first, then other words for it), for ``--benchmark chair``;
- ``cub/images/toy-heldout-NNNN.png`` and ``cub/boxes.csv`` (``image_id,x0,y0,x1,y1,label``,
  the first and last pixel of the object, inclusive, as :class:`~jmllm.joint.wsol.WsolItem`
  reads them, and the object's shape, the word ``jmllm-joint wsol`` explains in that image):
  single-object scenes, the CUB-200-2011 layout that ``jmllm-joint wsol`` reads (one object per
  image, like CUB's one bird);
- ``README.md``: what each file is and the commands that use it.

Every file is written atomically with ordinary permissions. The same ``(count, seed)`` always
writes the same bytes. ``OUT`` must be new, empty or hold only a previous run's sample data:
a folder with anything else in it (a repository's README, a user's ``coco/``) is refused
unless ``force``, and even then nothing the command did not write is replaced
(:func:`jmllm.align.files.claim_output_folder`).

Example:
    >>> import tempfile
    >>> out = write_sample_data(tempfile.mkdtemp(), count=2, wsol_count=1)
    >>> sorted(p.name for p in (out / "coco").iterdir())
    ['captions.json', 'images', 'instances.json']
    >>> sorted(p.name for p in (out / "pope").iterdir())
    ['toy_pope_adversarial.json', 'toy_pope_popular.json', 'toy_pope_random.json']
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from jmllm.align.files import atomic_write_bytes, atomic_write_text, output_folder

__all__ = [
    "SAMPLE_COMMAND",
    "SAMPLE_OUTPUTS",
    "SAMPLE_README",
    "TOY_SYNONYMS",
    "write_sample_data",
]

SAMPLE_COMMAND = "jmllm-joint sample-data"
SAMPLE_OUTPUTS = ("README.md", "coco", "cub", "chair", "pope")  # what it writes directly in OUT

# A CHAIR-style synonym list of the toy objects: one shape a line, its name first.
TOY_SYNONYMS = """# CHAIR-style synonym list of the toy world's objects (the format of CHAIR's synonyms.txt,
# Rohrbach et al., EMNLP 2018): one object a line, its name first, then other words for it.
circle, disc, disk, ring
square, rectangle, block
triangle, wedge
cross, plus sign
"""

SAMPLE_README = """# jmllm sample data (toy world)

Held-out toy-world scenes (coloured shapes on neutral backgrounds, 128 x 128 px) with their
truth, in the formats the workflows read. The built-in models (`--tiny`) are trained on such
scenes, so their answers, boxes and maps can be checked against the truth here. Written by
`jmllm-joint sample-data --out {out}`.

- `coco/images/`: the scenes; `coco/captions.json`: COCO captions; `coco/instances.json`: COCO
  instances (the four shapes as categories, boxes as [x, y, w, h]).
- `pope/toy_pope_{{random,popular,adversarial}}.json`: POPE's three splits in POPE's format (one
  present and one absent shape per scene); `chair/synonyms.txt`: a CHAIR-style synonym list of
  the shapes.
- `cub/images/` and `cub/boxes.csv`: single-object scenes in the CUB layout of `jmllm-joint wsol`,
  each labelled with its shape (the word `wsol` explains in it).

Try:

    jmllm-joint explain {out}/coco/images/{first} --tiny -p "What's the content of the image?" --out explain
    jmllm-joint wsol {out}/cub --tiny --json-out wsol.json
    jmllm-joint hallucination-audit --tiny --benchmark pope --data {out} --out pope-audit
    jmllm-joint hallucination-audit --tiny --benchmark chair --data {out} --out chair-audit
    jmllm-judge sample --coco {out}/coco/captions.json --images {out}/coco/images -n {count} -o manifest.json
    jmllm-judge captions --manifest manifest.json --system J --joint --tiny -o j.jsonl
    jmllm-align train --tiny {out}/coco/images --out w-run --max-steps 20 --batch-size 4
"""


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_sample_data(
    out: str | os.PathLike[str],
    count: int = 12,
    wsol_count: int = 8,
    seed: int = 0,
    *,
    force: bool = False,
) -> Path:
    """Write the sample data (see the module docstring) into ``out``.

    Args:
        out: folder (created if missing; a previous run's sample data is replaced).
        count: held-out scenes in ``coco/`` (the first ``count`` of the split).
        wsol_count: single-object held-out scenes in ``cub/``.
        seed: the toy world's seed (0: the world the shipped models were trained on).
        force: write into a folder that holds other files too (never replacing one).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``count`` or ``wsol_count`` below 1.
        jmllm.align.files.ForeignOutputError: ``out`` holds files the command did not write
            (without ``force``), or one named like its outputs (even with ``force``).
    """
    if count < 1 or wsol_count < 1:
        raise ValueError(f"count and wsol_count: must be at least 1, got {count}, {wsol_count}")
    with output_folder(
        out, command=SAMPLE_COMMAND, outputs=SAMPLE_OUTPUTS, force=force, what="--out"
    ) as root:
        return _write_sample_data(root, count, wsol_count, seed)


def _write_sample_data(root: Path, count: int, wsol_count: int, seed: int) -> Path:
    from jmllm.joint.toy.scenes import SHAPES, make_scene

    categories = [{"id": i + 1, "name": shape} for i, shape in enumerate(SHAPES)]
    category_of = {c["name"]: c["id"] for c in categories}
    images: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    instances: list[dict[str, Any]] = []
    for index in range(count):
        scene = make_scene("heldout", index, seed)
        name = f"toy-heldout-{index:04d}.png"
        atomic_write_bytes(root / "coco" / "images" / name, _png(scene.image))
        width, height = scene.image.size
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        captions.append({"id": image_id, "image_id": image_id, "caption": scene.caption})
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": category_of[obj.shape],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "colour": obj.colour,
                }
            )
    info = {"description": f"jmllm toy world, held-out scenes, seed {seed}"}
    atomic_write_text(
        root / "coco" / "captions.json",
        json.dumps({"info": info, "images": images, "annotations": captions}, indent=1) + "\n",
    )
    atomic_write_text(
        root / "coco" / "instances.json",
        json.dumps(
            {"info": info, "images": images, "annotations": instances, "categories": categories},
            indent=1,
        )
        + "\n",
    )
    _write_pope(root, images, instances, categories, seed)
    atomic_write_text(root / "chair" / "synonyms.txt", TOY_SYNONYMS)
    rows = ["image_id,x0,y0,x1,y1,label"]
    index = 0
    while len(rows) <= wsol_count:
        scene = make_scene("heldout", index, seed)
        index += 1
        if len(scene.objects) != 1:
            continue
        name = f"toy-heldout-{scene.index:04d}.png"
        atomic_write_bytes(root / "cub" / "images" / name, _png(scene.image))
        x0, y0, x1, y1 = scene.objects[0].box  # x1, y1 exclusive
        shape = scene.objects[0].shape  # the object word wsol explains in this image
        rows.append(f"{name},{x0},{y0},{x1 - 1},{y1 - 1},{shape}")  # inclusive last pixel
    atomic_write_text(root / "cub" / "boxes.csv", "\n".join(rows) + "\n")
    atomic_write_text(
        root / "README.md",
        SAMPLE_README.format(out=root, first=images[0]["file_name"], count=count),
    )
    return root


def _write_pope(
    root: Path,
    images: list[dict[str, Any]],
    instances: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    seed: int,
) -> None:
    """POPE's three split files over the scenes (see the module docstring)."""
    from jmllm.joint.audit.data import AuditDataset, AuditImage, plan_questions

    names = {c["id"]: c["name"] for c in categories}
    present: dict[int, list[str]] = {image["id"]: [] for image in images}
    for ann in instances:
        name = names[ann["category_id"]]
        if name not in present[ann["image_id"]]:
            present[ann["image_id"]].append(name)
    files = {image["id"]: image["file_name"] for image in images}
    dataset = AuditDataset(
        tuple(names.values()),
        tuple(
            AuditImage(str(image_id), files[image_id], tuple(shapes), files[image_id])
            for image_id, shapes in present.items()
        ),
    )
    for split in ("random", "popular", "adversarial"):
        plan = plan_questions(dataset, split, k=1, seed=seed)
        lines: list[str] = []
        for image_id, questions in plan.questions.items():
            for q in questions:
                lines.append(
                    json.dumps(
                        {
                            "question_id": len(lines) + 1,
                            "image": files[int(image_id)],
                            "text": f"Is there a {q.class_name} in the image?",
                            "label": "yes" if q.present else "no",
                        }
                    )
                )
        atomic_write_text(root / "pope" / f"toy_pope_{split}.json", "\n".join(lines) + "\n")
