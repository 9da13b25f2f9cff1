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

Example:
    >>> parser = ArgumentParser(prog="demo")
    >>> _ = parser.add_argument("--timeout", type=finite_float(0, open_low=True), default=60.0)
    >>> parser.parse_args(["--timeout", "2.5"]).timeout
    2.5
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
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
    "ArgumentParser",
    "ImageLoadError",
    "UsageError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_finite",
    "check_image_header",
    "check_output_dir",
    "check_output_file",
    "check_pixels",
    "current_umask",
    "exit_code_for",
    "file_mode",
    "finite_float",
    "integer",
    "one_line",
    "open_image",
    "output_folder",
    "remove_empty_folders",
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


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its type name when it has none).

    Example:
        >>> one_line(ValueError("bad value\\n  more detail"))
        'bad value more detail'
    """
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


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


@contextlib.contextmanager
def output_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Create ``path`` (and missing parents) for some work; if the work raises, remove the folders
    it created that are still empty. A folder that existed before is never removed, and nothing
    is removed after success.

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
    target.mkdir(parents=True, exist_ok=True)
    try:
        yield target
    except BaseException:
        remove_empty_folders(created)
        raise


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (created by this run, outermost first) that are empty, deepest first."""
    for folder in reversed(folders):
        try:
            folder.rmdir()  # only succeeds on an empty folder
        except OSError:
            break
