"""Generation throughput of J beside stock LLaVA-1.5, in the same run (DESIGN §5).

For batch 1 and batch 16, both systems answer the same prompts with greedy decoding and a fixed
answer length (EOS suppressed with ``min_new_tokens``):

- **J**: OWL-ViT to the penultimate layer (``t``) + W + LLaVA's language model through
  ``inputs_embeds`` — what :meth:`jmllm.joint.JointModel.generate` runs.
- **stock LLaVA**: ``LlavaForConditionalGeneration.generate(input_ids, pixel_values)`` — its own
  CLIP tower and projector.

Every generation step is timestamped by a no-op stopping criterion: prefill is the time to the
first token (for J including OWL-ViT + W, for LLaVA including its CLIP tower), decode the mean
time of the following steps; prefill tokens/s = prompt tokens / prefill time, decode tokens/s =
batch / step time (medians over repeats, after a warm-up run). Reported:
J/LLaVA decode and prefill ratios, the OWL-ViT + W time and its share of a whole answer at
batch 1, and (GPU) the batch-1 decode rate against the memory-bandwidth ceiling
(bandwidth / bytes of the language model's weights).

Modes:
- default (CPU): the tiny offline checkpoints of :mod:`jmllm.joint.testing`.
- ``--gpu``: full-size OWL-ViT B/32 and LLaVA-1.5-7b architectures with random bf16 weights
  (``owlvit_b32_config()``, ``llava_1_5_7b_config()``, a paper-size deep-mlp W); nothing is
  downloaded. ``--arch-scale small`` shrinks those architectures to check the GPU code path on a
  CPU.

Usage:
    python benchmarks/generate_throughput.py --quick
    python benchmarks/generate_throughput.py --gpu --json-out .bench/generate_throughput.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("generate_throughput")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ models
def _tiny_model(cache: Path) -> Any:
    from jmllm.joint.testing import tiny_joint_model

    return tiny_joint_model(cache, device="cpu")


def _full_size_model(device: torch.device, dtype: torch.dtype, scale: str) -> Any:
    """J with the real architectures and random weights (no download, no tokenizer needed)."""
    from transformers import LlavaForConditionalGeneration, OwlViTForObjectDetection

    from jmllm.align import AlignmentLayer, alignment_config_for
    from jmllm.align.testing import llava_1_5_7b_config, owlvit_b32_config
    from jmllm.joint import JointModel

    owl_config, llava_config = owlvit_b32_config(), llava_1_5_7b_config()
    w_overrides: dict[str, Any] = {}
    if scale == "small":  # same code path, small enough for a CPU check
        owl_config.vision_config.update({"num_hidden_layers": 2, "intermediate_size": 256})
        owl_config.vision_config.update({"hidden_size": 64, "num_attention_heads": 2})
        owl_config.vision_config.image_size, owl_config.vision_config.patch_size = 96, 16
        owl_config.text_config.update(
            {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128}
        )
        owl_config.projection_dim = 64
        llava_config.vision_config.update(
            {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}
        )
        llava_config.vision_config.update({"image_size": 84, "num_attention_heads": 2})
        llava_config.text_config.update(
            {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256}
        )
        llava_config.text_config.update({"num_attention_heads": 4, "num_key_value_heads": 4})
        w_overrides = {"hidden_dim": 128}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of 7 B weights
    try:
        with torch.device(device):
            torch.manual_seed(0)
            owl = OwlViTForObjectDetection(owl_config)
            llava = LlavaForConditionalGeneration(llava_config)
            w = AlignmentLayer(
                alignment_config_for(owl_config, llava_config, "deep-mlp", **w_overrides)
            )
    finally:
        torch.set_default_dtype(previous)
    return JointModel(owl, llava, w.to(device=device, dtype=dtype))


# ------------------------------------------------------------------------------------ inputs
def _inputs(model: Any, batch: int, text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompt ids shaped like ``USER: <image>\\n{question} ASSISTANT:`` with random text ids."""
    config = model.llava.config
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    image_id, pad_id = config.image_token_id, config.pad_token_id
    special = {image_id, pad_id, 0, 1, 2}
    text = torch.randint(3, min(vocab, 32000), (batch, text_tokens), generator=generator)
    text[torch.isin(text, torch.tensor(sorted(special)))] = 3
    head = torch.ones(batch, 1, dtype=torch.long)  # BOS
    images = torch.full((batch, model.num_image_tokens), image_id, dtype=torch.long)
    split = min(4, text_tokens)
    input_ids = torch.cat([head, text[:, :split], images, text[:, split:]], dim=1)
    pixels = torch.randint(0, 256, (batch, 3, 240, 320), generator=generator, dtype=torch.uint8)
    return {"input_ids": input_ids, "images": pixels}


def _gen_kwargs(new_tokens: int) -> dict[str, Any]:
    return {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "use_cache": True,
        "pad_token_id": 0,
    }


class _StepTimer:
    """A stopping criterion that never stops: it timestamps every generation step.

    ``generate`` calls it once per new token, after the token is chosen, so the first stamp ends
    the prefill (prompt forward + first token) and the later stamps time pure decode steps.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _run_timed(
    generators: dict[str, Any], device: torch.device, new_tokens: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Median prefill seconds, decode seconds per step and whole-answer seconds of each
    generator; the systems alternate run by run so that machine noise hits both alike."""
    from transformers import StoppingCriteriaList

    samples: dict[str, dict[str, list[float]]] = {
        name: {"prefill_seconds": [], "decode_seconds_per_step": [], "answer_seconds": []}
        for name in generators
    }
    for i in range(repeats + 1):  # the first round warms up
        for name, generate in generators.items():
            timer = _StepTimer(device)
            _sync(device)
            start = time.perf_counter()
            out = generate(StoppingCriteriaList([timer]))
            _sync(device)
            end = time.perf_counter()
            if out.shape[-1] < new_tokens or len(timer.stamps) != new_tokens:
                raise RuntimeError(f"{name}: expected {new_tokens} steps, got {len(timer.stamps)}")
            if i:
                samples[name]["prefill_seconds"].append(timer.stamps[0] - start)
                step = (timer.stamps[-1] - timer.stamps[0]) / (new_tokens - 1)
                samples[name]["decode_seconds_per_step"].append(step)
                samples[name]["answer_seconds"].append(end - start)
    return {
        name: {key: statistics.median(values) for key, values in series.items()}
        for name, series in samples.items()
    }


def _measure(
    model: Any, batch: int, new_tokens: int, text_tokens: int, repeats: int
) -> dict[str, Any]:
    from jmllm.align import owl_penultimate

    device = model.llava_device
    data = _inputs(model, batch, text_tokens)
    input_ids = data["input_ids"].to(device)
    attention_mask = torch.ones_like(input_ids)
    images = list(data["images"])
    prompt_tokens = int(input_ids.numel())

    @torch.no_grad()
    def owl_and_w() -> torch.Tensor:
        pixel_values = model.owl_norm(images, model.device).to(model.dtype)
        return model.image_tokens(owl_penultimate(model.owl, pixel_values))

    @torch.no_grad()
    def joint(criteria: Any) -> torch.Tensor:
        embeds = model.merge_image_tokens(input_ids, owl_and_w())
        return model.llava.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            stopping_criteria=criteria,
            **_gen_kwargs(new_tokens),
        )

    @torch.no_grad()
    def stock(criteria: Any) -> torch.Tensor:
        pixel_values = model.llava_norm(images, device).to(model.llava.dtype)
        return model.llava.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            stopping_criteria=criteria,
            **_gen_kwargs(new_tokens),
        )

    result: dict[str, Any] = {"batch": batch, "prompt_tokens_per_row": int(input_ids.shape[1])}
    timings = _run_timed({"joint": joint, "llava": stock}, device, new_tokens, repeats)
    for name, timing in timings.items():
        timing["prefill_tokens_per_s"] = prompt_tokens / timing["prefill_seconds"]
        timing["decode_tokens_per_s"] = batch / timing["decode_seconds_per_step"]
        result[name] = timing
        logger.info("batch %d %s: %s", batch, name, timing)
    owl_w = []
    owl_and_w()  # warm-up
    for _ in range(max(repeats, 3)):
        _sync(device)
        start = time.perf_counter()
        owl_and_w()
        _sync(device)
        owl_w.append(time.perf_counter() - start)
    result["owl_w_seconds"] = statistics.median(owl_w)
    j, s = result["joint"], result["llava"]
    result["decode_ratio_joint_over_llava"] = j["decode_tokens_per_s"] / s["decode_tokens_per_s"]
    result["prefill_ratio_joint_over_llava"] = j["prefill_tokens_per_s"] / s["prefill_tokens_per_s"]
    result["answer_time_ratio_joint_over_llava"] = j["answer_seconds"] / s["answer_seconds"]
    result["owl_w_share_of_joint_answer"] = result["owl_w_seconds"] / j["answer_seconds"]
    return result


def _language_weight_bytes(model: Any) -> int:
    language = model.llava.model.language_model
    params = list(language.parameters()) + list(model.llava.lm_head.parameters())
    unique = {p.data_ptr(): p for p in params}  # tied embeddings counted once
    return sum(p.numel() * p.element_size() for p in unique.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="full-size architectures, bf16, CUDA")
    parser.add_argument("--device", help="override the device (default: cuda with --gpu, else cpu)")
    parser.add_argument("--arch-scale", choices=("full", "small"), default="full")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=None, help="answer length (GPU 100)")
    parser.add_argument("--text-tokens", type=int, default=16, help="question tokens per prompt")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--bandwidth", type=float, default=3.35e12, help="memory bandwidth, bytes/s (H100 SXM)"
    )
    parser.add_argument("--cache", help="folder for the tiny checkpoints (CPU mode)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--json-out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    if args.gpu and device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--gpu: no CUDA device is available (use --device cpu --arch-scale small)")
    new_tokens = args.new_tokens or (100 if args.gpu else (8 if args.quick else 32))
    if args.quick and args.gpu:
        new_tokens = args.new_tokens or 32
    repeats = args.repeats or (2 if args.quick else 5)
    batches = [int(b) for b in args.batches.split(",")]
    if new_tokens < 2:
        parser.error("--new-tokens: at least 2 (decode = N-token minus 1-token generation)")

    if args.gpu:
        dtype = torch.bfloat16
        model = _full_size_model(device, dtype, args.arch_scale)
        mode = f"gpu-{args.arch_scale}-random-bf16"
    else:
        cache = Path(args.cache) if args.cache else Path(tempfile.gettempdir()) / "jmllm-bench-tiny"
        model = _tiny_model(cache)
        mode = "cpu-tiny"
    results = [_measure(model, b, new_tokens, args.text_tokens, repeats) for b in batches]
    weight_bytes = _language_weight_bytes(model)
    report: dict[str, Any] = {
        "benchmark": "generate_throughput",
        "mode": mode,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "baseline": "stock LlavaForConditionalGeneration.generate(input_ids, pixel_values)",
        "results": results,
        "language_model_weight_bytes": weight_bytes,
    }
    b1 = next((r for r in results if r["batch"] == 1), None)
    if b1 is not None:
        ceiling = args.bandwidth / weight_bytes
        report["batch1"] = {
            "decode_ratio_joint_over_llava": b1["decode_ratio_joint_over_llava"],
            "owl_w_seconds": b1["owl_w_seconds"],
            "owl_w_overhead_vs_llava_answer": b1["owl_w_seconds"] / b1["llava"]["answer_seconds"],
            "answer_tokens": new_tokens,
            "bandwidth_bytes_per_s": args.bandwidth,
            "decode_ceiling_tokens_per_s": ceiling,
            "joint_decode_fraction_of_ceiling": b1["joint"]["decode_tokens_per_s"] / ceiling,
            "llava_decode_fraction_of_ceiling": b1["llava"]["decode_tokens_per_s"] / ceiling,
        }
        if args.gpu:
            report["targets"] = {
                "joint_decode_at_least_0.95x_llava": b1["decode_ratio_joint_over_llava"] >= 0.95,
                "owl_w_at_most_5pct_of_answer": report["batch1"]["owl_w_overhead_vs_llava_answer"]
                <= 0.05,
            }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
