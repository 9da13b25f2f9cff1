"""``jmllm-align``: train, evaluate, inspect and import alignment weights W.

Subcommands:

- ``train SOURCES... --out DIR``: train W (preset ``paper`` by default); ``--resume`` continues.
- ``eval WEIGHTS SOURCES...``: held-out MSE and mean token cosine of a weights file on images.
- ``info FILE``: the stored config and provenance (``--json`` for machine output).
- ``import-pth STATE_DICT OUT.safetensors``: convert the paper authors' PyTorch state dict.
- ``demo``: a short W training run between tiny locally built encoders on generated images.

Errors are one line naming the input. Exit codes (docs/conventions.md): 0 success, 1 runtime
failure, 2 bad input or usage (numbers are checked here, at the boundary), 3 partial results
(images skipped and counted, or training stopped early with a resumable checkpoint), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from jmllm.align.options import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    ArgumentParser,
    exit_code_for,
    finite_float,
    integer,
    one_line,
    print_error,
    quiet_third_party,
)

logger = logging.getLogger("jmllm.align.cli")

# Training options that map to a TrainConfig field (a field not here is set with --set KEY=VALUE).
TRAIN_OPTIONS = (
    "source_model",
    "target_model",
    "architecture",
    "lr",
    "weight_decay",
    "batch_size",
    "micro_batch_size",
    "epochs",
    "max_steps",
    "seed",
    "eval_images",
    "eval_every",
    "checkpoint_every",
    "num_workers",
    "precision",
    "device",
)


def _default_tiny_cache() -> Path:
    base = os.environ.get("JMLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jmllm"
    )
    return Path(base) / "tiny"


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "sources",
        nargs="*",
        help="image folders (searched recursively for jpg/jpeg/png/webp) or list files "
        "(one image path per line)",
    )
    p.add_argument("--dataset", help="a `datasets` dataset name (e.g. imagefolder) instead")
    p.add_argument("--dataset-config", help="the dataset's configuration name")
    p.add_argument("--split", default=None, help="dataset split (default: train)")
    p.add_argument("--data-dir", help="data_dir passed to datasets.load_dataset")
    p.add_argument("--streaming", action="store_true", help="stream the dataset")
    p.add_argument("--image-column", default=None, help="dataset column holding images")


def _build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="jmllm-align",
        description="Alignment layer W between OWL-ViT and LLaVA (Giulivi and Boracchi, 2024).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train W between the two frozen encoders")
    _add_data_arguments(p)
    p.add_argument("--out", required=True, help="run folder (checkpoint, metrics, weights)")
    p.add_argument(
        "--preset", default=None, help="built-in preset name or a .json file (default: paper)"
    )
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--source-model", help="OWL-ViT Hub id or folder")
    p.add_argument("--target-model", help="LLaVA Hub id or folder")
    _tiny_argument(p)
    p.add_argument(
        "--architecture", choices=["deep-mlp", "llava-mlp", "transformer", "sequence-transformer"]
    )
    p.add_argument("--lr", type=finite_float(0, open_low=True), help="learning rate (> 0)")
    p.add_argument("--weight-decay", type=finite_float(0), help="AdamW weight decay (>= 0)")
    p.add_argument("--batch-size", type=integer(1), help="images per optimizer step, all ranks")
    p.add_argument("--micro-batch-size", type=integer(1), help="images per forward per rank")
    p.add_argument("--epochs", type=integer(1))
    p.add_argument(
        "--max-steps",
        type=integer(0),
        help="stop (and save) after this many steps in total; 0 = no limit (with --resume: lift "
        "the limit the run was started with)",
    )
    p.add_argument("--seed", type=integer(0))
    p.add_argument("--eval-images", type=integer(0), help="held-out images")
    p.add_argument("--eval-every", type=integer(0), help="steps between held-out evaluations")
    p.add_argument("--checkpoint-every", type=integer(0), help="steps between checkpoints")
    p.add_argument("--num-workers", type=integer(0), help="image decoding processes per rank")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        help="fp32 (the paper preset, as the authors trained), bf16 autocast, or auto "
        "(bf16 on GPU, fp32 on CPU)",
    )
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any training option (value parsed as JSON, else a string); repeatable",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="held-out MSE / cosine of a weights file on images")
    p.add_argument("weights", help="alignment .safetensors file, folder or Hub repo id")
    _add_data_arguments(p)
    p.add_argument("--source-model", help="OWL-ViT (default: the id stored in the weights)")
    p.add_argument("--target-model", help="LLaVA (default: the id stored in the weights)")
    _tiny_argument(p)
    p.add_argument("--limit", type=integer(1), help="evaluate at most this many images")
    p.add_argument("--batch-size", type=integer(1), default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("info", help="print a weights file's config and provenance")
    p.add_argument("file", help="alignment .safetensors file")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("import-pth", help="convert the authors' PyTorch state dict")
    p.add_argument("state_dict", help="the authors' .pth (loaded with weights_only=True)")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--source-model", default="google/owlvit-base-patch32")
    p.add_argument("--target-model", default="llava-hf/llava-1.5-7b-hf")
    p.add_argument("--num-tokens", type=integer(1), default=576)
    p.add_argument(
        "--num-heads",
        type=integer(1),
        default=8,
        help="attention heads of a transformer state dict (the authors': 8; not in the tensors)",
    )

    p = sub.add_parser("demo", help="train W between tiny local encoders on generated images")
    p.add_argument("--out", default="jmllm-demo", help="run folder (default: ./jmllm-demo)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the tiny checkpoints are built (default: $JMLLM_CACHE/tiny or "
        "~/.cache/jmllm/tiny)",
    )
    p.add_argument(
        "--images", type=integer(16), default=48, help="generated images (default 48, at least 16)"
    )
    p.add_argument("--epochs", type=integer(1), default=3)
    p.add_argument("--no-progress", action="store_true")
    return parser


BUILTIN_PRESETS = ("tiny", "toy")  # presets sized for the built-in models
BUILTIN_MODELS_GROUP = "jmllm.builtin_models"  # entry point of jmllm-joint's --tiny resolver


def _tiny_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the built-in models as the two encoders: the toy world's OWL-ViT and LLaVA "
        "shipped in jmllm-joint (offline; needs jmllm-joint installed)",
    )


def builtin_encoders() -> tuple[str, str]:
    """The built-in encoders (``--tiny``): the toy world's OWL-ViT and LLaVA folders, from the
    one resolver of every package's ``--tiny`` (:func:`jmllm.joint.cli.builtin_sources`, the
    ``jmllm.builtin_models`` entry point ``toy``).

    Raises:
        ValueError: jmllm-joint is not installed (it ships the toy world).

    Example:
        >>> owl, llava = builtin_encoders()  # doctest: +SKIP
    """
    from importlib.metadata import entry_points

    # jmllm-joint registers its resolver as an entry point: found without importing it (it
    # depends on this package, not the other way round)
    found = {ep.name: ep for ep in entry_points(group=BUILTIN_MODELS_GROUP)}
    if "toy" not in found:
        raise ValueError(
            "--tiny: the built-in models ship with jmllm-joint: pip install jmllm-joint"
        )
    paths = found["toy"].load()()
    return str(paths.owl), str(paths.llava)


def _resolve_encoders(args: argparse.Namespace, preset: str | None = None) -> None:
    """``--tiny`` (or a preset for the built-in models given without encoders): the built-in
    encoders, never a Hub download; ``--tiny`` with explicit encoders is refused."""
    explicit = args.source_model or args.target_model
    if args.tiny and explicit:
        raise ValueError("--tiny: cannot be combined with --source-model or --target-model")
    if args.tiny or (preset in BUILTIN_PRESETS and not explicit):
        args.source_model, args.target_model = builtin_encoders()
        logger.info("built-in encoders: %s, %s", args.source_model, args.target_model)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _train_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the command line sets explicitly (options, sources, --set)."""
    changes: dict[str, Any] = {}
    for name in TRAIN_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if changes.get("max_steps") == 0:
        changes["max_steps"] = None
    if args.sources:  # absolute, so a run can be resumed from another working directory
        changes["images"] = [str(Path(p).absolute()) for p in args.sources]
    if args.dataset:
        changes["dataset"] = args.dataset
        changes["dataset_streaming"] = args.streaming
    for name, attr in (
        ("dataset_config", "dataset_config"),
        ("dataset_split", "split"),
        ("dataset_data_dir", "data_dir"),
        ("image_column", "image_column"),
    ):
        if getattr(args, attr) is not None:
            changes[name] = getattr(args, attr)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item}: expected KEY=VALUE")
        changes[key.strip().replace("-", "_")] = _parse_value(value)
    if args.no_progress:
        changes["progress"] = False
    return changes


def _option_name(field: str, args: argparse.Namespace) -> str:
    """How the user set a TrainConfig field: ``--lr``, ``--set grad_clip=…``, the sources, ..."""
    set_keys = {item.partition("=")[0].strip().replace("-", "_"): item for item in args.set}
    if field in set_keys:
        return f"--set {set_keys[field]}"
    if field == "images":
        return "the image sources"
    if field in ("dataset_split", "dataset_data_dir"):
        return "--" + field.removeprefix("dataset_").replace("_", "-")
    return "--" + field.replace("_", "-")


def _train_config(args: argparse.Namespace) -> Any:
    from jmllm.align.train import load_preset

    preset = args.preset or ("toy" if args.tiny else "paper")
    _resolve_encoders(args, preset)
    config = load_preset(preset)
    return config.replace(**_train_changes(args))


def _cmd_train(args: argparse.Namespace) -> int:
    from jmllm.align.train import (
        CHECKPOINT_NAME,
        TrainConfig,
        load_checkpoint,
        preset_fields,
        train,
    )

    out = Path(args.out)
    if args.resume and (out / CHECKPOINT_NAME).is_file():
        # Resume with the stored options. Bookkeeping options may change; any other option given
        # on the line must equal the stored one (a silently ignored --lr would be a lie).
        saved = TrainConfig.from_dict(load_checkpoint(out / CHECKPOINT_NAME)["config"])
        changes = _train_changes(args)
        requested: dict[str, tuple[Any, str]] = {}
        if args.preset is not None:
            requested = {
                k: (v, f"--preset {args.preset}") for k, v in preset_fields(args.preset).items()
            }
        requested.update({k: (v, _option_name(k, args)) for k, v in changes.items()})
        stored = saved.to_dict()
        for field, (value, option) in requested.items():
            if field in TrainConfig.RESUMABLE_CHANGES:
                continue
            wanted = saved.replace(**{field: value}).to_dict()[field]
            if wanted != stored[field]:
                raise ValueError(
                    f"{option}: cannot change {field} on --resume (the run was started with "
                    f"{field}={stored[field]!r}, this asks {wanted!r}); start a new --out "
                    "folder to change it"
                )
        config = saved.replace(
            **{k: v for k, v in changes.items() if k in TrainConfig.RESUMABLE_CHANGES}
        )
    elif not args.resume and (out / CHECKPOINT_NAME).is_file():
        raise ValueError(
            f"{out}: already holds a training run; pass --resume to continue it or choose "
            "another --out"
        )
    else:
        config = _train_config(args)
    result = train(config, out, resume=args.resume)
    _print_result(result)
    if result.interrupted:
        return EXIT_PARTIAL
    held_out_skipped = result.eval.skipped if result.eval is not None else 0
    return EXIT_PARTIAL if (result.images_skipped or held_out_skipped) else EXIT_OK


def _print_result(result: Any) -> None:
    if result.interrupted:
        print(f"interrupted at step {result.steps}; checkpoint: {result.checkpoint_path}")
        return
    ev, first = result.eval, result.initial_eval
    print(f"steps: {result.steps}  images: {result.images_seen}  skipped: {result.images_skipped}")
    if ev is not None:
        before = f"{first.mse:.6g} -> " if first else ""
        print(f"held-out MSE: {before}{ev.mse:.6g}  cosine: {ev.cosine:.4f} ({ev.images} images)")
    print(f"weights: {result.weights_path}")


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from jmllm.align.features import FeatureExtractor
    from jmllm.align.train import TrainConfig, evaluate
    from jmllm.align.train.sources import (
        DatasetSource,
        PathSource,
        _decode_all,
        _load_dataset,
        _undecoded_column,
    )
    from jmllm.align.weights import load_alignment

    _resolve_encoders(args)
    layer = load_alignment(args.weights)
    source_model = args.source_model or layer.config.source_model
    target_model = args.target_model or layer.config.target_model
    if not source_model or not target_model:
        raise ValueError(f"{args.weights}: no model ids stored; pass --source-model/--target-model")
    if args.dataset:
        config = TrainConfig(
            dataset=args.dataset,
            dataset_config=args.dataset_config,
            dataset_split=args.split or "train",
            dataset_data_dir=args.data_dir,
            image_column=args.image_column or "image",
        )
        if args.streaming:
            if args.limit is None:
                raise ValueError(f"--dataset {args.dataset} --streaming: pass --limit N")
            stream = _load_dataset(config.replace(dataset_streaming=True))
            rows = _undecoded_column(stream, config.image_column).take(args.limit)
            source: Any = [row[config.image_column] for row in rows]
        else:
            source = DatasetSource(_load_dataset(config), config.image_column)
    elif args.sources:
        source = PathSource(args.sources)
    else:
        raise ValueError("no images: pass image folders/list files or --dataset")
    count = len(source) if args.limit is None else min(args.limit, len(source))
    if count == 0:
        raise ValueError(f"no images found in {', '.join(args.sources) or args.dataset}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device.startswith("cuda")
    fx = FeatureExtractor.from_pretrained(
        source_model, target_model, dtype=torch.bfloat16 if bf16 else torch.float32, device=device
    )
    from jmllm.align.architectures import check_fits

    check_fits(layer.config, fx.owl.config, fx.mllm.config)
    layer = layer.to(device)
    raws = source[:count] if isinstance(source, list) else [source.raw(i) for i in range(count)]
    batch = _decode_all(raws)
    result = evaluate(
        layer,
        fx,
        batch.images,
        micro_batch_size=args.batch_size,
        autocast=bf16,
        skipped=batch.skipped,
    )
    if result.images == 0:
        raise ValueError(
            f"no image could be read ({result.skipped} unreadable); nothing was evaluated"
        )
    record = {
        "weights": str(args.weights),
        "mse": result.mse,
        "cosine": result.cosine,
        "images": result.images,
        "skipped": result.skipped,
    }
    if args.json:
        print(json.dumps(record))
    else:
        print(
            f"MSE: {result.mse:.6g}  cosine: {result.cosine:.4f}  images: {result.images}  "
            f"skipped: {result.skipped}"
        )
    return EXIT_PARTIAL if result.skipped else EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from jmllm.align.weights import read_metadata

    config, provenance = read_metadata(args.file)
    if args.json:
        print(json.dumps({"config": config.to_dict(), "provenance": provenance}, indent=2))
        return 0
    print(f"{args.file}")
    print("config:")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    print("provenance:" + ("" if provenance else " (none)"))
    for key, value in sorted(provenance.items()):
        print(f"  {key}: {value}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from jmllm.align.weights import import_authors_state_dict, read_metadata

    path = import_authors_state_dict(
        args.state_dict,
        args.out,
        source_model=args.source_model,
        target_model=args.target_model,
        num_tokens=args.num_tokens,
        num_heads=args.num_heads,
    )
    config, _ = read_metadata(path)
    shape = f"hidden {config.hidden_dim} x {config.num_hidden_layers}"
    if config.architecture == "llava-mlp":
        shape = "Linear + GELU + Linear"
    elif config.architecture == "transformer":
        shape = (
            f"width {config.hidden_dim}, {config.num_hidden_layers} layers, "
            f"{config.num_heads} heads, feed-forward {config.ffn_dim}"
        )
    print(f"wrote {path} ({config.architecture}, {config.in_dim} -> {config.out_dim}, {shape})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from jmllm.align.testing import build_tiny_checkpoints, write_image_folder
    from jmllm.align.train import load_preset, train

    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared CPU
    cache = Path(args.cache_dir) if args.cache_dir else _default_tiny_cache()
    out = Path(args.out)
    logger.info("tiny encoders in %s", cache)
    ckpt = build_tiny_checkpoints(cache)
    images = write_image_folder(out / "images", args.images, size=96, seed=0)
    config = load_preset("tiny").replace(
        source_model=str(ckpt.owl),
        target_model=str(ckpt.llava),
        images=[str(images)],
        epochs=args.epochs,
        progress=not args.no_progress,
    )
    result = train(config, out / "run")
    _print_result(result)
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "info": _cmd_info,
    "import-pth": _cmd_import,
    "demo": _cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jmllm-align``; returns the exit code (0 on success).

    Example:
        >>> main(["info", "runs/w/alignment.safetensors", "--json"])  # doctest: +SKIP
        0
    """
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_third_party(args.verbose)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("jmllm-align: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line, never a traceback (-v shows it)
        if args.verbose:
            raise
        code = exit_code_for(exc)
        message = one_line(exc)
        if code == EXIT_FAILURE:
            message = f"{type(exc).__name__}: {message} (run with -v for details)"
        print_error(f"jmllm-align {args.command}", message)
        return code


if __name__ == "__main__":
    sys.exit(main())
