"""J on every MLLM family at the published shapes: tokens/s beside the stock model, GA latency
for a whole answer, peak memory (the family part of ``./dev -s gpu``).

GPU (``--gpu``): for each family (default the four beside LLaVA-1.5, which the other GPU
benchmarks cover: LLaVA-NeXT-Mistral-7B, LLaVA-OneVision-0.5B, Qwen2-VL-2B, Qwen2.5-VL-3B), J
is built on the card in bfloat16 at the published configuration, full depth, random weights
(nothing is downloaded), with OWL-ViT B/32 and the paper's deep-MLP W; then

- J's and the stock model's generation on the same image and prompt, batch 1: prefill seconds
  and decode tokens/s (``--new-tokens`` new tokens; decode = tokens after the first over the
  time after the first), and their ratio;
- GA for the whole answer (``explain_answer``: norms once, then one LLM backward and one JVP per
  token), seconds in all and per token;
- the peak GPU memory of the family.

Families run one after another, each freed before the next, within ``--budget-seconds``; one
that cannot start in the time left is recorded as skipped. Without ``--gpu`` (or with
``--device cpu --arch-scale small``) the same code runs on the tiny offline checkpoint of each
family: a check of the code, not of speed.

    python benchmarks/family_check.py --gpu [--families qwen2_vl,llava_next] [--json-out PATH]
    python benchmarks/family_check.py --device cpu --arch-scale small
"""

from __future__ import annotations

import argparse
import gc
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

logger = logging.getLogger("family_check")

DEFAULT_FAMILIES = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
PROMPT = "What's the content of the image?"
FALLBACK_ANSWER = "The image shows a bird on a branch."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    from jmllm.align.testing import peak_rss_mb

    return peak_rss_mb() / 1e3


def _build(family: str, device: torch.device, scale: str, cache: Path) -> Any:
    if scale == "small":
        from jmllm.joint.testing import tiny_family_joint_model

        return tiny_family_joint_model(cache, family, device=str(device))
    from jmllm.joint.testing import real_shape_joint

    return real_shape_joint(
        family,
        text_layers=None,
        vision_layers=None,
        w_hidden=8192,
        w_layers=2,
        device=device,
        dtype=torch.bfloat16,
    )


def _timed_generate(model: Any, emb: Any, vision: str, tokens: int, device: torch.device) -> Any:
    _sync(device)
    start = time.perf_counter()
    answer = model.generate(emb, PROMPT, max_new_tokens=tokens, vision=vision)[0]
    _sync(device)
    return answer, time.perf_counter() - start


def bench_family(
    family: str, device: torch.device, scale: str, new_tokens: int, cache: Path
) -> dict[str, Any]:
    """One family's figures (see the module docstring)."""
    from jmllm.align.testing import generated_images
    from jmllm.joint.saliency import GradientAlignment

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = _build(family, device, scale, cache)
    build_seconds = time.perf_counter() - start
    image = generated_images(1, size=256, seed=7)[0]
    emb = model.embed([image])
    out: dict[str, Any] = {
        "family": family,
        "model": model.sources.get("llava"),
        "image_tokens": model.num_image_tokens,
        "layout": model.family.layout.describe(),
        "build_seconds": round(build_seconds, 2),
    }
    for vision in ("joint", "stock"):
        _timed_generate(model, emb, vision, 2, device)  # warm-up (kernels, caches)
        _, prefill = _timed_generate(model, emb, vision, 1, device)
        answer, total = _timed_generate(model, emb, vision, new_tokens, device)
        decoded = max(answer.tokens - 1, 0)
        out[vision] = {
            "prefill_seconds": round(prefill, 4),
            "new_tokens": answer.tokens,
            "decode_tokens_per_s": round(decoded / max(total - prefill, 1e-9), 2)
            if decoded
            else None,
        }
        if vision == "joint":
            joint_answer = answer
    j, s = out["joint"]["decode_tokens_per_s"], out["stock"]["decode_tokens_per_s"]
    out["decode_ratio_joint_over_stock"] = round(j / s, 3) if j and s else None
    ga = GradientAlignment(model)
    _sync(device)
    start = time.perf_counter()
    # the generated answer; teacher-forced text when the random weights stopped at once
    answer = joint_answer if joint_answer.tokens else FALLBACK_ANSWER
    explanation = ga.explain_answer(emb, PROMPT, ["object"], answer=answer)
    _sync(device)
    seconds = time.perf_counter() - start
    explained = len(explanation.tokens)
    out["ga"] = {
        "answer_tokens": explained,
        "seconds": round(seconds, 3),
        "seconds_per_token": round(seconds / max(explained, 1), 4),
    }
    out["peak_memory_gb"] = round(_peak_memory_gb(device), 2)
    del model, ga, explanation, emb
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="published shapes on CUDA, bf16")
    parser.add_argument("--device", help="override the device (default: cuda with --gpu)")
    parser.add_argument("--arch-scale", choices=("full", "small"), default=None)
    parser.add_argument(
        "--families",
        default=None,
        help=f"comma-separated model types (default {','.join(DEFAULT_FAMILIES)}; "
        "the small check: every family)",
    )
    parser.add_argument("--new-tokens", type=int, default=20, help="answer length (20)")
    parser.add_argument("--budget-seconds", type=float, default=float("inf"))
    parser.add_argument("--cache", help="folder for the tiny checkpoints (small scale)")
    parser.add_argument("--json-out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from jmllm.joint.model.families import FAMILIES

    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--gpu: no CUDA device is available (try --device cpu --arch-scale small)")
    scale = args.arch_scale or ("full" if device.type == "cuda" else "small")
    default = DEFAULT_FAMILIES if scale == "full" else tuple(FAMILIES)
    families = args.families.split(",") if args.families else list(default)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)} (known: {', '.join(FAMILIES)})")
    if args.new_tokens < 2:
        parser.error("--new-tokens: at least 2 (decode speed needs tokens after the first)")
    cache = Path(args.cache) if args.cache else Path(tempfile.gettempdir()) / "jmllm-bench-tiny"
    deadline = time.monotonic() + args.budget_seconds
    results: dict[str, Any] = {}
    for family in families:
        if time.monotonic() > deadline:
            results[family] = {"status": "skipped", "reason": "budget spent"}
            continue
        logger.info("%s ...", family)
        try:
            results[family] = {
                "status": "ok",
                **bench_family(family, device, scale, args.new_tokens, cache),
            }
        except torch.cuda.OutOfMemoryError as exc:  # one family too large for the card
            results[family] = {"status": "failed", "error": str(exc).splitlines()[0]}
            gc.collect()
            torch.cuda.empty_cache()
    report = {
        "benchmark": "family_check",
        "mode": f"{device.type}-{scale}",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
        "families": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        os.replace(tmp, out)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 3


if __name__ == "__main__":
    raise SystemExit(main())
