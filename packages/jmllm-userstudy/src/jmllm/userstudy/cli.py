"""Command line: ``jmllm-userstudy example|render|score|serve``.

Spec to scored results in three commands::

    jmllm-userstudy render study.yaml -o site/             # site/questionnaire.html
    # participants answer and send back the downloaded answers-*.json files -> answers/
    jmllm-userstudy score study.yaml answers/ -o results/
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .conventions import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    ArgumentParser,
    UsageError,
    exit_code_for,
    finite_float,
    integer,
)
from .vocabulary import (
    DTYPE_CHOICES,
    add_standard_options,
    error_line,
    setup_logging,
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "example",
        help="write an example study: toy-world scenes and the toy J's GA maps (needs the "
        "joint extra), or the paper's structure with placeholder images",
    )
    p.add_argument(
        "-o", "--out", help="folder to write study.yaml and images/ into (default: none, required)"
    )
    # the folder was once a positional argument: still accepted, not shown
    p.add_argument("out_positional", nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument(
        "--device",
        default=None,
        help="without --placeholders: where the toy J runs, cpu, cuda, cuda:1, … (default: the "
        "CPU)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="without --placeholders: the toy J's weights dtype (default: auto, float32)",
    )
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
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)

    p = sub.add_parser("score", help="score the answer files in ANSWERS_DIR against SPEC")
    p.add_argument("spec", help="study spec the questionnaire was rendered from")
    p.add_argument("answers_dir", help="folder of answers-*.json files")
    p.add_argument(
        "-o", "--out", required=True, help="folder for results.md, results.json, per_question.png"
    )
    p.add_argument("--force", action="store_true", help=FORCE_HELP)

    p = sub.add_parser("serve", help="serve the questionnaire and store posted answers")
    p.add_argument("spec", help="study spec (YAML or JSON)")
    p.add_argument("--answers", required=True, help="folder to store submissions in")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default: 127.0.0.1, this machine only)",
    )
    p.add_argument("--port", type=integer(0, 65535), default=8000, help="TCP port, 0-65535")
    p.add_argument(
        "--timeout",
        type=finite_float(0, 3600, open_low=True),
        default=30.0,
        help="seconds a client has for each read of its request",
    )
    return add_standard_options(parser, "jmllm-userstudy")


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
    # the server's own output: one plain line per submission (not an INFO log line)
    activity = logging.getLogger("jmllm.userstudy.serve")
    if not any(getattr(h, "jmllm_activity", False) for h in activity.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.jmllm_activity = True  # type: ignore[attr-defined]
        activity.addHandler(handler)
    activity.setLevel(logging.DEBUG if args.verbose >= 2 else logging.INFO)
    activity.propagate = False
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


def _example(args: argparse.Namespace) -> int:
    from .example import write_example
    from .from_joint import MissingExtraError

    if args.out and args.out_positional and args.out != args.out_positional:
        raise UsageError(f"-o/--out {args.out}: and a folder {args.out_positional}: give one")
    out = args.out or args.out_positional
    if not out:
        raise UsageError("-o/--out: required (the folder to write study.yaml and images/ into)")
    source = "placeholders" if args.placeholders else "toy"
    try:
        path = write_example(
            out, force=args.force, source=source, device=args.device, dtype=args.dtype
        )
    except MissingExtraError as exc:
        raise UsageError(str(exc)) from None
    print(path)
    return EXIT_OK


def _render(args: argparse.Namespace) -> int:
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
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status: 0 ok, 1 failure, 2 bad input or usage, 3 some answer
    files could not be scored.

    >>> main(["render", "/nonexistent/study.yaml", "-o", "/tmp/x"])
    2
    """
    args = _parser().parse_args(argv)
    setup_logging(args.verbose, ["jmllm"])
    # Heavy imports (scipy, matplotlib) only in the command that needs them: --help is fast.
    commands = {"example": _example, "render": _render, "score": _score, "serve": _serve}
    prog = f"jmllm-userstudy {args.command}"
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line for the user; --debug shows the traceback
        if args.debug:
            raise
        code = exit_code_for(exc)
        print(error_line(prog, exc, code), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
