"""W training throughput: the jmllm-align trainer beside a straightforward loop, in the same run.

Baseline (what one would write first): one process, fp32, images opened with PIL in the loop, the
two models' Hugging Face image processors called on every batch, OWL-ViT's full vision model with
``output_hidden_states`` (t = ``hidden_states[-2]``), LLaVA's ``get_image_features``, the same W,
AdamW. The trainer (``jmllm.align.train.train``): images decoded in DataLoader workers, resize and
normalisation batched on tensors, OWL-ViT stopped at its penultimate layer, bf16 autocast and
bf16 encoders on GPU.

- CPU (default): the tiny offline encoders (``jmllm.align.testing``), generated JPEGs. The
  trainer must not be slower than the baseline.
- ``--gpu``: full-size architectures with random weights (``OwlViTConfig()`` = OWL-ViT B/32 and
  the LLaVA-1.5-7b vision tower + projector; its language model is not needed to train W and is
  left out), the paper's deep MLP, bf16. Also reports model FLOP utilisation: forward FLOPs of
  both encoders + forward and backward FLOPs of W per image (counted with
  ``torch.utils.flop_counter`` on the meta device), over ``--peak-flops`` (default 989e12,
  H100 SXM dense bf16).

Prints one JSON object (and writes it to ``--json-out``). Usage::

    python benchmarks/align_train.py --quick
    python benchmarks/align_train.py --gpu --json-out bench/align_train.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub


def write_jpegs(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    from jmllm.align.testing import generated_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(generated_images(count, size=size, seed=seed)):
        path = folder / f"img{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def model_flops_per_image(
    owl_config: Any, llava_config: Any, align_config: Any
) -> dict[str, float]:
    """FLOPs per image: encoders' forwards and W's forward + backward, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import OwlViTForObjectDetection

    from jmllm.align import AlignmentLayer
    from jmllm.align.features import llava_image_tokens, owl_penultimate

    owl_size = owl_config.vision_config.image_size
    llava_size = llava_config.vision_config.image_size
    with torch.device("meta"):
        owl = OwlViTForObjectDetection(owl_config)
        llava = _vision_only_llava(llava_config)
        layer = AlignmentLayer(align_config)
    counts = {}
    with FlopCounterMode(display=False) as counter:
        t = owl_penultimate(owl, torch.empty(1, 3, owl_size, owl_size, device="meta"))
    counts["owl_forward"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        llava_image_tokens(llava, torch.empty(1, 3, llava_size, llava_size, device="meta"))
    counts["llava_forward"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        layer(t[:, 1:]).float().pow(2).mean().backward()
    counts["w_forward_backward"] = counter.get_total_flops()
    counts["total"] = sum(counts.values())
    return {k: float(v) for k, v in counts.items()}


def _vision_only_llava(config: Any) -> Any:
    """LLaVA with its vision tower and projector; the language model replaced by nothing."""
    import copy

    from transformers import LlavaForConditionalGeneration

    config = copy.deepcopy(config)
    config.text_config.num_hidden_layers = 1  # built, then dropped: W only needs the projector
    model = LlavaForConditionalGeneration(config)
    model.model.language_model = torch.nn.Identity()
    model.lm_head = torch.nn.Identity()
    return model


def baseline_images_per_s(
    owl: Any,
    llava: Any,
    owl_processor: Any,
    llava_processor: Any,
    align_config: Any,
    paths: list[Path],
    batch_size: int,
    lr: float,
    device: torch.device,
) -> float:
    """The straightforward fp32 loop: PIL + processor calls per batch, one process."""
    from PIL import Image

    from jmllm.align import AlignmentLayer

    owl, llava = (
        owl.float().eval().requires_grad_(False),
        llava.float().eval().requires_grad_(False),
    )
    torch.manual_seed(0)
    layer = AlignmentLayer(align_config).to(device)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=1e-2)
    steps = len(paths) // batch_size
    _sync(device)
    start = time.perf_counter()
    for s in range(steps):
        images = [
            Image.open(p).convert("RGB") for p in paths[s * batch_size : (s + 1) * batch_size]
        ]
        owl_pixels = owl_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        llava_pixels = llava_processor(images=images, return_tensors="pt")["pixel_values"].to(
            device
        )
        with torch.no_grad():
            vision = owl.owlvit.vision_model(pixel_values=owl_pixels, output_hidden_states=True)
            t = vision.hidden_states[-2][:, 1:]  # (B, N, D_owl)
            out = llava.model.get_image_features(
                pixel_values=llava_pixels,
                vision_feature_layer=llava.config.vision_feature_layer,
                vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
            )
            target = torch.stack(list(out.pooler_output))  # (B, N, D_llm)
        loss = torch.nn.functional.mse_loss(layer(t), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import (
        AutoImageProcessor,
        LlavaForConditionalGeneration,
        OwlViTForObjectDetection,
    )

    from jmllm.align import alignment_config_for
    from jmllm.align.features import FeatureExtractor
    from jmllm.align.testing import build_tiny_checkpoints
    from jmllm.align.train import load_preset, train

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="jmllm-bench-"))
    cache = Path(args.cache_dir) if args.cache_dir else work / "tiny"
    ckpt = build_tiny_checkpoints(cache)
    count = 96 if args.quick else 256
    paths = write_jpegs(work / "images", count, size=args.image_size, seed=0)
    batch = 8
    config = load_preset("tiny").replace(
        source_model=str(ckpt.owl),
        target_model=str(ckpt.llava),
        images=[str(work / "images")],
        batch_size=batch,
        epochs=1,
        eval_images=0,
        log_every=0,
        num_workers=args.workers,
        progress=False,
    )
    fx = FeatureExtractor.from_pretrained(ckpt.owl, ckpt.llava)
    owl = OwlViTForObjectDetection.from_pretrained(ckpt.owl)
    llava = LlavaForConditionalGeneration.from_pretrained(ckpt.llava)
    align_config = alignment_config_for(
        owl.config, llava.config, "deep-mlp", hidden_dim=config.hidden_dim
    )
    owl_processor = AutoImageProcessor.from_pretrained(ckpt.owl)
    llava_processor = AutoImageProcessor.from_pretrained(ckpt.llava)
    trainer, baseline = [], []
    for repeat in range(1 if args.quick else 2):
        baseline.append(
            baseline_images_per_s(
                owl,
                llava,
                owl_processor,
                llava_processor,
                align_config,
                paths,
                batch,
                config.lr,
                torch.device("cpu"),
            )
        )
        result = train(config, work / f"run{repeat}", feature_extractor=fx)
        trainer.append(result.images_per_s)
    best_trainer, best_baseline = max(trainer), max(baseline)
    return {
        "benchmark": "align_train",
        "device": "cpu",
        "models": "tiny (jmllm.align.testing)",
        "threads": args.threads,
        "workers": args.workers,
        "images": len(paths),
        "image_size": args.image_size,
        "batch_size": batch,
        "trainer_images_per_s": best_trainer,
        "baseline_images_per_s": best_baseline,
        "ratio": best_trainer / best_baseline,
        "trainer_runs_images_per_s": trainer,
        "baseline_runs_images_per_s": baseline,
    }


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import (
        CLIPImageProcessor,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
    )

    from jmllm.align import alignment_config_for
    from jmllm.align.features import FeatureExtractor, ImageNormalization
    from jmllm.align.testing import llava_1_5_7b_config, tiny_llava_config, tiny_owl_config
    from jmllm.align.train import load_preset, train

    if args.full_path_on_cpu:  # check this code path without a GPU: tiny shapes, CPU
        device = torch.device("cpu")
        owl_config, llava_config = tiny_owl_config(), tiny_llava_config(300, 299, 3)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device available")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # the baseline is plain fp32
        owl_config, llava_config = OwlViTConfig(), llava_1_5_7b_config()
    torch.manual_seed(0)
    with device:
        owl = OwlViTForObjectDetection(owl_config).eval()
        llava = _vision_only_llava(llava_config).eval()
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    owl_norm = ImageNormalization(owl_config.vision_config.image_size, clip_mean, clip_std)
    llava_norm = ImageNormalization(llava_config.vision_config.image_size, clip_mean, clip_std)
    hidden: dict[str, Any] = {"hidden_dim": 64} if args.full_path_on_cpu else {}
    align_config = alignment_config_for(owl_config, llava_config, "deep-mlp", **hidden)
    flops = model_flops_per_image(owl_config, llava_config, align_config)

    work = Path(tempfile.mkdtemp(prefix="jmllm-bench-"))
    count = 512 if args.quick else 4096
    count = 48 if args.full_path_on_cpu else count
    paths = write_jpegs(work / "images", count, size=args.image_size, seed=0)
    batch = 16
    config = load_preset("paper").replace(
        source_model="random OWL-ViT B/32",
        target_model="random LLaVA-1.5-7b vision tower + projector",
        images=[str(work / "images")],
        eval_images=0,
        log_every=0,
        checkpoint_every=0,
        num_workers=args.workers,
        precision="bf16",
        device=str(device),
        progress=False,
        **hidden,
    )
    # bf16 encoders for the trainer (as it loads them itself for bf16 runs).
    fx = FeatureExtractor(
        _copy_to(owl, torch.bfloat16), _copy_to(llava, torch.bfloat16), owl_norm, llava_norm
    )
    trainer = train(config.replace(max_steps=8), work / "warmup", feature_extractor=fx)
    trainer = train(config, work / "run", feature_extractor=fx)
    del fx
    if device.type == "cuda":
        torch.cuda.empty_cache()
    owl_side, llava_side = (
        owl_config.vision_config.image_size,
        llava_config.vision_config.image_size,
    )
    owl_processor = OwlViTImageProcessor(
        size={"height": owl_side, "width": owl_side},
        crop_size={"height": owl_side, "width": owl_side},
    )
    llava_processor = CLIPImageProcessor(
        size={"shortest_edge": llava_side}, crop_size={"height": llava_side, "width": llava_side}
    )
    baseline_paths = paths[: max(batch * 8, count // 8)]  # the slow loop gets fewer images
    baseline = baseline_images_per_s(
        owl, llava, owl_processor, llava_processor, align_config, baseline_paths, batch, 1e-4,
        device,
    )  # fmt: skip
    mfu = trainer.images_per_s * flops["total"] / args.peak_flops
    return {
        "benchmark": "align_train",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "models": (
            "tiny shapes (code-path check only)"
            if args.full_path_on_cpu
            else "OWL-ViT B/32 + LLaVA-1.5-7b vision tower/projector, random weights"
        ),
        "architecture": "deep-mlp",
        "w_parameters": sum(p.numel() for p in trainer.layer.parameters()) if trainer.layer else 0,
        "workers": args.workers,
        "images": len(paths),
        "image_size": args.image_size,
        "batch_size": batch,
        "trainer_images_per_s": trainer.images_per_s,
        "baseline_images_per_s": baseline,
        "ratio": trainer.images_per_s / baseline,
        "flops_per_image": flops,
        "peak_flops": args.peak_flops,
        "mfu": mfu,
    }


def _copy_to(model: Any, dtype: torch.dtype) -> Any:
    import copy

    return copy.deepcopy(model).to(dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="full-size models on a CUDA GPU")
    parser.add_argument("--quick", action="store_true", help="fewer images, one repeat")
    parser.add_argument("--json-out", help="also write the JSON result to this file")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="GPU peak bf16 FLOP/s")
    parser.add_argument("--workers", type=int, default=None, help="trainer decoding workers")
    parser.add_argument("--threads", type=int, default=1, help="CPU mode: torch threads")
    parser.add_argument("--image-size", type=int, default=None, help="generated image side")
    parser.add_argument("--cache-dir", help="CPU mode: reuse tiny checkpoints from here")
    parser.add_argument(
        "--full-path-on-cpu",
        action="store_true",
        help="run the --gpu code path on the CPU with tiny shapes (checks the code, not speed)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.workers is None:
        # A small shared CPU gains nothing from a decoding process (it competes for the same
        # cores); a GPU host keeps the device fed with many.
        args.workers = min(12, (os.cpu_count() or 2) - 2) if args.gpu else 0
    if args.image_size is None:
        args.image_size = 640 if args.gpu else 256
    result = run_gpu(args) if (args.gpu or args.full_path_on_cpu) else run_cpu(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
