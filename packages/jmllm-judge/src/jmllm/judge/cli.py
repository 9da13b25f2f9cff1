"""``jmllm-judge``: sample → captions → run → report, one command per step.

jmllm-judge sample   --coco captions_train2017.json --images-dir train2017 -n 100 -o run/manifest.json
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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jmllm.judge.errors import JudgeError

log = logging.getLogger("jmllm.judge")

EXIT_FAILED_JUDGEMENTS = 3  # the run finished but some judgements have no answer yet
EXIT_INTERRUPTED = 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jmllm-judge")
    except PackageNotFoundError:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jmllm-judge",
        description="Reproducible, resumable GPT-as-a-judge scoring of image captions "
        "(supplementary §1.1 and Table 1 of Giulivi & Boracchi, BMVC 2024).",
        epilog="Run `jmllm-judge COMMAND --help` for each step.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="-v: retries; -vv: HTTP debug"
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
        "--images-dir",
        type=Path,
        metavar="DIR",
        help="with --coco: local images (default: coco_url)",
    )
    p.add_argument(
        "--ground-truth",
        type=Path,
        metavar="JSONL",
        help='with --folder: {"image", "caption"} lines',
    )
    p.add_argument("--split", default="train", help="with --dataset (default: train)")
    p.add_argument("--image-column", default="image", help="with --dataset (default: image)")
    p.add_argument(
        "--caption-column", default="caption", help="with --dataset; '' for none (default: caption)"
    )
    p.add_argument("--id-column", default=None, help="with --dataset (default: row index)")
    p.add_argument(
        "-n", type=int, default=100, help="number of images (default: 100, as the paper)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument(
        "-o", "--out", type=Path, required=True, metavar="MANIFEST", help="manifest JSON to write"
    )

    p = sub.add_parser("captions", help="one caption per manifest image for a system")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--system", required=True, help="the system's name in the report")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--ground-truth", action="store_true", help="the manifest's ground-truth captions"
    )
    source.add_argument(
        "--from-jsonl",
        type=Path,
        metavar="JSONL",
        help="any system's output: lines with 'image_id' or 'image', and the caption",
    )
    source.add_argument(
        "--joint", action="store_true", help="generate with J or stock LLaVA (joint extra)"
    )
    p.add_argument(
        "--caption-field", default="caption", help="with --from-jsonl (default: caption)"
    )
    p.add_argument(
        "--vision",
        choices=("joint", "llava"),
        default="joint",
        help="with --joint: joint = J (OWL-ViT + W + LLaVA), llava = stock LLaVA (default: joint)",
    )
    p.add_argument("--owl", help="with --joint: OWL-ViT id or folder")
    p.add_argument("--llava", help="with --joint: LLaVA-1.5 id or folder")
    p.add_argument("--alignment", help="with --joint: alignment weights (.safetensors) or Hub repo")
    p.add_argument(
        "--template",
        choices=("paper", "llava-1.5"),
        default="paper",
        help="with --joint: conversation template; paper (default) is the authors' "
        "'<image>\\nUSER: {question}\\nASSISTANT:' that produced Table 1, llava-1.5 the model "
        "card's 'USER: <image>\\n{question} ASSISTANT:'",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="with --joint (default: 256)")
    p.add_argument("--batch-size", type=int, default=4, help="with --joint (default: 4)")
    p.add_argument(
        "-o", "--out", type=Path, required=True, metavar="JSONL", help="captions file to write"
    )

    p = sub.add_parser("run", help="judge every caption (resumes from the cache)")
    p.add_argument("--manifest", type=Path, required=True)
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
        "--base-url", default=None, help="OpenAI-compatible API root, e.g. http://localhost:8000/v1"
    )
    p.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="NAME",
        help="environment variable that holds the API key (default: OPENAI_API_KEY)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="SQLite cache (default: judge-cache.sqlite beside --out)",
    )
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    p.add_argument(
        "--max-attempts", type=int, default=8, help="attempts per judgement (default: 8)"
    )
    p.add_argument(
        "--judge-prompt",
        choices=("authors", "supplementary"),
        default="authors",
        help="judge user prompt: authors (default; the script that produced Table 1, caption "
        "in double quotes) or supplementary (its printed text, caption bare)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="(default: 0, as the paper)")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="reply length cap (default: not sent)"
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
        "--resamples", type=int, default=10_000, help="bootstrap resamples (default: 10000)"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    return parser


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None, leave=False)


def _cmd_sample(args: argparse.Namespace) -> int:
    from jmllm.judge.manifest import sample_coco, sample_dataset, sample_folder

    if args.coco is not None:
        manifest = sample_coco(args.coco, args.n, seed=args.seed, images_dir=args.images_dir)
    elif args.folder is not None:
        manifest = sample_folder(
            args.folder, args.n, seed=args.seed, ground_truth=args.ground_truth
        )
    else:
        manifest = sample_dataset(
            args.dataset,
            args.out.resolve().parent,
            args.n,
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

    manifest = Manifest.load(args.manifest)
    if args.ground_truth:
        captions = captions_from_ground_truth(manifest, args.system)
    elif args.from_jsonl is not None:
        captions = captions_from_jsonl(
            manifest, args.from_jsonl, args.system, caption_field=args.caption_field
        )
    else:
        with _progress(len(manifest), f"captions {args.system}") as bar:
            captions = captions_from_joint(
                manifest,
                args.system,
                owl=args.owl,
                llava=args.llava,
                alignment=args.alignment,
                vision=args.vision,
                template=args.template,
                max_new_tokens=args.max_new_tokens,
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
    cache_path = args.cache if args.cache is not None else args.out.parent / "judge-cache.sqlite"
    with JudgeCache(cache_path) as cache:
        try:
            results = asyncio.run(
                judge_all(manifest, systems, settings, cache, api_key=api_key, show_progress=True)
            )
        except KeyboardInterrupt:
            counts = cache.counts()
            print(
                f"interrupted: {counts.get('answered', 0)} judgements are safe in {cache_path}; "
                "run the same command again to send only the missing ones",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
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


def _cmd_report(args: argparse.Namespace) -> int:
    from jmllm.judge.report import build_report, write_report
    from jmllm.judge.runner import load_results

    report = build_report(load_results(args.results), resamples=args.resamples, seed=args.seed)
    paths = write_report(report, args.out)
    for s in report.systems:
        mean = "—" if s.mean is None else f"{s.mean:.2f}"
        print(
            f"{s.system}: {mean} ({s.valid} valid, {s.invalid} invalid, {s.failed + s.pending} failed)"
        )
    print("report -> " + ", ".join(str(p) for p in paths.values()))
    return 0


COMMANDS = {
    "sample": _cmd_sample,
    "captions": _cmd_captions,
    "run": _cmd_run,
    "report": _cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.verbose < 2:  # keep third-party HTTP chatter out of -v
        for name in ("httpx", "httpx2", "httpcore", "httpcore2", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except JudgeError as e:
        print(f"jmllm-judge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
