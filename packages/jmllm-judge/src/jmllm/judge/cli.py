"""``jmllm-judge``: sample → captions → run → report, one command per step.

jmllm-judge sample   --coco captions_train2017.json --images train2017 -n 100 -o run/manifest.json
jmllm-judge captions --manifest run/manifest.json --system "COCO GT" --ground-truth -o run/gt.jsonl
jmllm-judge captions --manifest run/manifest.json --system LLaVA --from-jsonl llava.jsonl -o run/llava.jsonl
jmllm-judge run      --manifest run/manifest.json --captions run/gt.jsonl run/llava.jsonl --model gpt-4o -o run/results.json
jmllm-judge report   run/results.json -o run/report
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jmllm.judge.conventions import (
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    ArgumentParser,
    UsageError,
    check_output_claim,
    check_output_dir,
    check_output_file,
    claim_output_folder,
    exit_code_for,
    finite_float,
    integer,
    remove_empty_folders,
)
from jmllm.judge.parsing import DEFAULT_SCORE_PARSER, SCORE_PARSERS
from jmllm.judge.vocabulary import (
    DEVICE_HELP,
    DTYPE_CHOICES,
    add_standard_options,
    error_line,
    hidden_alias,
    setup_logging,
)

log = logging.getLogger("jmllm.judge")

EXIT_FAILED_JUDGEMENTS = EXIT_PARTIAL  # the run finished but some judgements have no answer yet


def _parser() -> argparse.ArgumentParser:
    from jmllm.judge.client import MAX_TEMPERATURE, MAX_TIMEOUT_S

    parser = ArgumentParser(
        prog="jmllm-judge",
        description="Reproducible, resumable GPT-as-a-judge scoring of image captions "
        "(supplementary §1.1 and Table 1 of Giulivi & Boracchi, BMVC 2024).",
        epilog="Run `jmllm-judge COMMAND --help` for each step.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sample", help="sample N seeded images into a manifest")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--coco",
        type=Path,
        metavar="JSON",
        help="COCO captions file (captions_train2017.json format)",
    )
    source.add_argument("--folder", type=Path, metavar="DIR", help="a folder of images")
    source.add_argument(
        "--dataset", metavar="NAME_OR_DIR", help="a `datasets` dataset (needs the datasets extra)"
    )
    p.add_argument(
        "--images",
        type=Path,
        metavar="DIR",
        help="with --coco: the folder of the images (default: their coco_url)",
    )
    hidden_alias(p, "--images-dir", dest="images", type=Path)  # its former name
    p.add_argument(
        "--ground-truth-file",
        type=Path,
        metavar="JSONL",
        help='with --folder: the ground-truth captions, {"image", "caption"} lines (default: none)',
    )
    hidden_alias(p, "--ground-truth", dest="ground_truth_file", type=Path)  # its former name
    p.add_argument("--split", default="train", help="with --dataset: the split")
    p.add_argument("--image-column", default="image", help="with --dataset: the image column")
    p.add_argument(
        "--caption-column",
        default="caption",
        help="with --dataset: the caption column, '' for none",
    )
    p.add_argument(
        "--id-column", default=None, help="with --dataset: the id column (default: row index)"
    )
    p.add_argument(
        "-n",
        "--num-images",
        type=integer(1),
        default=100,
        help="number of images (default: 100, as the paper)",
    )
    p.add_argument("--seed", type=integer(0), default=0, help="sampling seed")
    p.add_argument(
        "-o", "--out", type=Path, required=True, metavar="MANIFEST", help="manifest JSON to write"
    )

    p = sub.add_parser("captions", help="one caption per manifest image for a system")
    p.add_argument(
        "--manifest", type=Path, required=True, help="the manifest from `jmllm-judge sample`"
    )
    p.add_argument("--system", required=True, help="the system's name in the report")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--ground-truth", action="store_true", help="the manifest's ground-truth captions"
    )
    source.add_argument(
        "--from-jsonl",
        type=Path,
        metavar="JSONL",
        help="any system's output: lines with 'image_id' or 'image', and the caption "
        "(default: none)",
    )
    source.add_argument(
        "--joint", action="store_true", help="generate with J or stock LLaVA (joint extra)"
    )
    p.add_argument(
        "--caption-field", default="caption", help="with --from-jsonl: the caption's field"
    )
    p.add_argument(
        "--vision",
        choices=("joint", "llava"),
        default="joint",
        help="with --joint: joint = J (OWL-ViT + W + LLaVA), llava = stock LLaVA",
    )
    p.add_argument(
        "--owl",
        help="with --joint: OWL-ViT Hub id or folder (default: google/owlvit-base-patch32)",
    )
    p.add_argument(
        "--mllm", help="with --joint: LLaVA Hub id or folder (default: llava-hf/llava-1.5-7b-hf)"
    )
    hidden_alias(p, "--llava", dest="mllm")  # its former name
    p.add_argument(
        "--alignment",
        help="with --joint: alignment weights W, .safetensors file or Hub id (default: none; "
        "required unless --tiny)",
    )
    p.add_argument("--device", default=None, help="with --joint: " + DEVICE_HELP)
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="with --joint: weights dtype (default: auto, bfloat16 on a GPU, float32 on the CPU)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="with --joint: the built-in models of jmllm-joint (the toy world: small models "
        "trained on synthetic shapes, offline)",
    )
    p.add_argument(
        "--template",
        choices=("llava-1.5", "paper"),
        default="paper",
        help="with --joint: conversation template; paper is the authors' "
        "'<image>\\nUSER: {question}\\nASSISTANT:' that produced Table 1, llava-1.5 the model "
        "card's 'USER: <image>\\n{question} ASSISTANT:'",
    )
    p.add_argument(
        "--tokenization",
        choices=("legacy", "checkpoint"),
        default="legacy",
        help="with --joint: prompt token ids: legacy, the authors' (a ▁ after "
        "<image>, as transformers 4 gave); checkpoint, as the checkpoint's tokenizer config says",
    )
    p.add_argument(
        "--preprocessing",
        choices=("authors", "exif"),
        default="authors",
        help="with --joint: image preprocessing: authors, the stored pixels "
        "resized as the HF image processors do (the paper's); exif, EXIF orientation applied, "
        "torch's resize",
    )
    p.add_argument(
        "--max-new-tokens",
        type=integer(1),
        default=None,
        help="with --joint (default: 256; 48 with --tiny, whose toy LLaVA has 256 positions)",
    )
    p.add_argument(
        "--batch-size", type=integer(1), default=4, help="with --joint: images per batch"
    )
    p.add_argument(
        "-o", "--out", type=Path, required=True, metavar="JSONL", help="captions file to write"
    )

    p = sub.add_parser("run", help="judge every caption (resumes from the cache)")
    p.add_argument(
        "--manifest", type=Path, required=True, help="the manifest from `jmllm-judge sample`"
    )
    p.add_argument(
        "--captions",
        type=Path,
        nargs="+",
        required=True,
        metavar="JSONL",
        help="captions files, one per system, in report order",
    )
    p.add_argument("--model", required=True, help="judge model, e.g. gpt-4o")
    p.add_argument(
        "--base-url",
        default=None,
        help="OpenAI-compatible API root, e.g. http://localhost:8000/v1; a query string "
        "(?api-version=...) is sent with every request; credentials in the URL are refused "
        "(default: OpenAI's)",
    )
    p.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="NAME",
        help="environment variable that holds the API key",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="SQLite cache (default: judge-cache.sqlite beside --out)",
    )
    p.add_argument(
        "--concurrency",
        type=integer(1, 4096),
        default=16,
        help="requests in flight, 1-4096",
    )
    p.add_argument(
        "--judge-prompt",
        choices=("authors", "supplementary"),
        default="authors",
        help="judge user prompt: authors (the script that produced Table 1, caption in double "
        "quotes) or supplementary (its printed text, caption bare)",
    )
    p.add_argument(
        "--timeout",
        type=finite_float(0, MAX_TIMEOUT_S, open_low=True),
        default=60.0,
        help="seconds per request, > 0",
    )
    p.add_argument(
        "--max-attempts",
        type=integer(1, 100),
        default=8,
        help="attempts per judgement, 1-100",
    )
    p.add_argument(
        "--temperature",
        type=finite_float(0, MAX_TEMPERATURE),
        default=0.0,
        help="0-2 (default: 0, as the paper)",
    )
    p.add_argument(
        "--max-tokens", type=integer(1), default=None, help="reply length cap (default: not sent)"
    )
    p.add_argument(
        "-o", "--out", type=Path, required=True, metavar="JSON", help="results file to write"
    )

    p = sub.add_parser("report", help="Table 1, comparisons and chart from a results file")
    p.add_argument("results", type=Path, help="results JSON written by `jmllm-judge run`")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for report.md, report.json, scores.png",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a folder that holds files this command did not write (they are never "
        "replaced or deleted)",
    )
    p.add_argument(
        "--resamples",
        type=integer(1, 10_000_000),
        default=10_000,
        help="bootstrap resamples, >= 1",
    )
    p.add_argument("--seed", type=integer(0), default=0, help="bootstrap seed")
    p.add_argument(
        "--score-parser",
        choices=SCORE_PARSERS,
        default=DEFAULT_SCORE_PARSER,
        help="how replies become scores: authors = int(reply), as the authors' script (Table 1); "
        "strict = a bare integer from 1 to 10",
    )
    return add_standard_options(parser, "jmllm-judge")


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None, leave=False)


def _cmd_sample(args: argparse.Namespace) -> int:
    from jmllm.judge.manifest import sample_coco, sample_dataset, sample_folder

    check_output_file(args.out, "-o")
    if args.coco is not None:
        manifest = sample_coco(args.coco, args.num_images, seed=args.seed, images_dir=args.images)
    elif args.folder is not None:
        manifest = sample_folder(
            args.folder, args.num_images, seed=args.seed, ground_truth=args.ground_truth_file
        )
    else:
        manifest = sample_dataset(
            args.dataset,
            args.out.resolve().parent,
            args.num_images,
            seed=args.seed,
            split=args.split,
            image_column=args.image_column,
            caption_column=args.caption_column or None,
            id_column=args.id_column,
        )
    manifest.save(args.out)
    skipped = len(manifest.origin.get("skipped", []))
    print(
        f"{len(manifest)} images (seed {manifest.seed}, {skipped} unreadable skipped) -> {args.out}"
    )
    return 0


def _cmd_captions(args: argparse.Namespace) -> int:
    from jmllm.judge.captions import (
        captions_from_ground_truth,
        captions_from_joint,
        captions_from_jsonl,
        save_captions,
    )
    from jmllm.judge.manifest import Manifest

    if args.tiny and not args.joint:
        raise UsageError("--tiny: only with --joint (it selects the models that caption)")
    if args.tiny and (args.owl or args.mllm or args.alignment):
        raise UsageError("--tiny: cannot be combined with --owl, --mllm or --alignment")
    check_output_file(args.out, "-o")
    manifest = Manifest.load(args.manifest)
    if args.ground_truth:
        captions = captions_from_ground_truth(manifest, args.system)
    elif args.from_jsonl is not None:
        captions = captions_from_jsonl(
            manifest, args.from_jsonl, args.system, caption_field=args.caption_field
        )
    else:
        model = None
        if args.tiny:
            try:
                from jmllm.joint.cli import load_builtin_model
            except ImportError:
                raise UsageError(
                    "--tiny: needs the joint extra: pip install 'jmllm-judge[joint]'"
                ) from None
            model = load_builtin_model(
                device=args.device if args.device not in (None, "auto") else "cpu",
                dtype=args.dtype,  # by name: jmllm-joint turns it into torch's
            )
        with _progress(len(manifest), f"captions {args.system}") as bar:
            captions = captions_from_joint(
                manifest,
                args.system,
                model=model,
                owl=args.owl,
                llava=args.mllm,
                alignment=args.alignment,
                device=args.device,
                dtype=args.dtype,
                vision=args.vision,
                template=args.template,
                tokenization=args.tokenization,
                preprocessing=args.preprocessing,
                max_new_tokens=args.max_new_tokens or (48 if args.tiny else 256),
                batch_size=args.batch_size,
                progress=bar.update,
            )
    save_captions(args.out, captions, manifest)
    print(f"{len(manifest)} captions of {captions.system!r} -> {args.out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from jmllm.judge.cache import JudgeCache
    from jmllm.judge.captions import load_captions
    from jmllm.judge.client import JudgeSettings, RetryPolicy, read_api_key
    from jmllm.judge.manifest import Manifest
    from jmllm.judge.prompts import judge_prompt_template
    from jmllm.judge.runner import judge_all, save_results

    check_output_file(args.out, "-o")
    cache_path = args.cache if args.cache is not None else args.out.parent / "judge-cache.sqlite"
    check_output_file(cache_path, "--cache")
    manifest = Manifest.load(args.manifest)
    systems = [load_captions(path) for path in args.captions]
    settings = JudgeSettings(
        model=args.model,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        user_prompt_template=judge_prompt_template(args.judge_prompt),
        concurrency=args.concurrency,
        timeout_s=args.timeout,
        retry=RetryPolicy(max_attempts=args.max_attempts),
    )
    api_key = read_api_key(settings.api_key_env, os.environ)
    # A run that fails before storing anything leaves neither a new cache nor new folders.
    new_folders = [p for p in reversed(cache_path.parents) if not p.exists()]
    new_cache = not cache_path.exists()
    try:
        with JudgeCache(cache_path) as cache:
            try:
                results = asyncio.run(
                    judge_all(
                        manifest, systems, settings, cache, api_key=api_key, show_progress=True
                    )
                )
            except KeyboardInterrupt:
                counts = cache.counts()
                if counts.get("answered", 0) or counts.get("failed", 0):
                    print(
                        f"interrupted: {counts.get('answered', 0)} judgements are safe in "
                        f"{cache_path}; run the same command again to send only the missing ones",
                        file=sys.stderr,
                    )
                    return EXIT_INTERRUPTED
                raise
    except BaseException:
        if new_cache:
            _discard_empty_cache(cache_path)
            remove_empty_folders(new_folders)
        raise
    save_results(args.out, results)
    counts = results.counts()
    print(
        f"{counts['answered']} of {len(results.records)} judgements answered ({counts['invalid']} invalid), "
        f"{counts['failed']} failed; {results.sent} requests needed sending this run; cache {cache_path}; "
        f"results -> {args.out}"
    )
    if counts["failed"] or counts["pending"]:
        print(
            "some judgements have no answer: run the same command again to retry them",
            file=sys.stderr,
        )
        return EXIT_FAILED_JUDGEMENTS
    return 0


def _discard_empty_cache(path: Path) -> None:
    """Delete a cache this run created if it holds no judgement and no other run uses it."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0) as db:
            rows = db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
            owners = db.execute("SELECT COUNT(*) FROM claims WHERE owner IS NOT NULL").fetchone()
        db.close()
    except sqlite3.Error:
        return
    if rows or owners[0]:
        return
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _cmd_report(args: argparse.Namespace) -> int:
    from jmllm.judge.report import REPORT_FILES, build_report, write_report
    from jmllm.judge.runner import load_results

    check_output_dir(args.out, "-o")
    check_output_claim(args.out, REPORT_COMMAND, REPORT_FILES, force=args.force, what="-o")
    report = build_report(
        load_results(args.results),
        resamples=args.resamples,
        seed=args.seed,
        score_parser=args.score_parser,
    )
    claim_output_folder(args.out, REPORT_COMMAND, REPORT_FILES, force=args.force, what="-o")
    paths = write_report(report, args.out)
    for s in report.systems:
        mean = "—" if s.mean is None else f"{s.mean:.2f}"
        print(
            f"{s.system}: {mean} ({s.valid} valid, {s.invalid} invalid, {s.failed + s.pending} failed)"
        )
    print("report -> " + ", ".join(str(p) for p in paths.values()))
    return 0


REPORT_COMMAND = "jmllm-judge report"

COMMANDS = {
    "sample": _cmd_sample,
    "captions": _cmd_captions,
    "run": _cmd_run,
    "report": _cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status: 0 ok, 1 runtime failure, 2 bad input or usage,
    3 some judgements have no answer, 130 interrupted.

    >>> main(["report", "/nonexistent/results.json", "-o", "/tmp/report"])
    2
    """
    args = _parser().parse_args(argv)
    setup_logging(args.verbose, ["jmllm"])
    redact = _redactor(args)
    prog = f"jmllm-judge {args.command}"
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # one line for the user; --debug shows the traceback
        if args.debug:
            raise
        code = exit_code_for(e)
        print(redact(error_line(prog, e, code)), file=sys.stderr)
        return code


def _redactor(args: argparse.Namespace) -> Callable[[str], str]:
    """Redaction of the run's secrets (API key, --base-url's query values) in every log line and
    error message."""
    from jmllm.judge.client import RedactingFilter, Redactor

    if args.command != "run":
        return lambda text: text
    redactor = Redactor(os.environ.get(args.api_key_env, "").strip() or None, args.base_url)
    RedactingFilter.install(redactor, logging.getLogger().handlers)
    return redactor


if __name__ == "__main__":
    sys.exit(main())
