"""Sample data for every workflow, from the toy world, in one command: ``jmllm-joint sample-data``.

Real data sets (COCO, CUB-200-2011) are large and downloaded; the toy world's held-out scenes
(:mod:`jmllm.joint.toy.scenes`) carry their truth, so they can be written in the formats the
workflows read, offline and in a second, and the built-in models (``--tiny``) answer about them
correctly. :func:`write_sample_data` writes into ``OUT``:

- ``coco/images/toy-heldout-NNNN.png``: held-out toy scenes (128 × 128 px, 1–3 shapes);
- ``coco/captions.json``: COCO captions format (``captions_train2017.json``: ``images`` with
  ``id``, ``file_name``, ``width``, ``height``; ``annotations`` with ``image_id`` and
  ``caption``, the scene's caption) for ``jmllm-judge sample --coco … --images-dir …``;
- ``coco/instances.json``: COCO instances format (``categories`` the four shapes, one
  annotation per object with ``bbox`` ``[x, y, w, h]`` in pixels, ``area``, ``iscrowd`` 0), and
  the images also serve ``jmllm-joint chat/explain/hallucinations`` and ``jmllm-align train
  --images``;
- ``cub/images/toy-heldout-NNNN.png`` and ``cub/boxes.csv`` (``image_id,x0,y0,x1,y1,label``,
  the first and last pixel of the object, inclusive, as :class:`~jmllm.joint.wsol.WsolItem`
  reads them, and the object's shape, the word ``jmllm-joint wsol`` explains in that image):
  single-object scenes, the CUB-200-2011 layout that ``jmllm-joint wsol`` reads (one object per
  image, like CUB's one bird);
- ``README.md``: what each file is and the commands that use it.

Every file is written atomically with ordinary permissions. The same ``(count, seed)`` always
writes the same bytes.

Example:
    >>> import tempfile
    >>> out = write_sample_data(tempfile.mkdtemp(), count=2, wsol_count=1)
    >>> sorted(p.name for p in (out / "coco").iterdir())
    ['captions.json', 'images', 'instances.json']
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from jmllm.align.files import atomic_write_bytes, atomic_write_text

__all__ = ["SAMPLE_README", "write_sample_data"]

SAMPLE_README = """# jmllm sample data (toy world)

Held-out toy-world scenes (coloured shapes on neutral backgrounds, 128 x 128 px) with their
truth, in the formats the workflows read. The built-in models (`--tiny`) are trained on such
scenes, so their answers, boxes and maps can be checked against the truth here. Written by
`jmllm-joint sample-data --out {out}`.

- `coco/images/`: the scenes; `coco/captions.json`: COCO captions; `coco/instances.json`: COCO
  instances (the four shapes as categories, boxes as [x, y, w, h]).
- `cub/images/` and `cub/boxes.csv`: single-object scenes in the CUB layout of `jmllm-joint wsol`,
  each labelled with its shape (the word `wsol` explains in it).

Try:

    jmllm-joint explain {out}/coco/images/{first} --tiny -p "What's the content of the image?" --out explain
    jmllm-joint wsol {out}/cub --tiny --json-out wsol.json
    jmllm-judge sample --coco {out}/coco/captions.json --images-dir {out}/coco/images -n {count} --out manifest.json
    jmllm-judge captions --manifest manifest.json --system J --joint --tiny -o j.jsonl
    jmllm-align train --tiny {out}/coco/images --out w-run --max-steps 20 --batch-size 4
"""


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_sample_data(
    out: str | os.PathLike[str], count: int = 12, wsol_count: int = 8, seed: int = 0
) -> Path:
    """Write the sample data (see the module docstring) into ``out``.

    Args:
        out: folder (created if missing; files of a previous run are replaced).
        count: held-out scenes in ``coco/`` (the first ``count`` of the split).
        wsol_count: single-object held-out scenes in ``cub/``.
        seed: the toy world's seed (0: the world the shipped models were trained on).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``count`` or ``wsol_count`` below 1.
    """
    from jmllm.joint.toy.scenes import SHAPES, make_scene

    if count < 1 or wsol_count < 1:
        raise ValueError(f"count and wsol_count: must be at least 1, got {count}, {wsol_count}")
    root = Path(out)
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
