"""Is it a toy scene? The toy J's image and answer checks measured (false alarms and hits).

On held-out toy scenes saved as PNG, as JPEG (quality 95, 75, 50), blurred by 1 px, and blurred
then saved at quality 75, the share flagged by ``toy_image_problem`` (false alarms); on blank,
greyscale and photo crops (128 x 128 crops of the package's sample photo and smooth random colour
fields), the share flagged (hits). Then the answer check (``toy_answer_problem``): J's captions
of held-out scenes (flagged among the right ones and among the wrong ones) and of scenes the toy
world never shows (four objects; objects of 8-14 or 60-100 px).

    python benchmarks/toy_inputs.py [--scenes 500] [--answer-scenes 300] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


SAVED_AS = {
    "png": lambda im: im,
    "jpeg95": lambda im: _jpeg(im, 95),
    "jpeg75": lambda im: _jpeg(im, 75),
    "jpeg50": lambda im: _jpeg(im, 50),
    "blur1": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
    "blur1_jpeg75": lambda im: _jpeg(im.filter(ImageFilter.GaussianBlur(1)), 75),
}


def not_toy_images(count: int, seed: int = 0) -> dict[str, list[Image.Image]]:
    """Blank, greyscale-scene and photo-like 128 x 128 images."""
    from jmllm.joint.toy.scenes import make_scene

    photo = Image.open(str(files("jmllm.joint") / "data" / "sample.png")).convert("RGB")
    rng = np.random.default_rng(seed)
    width, height = photo.size
    crops, fields = [], []
    for _ in range(count):
        side = int(rng.integers(min(width, height) // 6, min(width, height)))
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        crops.append(photo.crop((x, y, x + side, y + side)).resize((128, 128)))
        field = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        fields.append(Image.fromarray(field, "RGB").resize((128, 128), Image.Resampling.BICUBIC))
    return {
        "blank": [Image.new("RGB", (128, 128), (g, g, g)) for g in range(0, 256, 8)],
        "greyscale_scenes": [
            make_scene("heldout", i).image.convert("L").convert("RGB") for i in range(count)
        ],
        "photo_crops": crops,
        "colour_fields": fields,
    }


def beyond(n: int, **kwargs: Any) -> list[Any]:
    """``n`` scenes the toy world never shows, drawn by ``make_scene(**kwargs)`` (e.g. ``count=4``
    objects; crowded draws that find no room are skipped)."""
    from jmllm.joint.toy.scenes import make_scene

    scenes, index = [], 5000
    while len(scenes) < n:
        try:
            scenes.append(make_scene("heldout", index, **kwargs))
        except ValueError:
            pass
        index += 1
    return scenes


def answer_check(model: Any, scenes: list[Any]) -> dict[str, Any]:
    """How often the answer check fires on J's captions, among right and wrong ones."""
    from jmllm.joint.toy.inputs import toy_answer_check
    from jmllm.joint.toy.scenes import CONTENT_QUESTION, caption_correct

    right = wrong = right_flagged = wrong_flagged = 0
    for start in range(0, len(scenes), 32):
        chunk = scenes[start : start + 32]
        emb = model.embed([s.image for s in chunk])
        answers = [a.text for a in model.generate(emb, CONTENT_QUESTION, max_new_tokens=32)]
        for scene, answer, problem in zip(
            chunk, answers, toy_answer_check(model, emb, answers), strict=True
        ):
            if caption_correct(answer, scene.objects):
                right += 1
                right_flagged += problem is not None
            else:
                wrong += 1
                wrong_flagged += problem is not None
    return {
        "scenes": len(scenes),
        "right_answers": right,
        "right_flagged": right_flagged,
        "wrong_answers": wrong,
        "wrong_flagged": wrong_flagged,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=500, help="scenes per saving (default 500)")
    parser.add_argument(
        "--answer-scenes", type=int, default=300, help="scenes for the answer check (300)"
    )
    parser.add_argument("--dir", help="a toy world trained with `jmllm-joint toy train --out`")
    parser.add_argument("--json-out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    from jmllm.joint.render.report import atomic_write_text
    from jmllm.joint.toy import load_toy_joint
    from jmllm.joint.toy.inputs import toy_image_problem
    from jmllm.joint.toy.scenes import make_scene

    clock = time.perf_counter()
    scenes = [make_scene("heldout", i).image for i in range(args.scenes)]
    false_alarms = {
        name: sum(toy_image_problem(save(im)) is not None for im in scenes) / len(scenes)
        for name, save in SAVED_AS.items()
    }
    hits = {
        name: sum(toy_image_problem(im) is not None for im in images) / len(images)
        for name, images in not_toy_images(100).items()
    }
    model = load_toy_joint(args.dir)
    answers = {
        "heldout": answer_check(
            model, [make_scene("heldout", i) for i in range(args.answer_scenes)]
        ),
        "four_objects": answer_check(model, beyond(60, count=4)),
        "objects_8_14_px": answer_check(model, beyond(60, sides=(8, 14))),
        "objects_60_100_px": answer_check(model, beyond(60, count=1, sides=(60, 100))),
    }
    report = {
        "benchmark": "toy_inputs",
        "image_check_false_alarm_rate": false_alarms,
        "image_check_hit_rate": hits,
        "answer_check": answers,
        "scenes": args.scenes,
        "weights": str(args.dir or "shipped"),
        "wall_seconds": round(time.perf_counter() - clock, 2),
        "load_average": list(os.getloadavg()),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
