"""Hallucination audit: questions/s of the fast path beside the authors' per-question loop, in the
same run (DESIGN §5: target ≥ 10×).

Both answer the audit's yes/no questions (``Is there a {class} in the image? Only answer with
'yes' or 'no'.``, ``paper`` template, greedy, the same token limit) for the 80 COCO class names
about the same images, and read OWL-ViT's maximum score for each class:

- **fast** (:class:`jmllm.joint.audit.YesNoAuditor`): ``t`` once per image, OWL-ViT's scores for
  all classes from one call of the heads, the prompt prefix up to the class name run once and
  its KV cache shared by all questions, the questions batched;
- **loop** (:func:`jmllm.joint.audit.ask_one_by_one`): the authors' semantics — re-embed the
  image for every question, the full prompt, one greedy ``generate`` per question, OWL-ViT
  queried with that class alone.

The loop runs on the first ``--loop-questions`` classes of each image (its cost is linear in the
questions); both rates are questions per second. Every loop answer is compared with the fast
path's (token ids, and OWL-ViT scores within 1e-4; in bfloat16 answers may part at near-ties).

Modes:
- default (CPU): the tiny offline J of :mod:`jmllm.joint.testing` (random weights, float32).
- ``--gpu``: full-size OWL-ViT B/32 and LLaVA-1.5-7b architectures with random bf16 weights
  (built as in ``generate_throughput.py``), prompted through the tiny tokenizer (the image token
  id set to the tokenizer's); nothing is downloaded. ``--arch-scale small`` shrinks the
  architectures to check this code path on a CPU.

Random weights never say "Yes" and stop: every answer runs to the token limit, in both paths.

``--across-images`` measures instead the batching of POPE and CHAIR
(:func:`jmllm.joint.audit.benchmark.run_benchmark`): POPE-style questions (``Is there a {class}
in the image?`` and LLaVA's single-word post-prompt, six per image) answered by the same runner
with one answer per ``generate`` call (``--batch-size 1``, the baseline) and with the answers of
several images in one left-padded batched ``generate``, alternately, ``--repeats`` times; every
batched answer is compared with its batch-1 answer. The speed-up is the ratio of the two times
per repeat: its mean with a 95 % t-interval over the repeats (wall-clock and CPU time), beside
the machine's load average.

``--toy-run`` times the whole offline path as a user runs it, on the toy world: ``jmllm-joint
sample-data`` then ``jmllm-joint hallucination-audit --tiny --benchmark pope`` and ``--benchmark
chair`` on it, each a process of its own (model loading included), and reports each command's
seconds with the reports' headline figures (``--device cuda`` on a GPU machine: the data any
device can reach).

Usage:
    python benchmarks/hallucination_audit.py --quick
    python benchmarks/hallucination_audit.py --gpu --json-out .bench/hallucination_audit.json
    python benchmarks/hallucination_audit.py --across-images --repeats 5
    python benchmarks/hallucination_audit.py --across-images --gpu --json-out .bench/h.json
    python benchmarks/hallucination_audit.py --toy-run --scenes 100
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("hallucination_audit")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tiny_model(cache: Path) -> Any:
    from jmllm.joint.testing import tiny_joint_model

    return tiny_joint_model(cache, device="cpu")


def _full_size_model(device: torch.device, scale: str, cache: Path) -> Any:
    """Full-size architectures with random bf16 weights (generate_throughput's builder), given
    the tiny tokenizers so that prompts are real text."""
    from transformers import AutoTokenizer

    from jmllm.joint.testing import build_tiny_joint

    spec = importlib.util.spec_from_file_location(
        "generate_throughput", Path(__file__).with_name("generate_throughput.py")
    )
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    model = builder._full_size_model(device, torch.bfloat16, scale)
    tiny = build_tiny_joint(cache)
    tokenizer = AutoTokenizer.from_pretrained(tiny.llava)
    tokenizer.padding_side = "left"
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    model.llava.config.image_token_id = image_token  # prompts expand the tokenizer's <image>
    model.tokenizer = tokenizer
    model.owl_tokenizer = AutoTokenizer.from_pretrained(tiny.owl)
    return model


def _images(count: int, size: int) -> list[Any]:
    from jmllm.joint.testing import generated_images

    return generated_images(count, size=size, seed=7)


def measure(
    model: Any,
    images: list[Any],
    classes: list[str],
    loop_questions: int,
    max_new_tokens: int,
    batch_size: int | None,
) -> dict[str, Any]:
    """Time both paths on the same images; compare their answers."""
    from jmllm.joint.audit import AuditSettings, YesNoAuditor, ask_one_by_one

    device = model.device
    settings = AuditSettings(max_new_tokens=max_new_tokens)
    auditor = YesNoAuditor(model, settings, classes, batch_size=batch_size)
    pixels = settings.preprocessing  # the audit's (the authors'), as ask_one_by_one embeds
    auditor.ask(model.embed([images[0]], preprocessing=pixels).t, classes[:2])  # warm-up
    ask_one_by_one(model, images[0], classes[:1], settings)
    fast_seconds, loop_seconds, loop_count = 0.0, 0.0, 0
    fast_cpu, loop_cpu = 0.0, 0.0  # process CPU time: steadier than wall time on a busy machine
    mismatched, compared, worst_score = 0, 0, 0.0
    for image in images:
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fast = auditor.ask(model.embed([image], preprocessing=pixels).t, classes)
        _sync(device)
        fast_seconds += time.perf_counter() - start
        fast_cpu += time.process_time() - start_cpu
        subset = classes[:loop_questions]
        start, start_cpu = time.perf_counter(), time.process_time()
        loop = ask_one_by_one(model, image, subset, settings)
        _sync(device)
        loop_seconds += time.perf_counter() - start
        loop_cpu += time.process_time() - start_cpu
        loop_count += len(subset)
        for f, s in zip(fast, loop, strict=False):
            compared += 1
            mismatched += f.answer.token_ids.tolist() != s.answer.token_ids.tolist()
            worst_score = max(worst_score, abs(f.owl_score - s.owl_score))
    fast_rate = len(images) * len(classes) / fast_seconds
    loop_rate = loop_count / loop_seconds
    return {
        "images": len(images),
        "questions_per_image": len(classes),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size or "auto",
        "rows_per_batch": auditor.rows_per_batch(len(classes), _prompt_tokens(auditor, classes)),
        "fast": {
            "seconds": fast_seconds,
            "cpu_seconds": fast_cpu,
            "questions": len(images) * len(classes),
            "questions_per_s": fast_rate,
        },
        "loop": {
            "seconds": loop_seconds,
            "cpu_seconds": loop_cpu,
            "questions": loop_count,
            "questions_per_s": loop_rate,
        },
        "speedup": fast_rate / loop_rate,
        "speedup_cpu_time": (loop_cpu / loop_count) / (fast_cpu / (len(images) * len(classes))),
        "answers_compared": compared,
        "answers_differing": mismatched,
        "max_owl_score_abs_diff": worst_score,
    }


def _interval(ratios: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of per-repeat ratios with a t-interval (None with one repeat)."""
    from scipy import stats

    n = len(ratios)
    mean = sum(ratios) / n
    if n < 2:
        return {"mean": mean, "n": n, "ci95": None}
    sem = stats.sem(ratios)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sem)
    return {"mean": mean, "n": n, "ci95": [mean - half, mean + half]}


def measure_across_images(
    model: Any,
    images: list[Any],
    classes: list[str],
    questions_per_image: int,
    max_new_tokens: int,
    batch_size: int,
    repeats: int,
) -> dict[str, Any]:
    """The runner at batch 1 and at ``batch_size``, alternately, on the same POPE-style
    questions; the batched answers compared with the batch-1 ones."""
    from jmllm.joint.audit.benchmark import BenchmarkImage, BenchmarkSettings, run_benchmark

    settings = BenchmarkSettings("pope", max_new_tokens=max_new_tokens)
    jobs = [
        BenchmarkImage(
            image_id=str(i),
            source=lambda image=image: image,
            file=f"image-{i}",
            texts=tuple(
                f"Is there a {classes[(i * questions_per_image + q) % len(classes)]} in the image?"
                for q in range(questions_per_image)
            ),
            owl_classes=tuple(
                classes[(i * questions_per_image + q) % len(classes)]
                for q in range(questions_per_image)
            ),
        )
        for i, image in enumerate(images)
    ]
    device = model.device

    def timed(rows: int) -> tuple[float, float, Any]:
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        result = run_benchmark(model, jobs, None, settings, batch_size=rows, progress=False)
        _sync(device)
        return time.perf_counter() - start, time.process_time() - start_cpu, result

    timed(batch_size)  # warm-up (allocators, kernels)
    walls, cpus, wall_ratios, cpu_ratios = {1: [], batch_size: []}, {1: [], batch_size: []}, [], []
    differing = compared = 0
    load_before = os.getloadavg()
    for r in range(repeats):
        order = (1, batch_size) if r % 2 == 0 else (batch_size, 1)  # alternate: drift cancels
        results = {}
        for rows in order:
            wall, cpu, results[rows] = timed(rows)
            walls[rows].append(wall)
            cpus[rows].append(cpu)
        wall_ratios.append(walls[1][-1] / walls[batch_size][-1])
        cpu_ratios.append(cpus[1][-1] / cpus[batch_size][-1])
        for image_id, line in results[1].lines.items():
            batched = results[batch_size].lines[image_id]["answers"]
            for one, many in zip(line["answers"], batched, strict=True):
                compared += 1
                differing += one["tokens"] != many["tokens"]
    questions = len(images) * questions_per_image
    return {
        "images": len(images),
        "questions": questions,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "batch1": {
            "seconds": walls[1],
            "cpu_seconds": cpus[1],
            "questions_per_s": [questions / w for w in walls[1]],
        },
        "batched": {
            "seconds": walls[batch_size],
            "cpu_seconds": cpus[batch_size],
            "questions_per_s": [questions / w for w in walls[batch_size]],
        },
        "speedup_wall": _interval(wall_ratios),
        "speedup_cpu_time": _interval(cpu_ratios),
        "answers_compared": compared,
        "answers_differing": differing,
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        "cpu_count": os.cpu_count(),
    }


def toy_run(scenes: int, device: str | None, top_k: int | None) -> dict[str, Any]:
    """``sample-data`` then POPE and CHAIR with ``--tiny``, each command timed as a process."""
    import resource
    import subprocess

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def command(*args: str) -> dict[str, Any]:
        start, start_cpu = time.perf_counter(), children_cpu()
        child = [sys.executable, "-m", "jmllm.joint", *args]
        done = subprocess.run(child, capture_output=True, text=True, env={**os.environ})
        entry = {
            "command": " ".join(["jmllm-joint", *args]),
            "seconds": round(time.perf_counter() - start, 2),
            "cpu_seconds": round(children_cpu() - start_cpu, 2),  # the process's user + system
            "exit_code": done.returncode,
        }
        if done.returncode != 0:
            entry["stderr_tail"] = done.stderr.strip().splitlines()[-5:]
        return entry

    extra = [*(["--device", device] if device else []), *(["--top-k", str(top_k)] if top_k else [])]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="jmllm-toy-run-") as tmp:
        data, steps = Path(tmp) / "toy-data", {}
        steps["sample_data"] = command("sample-data", "--out", str(data), "-n", str(scenes))
        figures: dict[str, Any] = {}
        for benchmark in ("pope", "chair"):
            out = Path(tmp) / benchmark
            steps[benchmark] = command("hallucination-audit", "--tiny", "--benchmark", benchmark,
                                       "--data", str(data), "--out", str(out), *extra)  # fmt: skip
            if steps[benchmark]["exit_code"] == 0:
                doc = json.loads((out / "report.json").read_text())
                figures[benchmark] = {
                    "perception_vs_language": doc["perception_vs_language"],
                    "auroc_owl_predicts_truth": doc["auroc_owl_predicts_truth"],
                    **(
                        {
                            "pope": {
                                k: doc["pope"][k]
                                for k in ("random", "popular", "adversarial", "mean")
                            }
                        }
                        if benchmark == "pope"
                        else {
                            "chair": {k: doc["chair"][k] for k in ("chair_s", "chair_i", "recall")}
                        }
                    ),
                }
    return {
        "scenes": scenes,
        "steps": steps,
        "seconds_pope_and_chair": round(steps["pope"]["seconds"] + steps["chair"]["seconds"], 2),
        "cpu_seconds_pope_and_chair": round(
            steps["pope"]["cpu_seconds"] + steps["chair"]["cpu_seconds"], 2
        ),
        "figures": figures,
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        "cpu_count": os.cpu_count(),
    }


def _prompt_tokens(auditor: Any, classes: list[str]) -> int:
    return max(int(auditor.prompt(c)[0].numel()) for c in classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="full-size architectures, bf16, CUDA")
    parser.add_argument("--device", help="override the device (default: cuda with --gpu, else cpu)")
    parser.add_argument("--arch-scale", choices=("full", "small"), default="full")
    parser.add_argument("--images", type=int, default=None, help="images (CPU 3, GPU 4)")
    parser.add_argument("--loop-questions", type=int, default=None, help="loop questions/image")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer limit (16)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="questions per batch (default: auto)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cache", help="folder for the tiny checkpoints")
    parser.add_argument("--quick", action="store_true", help="one image, fewer loop questions")
    parser.add_argument("--json-out", help="also write the JSON result here")
    parser.add_argument(
        "--across-images",
        action="store_true",
        help="POPE/CHAIR's batching across images against batch 1 (see the module docstring)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="--across-images: repeats (5)")
    parser.add_argument(
        "--toy-run", action="store_true", help="time the toy world's POPE and CHAIR commands"
    )
    parser.add_argument("--scenes", type=int, default=100, help="--toy-run: scenes (100)")
    parser.add_argument("--top-k", type=int, help="--toy-run: gallery entries (the defaults)")
    parser.add_argument(
        "--questions-per-image", type=int, default=6, help="--across-images: POPE's 6"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from jmllm.joint.hallucination import COCO_OBJECTS

    if args.toy_run:
        if args.scenes < 1:
            parser.error("--scenes: must be at least 1")
        run = toy_run(args.scenes, args.device, args.top_k)
        _emit({"benchmark": "hallucination_toy_run", "torch": torch.__version__, **run},
              args.json_out)  # fmt: skip
        failed = [s for s in run["steps"].values() if s["exit_code"] != 0]
        return 1 if failed else 0
    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    if args.gpu and device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--gpu: no CUDA device is available (use --device cpu --arch-scale small)")
    for name in ("images", "loop_questions", "batch_size", "threads", "repeats",
                 "questions_per_image"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens: must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else Path(tempfile.gettempdir()) / "jmllm-bench-tiny"
    if args.gpu:
        model = _full_size_model(device, args.arch_scale, cache)
        mode = f"gpu-{args.arch_scale}-random-bf16"
        size = 640
    else:
        model = _tiny_model(cache)
        mode = "cpu-tiny"
        size = 96
    classes = list(COCO_OBJECTS)
    if args.across_images:
        count = args.images or (2 if args.quick else (8 if args.gpu else 16))
        batch = args.batch_size or 32
        across = measure_across_images(
            model,
            _images(count, size),
            classes,
            args.questions_per_image,
            args.max_new_tokens,
            batch,
            1 if args.quick else args.repeats,
        )
        report_across: dict[str, Any] = {
            "benchmark": "hallucination_benchmarks_across_images",
            "mode": mode,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "baseline": "run_benchmark --batch-size 1: one answer per generate call",
            **across,
            "target_3x": across["speedup_wall"]["mean"] >= 3,
        }
        if device.type == "cuda":
            report_across["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        _emit(report_across, args.json_out)
        return 0
    count = args.images or (1 if args.quick else (4 if args.gpu else 3))
    loop_questions = args.loop_questions or (8 if args.quick else 16)
    result = measure(
        model,
        _images(count, size),
        classes,
        min(loop_questions, len(classes)),
        args.max_new_tokens,
        args.batch_size,
    )
    report: dict[str, Any] = {
        "benchmark": "hallucination_audit",
        "mode": mode,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "baseline": "ask_one_by_one: re-embed per question, full prompt, greedy generate",
        **result,
        "target_10x": result["speedup"] >= 10,
    }
    if device.type == "cuda":
        report["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    _emit(report, args.json_out)
    return 0


def _emit(report: dict[str, Any], json_out: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if json_out:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
