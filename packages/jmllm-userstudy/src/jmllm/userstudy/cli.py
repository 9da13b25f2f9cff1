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

from .conventions import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    ArgumentParser,
    configure_logging,
    exit_code_for,
    finite_float,
    integer,
    one_line,
)

__all__ = ["main"]

FORCE_HELP = (
    "write into an --out that holds files this command did not write (they are never replaced "
    "or deleted)"
)
log = logging.getLogger("jmllm.userstudy")


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="jmllm-userstudy",
        description="User study of GA explanations: render a spec into a self-contained HTML "
        "questionnaire, collect the answer files, score them. Exit codes: 0 ok, 1 failure, "
        "2 bad input or usage, 3 some answer files could not be scored.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "example",
        help="write an example study: toy-world scenes and the toy J's GA maps (needs the "
        "joint extra), or the paper's structure with placeholder images",
    )
    p.add_argument("out", help="folder to write study.yaml and images/ into")
    p.add_argument(
        "--placeholders",
        action="store_true",
        help="the paper's questions with generated placeholder images (no model needed)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier example's study.yaml and images, or write beside other files "
        "(a study.yaml or images/ it did not write is never replaced)",
    )

    p = sub.add_parser("render", help="render SPEC into OUT/questionnaire.html")
    p.add_argument("spec", help="study spec (YAML or JSON)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)

    p = sub.add_parser("score", help="score the answer files in ANSWERS_DIR against SPEC")
    p.add_argument("spec", help="study spec the questionnaire was rendered from")
    p.add_argument("answers_dir", help="folder of answers-*.json files")
    p.add_argument(
        "--out", required=True, help="folder for results.md, results.json, per_question.png"
    )
    p.add_argument("--force", action="store_true", help=FORCE_HELP)

    p = sub.add_parser("serve", help="serve the questionnaire and store posted answers")
    p.add_argument("spec", help="study spec (YAML or JSON)")
    p.add_argument("--answers", required=True, help="folder to store submissions in")
    p.add_argument("--host", default="127.0.0.1", help="interface (default: this machine only)")
    p.add_argument(
        "--port", type=integer(0, 65535), default=8000, help="TCP port, 0-65535 (default 8000)"
    )
    p.add_argument(
        "--timeout",
        type=finite_float(0, 3600, open_low=True),
        default=30.0,
        help="seconds a client has for each read of its request (default 30)",
    )
    return parser


def _score(args: argparse.Namespace) -> int:
    from .conventions import check_output_claim, check_output_dir, output_folder
    from .report import write_results
    from .score import score_answers
    from .spec import load_spec

    check_output_dir(args.out, "--out")
    outputs = ("results.md", "results.json", "per_question.png")
    check_output_claim(args.out, "jmllm-userstudy score", outputs, force=args.force)
    score = score_answers(load_spec(args.spec), args.answers_dir)
    with output_folder(
        args.out, command="jmllm-userstudy score", outputs=outputs, force=args.force
    ):
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
    # an exact copy scored once is no loss; any other file set aside leaves the results partial
    lost = [p for p in score.problems if p.kind != "duplicate"]
    return EXIT_PARTIAL if lost else EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from .serve import make_server
    from .spec import load_spec

    server = make_server(
        load_spec(args.spec), args.answers, host=args.host, port=args.port, timeout=args.timeout
    )
    logging.getLogger("jmllm.userstudy.serve").setLevel(logging.INFO)  # one line per submission
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
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status: 0 ok, 1 failure, 2 bad input or usage, 3 some answer
    files could not be scored.

    >>> main(["render", "/nonexistent/study.yaml", "--out", "/tmp/x"])
    2
    """
    args = _parser().parse_args(argv)
    configure_logging(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        # Heavy imports (scipy, matplotlib) only for the command that needs them: --help is fast.
        if args.command == "example":
            from .conventions import UsageError
            from .example import write_example
            from .from_joint import MissingExtraError

            source = "placeholders" if args.placeholders else "toy"
            try:
                print(write_example(args.out, force=args.force, source=source))
            except MissingExtraError as exc:
                raise UsageError(str(exc)) from None
        elif args.command == "render":
            from .conventions import check_output_claim, check_output_dir, output_folder
            from .render import QUESTIONNAIRE_NAME, write_questionnaire
            from .spec import load_spec

            check_output_dir(args.out, "--out")
            outputs = (QUESTIONNAIRE_NAME,)
            check_output_claim(args.out, "jmllm-userstudy render", outputs, force=args.force)
            spec = load_spec(args.spec)
            with output_folder(
                args.out, command="jmllm-userstudy render", outputs=outputs, force=args.force
            ):
                print(write_questionnaire(spec, args.out))
        elif args.command == "score":
            return _score(args)
        elif args.command == "serve":
            return _serve(args)
    except KeyboardInterrupt:
        print("jmllm-userstudy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line for the user; -v logs a failure's traceback too
        code = exit_code_for(exc)
        if code == EXIT_FAILURE:  # not a usage error: -v shows where it came from
            log.info("traceback", exc_info=True)
        detail = one_line(exc) if code != EXIT_FAILURE else f"{type(exc).__name__}: {one_line(exc)}"
        print(f"jmllm-userstudy: error: {detail}", file=sys.stderr)
        return code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
