"""Command line: ``jmllm-userstudy example|render|score|serve``.

Spec to scored results in three commands::

    jmllm-userstudy render study.yaml --out site/          # site/questionnaire.html
    # participants answer and send back the downloaded answers-*.json files -> answers/
    jmllm-userstudy score study.yaml answers/ --out results/
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]

log = logging.getLogger("jmllm.userstudy")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jmllm-userstudy",
        description="User study of GA explanations: render a spec into a self-contained HTML "
        "questionnaire, collect the answer files, score them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "example", help="write an example spec (paper's structure, placeholder images)"
    )
    p.add_argument("out", help="folder to write study.yaml and images/ into")

    p = sub.add_parser("render", help="render SPEC into OUT/questionnaire.html")
    p.add_argument("spec", help="study spec (YAML or JSON)")
    p.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("score", help="score the answer files in ANSWERS_DIR against SPEC")
    p.add_argument("spec", help="study spec the questionnaire was rendered from")
    p.add_argument("answers_dir", help="folder of answers-*.json files")
    p.add_argument(
        "--out", required=True, help="folder for results.md, results.json, per_question.png"
    )

    p = sub.add_parser("serve", help="serve the questionnaire and store posted answers")
    p.add_argument("spec", help="study spec (YAML or JSON)")
    p.add_argument("--answers", required=True, help="folder to store submissions in")
    p.add_argument("--host", default="127.0.0.1", help="interface (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 bad input).

    >>> main(["render", "/nonexistent/study.yaml", "--out", "/tmp/x"])
    1
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Heavy imports (scipy, matplotlib) only for the command that needs them, so --help is fast.
    from .spec import SpecError, load_spec

    try:
        if args.command == "example":
            from .example import write_example

            print(write_example(args.out))
        elif args.command == "render":
            from .render import write_questionnaire

            print(write_questionnaire(load_spec(args.spec), args.out))
        elif args.command == "score":
            from .report import write_results
            from .score import score_answers

            score = score_answers(load_spec(args.spec), args.answers_dir)
            paths = write_results(score, args.out)
            o = score.overall
            share = "n/a" if o.total == 0 else f"{100 * o.share:.0f}%"
            print(
                f"{len(score.participants)} submissions scored, {len(score.problems)} not scored; "
                f"overall {o.correct}/{o.total} correct ({share})"
            )
            for problem in score.problems:
                log.warning("%s not scored: %s (%s)", problem.file, problem.kind, problem.detail)
            for path in paths.values():
                print(path)
        elif args.command == "serve":
            from .serve import make_server

            server = make_server(load_spec(args.spec), args.answers, host=args.host, port=args.port)
            host, port = server.server_address[:2]
            print(
                f"serving http://{host!s}:{port}/ ; answers go to {args.answers} (Ctrl-C stops)",
                flush=True,
            )
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.server_close()
    except (SpecError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as exc:
        print(f"jmllm-userstudy: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
