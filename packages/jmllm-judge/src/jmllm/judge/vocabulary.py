"""The command-line vocabulary every jmllm command shares (docs/conventions.md), in one module.

Three byte-identical copies exist: ``jmllm.align.vocabulary`` (used by ``jmllm-align``,
``jmllm-joint`` and ``jmllm-bias``) and the copies inside the standalone ``jmllm-judge`` and
``jmllm-userstudy``, which cannot import ``jmllm-align``; a test compares them. The module
imports nothing but the standard library, so ``--help`` stays fast.

- :class:`HelpFormatter`: every option's help ends with its default, written one way,
  ``(default: X)``.
- :func:`add_standard_options`: ``--version``, ``-v/--verbose`` (repeatable) and ``--debug`` on a
  program and on each of its subcommands, with one meaning everywhere.
- :func:`add_model_options`: ``--device`` and ``--dtype`` wherever a model loads.
- :func:`add_json_out`: ``--json-out PATH`` (``-``: standard output).
- :func:`hidden_alias`: a former option name, still accepted, not shown in ``--help``.
- :func:`setup_logging`: what ``-v`` means: nothing but warnings and errors without it (no
  ``INFO`` line, no other library's warnings, retries or progress bars), the steps with ``-v``,
  debug messages with ``-vv``.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="demo", formatter_class=HelpFormatter)
    >>> _ = parser.add_argument("--limit", type=int, default=8, help="images")
    >>> _ = add_standard_options(parser, "jmllm-align")
    >>> parser.parse_args(["-vv", "--limit", "3"]).verbose
    2
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEVICE_HELP",
    "DTYPE_CHOICES",
    "HelpFormatter",
    "add_json_out",
    "add_model_options",
    "add_standard_options",
    "error_line",
    "hidden_alias",
    "package_version",
    "quiet_third_party",
    "setup_logging",
]

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_HELP = "cpu, cuda, cuda:1, … (default: auto, the first GPU if there is one, else the CPU)"
VERBOSE_HELP = (
    "more output, repeatable: -v shows the steps (INFO) and other libraries' warnings and "
    "retries, -vv debug messages too (default: warnings and errors only)"
)
DEBUG_HELP = "show the traceback of a failure"
JSON_OUT_HELP = "write the machine-readable record to this file (-: standard output)"
# Other libraries' loggers: silent below ERROR without -v; below WARNING without -vv.
NOISY_LOGGERS = (
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore2",
    "urllib3",
    "openai",
    "huggingface_hub",
    "datasets",
    "filelock",
    "accelerate",
    "PIL",
    "matplotlib",
)
# read by the libraries when they are imported (a library imported already is set directly)
VERBOSITY_ENV = (
    "TRANSFORMERS_VERBOSITY",
    "DIFFUSERS_VERBOSITY",
    "DATASETS_VERBOSITY",
    "HF_HUB_VERBOSITY",
)


class HelpFormatter(argparse.HelpFormatter):
    """Help whose every option ends with its default, rendered one way: ``(default: X)``.

    An option that takes a value, is not required and has a default gets ``(default: X)``
    appended unless its help already says ``(default: …)`` (a default computed at run time,
    e.g. ``(default: bfloat16 on a GPU)``, is written by hand that way).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default: " in text or "%(default)" in text:
            return text
        if not action.option_strings or action.required or action.nargs == 0:
            return text
        if action.default is None or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action.default, (list, tuple)) and not action.default:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def package_version(distribution: str) -> str:
    """The installed version of ``distribution`` (``unknown`` when it is not installed).

    Example:
        >>> package_version("no-such-distribution")
        'unknown'
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if all(sub is not seen for seen in found):  # aliases share one parser
                    found.append(sub)
    return found


def add_standard_options(
    parser: argparse.ArgumentParser, distribution: str
) -> argparse.ArgumentParser:
    """``--version``, ``-v/--verbose`` and ``--debug`` on ``parser`` and every subcommand.

    On a subcommand they default to nothing (``argparse.SUPPRESS``), so ``prog -v cmd`` and
    ``prog cmd -v`` both work and one never undoes the other. The parsed namespace always holds
    ``verbose`` (an int) and ``debug`` (a bool).

    Args:
        parser: the program's parser, subcommands added.
        distribution: the distribution whose version ``--version`` prints.

    Returns:
        ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(prog="x")
        >>> _ = p.add_subparsers(dest="command").add_parser("run")
        >>> args = add_standard_options(p, "jmllm-align").parse_args(["-v", "run", "-v"])
        >>> args.verbose, args.debug
        (1, False)
    """
    version = f"{distribution} {package_version(distribution)}"

    def add(target: argparse.ArgumentParser, top: bool) -> None:
        taken = {s for action in target._actions for s in action.option_strings}
        if "--version" not in taken:
            target.add_argument(
                "--version", action="version", version=version, help="print the version and exit"
            )
        if "--verbose" not in taken:
            target.add_argument(
                "-v",
                "--verbose",
                action="count",
                default=0 if top else argparse.SUPPRESS,
                help=VERBOSE_HELP,
            )
        if "--debug" not in taken:
            target.add_argument(
                "--debug",
                action="store_true",
                default=False if top else argparse.SUPPRESS,
                help=DEBUG_HELP,
            )
        for sub in _subparsers(target):
            add(sub, False)

    add(parser, True)
    return parser


def hidden_alias(parser: Any, *names: str, dest: str, **kwargs: Any) -> argparse.Action:
    """A former option name, still accepted (into ``dest``) but not shown in ``--help``.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument("--mllm")
        >>> _ = hidden_alias(p, "--llava", dest="mllm")
        >>> p.parse_args(["--llava", "x"]).mllm
        'x'
    """
    kwargs.setdefault("default", argparse.SUPPRESS)
    action: argparse.Action = parser.add_argument(
        *names, dest=dest, help=argparse.SUPPRESS, **kwargs
    )
    return action


def add_model_options(
    parser: Any,
    *,
    dtype_help: str = "weights dtype (default: auto, bfloat16 on a GPU, float32 on the CPU)",
    device_help: str = DEVICE_HELP,
) -> None:
    """``--device`` and ``--dtype {auto,float32,bfloat16,float16}``, as every command that loads
    a model has them (defaults: ``None``, i.e. auto, and ``auto``)."""
    parser.add_argument("--device", default=None, help=device_help)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=dtype_help)


def add_json_out(parser: Any, help: str = JSON_OUT_HELP) -> None:
    """``--json-out PATH`` (``-``: standard output), and ``--json``, its former spelling for
    ``--json-out -``, hidden."""
    parser.add_argument("--json-out", metavar="PATH", default=None, help=help + " (default: none)")
    hidden_alias(parser, "--json", dest="json_out", action="store_const", const="-")


def quiet_third_party(verbose: int | bool) -> None:
    """Every command's rule for other libraries' chatter: without ``-v`` their warnings (Python
    ``warnings`` raised outside ``jmllm``, log records below ERROR), retries and model-loading
    progress bars are silenced; with ``-v`` their warnings and bars show, with ``-vv`` their
    ``INFO`` too. The project's own warnings and progress bars are never silenced. Libraries
    imported later read the same choice from their environment variables
    (``TRANSFORMERS_VERBOSITY``, …; without ``-v`` a value the user set wins).

    Args:
        verbose: the command's ``-v`` count.

    Example:
        >>> quiet_third_party(verbose=1)
    """
    verbose = int(verbose)
    level = ("error", "warning", "info")[min(verbose, 2)]
    if not verbose:
        warnings.filterwarnings("ignore", module=r"(?!jmllm)")  # warnings raised outside jmllm
    # other libraries' loggers: errors only without -v, warnings with -v, everything with -vv
    others = (logging.ERROR, logging.WARNING, logging.NOTSET)[min(verbose, 2)]
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(others)
    # libraries not imported yet read these when they are (and configure their loggers then)
    settings = {name: level for name in VERBOSITY_ENV}
    settings["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if verbose else "1"  # transformers' bars too
    for name, value in settings.items():
        if verbose:
            os.environ[name] = value
        else:
            os.environ.setdefault(name, value)
    # libraries imported already: their own switches
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:
        hub.logging.set_verbosity(getattr(logging, level.upper()))
        (hub.enable_progress_bars if verbose else hub.disable_progress_bars)()
    for module in ("transformers.utils.logging", "diffusers.utils.logging"):
        found = sys.modules.get(module)
        if found is not None:
            found.set_verbosity(getattr(logging, level.upper()))
            (found.enable_progress_bar if verbose else found.disable_progress_bar)()


def setup_logging(verbose: int | bool, names: Sequence[str] = ()) -> None:
    """What ``-v`` means in every jmllm command.

    - no ``-v``: warnings and errors only; no ``INFO`` line; other libraries silent
      (:func:`quiet_third_party`);
    - ``-v``: the steps (``INFO``), other libraries' warnings and retries;
    - ``-vv``: debug messages, other libraries' included (HTTP requests).

    Args:
        verbose: the ``-v`` count.
        names: the program's own loggers, set to the chosen level even if configured before.

    Example:
        >>> setup_logging(0)
    """
    verbose = int(verbose)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    for name in names:
        logging.getLogger(name).setLevel(level)
    quiet_third_party(verbose)


def error_line(prog: str, exc: BaseException, code: int) -> str:
    """The one line a command prints when it stops on ``exc`` with exit ``code``:
    ``PROG: error: MESSAGE``; a runtime failure (code 1) adds the exception's type and the
    pointer to ``--debug``.

    Example:
        >>> error_line("jmllm-align train", ValueError("--lr: must be > 0"), 2)
        'jmllm-align train: error: --lr: must be > 0'
        >>> error_line("jmllm-align train", MemoryError("70 GB"), 1)
        'jmllm-align train: error: MemoryError: 70 GB (run with --debug for the traceback)'
    """
    message = _shown_message(" ".join(str(exc).split())) or type(exc).__name__
    if code == 1:
        message = f"{type(exc).__name__}: {message} (run with --debug for the traceback)"
    return f"{prog}: error: {message}"


ERROR_LIMIT = 400  # characters of an error's message (a 10 000-character input stays one line)


def _shown_message(text: str, limit: int = ERROR_LIMIT) -> str:
    """A message safe for a terminal: control characters escaped (``\\x1b``), cut in the
    middle to ``limit`` characters (the start names the input, the end says the problem)."""
    text = "".join(
        ch if ch.isprintable() else (f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        for ch in text
    )
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 3
    return f"{text[:head]}…{text[-(limit - 1 - head) :]}"
