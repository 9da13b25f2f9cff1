"""``jmllm-align``: train, evaluate, inspect and import alignment weights W.

Subcommands:

- ``train SOURCES... -o DIR``: train W (preset ``paper`` by default); ``--resume`` continues.
- ``eval WEIGHTS SOURCES...``: held-out MSE and mean token cosine of a weights file on images.
- ``info FILE``: the stored config and provenance (``--json-out -`` for machine output).
- ``import-pth STATE_DICT -o OUT.safetensors``: convert the paper authors' PyTorch state dict.
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

from jmllm.align.files import check_output_claim, output_folder
from jmllm.align.options import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    ArgumentParser,
    clip,
    exit_code_for,
    finite_float,
    integer,
    printable,
)
from jmllm.align.vocabulary import (
    DEVICE_HELP,
    DTYPE_CHOICES,
    add_json_out,
    add_standard_options,
    error_line,
    hidden_alias,
    setup_logging,
)

logger = logging.getLogger("jmllm.align.cli")
FORCE_HELP = (
    "write into an --out that holds files this command did not write (they are never replaced "
    "or deleted)"
)

# Training options that map to a TrainConfig field (a field not here is set with --set KEY=VALUE).
TRAIN_OPTIONS = (
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
    "device",
    "preprocessing",
)
# --dtype as the trainer's precision: encoders in float32 and W in float32, or encoders in
# bfloat16 and W under bfloat16 autocast; float16 (which needs loss scaling) is not offered.
PRECISIONS = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16"}
FORMER_PRECISIONS = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}  # --precision
OPTION_NAMES = {  # TrainConfig fields set by an option of another name
    "source_model": "--owl",
    "target_model": "--mllm",
    "precision": "--dtype",
    "dataset_split": "--split",
    "dataset_data_dir": "--data-dir",
}


def _default_tiny_cache() -> Path:
    base = os.environ.get("JMLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jmllm"
    )
    return Path(base) / "tiny"


def _preprocessing_argument(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--preprocessing``: the named preprocessing of :mod:`jmllm.align.preprocessing`."""
    from jmllm.align.preprocessing import PREPROCESSINGS

    p.add_argument("--preprocessing", choices=sorted(PREPROCESSINGS), help=help_text)


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "sources",
        nargs="*",
        help="image folders (searched recursively for jpg/jpeg/png/webp) or list files "
        "(one image path per line)",
    )
    p.add_argument(
        "--dataset", help="a `datasets` dataset name (e.g. imagefolder) instead (default: none)"
    )
    p.add_argument(
        "--dataset-config", help="the dataset's configuration name (default: its default)"
    )
    p.add_argument("--split", default=None, help="dataset split (default: train)")
    p.add_argument("--data-dir", help="data_dir passed to datasets.load_dataset (default: none)")
    p.add_argument("--streaming", action="store_true", help="stream the dataset")
    p.add_argument(
        "--image-column", default=None, help="dataset column holding images (default: image)"
    )


def _preset_defaults(field: str) -> str:
    """A training option's default in each built-in preset, for --help: ``paper 1, toy 8``."""
    from jmllm.align.train import load_preset, preset_names

    values = []
    for name in preset_names():
        value = getattr(load_preset(name), field)
        values.append(f"{name} {value}")
    return ", ".join(values)


def _model_arguments(p: argparse.ArgumentParser, owl: str, mllm: str, **kwargs: Any) -> None:
    """``--owl`` and ``--mllm`` (the former ``--source-model``/``--target-model``, hidden)."""
    p.add_argument("--owl", help=owl, **kwargs)
    p.add_argument("--mllm", help=mllm, **kwargs)
    hidden_alias(p, "--source-model", dest="owl")
    hidden_alias(p, "--target-model", dest="mllm")


def _build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="jmllm-align",
        description="Alignment layer W between OWL-ViT and LLaVA (Giulivi and Boracchi, 2024).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from_preset = "(default: the preset's: {})"
    p = sub.add_parser("train", help="train W between the two frozen encoders")
    _add_data_arguments(p)
    p.add_argument("-o", "--out", required=True, help="run folder (checkpoint, metrics, weights)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument(
        "--preset", default=None, help="built-in preset name or a .json file (default: paper)"
    )
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    builtin = "with --tiny, or preset tiny or toy: the built-in toy-world model"
    _model_arguments(
        p,
        f"OWL-ViT Hub id or folder (default: {DEFAULT_OWL}; {builtin})",
        f"LLaVA Hub id or folder (default: {DEFAULT_MLLM}; {builtin})",
    )
    _tiny_argument(p)
    p.add_argument(
        "--architecture",
        choices=["deep-mlp", "llava-mlp", "transformer", "sequence-transformer"],
        help="W's architecture " + from_preset.format(_preset_defaults("architecture")),
    )
    p.add_argument(
        "--lr",
        type=finite_float(0, open_low=True),
        help="learning rate, > 0 " + from_preset.format(_preset_defaults("lr")),
    )
    p.add_argument(
        "--weight-decay",
        type=finite_float(0),
        help="AdamW weight decay, >= 0 " + from_preset.format(_preset_defaults("weight_decay")),
    )
    p.add_argument(
        "--batch-size",
        type=integer(1),
        help="images per optimizer step, all ranks "
        + from_preset.format(_preset_defaults("batch_size")),
    )
    p.add_argument(
        "--micro-batch-size",
        type=integer(1),
        help="images per forward per rank (default: the whole share of the batch)",
    )
    p.add_argument(
        "--epochs",
        type=integer(1),
        help="passes over the training images (default: the preset's: "
        f"{_preset_defaults('epochs')}; with --max-steps and no --epochs, as many as the steps "
        "need)",
    )
    p.add_argument(
        "--max-steps",
        type=integer(0),
        help="stop (and save) after this many steps in total; 0 = no limit (with --resume: lift "
        "the limit the run was started with) (default: none, the epochs decide)",
    )
    p.add_argument(
        "--seed",
        type=integer(0),
        help="seed of W's initialisation, the data order and the held-out images (default: 0)",
    )
    p.add_argument(
        "--eval-images",
        type=integer(0),
        help="held-out images " + from_preset.format(_preset_defaults("eval_images")),
    )
    p.add_argument(
        "--eval-every",
        type=integer(0),
        help="steps between held-out evaluations, 0: at the end only "
        + from_preset.format(_preset_defaults("eval_every")),
    )
    p.add_argument(
        "--checkpoint-every",
        type=integer(0),
        help="steps between checkpoints, 0: at the end only "
        + from_preset.format(_preset_defaults("checkpoint_every")),
    )
    p.add_argument(
        "--num-workers",
        type=integer(0),
        help="image decoding processes per rank "
        + from_preset.format(_preset_defaults("num_workers")),
    )
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        help="float32: encoders and W in float32 (the paper preset, as the authors trained); "
        "bfloat16: encoders in bfloat16, W under bfloat16 autocast; auto: bfloat16 on a GPU, "
        "float32 on the CPU; float16 is refused (default: the preset's: paper float32, others "
        "auto)",
    )
    hidden_alias(p, "--precision", dest="dtype", type=_former_precision)  # its former name
    _preprocessing_argument(
        p,
        "authors: stored pixels, the Hugging Face processors' PIL resize (the paper preset, as "
        "the authors trained); exif: EXIF orientation applied, torch's resize (default: the "
        "preset's)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any training option (value parsed as JSON, else a string); repeatable "
        "(default: none)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="held-out MSE / cosine of a weights file on images")
    p.add_argument("weights", help="alignment .safetensors file, folder or Hub repo id")
    _add_data_arguments(p)
    _model_arguments(
        p,
        "OWL-ViT Hub id or folder (default: the id stored in the weights)",
        "LLaVA Hub id or folder (default: the id stored in the weights)",
    )
    _tiny_argument(p)
    p.add_argument(
        "--limit", type=integer(1), help="evaluate at most this many images (default: all)"
    )
    p.add_argument("--batch-size", type=integer(1), default=16, help="images per forward")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="float32, or bfloat16 encoders with W under bfloat16 autocast; auto: bfloat16 on "
        "a GPU, float32 on the CPU; float16 is refused",
    )
    _preprocessing_argument(
        p,
        "authors or exif (default: the one W was trained with, as its file records; exif for "
        "weights that do not say)",
    )
    add_json_out(p)

    p = sub.add_parser("info", help="print a weights file's config and provenance")
    p.add_argument("file", help="alignment .safetensors file")
    add_json_out(p)

    p = sub.add_parser("import-pth", help="convert the authors' PyTorch state dict")
    p.add_argument("state_dict", help="the authors' .pth (loaded with weights_only=True)")
    p.add_argument("-o", "--out", help="the .safetensors file to write (default: none, required)")
    # the output was once a positional argument: still accepted, not shown
    p.add_argument("out_positional", nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    _model_arguments(
        p,
        "the OWL-ViT id the weights record",
        "the LLaVA id the weights record",
    )
    p.set_defaults(owl=DEFAULT_OWL, mllm=DEFAULT_MLLM)
    p.add_argument(
        "--num-tokens", type=integer(1), default=576, help="image tokens W maps, CLS excluded"
    )
    p.add_argument(
        "--num-heads",
        type=integer(1),
        default=8,
        help="attention heads of a transformer state dict (the authors': 8; not in the tensors)",
    )

    p = sub.add_parser("demo", help="train W between tiny local encoders on generated images")
    p.add_argument("-o", "--out", default="jmllm-demo", help="run folder")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the tiny checkpoints are built (default: $JMLLM_CACHE/tiny or "
        "~/.cache/jmllm/tiny)",
    )
    p.add_argument(
        "-n", "--num-images", type=integer(16), default=48, help="generated images, at least 16"
    )
    hidden_alias(p, "--images", dest="num_images", type=integer(16))  # its former name
    p.add_argument("--epochs", type=integer(1), default=3, help="passes over the images")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="as train's --dtype (default: auto, bfloat16 on a GPU, float32 on the CPU)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return add_standard_options(parser, "jmllm-align")


def _former_precision(text: str) -> str:
    """``--precision auto|bf16|fp32`` (the former name of ``--dtype``) as a ``--dtype`` value."""
    if text not in FORMER_PRECISIONS:
        raise argparse.ArgumentTypeError(f"must be auto, bf16 or fp32, got {text!r}")
    return FORMER_PRECISIONS[text]


def _precision(dtype: str) -> str:
    """``--dtype`` as the trainer's precision (``auto``, ``fp32``, ``bf16``)."""
    if dtype not in PRECISIONS:
        raise ValueError(
            f"--dtype {dtype}: W is trained and evaluated in float32 or under bfloat16 "
            "autocast; choose float32, bfloat16 or auto"
        )
    return PRECISIONS[dtype]


DEFAULT_OWL = "google/owlvit-base-patch32"
DEFAULT_MLLM = "llava-hf/llava-1.5-7b-hf"
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
    explicit = args.owl or args.mllm
    if args.tiny and explicit:
        raise ValueError("--tiny: cannot be combined with --owl or --mllm")
    if args.tiny or (preset in BUILTIN_PRESETS and not explicit):
        args.owl, args.mllm = builtin_encoders()
        logger.info("built-in encoders: %s, %s", args.owl, args.mllm)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # the option's own check names the problem
        return text


def _train_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the command line sets explicitly (options, sources, --set)."""
    changes: dict[str, Any] = {}
    for name in TRAIN_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    for option, field_name in (("owl", "source_model"), ("mllm", "target_model")):
        if getattr(args, option) is not None:
            changes[field_name] = getattr(args, option)
    if changes.get("max_steps") == 0:
        changes["max_steps"] = None
    if args.dtype is not None:
        changes["precision"] = _precision(args.dtype)
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
    return OPTION_NAMES.get(field) or "--" + field.replace("_", "-")


def _train_config(args: argparse.Namespace) -> Any:
    from jmllm.align.train import load_preset

    preset = args.preset or ("toy" if args.tiny else "paper")
    _resolve_encoders(args, preset)
    config = load_preset(preset)
    changes = _train_changes(args)
    if changes.get("max_steps") and "epochs" not in changes:
        # --max-steps alone: the run stops there, not at the preset's last epoch before it
        # (every epoch is at least one step, so max_steps epochs always suffice)
        changes["epochs"] = max(config.epochs, changes["max_steps"])
    return config.replace(**changes)


def _cmd_train(args: argparse.Namespace) -> int:
    from jmllm.align.train import (
        CHECKPOINT_NAME,
        CONFIG_NAME,
        METRICS_NAME,
        WEIGHTS_NAME,
        TrainConfig,
        load_checkpoint,
        preset_fields,
        train,
    )

    out = Path(args.out)
    outputs = (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, WEIGHTS_NAME)
    check_output_claim(out, "jmllm-align train", outputs, force=args.force)  # before any work
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
    outputs = (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, WEIGHTS_NAME)
    with output_folder(out, command="jmllm-align train", outputs=outputs, force=args.force):
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
    from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING
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
    source_model = args.owl or layer.config.source_model
    target_model = args.mllm or layer.config.target_model
    if not source_model or not target_model:
        raise ValueError(f"{args.weights}: no model ids stored; pass --owl and --mllm")
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
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = _precision(args.dtype)
    bf16 = precision == "bf16" or (precision == "auto" and device.startswith("cuda"))
    trained_with = (getattr(layer, "provenance", None) or {}).get("preprocessing")
    preprocessing = str(args.preprocessing or trained_with or INTERACTIVE_PREPROCESSING)
    fx = FeatureExtractor.from_pretrained(
        source_model,
        target_model,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        device=device,
        preprocessing=preprocessing,
    )
    from jmllm.align.architectures import check_fits

    check_fits(layer.config, fx.owl.config, fx.mllm.config)
    layer = layer.to(device)
    raws = source[:count] if isinstance(source, list) else [source.raw(i) for i in range(count)]
    batch = _decode_all(raws, preprocessing)
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
        "preprocessing": preprocessing,
    }
    if args.json_out:
        _write_json(args.json_out, json.dumps(record))
    else:
        print(
            f"MSE: {result.mse:.6g}  cosine: {result.cosine:.4f}  images: {result.images}  "
            f"skipped: {result.skipped}"
        )
    return EXIT_PARTIAL if result.skipped else EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from jmllm.align.weights import read_metadata

    config, provenance = read_metadata(args.file)
    if args.json_out:  # JSON escapes control characters itself
        try:
            record = {"config": config.to_dict(), "provenance": provenance}
            text = json.dumps(record, indent=2)
        except RecursionError:
            raise ValueError(f"{args.file}: provenance is nested too deeply to print") from None
        _write_json(args.json_out, text)
        return 0
    # the file's metadata is anyone's text: never raw to the terminal, one line per value
    print(printable(args.file))
    print("config:")
    for key, value in config.to_dict().items():
        print(f"  {clip(key)}: {clip(value, INFO_VALUE_LIMIT)}")
    print("provenance:" + ("" if provenance else " (none)"))
    for key, value in sorted(provenance.items()):
        print(f"  {clip(key)}: {_shown(value)}")
    return 0


INFO_VALUE_LIMIT = 1000  # characters of one metadata value shown by `info`


def _shown(value: Any) -> str:
    try:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    except RecursionError:
        return "(nested too deeply to show; see --json)"
    return clip(text, INFO_VALUE_LIMIT)


def _cmd_import(args: argparse.Namespace) -> int:
    from jmllm.align.weights import import_authors_state_dict, read_metadata

    out = _one_output(args)
    path = import_authors_state_dict(
        args.state_dict,
        out,
        source_model=args.owl,
        target_model=args.mllm,
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
    check_output_claim(out, "jmllm-align demo", ("images", "run"), force=args.force)
    logger.info("tiny encoders in %s", cache)
    ckpt = build_tiny_checkpoints(cache)
    with output_folder(
        out, command="jmllm-align demo", outputs=("images", "run"), force=args.force
    ):
        images = write_image_folder(out / "images", args.num_images, size=96, seed=0)
        config = load_preset("tiny").replace(
            source_model=str(ckpt.owl),
            target_model=str(ckpt.llava),
            images=[str(images)],
            epochs=args.epochs,
            progress=not args.no_progress,
            precision=_precision(args.dtype),
            **({"device": args.device} if args.device else {}),
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


def _write_json(path: str, text: str) -> None:
    """``--json-out``: the record on standard output (``-``) or into a file (atomically)."""
    if path == "-":
        print(text)
        return
    from jmllm.align.files import atomic_write_text

    atomic_write_text(path, text + "\n")
    print(f"wrote {path}")


def _one_output(args: argparse.Namespace) -> str:
    """``-o/--out``, or the former positional output; one of them, once."""
    if args.out and args.out_positional and args.out != args.out_positional:
        raise ValueError(f"-o/--out {args.out}: and an output {args.out_positional}: give one")
    out = args.out or args.out_positional
    if not out:
        raise ValueError("-o/--out: required (the .safetensors file to write)")
    return str(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jmllm-align``; returns the exit code (0 on success).

    Example:
        >>> main(["info", "runs/w/alignment.safetensors", "--json-out", "-"])  # doctest: +SKIP
        0
    """
    args = _build_parser().parse_args(argv)
    setup_logging(args.verbose, ["jmllm"])
    prog = f"jmllm-align {args.command}"
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line, never a traceback (--debug shows it)
        if args.debug:
            raise
        code = exit_code_for(exc)
        print(error_line(prog, exc, code), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
