"""The training loop: :func:`train`, from a configuration to saved weights, read top to bottom.

Set-up (devices, resume state, data, models), then one optimizer step per global batch (DDP under
``torchrun``, gradient accumulation over micro-batches, bf16 autocast on GPU), periodic held-out
evaluation, metrics and checkpoints, and at the end ``save_alignment`` with provenance.
SIGTERM/SIGINT stop it cleanly at the next step boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jmllm.align.architectures import AlignmentConfig, AlignmentLayer, alignment_config_for
from jmllm.align.features import FeatureExtractor
from jmllm.align.preprocessing import get_preprocessing
from jmllm.align.train.checkpoint import (
    CHECKPOINT_FORMAT,
    _append_jsonl,
    _check_resumable,
    _rng_state,
    _set_rng_state,
    _truncate_metrics,
    load_checkpoint,
    save_checkpoint,
    write_atomically,
)
from jmllm.align.train.config import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    WEIGHTS_NAME,
    TrainConfig,
)
from jmllm.align.train.distributed import (
    _all_sum,
    _Dist,
    _no_sync,
    _resolve_device,
    _setup_distributed,
)
from jmllm.align.train.evaluation import (
    EvalResult,
    _global_loss,
    _micro_batches,
    _token_errors,
    evaluate,
)
from jmllm.align.train.order import epoch_loader, training_data
from jmllm.align.train.sources import Normalizations, Pixels, _decode_all
from jmllm.align.weights import save_alignment

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite weights (a runtime failure: exit code 1)."""


@dataclass
class TrainResult:
    """What a :func:`train` call did."""

    weights_path: Path | None  # None when interrupted before the end
    checkpoint_path: Path
    steps: int
    images_seen: int
    images_skipped: int
    final_loss: float | None
    eval: EvalResult | None
    train_seconds: float  # the training loop only (no model loading)
    images_per_s: float  # images trained per second of train_seconds (this session)
    interrupted: bool = False
    initial_eval: EvalResult | None = None  # held-out metrics of the untrained W (step 0)
    layer: AlignmentLayer | None = field(default=None, repr=False)


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop checkpoints at the next step boundary and returns."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("signal %d: stopping after this step and writing a checkpoint", signum)
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    feature_extractor: FeatureExtractor | None = None,
) -> TrainResult:
    """Train W between the two frozen encoders of ``config`` and save it in ``out_dir``.

    Writes ``config.json``, ``metrics.jsonl`` (one JSON object per logged step and evaluation),
    ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end) and, when training
    finishes (end of data or ``max_steps``), ``alignment.safetensors`` with provenance. Under
    ``torchrun`` each process trains on its shard of every global batch (DDP); rank 0 writes.
    SIGTERM/SIGINT make it checkpoint at the next step and return with ``interrupted=True``.

    Args:
        config: the run's settings (see :func:`load_preset`).
        out_dir: the run's folder.
        resume: continue from ``out_dir/checkpoint.pt`` (exactly: same data order, same weights
            as if never interrupted). Only bookkeeping fields may change on resume.
        feature_extractor: already-loaded encoders (default: loaded from the config's ids).

    Returns:
        A :class:`TrainResult`.

    Example:
        >>> result = train(load_preset("tiny").replace(images=["imgs/"]), "runs/t")  # doctest: +SKIP
        >>> result.images_skipped  # doctest: +SKIP
        0
    """
    out = Path(out_dir)
    info = _setup_distributed(config.device)
    try:
        return _train(config, out, resume, feature_extractor, info)
    finally:
        if info.initialised_here:
            dist.destroy_process_group()


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run trains in bfloat16 (encoders in bf16, W's forward under autocast).

    Example:
        >>> uses_bf16("fp32", torch.device("cuda")), uses_bf16("auto", torch.device("cuda"))
        (False, True)
    """
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _train(
    config: TrainConfig,
    out: Path,
    resume: bool,
    fx: FeatureExtractor | None,
    info: _Dist,
) -> TrainResult:
    device = _resolve_device(config, info)
    bf16 = uses_bf16(config.precision, device)
    checkpoint_path, metrics_path = out / CHECKPOINT_NAME, out / METRICS_NAME
    if config.batch_size < info.world:
        raise ValueError(f"batch_size {config.batch_size} is smaller than {info.world} processes")

    # -- resume state
    state: dict[str, Any] | None = None
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        _check_resumable(state["config"], config, checkpoint_path)
    elif resume:
        logger.info("%s: no checkpoint, starting from scratch", checkpoint_path)

    # -- data: sources, held-out subset and training items
    data = training_data(config, info)
    source, stream, train_ids, total_steps = (
        data.source,
        data.stream,
        data.train_ids,
        data.total_steps,
    )

    # -- models
    if fx is None:
        dtype = torch.bfloat16 if bf16 else torch.float32
        fx = FeatureExtractor.from_pretrained(
            config.source_model,
            config.target_model,
            dtype=dtype,
            device=device,
            preprocessing=config.preprocessing,
        )
    elif fx.preprocessing != config.preprocessing:
        raise ValueError(
            f"preprocessing: the run asks for {config.preprocessing!r} but the feature extractor "
            f"given resizes with {fx.preprocessing!r}"
        )
    align_config, layer, optimizer = _new_layer(config, fx, device)
    epoch = step_in_epoch = step = images_seen = images_skipped = 0
    last_loss: float | None = None
    initial_eval: EvalResult | None = None
    if state is not None:
        layer.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        step, images_seen, images_skipped = (
            state["step"],
            state["images_seen"],
            state["images_skipped"],
        )
        last_loss = state["last_loss"]
        if state.get("initial_eval"):
            initial_eval = EvalResult(**state["initial_eval"])
        _set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d (epoch %d)", checkpoint_path, step, epoch)
    model: torch.nn.Module = layer
    if info.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            layer, device_ids=[device.index] if device.type == "cuda" else None
        )

    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config.to_dict(), indent=2)
        write_atomically(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
        if state is not None:
            _truncate_metrics(metrics_path, step)
        elif metrics_path.exists():
            metrics_path.unlink()

    # -- held-out images: decoded once, kept as uint8 (this rank's share)
    held_batch = _decode_all(data.held_out_raw(), config.preprocessing)
    micro = config.micro_batch_size or max(1, math.ceil(config.batch_size / info.world))

    def run_eval() -> EvalResult:
        result = evaluate(
            layer,
            fx,
            held_batch.images,
            micro_batch_size=micro,
            autocast=bf16,
            skipped=held_batch.skipped,
            info=info,
        )
        if info.main:
            _append_jsonl(
                metrics_path,
                {
                    "step": step,
                    "eval_mse": result.mse,
                    "eval_cosine": result.cosine,
                    "eval_images": result.images,
                    "eval_skipped": result.skipped,
                },
            )
        return result

    def write_checkpoint() -> None:
        if not info.main:
            return
        save_checkpoint(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "version": 1,
                "config": config.to_dict(),
                "alignment_config": align_config.to_dict(),
                "model": layer.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "step": step,
                "images_seen": images_seen,
                "images_skipped": images_skipped,
                "last_loss": last_loss,
                "initial_eval": dataclasses.asdict(initial_eval) if initial_eval else None,
                "rng": _rng_state(),
            },
        )

    # -- the loop
    # "auto": in the workers on CPU, and for the authors' PIL resize (CPU work) on a GPU too
    in_workers = config.preprocess == "workers" or (
        config.preprocess == "auto"
        and (device.type != "cuda" or get_preprocessing(config.preprocessing).resize == "pil")
    )
    norms: Normalizations | None = (fx.owl_norm, fx.mllm_norm) if in_workers else None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        unit="step",
        disable=not (info.main and config.progress),
        dynamic_ncols=True,
    )
    last_eval: EvalResult | None = None
    interrupted = finished = False
    step_sse: torch.Tensor | None = None
    step_tokens = 0.0
    if state is None and config.eval_images > 0:
        initial_eval = run_eval()  # the untrained W: the baseline the final eval is read against
    window_images, window_start = 0, time.perf_counter()
    loop_start, session_images = time.perf_counter(), 0
    layer.train()
    with _StopFlag() as stop:
        while epoch < config.epochs and not finished:
            if total_steps is not None and step >= total_steps:
                break
            loader = epoch_loader(
                config, source, train_ids, stream, epoch, step_in_epoch, info, norms
            )
            for batch in loader:
                # One optimizer step. Counts first (all ranks), so the loss is the mean over
                # every valid token of the global batch whatever each rank kept; the same
                # all-reduce carries the stop votes (SIGTERM), so ranks stop at the same step.
                n_images, n_skipped, stop_votes = _all_sum(
                    [float(len(batch.images)), float(batch.skipped), float(stop.requested)],
                    info,
                    device,
                )
                if stop_votes > 0:  # this step is not trained: the data position stays before it
                    interrupted = True
                    break
                for error in batch.errors:
                    logger.warning("skipped image: %s", error)
                tokens = n_images * align_config.num_tokens
                step_sse = _train_step(
                    model, layer, optimizer, fx, batch.images, tokens, config, bf16, info, device
                )
                step_tokens = tokens
                step += 1
                step_in_epoch += 1
                images_seen += int(n_images)
                images_skipped += int(n_skipped)
                session_images += int(n_images)
                window_images += int(n_images)
                bar.update(1)
                log_now = bool(config.log_every) and step % config.log_every == 0
                checkpoint_now = (
                    bool(config.checkpoint_every) and step % config.checkpoint_every == 0
                )
                if log_now or checkpoint_now:  # the loss is read (a host sync) only when needed
                    last_loss = _global_loss(step_sse, step_tokens, last_loss, info, device)
                if log_now:
                    now = time.perf_counter()
                    rate = window_images / max(now - window_start, 1e-9)
                    window_images, window_start = 0, now
                    bar.set_postfix(loss=f"{last_loss:.4g}", img_s=f"{rate:.1f}")
                    if info.main:
                        _append_jsonl(
                            metrics_path,
                            {
                                "step": step,
                                "epoch": epoch,
                                "loss": last_loss,
                                "images_seen": images_seen,
                                "images_skipped": images_skipped,
                                "images_per_s": rate,
                                "lr": optimizer.param_groups[0]["lr"],
                            },
                        )
                if config.eval_images and config.eval_every and step % config.eval_every == 0:
                    last_eval = run_eval()
                if checkpoint_now:
                    write_checkpoint()
                if total_steps is not None and step >= total_steps:
                    finished = True
                    break
            if interrupted:
                break
            if not finished:
                epoch, step_in_epoch = epoch + 1, 0
    if step_sse is not None:  # the loss of the last step trained in this session
        last_loss = _global_loss(step_sse, step_tokens, last_loss, info, device)
    train_seconds = time.perf_counter() - loop_start
    bar.close()
    write_checkpoint()
    result = TrainResult(
        weights_path=None,
        checkpoint_path=checkpoint_path,
        steps=step,
        images_seen=images_seen,
        images_skipped=images_skipped,
        final_loss=last_loss,
        eval=None,
        train_seconds=train_seconds,
        images_per_s=session_images / max(train_seconds, 1e-9),
        interrupted=interrupted,
        initial_eval=initial_eval,
        layer=layer,
    )
    if interrupted:
        logger.info("interrupted at step %d; resume with --resume", step)
        return result
    if config.eval_images > 0:
        evaluated_now = last_eval and config.eval_every and step % config.eval_every == 0
        result.eval = last_eval if evaluated_now else run_eval()
    if not all(bool(torch.isfinite(p).all()) for p in layer.parameters()):
        raise TrainingDivergedError(
            f"training diverged: W holds NaN or infinite weights after step {step} (last loss "
            f"{last_loss}); no weights written; lower lr or set grad_clip and start again"
        )
    if info.main:
        provenance = {
            "trainer": "jmllm-align train",
            "steps": step,
            "images_seen": images_seen,
            "images_skipped": images_skipped,
            "final_loss": last_loss,
            "eval_mse": result.eval.mse if result.eval else None,
            "eval_cosine": result.eval.cosine if result.eval else None,
            "eval_images": result.eval.images if result.eval else 0,
            "eval_mse_initial": initial_eval.mse if initial_eval else None,
            "source_model": config.source_model,
            "target_model": config.target_model,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "seed": config.seed,
            "world_size": info.world,
            "preprocessing": config.preprocessing,
        }
        result.weights_path = save_alignment(layer, out / WEIGHTS_NAME, provenance)
    if images_skipped or held_batch.skipped:
        logger.warning(
            "skipped %d unreadable training image(s) and %d held-out image(s)",
            images_skipped,
            held_batch.skipped,
        )
    return result


def _new_layer(
    config: TrainConfig, fx: FeatureExtractor, device: torch.device
) -> tuple[AlignmentConfig, AlignmentLayer, torch.optim.Optimizer]:
    """W for the two encoders (seeded initialisation) and its AdamW optimizer."""
    overrides = {
        k: getattr(config, k)
        for k in ("hidden_dim", "num_hidden_layers", "num_heads")
        if getattr(config, k) is not None
    }
    align_config = alignment_config_for(
        fx.owl.config,
        fx.mllm.config,
        config.architecture,
        source_model=config.source_model,
        target_model=config.target_model,
        **overrides,
    )
    torch.manual_seed(config.seed)
    layer = AlignmentLayer(align_config).to(device)
    optimizer = torch.optim.AdamW(
        layer.parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=config.betas,
        fused=device.type == "cuda",
    )
    return align_config, layer, optimizer


def _train_step(
    model: torch.nn.Module,
    layer: AlignmentLayer,
    optimizer: torch.optim.Optimizer,
    fx: FeatureExtractor,
    images: list[Pixels],
    tokens: float,
    config: TrainConfig,
    bf16: bool,
    info: _Dist,
    device: torch.device,
) -> torch.Tensor:
    """One optimizer step on this rank's images: micro-batches with gradients accumulated (DDP
    all-reduces on the last), the loss the mean over ``tokens`` valid tokens of the global batch.

    Returns:
        This rank's summed squared error of the step, on the device (no host sync).
    """
    align_config = layer.config
    # A rank that kept no image still runs one empty micro-batch to join DDP.
    chunks = _micro_batches(images, config.micro_batch_size) or [[]]
    step_sse = torch.zeros((), device=device)  # summed on the device: no host sync
    for i, chunk in enumerate(chunks):
        sync = i == len(chunks) - 1
        # DDP: all-reduce gradients only on the last micro-batch of the step.
        ctx = _no_sync(model) if (info.world > 1 and not sync) else contextlib.nullcontext()
        with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if chunk:
                errors, _, _ = _token_errors(model, fx, chunk, align_config.drop_cls)
            else:  # nothing decoded on this rank: still join DDP's all-reduce
                empty = torch.zeros(0, align_config.num_tokens, align_config.in_dim, device=device)
                errors = model(empty).float().pow(2).mean(dim=-1)
            local_sse = errors.sum()
        if tokens > 0:
            # DDP averages gradients over ranks; scaling by world makes it a sum.
            (local_sse * (info.world / tokens)).backward()
        step_sse += local_sse.detach()
    if tokens > 0:
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(layer.parameters(), config.grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_sse
