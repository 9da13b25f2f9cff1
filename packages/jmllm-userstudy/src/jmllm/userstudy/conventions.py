"""The command-line and file conventions every jmllm package follows, in one small module.

The packages that stand alone (``jmllm-judge``, ``jmllm-userstudy``) cannot import
``jmllm-align``'s ``jmllm.align.options``, ``jmllm.align.images`` and ``jmllm.align.files``, which
the other packages follow (docs/conventions.md), so they carry this file; the two copies are
byte-identical and behave as ``jmllm-align``'s modules (tests compare both, case by case).

- **Exit codes**: :data:`EXIT_OK` 0; :data:`EXIT_FAILURE` 1, the run failed (disk full, a
  server or model error); :data:`EXIT_USAGE` 2, bad input or usage (an option value, a missing,
  malformed or unwritable path: fixing the input fixes it); :data:`EXIT_PARTIAL` 3, finished but
  some items were skipped and counted; :data:`EXIT_INTERRUPTED` 130 on Ctrl-C.
- **Numbers are checked at the boundary**: the argparse types :func:`finite_float` and
  :func:`integer` refuse NaN, infinities and out-of-range values with one line naming the option.
  Usage errors are one line (:class:`ArgumentParser`).
- **Images**: at most :data:`MAX_IMAGE_PIXELS` (20 000 × 20 000) pixels, checked from the header
  before any pixel is decoded (:func:`check_image_header`, :func:`open_image`); a larger image is
  refused with one line naming the file.
- **Output files** are written atomically (temporary file in the same folder, flushed and fsynced,
  ``os.replace``; the temporary file is removed on any error) with ordinary permissions,
  ``0o666 & ~umask`` (:func:`atomic_write_bytes`). Output paths are checked before the work starts
  (:func:`check_output_file`, :func:`check_output_dir`), and a run that fails leaves no empty
  folder behind (:func:`output_folder`).
- **Never through a link**: every file written is opened without following a symbolic link at its
  name (:func:`open_nofollow`, :func:`refuse_link`); a path read from a data file stays inside its
  root (:func:`resolve_inside`); an output folder holding entries the command did not write is
  refused unless ``force``, which never replaces them (:func:`claim_output_folder`).
- **Text from files and models** is escaped where it is shown (:func:`printable`, :func:`clip`,
  :func:`markdown_text`); every error message is one line of at most :data:`MESSAGE_LIMIT`
  characters (:func:`one_line`); JSON from users is read with one-line errors (:func:`read_json`).

Example:
    >>> parser = ArgumentParser(prog="demo")
    >>> _ = parser.add_argument("--timeout", type=finite_float(0, open_low=True), default=60.0)
    >>> parser.parse_args(["--timeout", "2.5"]).timeout
    2.5
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import html
import json
import logging
import math
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from PIL import Image, UnidentifiedImageError

from .vocabulary import HelpFormatter

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "MAX_IMAGE_PIXELS",
    "MESSAGE_LIMIT",
    "OUTPUTS_RECORD",
    "VALUE_LIMIT",
    "ArgumentParser",
    "EscapingFormatter",
    "ForeignOutputError",
    "ImageLoadError",
    "UnsafePathError",
    "UsageError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_finite",
    "check_image_header",
    "check_output_claim",
    "check_output_dir",
    "check_output_file",
    "check_pixels",
    "claim_output_folder",
    "clip",
    "configure_logging",
    "current_umask",
    "exit_code_for",
    "file_mode",
    "finite_float",
    "foreign_entries",
    "integer",
    "markdown_text",
    "one_line",
    "open_image",
    "open_nofollow",
    "output_folder",
    "parse_json",
    "printable",
    "read_json",
    "refuse_link",
    "remove_empty_folders",
    "resolve_inside",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130

MAX_IMAGE_PIXELS = 20_000 * 20_000  # larger images are refused from their header

# PIL's own guard (a warning above its limit, an error above twice it) must not refuse images
# this limit accepts; ours is checked explicitly from the header, before decoding.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# Errors the user fixes by choosing another path: usage errors (exit 2), not failures.
_PATH_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


class UsageError(ValueError):
    """Bad input or usage (exit code 2); the message names the input and the problem."""


class ImageLoadError(UsageError):
    """An image could not be read, or is refused; the message names the file and the problem."""


# -- text shown to people ----------------------------------------------------------------------

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
    terminal, a log or a Markdown page shows it instead of obeying it (``keep_newlines``: keep
    line breaks and tabs).

    Example:
        >>> printable("\x1b]0;PWNED\x07\x1b[2J")
        '\\x1b]0;PWNED\\x07\\x1b[2J'
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
        >>> one_line(ValueError("bad value\n  more detail \x1b[2J"))
        'bad value more detail \\x1b[2J'
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


def exit_code_for(exc: BaseException) -> int:
    """The exit code of a command that stopped on ``exc``, the same rule as every jmllm package:

    - an ``exit_code`` attribute on the exception wins;
    - ``ValueError`` / ``LookupError`` (bad values, malformed files, inputs that do not fit;
      :class:`UsageError` is one) and path errors (no such file, not a folder, already exists,
      permission denied): 2;
    - Ctrl-C: 130; anything else (out of memory, disk full, a bug): 1.

    Example:
        >>> exit_code_for(UsageError("x")), exit_code_for(PermissionError(13, "denied"))
        (2, 2)
        >>> exit_code_for(OSError(28, "No space left on device")), exit_code_for(MemoryError())
        (1, 1)
    """
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, (ValueError, LookupError, *_PATH_ERRORS)):
        return EXIT_USAGE
    return EXIT_FAILURE


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (exit code 2) and whose help
    shows every default one way (:class:`HelpFormatter` of the ``vocabulary`` module beside this
    one).

    Subparsers made with ``add_subparsers`` are of the same class (argparse's default).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- numbers ---------------------------------------------------------------------------------


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
    """``value`` if it is a finite number in the range, else :class:`UsageError` naming ``name``.

    Example:
        >>> check_finite(0.5, "timeout", low=0, open_low=True)
        0.5
        >>> try:
        ...     check_finite(float("nan"), "timeout")
        ... except UsageError as exc:
        ...     print(exc)
        timeout: must be a finite number, got nan
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name}: must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UsageError(f"{name}: must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        raise UsageError(
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
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None

    parse.__name__ = "number"  # argparse names the type in "invalid number value" messages
    return parse


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


# -- images ----------------------------------------------------------------------------------


def check_pixels(size: Sequence[int], name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse an image of more than ``max_pixels`` pixels (or of none), naming it.

    Example:
        >>> try:
        ...     check_pixels((28_000, 28_000), "bomb.png")
        ... except ImageLoadError as exc:
        ...     print(exc)
        bomb.png: image too large: 28000x28000 pixels (784.0 megapixels); the limit is 400.0 megapixels (20000x20000)
    """
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ImageLoadError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        side = math.isqrt(max_pixels)
        raise ImageLoadError(
            f"{name}: image too large: {width}x{height} pixels ({width * height / 1e6:.1f} "
            f"megapixels); the limit is {max_pixels / 1e6:.1f} megapixels ({side}x{side})"
        )


def _open_checked(handle: IO[bytes], name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{name}: image too large ({exc})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not a readable image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{name}: not a readable image ({one_line(exc)})") from None
    try:
        check_pixels(image.size, name, max_pixels)
    except ImageLoadError:
        image.close()
        raise
    return image


def check_image_header(
    path: str | os.PathLike[str], *, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[str, tuple[int, int]]:
    """The format and (width, height) of an image file, read from its header alone; an image
    over the pixel limit (or not an image) is refused before any pixel is decoded.

    Raises:
        ImageLoadError: missing, not an image, or too large (one line naming the file).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (3, 2)).save(p)
        >>> check_image_header(p)
        ('PNG', (3, 2))
    """
    label = name or str(path)
    try:
        with open(path, "rb") as handle, _open_checked(handle, label, max_pixels) as image:
            return str(image.format or ""), (int(image.size[0]), int(image.size[1]))
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: no such image file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{label}: is a folder, not an image file") from None
    except PermissionError as exc:
        raise ImageLoadError(f"{label}: cannot be read ({exc.strerror or exc})") from None


def open_image(
    source: str | os.PathLike[str] | bytes,
    *,
    name: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode an image fully after checking its pixel count from the header.

    Args:
        source: a file path or the encoded bytes.
        name: the label used in messages (default: the path, or ``<bytes>``).
        max_pixels: the pixel limit (default 20 000 × 20 000).

    Returns:
        The decoded image (its own copy of the pixels; no file stays open), mode unchanged.

    Raises:
        ImageLoadError: missing, truncated, corrupt, not an image or too large.

    Example:
        >>> import io
        >>> buffer = io.BytesIO(); Image.new("L", (4, 3)).save(buffer, format="PNG")
        >>> open_image(buffer.getvalue()).size
        (4, 3)
    """
    import io

    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), name or "<bytes>", max_pixels)
    label = name or str(source)
    try:
        with open(source, "rb") as handle:
            return _decode(handle, label, max_pixels)
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: no such image file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{label}: is a folder, not an image file") from None
    except PermissionError as exc:
        raise ImageLoadError(f"{label}: cannot be read ({exc.strerror or exc})") from None


def _decode(handle: IO[bytes], label: str, max_pixels: int) -> Image.Image:
    image = _open_checked(handle, label, max_pixels)
    try:
        image.load()
        loaded = image.copy()  # detached from the handle
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{label}: not a readable image ({one_line(exc)})") from None
    finally:
        image.close()
    loaded.format = image.format  # copy() drops it; callers decide on re-encoding by it
    return loaded


# -- output files ----------------------------------------------------------------------------


class UnsafePathError(UsageError):
    """A path refused for safety (bad input: exit code 2): an output that is a symbolic link or
    not a regular file, a data path that leaves its root, a folder that is not the command's."""


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# close-on-exec; non-blocking so that a FIFO planted at an output name cannot hang the open
_O_EXTRA = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def _link_refused(path: Path, what: str) -> UnsafePathError:
    return UnsafePathError(
        f"{what} {path}: is a symbolic link; jmllm never writes through a link (remove it, or "
        "choose another output)"
    )


def refuse_link(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Refuse to write at ``path`` if it is a symbolic link, or exists as anything but a regular
    file; a missing path is fine.

    Raises:
        UnsafePathError: naming ``what``, the path and the problem.

    Example:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "link").symlink_to(root / "victim")
        >>> try:
        ...     refuse_link(root / "link", "report")
        ... except UnsafePathError as exc:
        ...     print(str(exc).replace(str(root), "ROOT").split(";")[0])
        report ROOT/link: is a symbolic link
    """
    target = Path(path)
    try:
        mode = os.lstat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return target
    if stat.S_ISLNK(mode):
        raise _link_refused(target, what)
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UnsafePathError(f"{what} {target}: exists and is {kind}")
    return target


def open_nofollow(
    path: str | os.PathLike[str], flags: int, mode: int = 0o666, what: str = "output"
) -> int:
    """``os.open`` for a file the project writes: a symbolic link at ``path`` is refused
    (``O_NOFOLLOW``; where the system has none, by looking first), and so is anything that is
    not a regular file (a FIFO, a device).

    Returns:
        The open file descriptor (close-on-exec).

    Raises:
        UnsafePathError: ``path`` is a link or not a regular file (its target is untouched).

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.jsonl"
        >>> fd = open_nofollow(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        >>> os.write(fd, b"{}\\n")
        3
        >>> os.close(fd)
    """
    target = Path(path)
    if not _O_NOFOLLOW:
        refuse_link(target, what)
    try:
        fd = os.open(target, flags | _O_NOFOLLOW | _O_EXTRA, mode)
    except OSError as exc:
        if os.path.islink(target):  # ELOOP (Linux, macOS) or EMLINK (FreeBSD)
            raise _link_refused(target, what) from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise UnsafePathError(f"{what} {target}: exists and is not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{what} {target}: exists and is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def resolve_inside(root: str | os.PathLike[str], relative: object, what: str = "path") -> Path:
    """``root / relative`` for a path read from a data file, refused unless it stays inside
    ``root``: no absolute path, no ``..``, and no symbolic link that leads out of ``root``.

    Args:
        root: the folder the data file declares (e.g. ``--images``).
        relative: the path as the data file gives it.
        what: names the field in messages (e.g. ``"images[3].file_name"``).

    Returns:
        ``root / relative`` (not resolved: messages keep the user's spelling).

    Raises:
        UnsafePathError: one line naming ``what``, the path (cut to 200 characters) and why.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> resolve_inside(root, "a/b.png").name
        'b.png'
        >>> try:
        ...     resolve_inside(root, "../secret.png", "images[0].file_name")
        ... except UnsafePathError as exc:
        ...     print(str(exc).split(";")[0])
        images[0].file_name '../secret.png': leaves its folder with '..'
    """
    if not isinstance(relative, str):
        raise UnsafePathError(
            f"{what}: must be a relative path (text), got {type(relative).__name__}"
        )
    shown = repr(clip(relative))
    if not relative or "\x00" in relative:
        raise UnsafePathError(f"{what} {shown}: not a file name")
    pure = Path(relative)
    if pure.is_absolute() or pure.drive or pure.root:
        raise UnsafePathError(
            f"{what} {shown}: an absolute path; paths here are relative to {root}"
        )
    if ".." in pure.parts:
        raise UnsafePathError(
            f"{what} {shown}: leaves its folder with '..'; paths here stay in {root}"
        )
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    if os.path.commonpath([real_root, real]) != real_root:
        raise UnsafePathError(
            f"{what} {shown}: a symbolic link that leads out of {root}; paths here stay inside it"
        )
    return Path(root) / pure


def read_json(path: str | os.PathLike[str], what: str | None = None) -> Any:
    """The JSON document of a user's file; every way the file can be bad is one line naming it:
    missing, unreadable, not UTF-8, not JSON, nested deeper than Python can read.

    Raises:
        UsageError: the one-line message (bad input: exit code 2).

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "deep.json"
        >>> _ = p.write_text("[" * 100_000 + "]" * 100_000)
        >>> try:
        ...     read_json(p, "annotations")
        ... except ValueError as exc:
        ...     print(exc)
        annotations: not valid JSON (nested too deeply)
    """
    label = what or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{label}: is a folder, not a file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{label}: not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"{label}: cannot be read ({exc.strerror or exc})") from None
    return parse_json(text, label)


def parse_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` with one-line errors naming ``what`` (malformed, or nested too deeply).

    Example:
        >>> parse_json('{"a": [1]}', "provenance")
        {'a': [1]}
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise UsageError(f"{what}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, TypeError) as exc:
        raise UsageError(f"{what}: not valid JSON ({type(exc).__name__})") from None


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux /proc);
    elsewhere with the ``os.umask`` round trip."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions of a new output file: ``0o666 & ~umask`` (0644 under the usual 022).

    Example:
        >>> file_mode() == 0o666 & ~current_umask()
        True
    """
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, flushed and
    fsynced, given :func:`file_mode`, then renamed over ``path``; readers see the old file or the
    new one, never half of one; the temporary file is removed on any error. Missing parent
    folders are created.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "sub" / "a.bin"
        >>> atomic_write_bytes(target, b"x").read_bytes()
        b'x'
    """
    path = Path(path)
    refuse_link(path)  # os.replace would not follow it, but a link here was planted: say so
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _check_writable_folder(target: Path, folder: Path, what: str) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UsageError(f"{what} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {target}: cannot write in {existing} (permission denied)")


def check_output_file(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Check, before any work, that a file can be written at ``path``: it is not a folder, no
    part of its folder is a file, and the nearest existing folder is writable.

    Raises:
        UsageError: naming ``what``, the path and the problem.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> check_output_file(root / "new" / "results.json").name
        'results.json'
        >>> try:
        ...     check_output_file(root, "--out")
        ... except UsageError as exc:
        ...     print(str(exc).replace(str(root), "ROOT"))
        --out ROOT: is a folder; give a file name
    """
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{what} {target}: is a folder; give a file name")
    _check_writable_folder(target, target.parent, what)
    return target


def check_output_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Check, before any work, that ``path`` is (or can be created as) a writable folder.

    Raises:
        UsageError: naming ``what``, the path and the problem.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "f").write_text("x")
        1
        >>> try:
        ...     check_output_dir(root / "f", "--out")
        ... except UsageError as exc:
        ...     print(str(exc).replace(str(root), "ROOT"))
        --out ROOT/f: exists and is not a folder
    """
    target = Path(path)
    if os.path.lexists(target) and not target.is_dir():
        raise UsageError(f"{what} {target}: exists and is not a folder")
    _check_writable_folder(target, target, what)
    return target


OUTPUTS_RECORD = ".jmllm-outputs.json"  # in an output folder: which entries which command wrote


class ForeignOutputError(UnsafePathError):
    """An output folder holds entries the command did not write (bad usage: exit code 2)."""


def _read_record(folder: Path) -> dict[str, str]:
    path = folder / OUTPUTS_RECORD
    if os.path.islink(path) or not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {str(k): str(v) for k, v in entries.items() if isinstance(v, str)}


def _write_record(folder: Path, entries: dict[str, str]) -> None:
    doc = {"format": 1, "entries": dict(sorted(entries.items()))}
    atomic_write_text(folder / OUTPUTS_RECORD, json.dumps(doc, indent=1) + "\n")


def _owned(name: str, owner: str | None, command: str) -> bool:
    if owner == command:
        return True
    # an atomic write's temporary file, left by a killed run, belongs with its file
    return name.startswith(".") and name.endswith(".tmp")


def foreign_entries(folder: str | os.PathLike[str], command: str) -> list[str]:
    """Names of the entries of ``folder`` that ``command`` did not write, by the folder's
    :data:`OUTPUTS_RECORD` (a symbolic link is never the command's); sorted.

    Example:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (root / "README.md").write_text("mine")
        >>> foreign_entries(root, "jmllm-joint sample-data")
        ['README.md']
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    record = _read_record(root)
    foreign = []
    for entry in os.scandir(root):
        if entry.name == OUTPUTS_RECORD:
            continue
        if entry.is_symlink() or not _owned(entry.name, record.get(entry.name), command):
            foreign.append(entry.name)
    return sorted(foreign)


def _listed(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(clip(n, 60) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def claim_output_folder(
    folder: str | os.PathLike[str],
    command: str,
    outputs: Sequence[str],
    *,
    force: bool = False,
    what: str = "--out",
) -> Path:
    """Check that ``command`` may write its ``outputs`` into ``folder``, and record them as its
    own in the folder's :data:`OUTPUTS_RECORD` (before the work, so that a killed run's files are
    still its own when it is rerun).

    - A new or empty folder, or one holding only what ``command`` wrote before: fine.
    - Anything else in it (a user's files, another command's, a planted link) refuses the folder,
      unless ``force``.
    - With ``force`` the command writes beside those entries but never replaces one: an output
      name that is taken by an entry it did not write is refused all the same.

    Args:
        folder: the output folder (created if missing).
        command: who writes, e.g. ``"jmllm-joint sample-data"``.
        outputs: the names of the files and folders ``command`` writes directly in ``folder``.
        force: write beside entries the command did not write.
        what: names the option in messages.

    Raises:
        ForeignOutputError: one line naming the folder and (some of) the entries in the way.

    Example:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (root / "README.md").write_text("the user's")
        >>> try:
        ...     claim_output_folder(root, "jmllm-joint sample-data", ["README.md"], force=True)
        ... except ForeignOutputError as exc:
        ...     print(str(exc).replace(str(root), "ROOT").split(",")[0])
        --out ROOT: README.md was not written by jmllm-joint sample-data
    """
    root = Path(folder)
    check_output_claim(root, command, outputs, force=force, what=what)
    record = {k: v for k, v in _read_record(root).items() if os.path.lexists(root / k)}
    record.update(dict.fromkeys(outputs, command))
    root.mkdir(parents=True, exist_ok=True)
    _write_record(root, record)
    return root


def check_output_claim(
    folder: str | os.PathLike[str],
    command: str,
    outputs: Sequence[str],
    *,
    force: bool = False,
    what: str = "--out",
) -> None:
    """The checks of :func:`claim_output_folder` alone, writing nothing: for a command that
    refuses a folder before its slow work and claims it once it has something to write.

    Raises:
        ForeignOutputError: as :func:`claim_output_folder`.

    Example:
        >>> import pathlib, tempfile
        >>> check_output_claim(pathlib.Path(tempfile.mkdtemp()) / "new", "tool", ["a.txt"])
    """
    root = Path(folder)
    if os.path.lexists(root) and not root.is_dir():
        raise NotADirectoryError(f"{what} {root}: exists and is not a folder")
    refuse_link(root / OUTPUTS_RECORD, what)
    foreign = foreign_entries(root, command)
    taken = [name for name in outputs if name in foreign]
    if taken:
        raise ForeignOutputError(
            f"{what} {root}: {_listed(taken)} {'was' if len(taken) == 1 else 'were'} not written "
            f"by {command}, which never replaces what it did not write, even with --force (move "
            f"{'it' if len(taken) == 1 else 'them'} away, or choose another folder)"
        )
    if foreign and not force:
        raise ForeignOutputError(
            f"{what} {root}: holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
            f"{command} did not write ({_listed(foreign)}); choose a new or empty folder, or "
            "pass --force to write beside them (they are left untouched)"
        )


def _prune_record(folder: Path) -> None:
    """Drop the record's names that were not written after all; no record when none is left."""
    record = _read_record(folder)
    kept = {k: v for k, v in record.items() if os.path.lexists(folder / k)}
    path = folder / OUTPUTS_RECORD
    if kept == record and (kept or not path.exists()):
        return
    if kept:
        _write_record(folder, kept)
    elif not os.path.islink(path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def output_folder(
    path: str | os.PathLike[str],
    *,
    command: str | None = None,
    outputs: Sequence[str] = (),
    force: bool = False,
    what: str = "--out",
) -> Iterator[Path]:
    """Create ``path`` (and missing parents) for some work; if the work raises, remove the folders
    it created that are still empty. A folder that existed before is never removed, and nothing
    is removed after success. With a ``command``, the folder is first claimed for it
    (:func:`claim_output_folder`; ``outputs`` are the names it writes there).

    Example:
        >>> import pathlib, tempfile
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "run" / "out"
        >>> try:
        ...     with output_folder(out):
        ...         raise RuntimeError("failed")
        ... except RuntimeError:
        ...     pass
        >>> out.parent.exists()
        False
    """
    target = Path(path)
    if os.path.lexists(target) and not target.is_dir():
        raise UsageError(f"{target}: exists and is not a folder")
    created = [folder for folder in (*reversed(target.parents), target) if not folder.exists()]
    if command is not None:
        claim_output_folder(target, command, outputs, force=force, what=what)
    target.mkdir(parents=True, exist_ok=True)
    try:
        yield target
    except BaseException:
        if command is not None and target in created:  # its record goes with the new folder
            with contextlib.suppress(FileNotFoundError):
                (target / OUTPUTS_RECORD).unlink()
        remove_empty_folders(created)
        raise
    if command is not None:
        _prune_record(target)


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (created by this run, outermost first) that are empty, deepest first."""
    for folder in reversed(folders):
        try:
            folder.rmdir()  # only succeeds on an empty folder
        except OSError:
            break
