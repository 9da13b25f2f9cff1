"""Command-line conventions shared by ``jmllm-align``, ``jmllm-joint`` and ``jmllm-bias``
(docs/conventions.md).

- **Exit codes**: :data:`EXIT_OK` 0, :data:`EXIT_FAILURE` 1 (the run failed: out of memory, disk
  full, a model error), :data:`EXIT_USAGE` 2 (bad input or usage: an option value, a missing or
  malformed input file, inputs that do not fit together — fixing the input fixes it),
  :data:`EXIT_PARTIAL` 3 (finished, but some items were skipped and counted, or the run stopped
  early with a resumable checkpoint), 130 on Ctrl-C.
- **Numbers are checked at the boundary**: the argparse types below refuse NaN, infinities and
  out-of-range values with one line naming the option (``argument --top-p: must be in (0, 1],
  got 2``), before any model is loaded.
- **One-line usage errors**: :class:`ArgumentParser` prints ``prog: error: …`` and a pointer to
  ``--help`` instead of the whole usage block.
- **Text from files and models is made safe where it is shown**: :func:`printable` escapes
  control characters (a terminal must not obey an ``ESC`` sequence hidden in a file), :func:`clip`
  also cuts an echoed value to :data:`VALUE_LIMIT` characters, :func:`one_line` does both to a
  whole error message, and :func:`markdown_text` escapes text for Markdown (HTML included).

Example:
    >>> parser = ArgumentParser(prog="demo")
    >>> _ = parser.add_argument("--top-p", type=unit_interval(open_low=True), default=1.0)
    >>> parser.parse_args(["--top-p", "0.9"]).top_p
    0.9
"""

from __future__ import annotations

import argparse
import html
import logging
import math
import re
import string
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from jmllm.align.vocabulary import NOISY_LOGGERS, HelpFormatter, quiet_third_party

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "MESSAGE_LIMIT",
    "NOISY_LOGGERS",
    "VALUE_LIMIT",
    "ArgumentParser",
    "EscapingFormatter",
    "check_finite",
    "check_template",
    "clip",
    "configure_logging",
    "exit_code_for",
    "finite_float",
    "integer",
    "markdown_text",
    "one_line",
    "printable",
    "quiet_third_party",
    "template_type",
    "unit_interval",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (exit code 2) and whose help
    shows every default one way (:class:`jmllm.align.vocabulary.HelpFormatter`).

    Subparsers made with ``add_subparsers`` are of the same class (argparse's default).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(text.strip())
    except (TypeError, ValueError):
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {name}, got {text!r}") from None


def _range_text(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    if low is not None:
        return f"{'>' if open_low else '>='} {low:g}"
    if high is not None:
        return f"{'<' if open_high else '<='} {high:g}"
    return "finite"


def check_finite(
    value: float,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` if it is a finite number in the range, else ``ValueError`` naming ``name``.

    Example:
        >>> check_finite(0.5, "lr", low=0, open_low=True)
        0.5
        >>> check_finite(float("nan"), "lr")
        Traceback (most recent call last):
        ...
        ValueError: lr: must be a finite number, got nan
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        raise ValueError(
            f"{name}: must be {_range_text(low, high, open_low, open_high)}, got {value:g}"
        )
    return value


def finite_float(
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> Callable[[str], float]:
    """An argparse ``type``: a finite float, optionally in a range (closed unless ``open_*``).

    Example:
        >>> finite_float(0, open_low=True)("1e-4")
        0.0001
    """

    def parse(text: str) -> float:
        value = _number(text, float)
        try:
            return check_finite(value, "value", low, high, open_low=open_low, open_high=open_high)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None

    parse.__name__ = "number"  # argparse names the type in "invalid number value" messages
    return parse


def unit_interval(*, open_low: bool = False, open_high: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a probability-like number in [0, 1] (ends optionally open).

    Example:
        >>> unit_interval(open_low=True)("1")
        1.0
    """
    return finite_float(0.0, 1.0, open_low=open_low, open_high=open_high)


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer, optionally in ``[low, high]``.

    Example:
        >>> integer(1)("16")
        16
    """

    def parse(text: str) -> int:
        value = _number(text, int)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be {_range_text(low, high, False, False)}, got {value}"
            )
        return int(value)

    parse.__name__ = "integer"
    return parse


def check_template(template: Any, what: str = "template") -> str:
    """A ``str.format`` template with exactly one bare ``{}`` field and nothing else to fill.

    ``{{`` and ``}}`` stand for literal braces. Named or numbered fields, a second ``{}``,
    conversions (``{!r}``) and format specs (``{:>10}``) are refused: they either fail at
    ``format`` time or silently change (or drop) the inserted name.

    Raises:
        ValueError: naming ``what`` and the problem.

    Example:
        >>> check_template("a photo of a {}")
        'a photo of a {}'
        >>> check_template("{}{}", "--template")
        Traceback (most recent call last):
        ...
        ValueError: --template '{}{}': must contain exactly one {} (found 2)
    """
    if not isinstance(template, str):
        raise ValueError(f"{what}: must be text, got {type(template).__name__}")
    try:
        fields = [f for f in string.Formatter().parse(template) if f[1] is not None]
    except ValueError as exc:  # a lone "{" or "}"
        raise ValueError(
            f"{what} {template!r}: not a valid template ({exc}); write {{{{ and }}}} for braces"
        ) from None
    if len(fields) != 1:
        raise ValueError(
            f"{what} {template!r}: must contain exactly one {{}} (found {len(fields)})"
        )
    _, name, spec, conversion = fields[0]
    if name or spec or conversion:
        raise ValueError(
            f"{what} {template!r}: the field must be a bare {{}} (no name, conversion or format "
            "spec)"
        )
    return template


def template_type(what: str = "template") -> Callable[[str], str]:
    """An argparse ``type`` running :func:`check_template`."""

    def parse(text: str) -> str:
        try:
            return check_template(text, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "template"
    return parse


def exit_code_for(exc: BaseException) -> int:
    """The exit code of a command that stopped on ``exc`` (docs/conventions.md).

    - an ``exit_code`` attribute on the exception wins (e.g. a model that cannot be loaded from
      the path given is bad input, although it is an ``OSError``);
    - ``ValueError`` / ``LookupError`` (bad values, malformed files, inputs that do not fit) and
      path errors (no such file, not a folder, already exists, permission denied): 2;
    - Ctrl-C: 130; anything else (out of memory, disk full, a bug): 1.

    Example:
        >>> exit_code_for(ValueError("--lr: must be > 0")), exit_code_for(MemoryError())
        (2, 1)
    """
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, (ValueError, LookupError)):
        return EXIT_USAGE
    path_errors = (
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        FileExistsError,
        PermissionError,
    )
    if isinstance(exc, path_errors):
        return EXIT_USAGE
    return EXIT_FAILURE


VALUE_LIMIT = 200  # characters of a value from a file or the command line echoed in a message
MESSAGE_LIMIT = 400  # characters of a whole one-line error message

# What a terminal, a Markdown viewer or a log must never receive raw: C0/C1 controls (ESC starts
# terminal commands, BEL, DEL …), line and paragraph separators, surrogates, private-use code
# points, and the bidirectional overrides that reorder what is shown ("Trojan source").
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
    "\ud800-\udfff\ue000-\uf8ff]"
)
_UNSAFE_WITH_BREAKS = re.compile(_UNSAFE.pattern[:-1] + "\\t\\n]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, keep_newlines: bool = False) -> str:
    r"""``text`` with every control character escaped as ``\xNN`` / ``\uNNNN``, so that a
    terminal, a log or a Markdown page shows it instead of obeying it.

    Args:
        text: anything; ``str()`` of it is escaped.
        keep_newlines: keep line breaks and tabs (multi-line model answers); otherwise they are
            escaped too.

    Example:
        >>> printable("\x1b]0;PWNED\x07\x1b[2J")
        '\\x1b]0;PWNED\\x07\\x1b[2J'
        >>> printable("two\nlines", keep_newlines=True)
        'two\nlines'
    """
    pattern = _UNSAFE if keep_newlines else _UNSAFE_WITH_BREAKS
    return pattern.sub(_escape_char, str(text))


def clip(text: object, limit: int = VALUE_LIMIT) -> str:
    """A value made safe to echo in a one-line message: :func:`printable`, and cut to ``limit``
    characters (``…`` and the full length mark the cut).

    Example:
        >>> clip("x" * 10_000, 10)
        'xxxxxxxxxx… (10000 characters)'
    """
    raw = str(text)
    shown = printable(raw[: limit + 1])
    if len(raw) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[:limit]}… ({len(raw)} characters)"


def _cut_middle(text: str, limit: int) -> str:
    # the start names the input and the end says the problem: cut in between
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 3
    tail = limit - 1 - head
    return f"{text[:head]}…{text[-tail:] if tail else ''}"


def one_line(exc: BaseException, limit: int = MESSAGE_LIMIT) -> str:
    r"""The exception's message on one line (its type name when it has none), control characters
    escaped and cut in the middle to ``limit`` characters.

    Example:
        >>> one_line(ValueError("bad\n value \x1b[2J"))
        'bad value \\x1b[2J'
        >>> len(one_line(ValueError("name " + "x" * 10_000 + ": too long")))
        400
    """
    text = printable(" ".join(str(exc).split()))
    return _cut_middle(text, limit) or type(exc).__name__


# what changes Markdown's meaning inside a line: escapes, code, emphasis, links and images,
# table cells, strikethrough, maths, headings (intraword "_" is plain text in CommonMark)
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]|~$#]|(?<!\w)_|_(?!\w))")


def markdown_text(text: object, limit: int | None = None) -> str:
    r"""Text from a file or a model made safe for Markdown (a table cell, a list item, a
    heading): HTML-escaped (``&``, ``<``, ``>``), Markdown punctuation backslash-escaped, control
    characters escaped, line breaks shown as ``⏎``; cut at ``limit`` characters if given.

    Example:
        >>> print(markdown_text("<b>x</b> | *y*"))
        &lt;b&gt;x&lt;/b&gt; \| \*y\*
    """
    raw = str(text)
    if limit is not None and len(raw) > limit:
        raw = raw[:limit] + "…"
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    lines = [printable(line) for line in raw.split("\n")]
    escaped = [_MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(line, quote=False)) for line in lines]
    return " ⏎ ".join(escaped)


class EscapingFormatter(logging.Formatter):
    """A log formatter that escapes control characters (:func:`printable`, line breaks kept):
    file names and model text reach the log, which a terminal shows."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep_newlines=True)


def configure_logging(**kwargs: Any) -> None:
    """``logging.basicConfig(**kwargs)`` with :class:`EscapingFormatter` on the handlers it adds
    (nothing changes where logging was configured already, e.g. under pytest).

    Example:
        >>> configure_logging(level=logging.WARNING, format="%(levelname)s %(message)s")
    """
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(**kwargs)
    for handler in root.handlers:
        if handler not in before:
            handler.setFormatter(EscapingFormatter(kwargs.get("format"), kwargs.get("datefmt")))


def print_error(prog: str, message: str) -> None:
    """Print ``prog: error: <first line of message>`` on stderr."""
    lines = str(message).strip().splitlines()
    print(f"{prog}: error: {lines[0] if lines else 'unknown error'}", file=sys.stderr)
