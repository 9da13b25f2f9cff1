"""GA saliency benchmark: the fast exact method beside the naive autograd loop (DESIGN §5).

CPU (default): OWL-ViT B/32 shapes, random weights, one query, float32. Times the fast method for
all 576 × 5 outputs (norms once + one JVP) and the naive method (one ``torch.autograd.grad`` per
output through the modules' own forward) on a sample of outputs, extrapolated to all of them, in
the same run; reports their ratio, the maximum relative error on the sample (against the naive
float32 loop and against a float64 naive reference), and the peak resident memory. Then the cost
of explaining a 20-token answer with ``explain_answer`` (norms once) against 20 separate
single-token ``attribute`` calls, on the tiny J.

GPU (``--gpu``): one full explanation with full-size LLaVA-1.5-7b (bf16) + OWL-ViT B/32 (fp32) +
the paper's deep-MLP W, random weights: norms once, then per token one LLM backward + one JVP.

    python benchmarks/ga_saliency.py [--quick] [--json-out PATH]
    python benchmarks/ga_saliency.py --gpu [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

logger = logging.getLogger("ga_saliency")


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS)
    scale = 1 / 1024 / 1024 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate_heads(owl: Any) -> None:
    """Rescale the detection heads to a 1/sqrt(fan-in) init, as ``jmllm.joint.testing`` does:
    default-initialised heads saturate (logits ~1e4), unlike any trained OWL-ViT."""
    heads = [owl.box_head.dense0, owl.box_head.dense1, owl.box_head.dense2]
    heads += [owl.class_head.dense0, owl.class_head.logit_shift, owl.class_head.logit_scale]
    with torch.no_grad():
        for linear in heads:
            linear.weight.mul_(linear.weight.shape[1] ** -0.5)


def _b32_owl(device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import OwlViTForObjectDetection

    from jmllm.align.testing import owlvit_b32_config

    config = owlvit_b32_config()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    owl = OwlViTForObjectDetection(config).to(device=device, dtype=dtype)
    _calibrate_heads(owl)
    return owl.eval().requires_grad_(False)


def bench_norms(sample_size: int, chunk_size: int | None) -> dict[str, Any]:
    """Fast (all outputs) vs naive (sampled, extrapolated) on B/32 shapes, float32 CPU."""
    from jmllm.align.features import owl_penultimate
    from jmllm.joint.saliency import OwlHeadGradients, naive_owl_gradients

    device = torch.device("cpu")
    owl = _b32_owl(device)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 768, 768, generator=gen)
    with torch.no_grad():
        t = owl_penultimate(owl, pixels)  # (1, 577, 768), a realistic t
    query = torch.randn(1, 512, generator=gen)
    query = query / query.norm(dim=-1, keepdim=True)
    g_llm = torch.randn(t.shape, generator=gen)

    heads = OwlHeadGradients(owl, t, query)
    N, C = heads.num_patches, heads.num_channels
    start = time.perf_counter()
    norms = heads.gradient_norms(chunk_size=chunk_size)
    norms_seconds = time.perf_counter() - start
    start = time.perf_counter()
    numerators = heads.numerators(g_llm)
    jvp_seconds = time.perf_counter() - start
    fast_seconds = norms_seconds + jvp_seconds

    picks = torch.randperm(N * C, generator=gen)[:sample_size].tolist()
    sample = [(i // C, i % C) for i in picks]
    start = time.perf_counter()
    naive_norms, naive_nums = naive_owl_gradients(owl, t, query, sample, g_llm)
    assert naive_nums is not None
    naive_sample_seconds = time.perf_counter() - start
    per_output = naive_sample_seconds / sample_size
    naive_extrapolated = per_output * N * C

    owl64 = owl.double()
    ref_norms, ref_nums = naive_owl_gradients(
        owl64, t.double(), query.double(), sample, g_llm.double()
    )
    assert ref_nums is not None
    fast_norms = torch.stack([norms[k, c] for k, c in sample]).double()
    fast_nums = torch.stack([numerators[k, c] for k, c in sample]).double()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b).abs() / b.abs().clamp(min=1e-30)).max())

    nums_scale = float(ref_nums.abs().max())
    return {
        "shapes": {"patches": N, "channels": C, "hidden": t.shape[-1], "queries": 1},
        "fast_seconds": fast_seconds,
        "fast_norms_seconds": norms_seconds,
        "fast_jvp_seconds": jvp_seconds,
        "naive_sample_size": sample_size,
        "naive_sample_seconds": naive_sample_seconds,
        "naive_seconds_per_output": per_output,
        "naive_extrapolated_seconds": naive_extrapolated,
        "extrapolation": f"{per_output:.4f} s/output x {N * C} outputs",
        "speedup": naive_extrapolated / fast_seconds,
        "max_rel_err_norms_fast_vs_naive32": rel(fast_norms, naive_norms.double()),
        "max_rel_err_norms_fast_vs_naive64": rel(fast_norms, ref_norms),
        "max_rel_err_norms_naive32_vs_naive64": rel(naive_norms.double(), ref_norms),
        "max_err_numerators_fast_vs_naive32_rel_to_max": float(
            (fast_nums - naive_nums.double()).abs().max()
        )
        / max(float(naive_nums.abs().max()), 1e-30),
        "max_err_numerators_fast_vs_naive64_rel_to_max": float((fast_nums - ref_nums).abs().max())
        / max(nums_scale, 1e-30),
        "peak_rss_mb": _peak_rss_mb(),
        "targets": {"speedup_at_least_20x": naive_extrapolated / fast_seconds >= 20},
    }


def bench_all_tokens(cache: Path, tokens: int) -> dict[str, Any]:
    """``explain_answer`` (norms once) vs ``tokens`` separate ``attribute`` calls, tiny J."""
    from jmllm.joint.saliency import GradientAlignment
    from jmllm.joint.testing import generated_images, tiny_joint_model

    model = tiny_joint_model(cache)
    image = generated_images(1, size=96, seed=5)[0]
    question = "What's the content of the image?"
    text = "The cat is sitting on the couch in a living room with red curtains and pillows. " * 3
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    answer = SimpleNamespace(
        prompt_ids=model.prompt_inputs(question)["input_ids"][0].cpu(),
        token_ids=torch.tensor(ids),
    )
    emb = model.embed([image])
    start = time.perf_counter()
    GradientAlignment(model).explain_answer(emb, question, ["cat"], answer=answer)
    all_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(tokens):  # a fresh object each time: nothing is shared between the calls
        GradientAlignment(model).attribute(emb, question, i, ["cat"], answer=answer)
    separate_seconds = time.perf_counter() - start
    return {
        "model": "tiny J (jmllm.joint.testing)",
        "answer_tokens": tokens,
        "explain_answer_seconds": all_seconds,
        "separate_attribute_seconds": separate_seconds,
        "speedup": separate_seconds / all_seconds,
    }


def bench_gpu(device: torch.device, tokens: int, scale: str) -> dict[str, Any]:
    """One full explanation on full-size random-weight J: norms once + per-token terms."""
    from transformers import LlavaForConditionalGeneration

    from jmllm.align import AlignmentLayer, alignment_config_for
    from jmllm.align.testing import llava_1_5_7b_config
    from jmllm.joint import JointModel
    from jmllm.joint.saliency import GradientAlignment

    owl = _b32_owl(device) if scale == "full" else _small_owl(device)
    llava_config = llava_1_5_7b_config()
    w_overrides: dict[str, Any] = {}
    if scale == "small":  # same code path, small enough for a CPU check of this function
        llava_config.vision_config.update({"num_hidden_layers": 1, "hidden_size": 64})
        llava_config.vision_config.update({"intermediate_size": 128, "num_attention_heads": 2})
        llava_config.text_config.update({"num_hidden_layers": 2, "hidden_size": 128})
        llava_config.text_config.update({"intermediate_size": 256, "num_attention_heads": 4})
        llava_config.text_config.update({"num_key_value_heads": 4})
        w_overrides = {"hidden_dim": 128}
    dtype = torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16: no fp32 copy of 7 B weights
    try:
        with torch.device(device):
            torch.manual_seed(0)
            llava = LlavaForConditionalGeneration(llava_config)
            w = AlignmentLayer(
                alignment_config_for(owl.config, llava_config, "deep-mlp", **w_overrides)
            )
    finally:
        torch.set_default_dtype(previous)
    model = JointModel(owl, llava, w.to(device=device, dtype=dtype))
    gen = torch.Generator().manual_seed(0)
    config = llava.config
    vocab = min(config.text_config.vocab_size, 32000)
    text = torch.randint(3, vocab, (24,), generator=gen)
    prompt_ids = torch.cat(
        [
            torch.ones(1, dtype=torch.long),
            text[:4],
            torch.full((model.num_image_tokens,), config.image_token_id),
            text[4:],
        ]
    )
    answer_ids = torch.randint(3, vocab, (tokens,), generator=gen)
    pixels = torch.randn(1, 3, 768, 768, generator=gen).to(device)
    from jmllm.align.features import owl_penultimate

    with torch.no_grad():
        t = owl_penultimate(owl, pixels)
    ga = GradientAlignment(model)
    query = torch.randn(1, owl.config.projection_dim, generator=gen).to(device)
    # no OWL-ViT tokenizer offline: a random query embedding stands in for the text model
    model.encode_queries = lambda names, template=None: query  # type: ignore[method-assign,assignment]
    _sync(device)
    start = time.perf_counter()
    prepared = ga.prepare(t, (768, 768), ["object"], "a photo of a {}")
    ga.norms(prepared)
    _sync(device)
    norms_seconds = time.perf_counter() - start
    start = time.perf_counter()
    grads = ga.llm_gradients(t, prompt_ids, answer_ids, [[i] for i in range(tokens)])
    for g in grads:
        prepared.heads.numerators(g)
    _sync(device)
    token_seconds = time.perf_counter() - start
    result = {
        "scale": scale,
        "answer_tokens": tokens,
        "norms_seconds": norms_seconds,
        "tokens_seconds": token_seconds,
        "seconds_per_token_after_first": token_seconds / tokens,
        "llm_dtype": "bfloat16",
        "owl_dtype": "float32",
    }
    if device.type == "cuda":
        result["peak_cuda_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        result["targets"] = {"at_most_1s_per_token": token_seconds / tokens <= 1.0}
    return result


def _small_owl(device: torch.device) -> Any:
    from transformers import OwlViTForObjectDetection

    from jmllm.align.testing import owlvit_b32_config

    config = owlvit_b32_config()
    config.vision_config.update({"num_hidden_layers": 2, "hidden_size": 64})
    config.vision_config.update({"intermediate_size": 128, "num_attention_heads": 2})
    config.vision_config.update({"image_size": 768, "patch_size": 32})
    config.text_config.update({"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128})
    config.projection_dim = 64
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    owl = OwlViTForObjectDetection(config).to(device)
    _calibrate_heads(owl)
    return owl.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="full-size J, bf16 LLM, CUDA")
    parser.add_argument("--device", help="override the device (default: cuda with --gpu)")
    parser.add_argument("--arch-scale", choices=("full", "small"), default="full")
    parser.add_argument("--quick", action="store_true", help="smaller naive sample")
    parser.add_argument("--sample", type=int, default=None, help="naive outputs timed (12)")
    parser.add_argument("--chunk-size", type=int, default=None, help="patches per norm batch")
    parser.add_argument("--tokens", type=int, default=20, help="answer tokens for --all cost")
    parser.add_argument("--cache", help="folder for the tiny checkpoints")
    parser.add_argument("--json-out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict[str, Any] = {
        "benchmark": "ga_saliency",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if args.gpu:
        device = torch.device(args.device or "cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--gpu: no CUDA device is available (try --device cpu --arch-scale small)")
        report["mode"] = f"gpu-{args.arch_scale}"
        if device.type == "cuda":
            report["device"] = torch.cuda.get_device_name(device)
        report["explanation"] = bench_gpu(device, args.tokens, args.arch_scale)
    else:
        report["mode"] = "cpu-b32-float32"
        sample = args.sample or (4 if args.quick else 12)
        logger.info("norms: fast (all outputs) vs naive (%d sampled outputs)...", sample)
        report["norms"] = bench_norms(sample, args.chunk_size)
        cache = Path(args.cache) if args.cache else Path(tempfile.gettempdir()) / "jmllm-bench-tiny"
        logger.info("explain_answer vs %d separate calls (tiny J)...", args.tokens)
        report["all_tokens"] = bench_all_tokens(cache, args.tokens)
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
