"""Image decoding memory: the policy's reduced, strip-by-strip decode beside the whole-image
pipeline it replaced, in the same run.

Baseline (what the policy did before): ``Image.open(...).load()``, convert the whole image to
8-bit RGB (16-bit scaled through a float64 array, alpha composited on white), then shrink to
4096 px. The policy (``jmllm.align.images.open_image``): non-interlaced PNGs decoded in strips,
each converted and box-reduced before the final shrink; formats decoded whole refused above
48 megapixels when they must be shrunk.

Every measurement runs in its own child process (peak RSS is a process's high-water mark,
``VmHWM``): ``repeats`` runs per (file, pipeline), wall time as mean with a 95 % t-interval, peak
RSS as the maximum. The baseline is skipped for files whose whole decode would need more than
``--baseline-max-gb`` (20 000² files take 8-11 GB that way: not on a shared machine).

Prints one JSON object (and writes it to ``--json-out``). Usage::

    python benchmarks/image_memory.py --quick          # 6000² files, both pipelines
    python benchmarks/image_memory.py                  # the 20000² files of the policy's test
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CHILD = """
import sys, time
from jmllm.align.testing import peak_rss_mb
pipeline, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if pipeline == "policy":
    from jmllm.align.images import ImageLoadError, open_image
    try:
        size = open_image(path).image.size
    except ImageLoadError:
        size = None
else:
    from PIL import Image
    from jmllm.align import images
    with Image.open(path) as image:
        image.load()
        size = images._shrink(images._to_rgb(image), images.WORKING_SIDE).size
print(time.perf_counter() - start, peak_rss_mb(), size)
"""


def measure(pipeline: str, path: Path) -> tuple[float, float, Any]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, pipeline, str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split(maxsplit=2)
    return float(out[0]), float(out[1]), out[2].strip()


def interval(values: list[float]) -> dict[str, Any]:
    """Mean and a 95 % t-interval (n = len(values))."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": len(values)}
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(values)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6000² files (both pipelines run)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per file and pipeline (3)")
    parser.add_argument(
        "--baseline-max-gb", type=float, default=4.0, help="skip larger whole-image decodes"
    )
    parser.add_argument("--json-out", help="also write the JSON here")
    args = parser.parse_args(argv)

    from jmllm.align.testing import webp_lossless_constant, write_large_png

    side = 6000 if args.quick else 20_000
    webp_side = 6000 if args.quick else 6900
    # bytes per pixel of the whole-image pipeline (decoded + float64 or composited copies)
    files = [("16-bit grey PNG", "I;16", side, 28), ("RGBA PNG", "RGBA", side, 22)]
    results: dict[str, Any] = {"files": {}, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for label, mode, n, _ in files:
            paths[label] = write_large_png(Path(tmp) / f"{mode[:4]}.png", n, n, mode)
        webp = Path(tmp) / "image.webp"
        webp.write_bytes(webp_lossless_constant(webp_side, webp_side, (128, 10, 200, 30)))
        paths["lossless WebP"] = webp
        costs = {label: cost for label, _, _, cost in files} | {"lossless WebP": 20}
        sides = {label: n for label, _, n, _ in files} | {"lossless WebP": webp_side}
        for label, path in paths.items():
            row: dict[str, Any] = {
                "pixels": f"{sides[label]}x{sides[label]}",
                "file_bytes": path.stat().st_size,
            }
            pipelines = ["policy"]
            if sides[label] ** 2 * costs[label] / 1e9 <= args.baseline_max_gb:
                pipelines.append("whole-image baseline")
            for pipeline in pipelines:
                runs = [measure(pipeline.split()[0], path) for _ in range(args.repeats)]
                row[pipeline] = {
                    "seconds": interval([r[0] for r in runs]),
                    "peak_rss_mb": max(r[1] for r in runs),
                    "output": runs[0][2],
                }
            if len(pipelines) == 2:
                row["peak_rss_ratio_baseline_over_policy"] = (
                    row["whole-image baseline"]["peak_rss_mb"] / row["policy"]["peak_rss_mb"]
                )
            results["files"][label] = row
    results["target"] = "policy peak RSS <= 1536 MB for every accepted image"
    results["target_met"] = all(
        row["policy"]["peak_rss_mb"] <= 1536 for row in results["files"].values()
    )
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
