"""Faithfulness benchmark: batched deletion curves against the one-by-one loop, and the cost of
7 methods × 4 metrics on 100 toy scenes (DESIGN §5).

CPU (default), on the shipped toy world:

1. ``curves``: for each of ``--curve-targets`` explained words, one method's K-step deletion
   curve (K + 1 points) computed as one batched forward (:class:`CurveScorer`) and as the
   straightforward loop (one full forward of J per point, :func:`unbatched_log_probs`), in
   ``t`` and in pixels, timed in the same run, interleaved; the speed-up's mean with a 95 %
   bootstrap interval over the words, and the largest difference between the two curves.
2. ``run``: ``jmllm.joint.faithfulness.run_faithfulness`` on ``--scenes`` held-out scenes with
   the seven methods of the report (``ga``, ``gradient``, ``gradient_x_input``,
   ``integrated_gradients``, ``attention``, ``logit_lens``, ``random``) and its four metrics:
   deletion/insertion AUC on ``t``, the pointing game, MaxBoxAccV2 and the randomisation check
   (the fully randomised model's Spearman/SSIM); wall and CPU seconds, against the target of
   300 s. ``--full`` also times the command's default (every method, both spaces, the whole
   cascade, the randomised maps' curves) on the same scenes.

GPU (``--gpu``): one real-shape run — OWL-ViT B/32 and LLaVA-1.5-7b shapes, random weights (bf16
language model), the deep-MLP W — of every core method and metric on one image; with
``--device cpu --arch-scale small`` the same code path at small scale (an 8 × 8 patch grid, two
narrow decoder layers; a check of the code, not of speed).

The machine's load (``os.getloadavg``) is recorded beside every figure.

    python benchmarks/faithfulness.py [--quick] [--full] [--json-out PATH]
    python benchmarks/faithfulness.py --gpu [--device cpu --arch-scale small] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("faithfulness_bench")

CORE = ("ga", "gradient", "gradient_x_input", "integrated_gradients", "attention", "logit_lens",
        "random")  # fmt: skip
TARGET_SECONDS = 300.0
TARGET_SPEEDUP = 5.0


def _load() -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {"load_1min": one, "load_5min": five, "load_15min": fifteen, "cpus": os.cpu_count() or 0}


def _interval(values: list[float]) -> dict[str, Any]:
    from jmllm.joint.faithfulness.stats import bootstrap_ci

    ci = bootstrap_ci(values, n_resamples=2000, seed=0)
    return {
        "mean": float(np.mean(values)),
        "ci95": list(ci) if ci else None,
        "n": len(values),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def bench_curves(model: Any, targets: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Batched against one-by-one deletion curves of the plain-gradient map on toy words."""
    from jmllm.joint.faithfulness import CurveScorer, ToySource
    from jmllm.joint.faithfulness.metrics import unbatched_log_probs
    from jmllm.joint.saliency.attribution import get_method, prepare_request

    source = ToySource(scenes=targets * 2, seed=seed)
    method = get_method("gradient", model)
    out: dict[str, Any] = {"steps": steps, "points": steps + 1, "method": "gradient"}
    requests = []
    for item in source.items:
        emb = model.embed([item.load()])
        truths, _ = source.targets(model, emb, item)
        for truth in truths[:1]:
            requests.append(
                prepare_request(
                    model,
                    emb,
                    source.prompt,
                    truth.target,
                    truth.answer,
                    queries=truth.queries,
                    template=source.template,
                    occurrence=truth.occurrence,
                )
            )
        if len(requests) >= targets:
            break
    for space in ("t", "pixels"):
        scorer = CurveScorer(model, steps=steps, spaces=(space,))
        ratios, wall_b, wall_u, cpu_b, cpu_u, diffs = [], [], [], [], [], []
        first = requests[0]
        first_masks = scorer.masks(first, method.attribute_request(first))[1]
        scorer.log_probs(first, space, first_masks)  # warm-up
        for request in requests:
            _, masks = scorer.masks(request, method.attribute_request(request))
            w, c = time.perf_counter(), time.process_time()
            batched = scorer.log_probs(request, space, masks)
            wb, cb = time.perf_counter() - w, time.process_time() - c
            w, c = time.perf_counter(), time.process_time()
            loop = unbatched_log_probs(model, request, space, masks)
            wu, cu = time.perf_counter() - w, time.process_time() - c
            ratios.append(wu / wb)
            wall_b.append(wb)
            wall_u.append(wu)
            cpu_b.append(cb)
            cpu_u.append(cu)
            diffs.append(float(np.abs(np.exp(batched) - np.exp(loop)).max()))
        out[space] = {
            "batched_seconds": _interval(wall_b),
            "loop_seconds": _interval(wall_u),
            "batched_cpu_seconds": _interval(cpu_b),
            "loop_cpu_seconds": _interval(cpu_u),
            "speedup": _interval(ratios),
            "speedup_cpu": float(np.sum(cpu_u) / np.sum(cpu_b)),
            "max_probability_difference": max(diffs),
            "targets": {"at_least_5x": float(np.mean(ratios)) >= TARGET_SPEEDUP},
            "batch_scaling": _batch_scaling(scorer, first, space, first_masks),
            "load_after": _load(),
        }
    return out


def _batch_scaling(scorer: Any, request: Any, space: str, masks: np.ndarray) -> dict[str, Any]:
    """What batching can gain on this model and machine: the batched path's time for one row
    and for all K + 1 rows of a curve (median of 7, interleaved). ``bound`` = (K + 1) × one
    row's time / all rows' time is the largest speed-up one batched forward can give over the
    same path run a row at a time; near 1 when the arithmetic, not the per-call cost, dominates
    a forward."""
    one, every = [], []
    for _ in range(7):
        w = time.perf_counter()
        scorer.log_probs(request, space, masks[:1])
        one.append(time.perf_counter() - w)
        w = time.perf_counter()
        scorer.log_probs(request, space, masks)
        every.append(time.perf_counter() - w)
    t1, tk = float(np.median(one)), float(np.median(every))
    rows = int(masks.shape[0])
    return {
        "rows": rows,
        "seconds_one_row": t1,
        "seconds_all_rows": tk,
        "seconds_per_row_batched": tk / rows,
        "bound": rows * t1 / tk,
    }


def bench_run(model: Any, scenes: int, settings: Any, label: str) -> dict[str, Any]:
    from jmllm.joint.faithfulness import ToySource, run_faithfulness
    from jmllm.joint.faithfulness.report import summarise

    before = _load()
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_faithfulness(model, ToySource(scenes=scenes), None, settings, progress=False)
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    summary = summarise(result, resamples=1000)
    headline = {
        m: {k: round(v["value"], 4) for k, v in row.items()}
        for m, row in summary["methods"].items()
    }
    return {
        "label": label,
        "settings": settings.to_dict(),
        "scenes": scenes,
        "targets": result.targets,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "seconds_per_target": seconds / max(1, result.targets),
        "threads": torch.get_num_threads(),
        "load_before": before,
        "load_after": _load(),
        "targets_met": {"at_most_300s": seconds <= TARGET_SECONDS},
        "values": headline,
    }


def bench_gpu(device: torch.device, scale: str) -> dict[str, Any]:
    """Every core method and metric on one image, real shapes (random weights)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ga_saliency import _b32_owl
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from jmllm.align import AlignmentLayer, alignment_config_for
    from jmllm.align.testing import llava_1_5_7b_config
    from jmllm.joint import JointModel
    from jmllm.joint.chat import JointAnswer
    from jmllm.joint.faithfulness import CurveScorer, RandomisationCascade
    from jmllm.joint.faithfulness.metrics import pointing, spearman, ssim
    from jmllm.joint.saliency import answer_tokens
    from jmllm.joint.saliency.attribution import make_methods
    from jmllm.joint.saliency.attribution.base import Request
    from jmllm.joint.toy import toy_paths

    owl = _b32_owl(device) if scale == "full" else _small_owl(device)
    side = int(owl.config.vision_config.image_size)
    llava_config = llava_1_5_7b_config()
    w_overrides: dict[str, Any] = {}
    if scale == "small":  # the same code path, small enough for a CPU check
        llava_config.vision_config.update({"num_hidden_layers": 1, "hidden_size": 64})
        llava_config.vision_config.update({"intermediate_size": 128, "num_attention_heads": 2})
        llava_config.vision_config.update({"image_size": 112, "patch_size": 14})  # OWL's 8 × 8
        llava_config.text_config.update({"num_hidden_layers": 2, "hidden_size": 128})
        llava_config.text_config.update({"intermediate_size": 256, "num_attention_heads": 4})
        llava_config.text_config.update({"num_key_value_heads": 4})
        w_overrides = {"hidden_dim": 128}
    dtype = torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16: no fp32 copy of 7 B weights
    try:
        with torch.device(device):
            torch.manual_seed(0)
            llava = LlavaForConditionalGeneration(llava_config)
            w = AlignmentLayer(
                alignment_config_for(owl.config, llava_config, "deep-mlp", **w_overrides)
            )
    finally:
        torch.set_default_dtype(previous)
    # offline: the toy world's tokenizer decodes the answer (its ids fit any vocabulary)
    tokenizer = AutoTokenizer.from_pretrained(toy_paths().llava)
    model = JointModel(owl, llava, w.to(device=device, dtype=dtype), tokenizer=tokenizer)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, owl.config.projection_dim, generator=gen).to(device)
    model.encode_queries = lambda names, template=None: query  # type: ignore[method-assign,assignment]
    image = torch.randint(0, 256, (3, side, side), generator=gen, dtype=torch.uint8)
    emb = model.embed([image])
    text = torch.randint(5, 250, (24,), generator=gen)
    prompt_ids = torch.cat(
        [torch.ones(1, dtype=torch.long), text[:4],
         torch.full((model.num_image_tokens,), llava.config.image_token_id), text[4:]]
    )  # fmt: skip
    answer_ids = torch.randint(5, 250, (8,), generator=gen)
    decoded, tokens = answer_tokens(tokenizer, answer_ids)
    answer = JointAnswer(decoded, answer_ids, prompt_ids, "question", True)
    request = Request(
        t=emb.t.detach(), image_size=emb.image_sizes[0], emb=emb, prompt="question",
        template="llava-1.5", answer=answer, target=[7], occurrence=0, positions=[7],
        label=tokens[7].text, tokens=[tokens[7]], answer_text=decoded, queries=["object"],
    )  # fmt: skip
    timings: dict[str, float] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps = 16 if scale == "full" else 4  # the small CPU check: the same path, fewer points
    start = time.perf_counter()
    methods = make_methods(CORE, model, ig_steps=steps, batch_size=4)
    maps = {}
    for name, method in methods.items():
        t0 = time.perf_counter()
        maps[name] = method.attribute_request(request)
        sync()
        timings[f"attribute_{name}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    curves = CurveScorer(model, steps=steps, batch_size=8).curves(request, maps)
    sync()
    timings["curves_t_and_pixels"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    box = np.array([[0.25, 0.25, 0.65, 0.65]]) * side
    points = {n: pointing(a.map((224, 224)), box * 224 / side) for n, a in maps.items()}
    cascade = RandomisationCascade(model, cascade="final")
    similarity = {}
    for _, randomised in cascade.stages():
        for name, method in methods.items():
            other = method.bound_to(randomised).attribute_request(request).map((224, 224))
            mine = maps[name].map((224, 224))
            similarity[name] = {"spearman": spearman(mine, other), "ssim": ssim(mine, other)}
    sync()
    timings["cascade_final_and_localisation"] = time.perf_counter() - t0
    result: dict[str, Any] = {
        "scale": scale,
        "steps": steps,
        "methods": list(CORE),
        "seconds": time.perf_counter() - start,
        "timings": timings,
        "deletion_auc_t": {n: curves.auc("t", "deletion", n) for n in maps},
        "insertion_auc_pixels": {n: curves.auc("pixels", "insertion", n) for n in maps},
        "pointing": points,
        "randomisation": similarity,
        "finite": all(np.isfinite(a.map()).all() for a in maps.values()),
        "llm_dtype": "bfloat16",
    }
    if device.type == "cuda":
        result["peak_cuda_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def _small_owl(device: torch.device) -> Any:
    """OWL-ViT's classes at a small scale for the CPU check: 256 px, patch 32 (an 8 × 8 grid),
    two narrow layers."""
    from transformers import OwlViTForObjectDetection

    from jmllm.align.testing import owlvit_b32_config

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ga_saliency import _calibrate_heads

    config = owlvit_b32_config()
    config.vision_config.update({"num_hidden_layers": 2, "hidden_size": 64})
    config.vision_config.update({"intermediate_size": 128, "num_attention_heads": 2})
    config.vision_config.update({"image_size": 256, "patch_size": 32})
    config.text_config.update({"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128})
    config.projection_dim = 64
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    owl = OwlViTForObjectDetection(config).to(device)
    _calibrate_heads(owl)
    return owl.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 scenes, 4 curve targets")
    parser.add_argument("--scenes", type=int, default=None, help="toy scenes of the run (100)")
    parser.add_argument("--curve-targets", type=int, default=None, help="words timed (10)")
    parser.add_argument("--steps", type=int, default=16, help="curve steps K (16)")
    parser.add_argument("--full", action="store_true", help="also time the command's defaults")
    parser.add_argument("--gpu", action="store_true", help="one real-shape run (CUDA)")
    parser.add_argument("--device", help="override the device (default: cuda with --gpu)")
    parser.add_argument("--arch-scale", choices=("full", "small"), default="full")
    parser.add_argument("--json-out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict[str, Any] = {
        "benchmark": "faithfulness",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_at_start": _load(),
    }
    if args.gpu:
        device = torch.device(args.device or "cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--gpu: no CUDA device is available (try --device cpu --arch-scale small)")
        report["mode"] = f"gpu-{args.arch_scale}"
        if device.type == "cuda":
            report["device"] = torch.cuda.get_device_name(device)
        report["real_shape_run"] = bench_gpu(device, args.arch_scale)
    else:
        from jmllm.joint.faithfulness import FaithfulnessSettings
        from jmllm.joint.toy import load_toy_joint

        report["mode"] = "cpu-toy-world"
        scenes = args.scenes or (10 if args.quick else 100)
        curve_targets = args.curve_targets or (4 if args.quick else 10)
        model = load_toy_joint()
        logger.info("curves: batched against one by one (%d words)...", curve_targets)
        report["curves"] = bench_curves(model, curve_targets, args.steps)
        core = FaithfulnessSettings(
            methods=CORE, steps=args.steps, spaces=("t",), cascade="final", separation=False
        )
        logger.info("run: 7 methods x 4 metrics on %d toy scenes...", scenes)
        report["run"] = bench_run(model, scenes, core, "7 methods x 4 metrics")
        if args.full:
            logger.info("run: the command's defaults on %d toy scenes...", scenes)
            report["full_run"] = bench_run(model, scenes, FaithfulnessSettings(), "defaults")
    report["load_at_end"] = _load()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
