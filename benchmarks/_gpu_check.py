"""The one-command GPU check (``./dev -s gpu``): the GPU benchmarks, one JSON.

On a machine with CUDA it runs, at full size with random weights (nothing is downloaded):

1. ``generate_throughput.py --gpu``: J beside stock LLaVA-1.5-7b, decode and prefill tokens/s,
   batch 1 and 16, bf16;
2. ``ga_saliency.py --gpu``: one GA explanation of a 20-token answer on full-size J, seconds per
   token after the norms;
3. ``align_train.py --gpu --quick``: W training images/s and model FLOP utilisation at the
   paper's setting, beside a straightforward fp32 loop;
4. ``hallucination_audit.py --across-images --gpu``: POPE/CHAIR's answers batched across images
   against one answer per ``generate`` call, full-size J, bf16;
5. ``hallucination_audit.py --toy-run --device cuda``: the toy world's POPE (three splits) and
   CHAIR commands end to end on the GPU — the benchmark data a device without network can reach
   (the real POPE files and COCO are not downloaded; ``docs/hallucination-audit.md`` gives the
   commands for a machine that has them).
6. ``family_check.py --gpu``: J on one published-shape model of every other family
   (LLaVA-NeXT-Mistral-7B, LLaVA-OneVision-0.5B, Qwen2-VL-2B, Qwen2.5-VL-3B): decode tokens/s
   beside the stock model, GA latency for a whole 20-token answer, peak memory.
7. ``faithfulness.py --gpu``: one real-shape faithfulness run — the seven methods of the report,
   deletion/insertion curves in ``t`` and pixels, pointing, the fully randomised model's maps.

Each runs in its own process under a time cap, all within ``--budget-seconds`` (default 450:
the whole check fits in 8 minutes on one H100/H200 with room to start the processes); one that
fails or runs out of time is recorded as such and the others still run. Without CUDA the same
code paths run at small scale on the CPU (``--arch-scale small`` / ``--full-path-on-cpu``;
default budget 1500 s, as a shared CPU can be slow), which checks the code, not the speed.

Writes one JSON object (stdout and ``--json-out``, default ``.bench/gpu.json``): the device, each
benchmark's status, seconds, command and full result, and a ``summary`` of the headline figures.
Exit code: 0 all ran, 3 some failed or timed out (partial), 1 none ran.

    python benchmarks/_gpu_check.py [--json-out PATH] [--budget-seconds 450] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# name: (script, arguments on CUDA, arguments for the small CPU check, share of the budget)
BENCHMARKS: dict[str, tuple[str, list[str], list[str], float]] = {
    "generate_throughput": (
        "generate_throughput.py",
        ["--gpu", "--repeats", "3"],
        ["--gpu", "--device", "cpu", "--arch-scale", "small", "--batches", "1,2",
         "--new-tokens", "4", "--repeats", "1"],
        0.18,
    ),
    "ga_saliency": (
        "ga_saliency.py",
        ["--gpu", "--tokens", "20"],
        ["--gpu", "--device", "cpu", "--arch-scale", "small", "--tokens", "4"],
        0.12,
    ),
    "align_train": (
        "align_train.py",
        ["--gpu", "--quick"],
        ["--full-path-on-cpu", "--quick"],
        0.18,
    ),
    "hallucination_batching": (
        "hallucination_audit.py",
        ["--across-images", "--gpu", "--images", "4", "--repeats", "3"],
        ["--across-images", "--gpu", "--device", "cpu", "--arch-scale", "small", "--quick",
         "--max-new-tokens", "4"],
        0.10,
    ),
    "hallucination_toy_run": (
        "hallucination_audit.py",
        ["--toy-run", "--device", "cuda", "--scenes", "40"],
        ["--toy-run", "--scenes", "8", "--top-k", "1"],
        0.07,
    ),
    "families": (
        "family_check.py",
        ["--gpu", "--new-tokens", "20", "--budget-seconds", "110"],
        ["--device", "cpu", "--arch-scale", "small", "--new-tokens", "3"],
        0.25,
    ),
    "faithfulness": (
        "faithfulness.py",
        ["--gpu"],
        ["--gpu", "--device", "cpu", "--arch-scale", "small"],
        0.10,
    ),
}  # fmt: skip


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figure of each benchmark that finished (None for the others)."""

    def get(name: str, *keys: str) -> Any:
        value: Any = results.get(name, {}).get("result")
        for key in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    return {
        "decode_ratio_joint_over_llava_batch1": get(
            "generate_throughput", "batch1", "decode_ratio_joint_over_llava"
        ),
        "joint_decode_fraction_of_ceiling_batch1": get(
            "generate_throughput", "batch1", "joint_decode_fraction_of_ceiling"
        ),
        "ga_seconds_per_token": get("ga_saliency", "explanation", "seconds_per_token_after_first"),
        "ga_norms_seconds": get("ga_saliency", "explanation", "norms_seconds"),
        "w_training_images_per_s": get("align_train", "trainer_images_per_s"),
        "w_training_mfu": get("align_train", "mfu"),
        "hallucination_batching_speedup": get("hallucination_batching", "speedup_wall", "mean"),
        "toy_pope_mean_f1": get("hallucination_toy_run", "figures", "pope", "pope", "mean", "f1"),
        "toy_chair_s": get("hallucination_toy_run", "figures", "chair", "chair", "chair_s"),
        "families": {
            name: {
                "decode_ratio_joint_over_stock": family.get("decode_ratio_joint_over_stock"),
                "ga_seconds_per_token": (family.get("ga") or {}).get("seconds_per_token"),
                "peak_memory_gb": family.get("peak_memory_gb"),
            }
            for name, family in (get("families", "families") or {}).items()
        },
        "faithfulness_seconds": get("faithfulness", "real_shape_run", "seconds"),
        "faithfulness_maps_finite": get("faithfulness", "real_shape_run", "finite"),
    }


def run_check(budget_seconds: float, cpu: bool, python: str = sys.executable) -> dict[str, Any]:
    """Run the benchmarks in child processes within the budget; the combined report."""
    import torch

    cuda = torch.cuda.is_available() and not cpu
    deadline = time.monotonic() + budget_seconds
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="jmllm-gpu-check-") as tmp:
        for name, (script, gpu_args, cpu_args, share) in BENCHMARKS.items():
            left = deadline - time.monotonic()
            cap = min(left, max(10.0, share * budget_seconds))
            out = Path(tmp) / f"{name}.json"
            command = [python, str(HERE / script), *(gpu_args if cuda else cpu_args)]
            command += ["--json-out", str(out)]
            entry: dict[str, Any] = {"command": " ".join(command[1:]), "cap_seconds": round(cap)}
            if left < 10:
                results[name] = {**entry, "status": "skipped", "reason": "budget spent"}
                continue
            start = time.monotonic()
            try:
                proc = subprocess.run(
                    command,
                    capture_output=True,
                    text=True,
                    timeout=cap,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            except subprocess.TimeoutExpired:
                entry.update(status="timed_out", seconds=round(time.monotonic() - start, 1))
                results[name] = entry
                continue
            entry["seconds"] = round(time.monotonic() - start, 1)
            if proc.returncode == 0 and out.is_file():
                entry.update(status="ok", result=json.loads(out.read_text()))
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                entry.update(status="failed", returncode=proc.returncode, stderr_tail=tail)
            results[name] = entry
    return {
        "check": "gpu",
        "mode": "cuda-full-size-random-weights" if cuda else "cpu-small-code-path-only",
        "device": torch.cuda.get_device_name(0) if cuda else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "budget_seconds": budget_seconds,
        "benchmarks": results,
        "summary": _summary(results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--json-out", default=str(HERE.parent / ".bench" / "gpu.json"), help="the JSON report"
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="all the benchmarks (default 450 with CUDA; 1500 for the CPU check)",
    )
    parser.add_argument("--cpu", action="store_true", help="the small CPU check even with CUDA")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    budget = args.budget_seconds if args.budget_seconds is not None else (450.0 if cuda else 1500.0)
    if not (budget > 0 and budget < float("inf")):
        parser.error(f"--budget-seconds: must be a finite number > 0, got {budget}")
    start = time.monotonic()
    report = run_check(budget, args.cpu)
    report["wall_seconds"] = round(time.monotonic() - start, 1)
    text = json.dumps(report, indent=2)
    print(text)
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, out)
    statuses = [b["status"] for b in report["benchmarks"].values()]
    if all(s == "ok" for s in statuses):
        return 0
    return 3 if "ok" in statuses else 1


if __name__ == "__main__":
    raise SystemExit(main())
