"""The shared conventions module: its rules, and that every installed copy is the same file."""

from __future__ import annotations

import argparse
import importlib
import inspect
import math

import pytest

from jmllm.judge import conventions

COPIES = ["jmllm.judge.conventions", "jmllm.userstudy.conventions"]


def test_every_installed_copy_is_identical() -> None:
    """The standalone packages carry the conventions as a file of their own: identical copies
    behave identically."""
    sources = {}
    for name in COPIES:
        try:
            sources[name] = inspect.getsource(importlib.import_module(name))
        except ModuleNotFoundError:  # that package is not installed here
            continue
    assert len(sources) >= 1
    assert len(set(sources.values())) == 1, sorted(sources)


@pytest.mark.parametrize(
    ("kind", "text", "accepted"),
    [
        (conventions.finite_float(0, open_low=True), "2.5", 2.5),
        (conventions.finite_float(0, open_low=True), "nan", None),
        (conventions.finite_float(0, open_low=True), "NaN", None),
        (conventions.finite_float(0, open_low=True), "inf", None),
        (conventions.finite_float(0, open_low=True), "-inf", None),
        (conventions.finite_float(0, open_low=True), "0", None),
        (conventions.finite_float(0, 2), "2", 2.0),
        (conventions.finite_float(0, 2), "2.0001", None),
        (conventions.finite_float(0, 2), "1e309", None),
        (conventions.finite_float(0, 2), "x", None),
        (conventions.integer(1), "1", 1),
        (conventions.integer(1), "0", None),
        (conventions.integer(1), "1.5", None),
        (conventions.integer(1), "1e3", None),
        (conventions.integer(0, 65535), "65535", 65535),
        (conventions.integer(0, 65535), "65536", None),
    ],
)
def test_numbers_are_finite_and_in_range(kind, text: str, accepted: float | None) -> None:  # type: ignore[no-untyped-def]
    if accepted is None:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)
    else:
        value = kind(text)
        assert value == accepted and math.isfinite(value)


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    parser = conventions.ArgumentParser(prog="tool")
    parser.add_argument("--timeout", type=conventions.finite_float(0, open_low=True))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--timeout", "nan"])
    assert exc.value.code == conventions.EXIT_USAGE
    assert capsys.readouterr().err.splitlines() == [
        "tool: error: argument --timeout: must be a finite number, got nan (see tool --help)"
    ]


def test_docstring_examples() -> None:
    import doctest

    for name in ("conventions", "files", "client"):
        module = importlib.import_module(f"jmllm.judge.{name}")
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, name


def test_the_same_rules_as_jmllm_align() -> None:
    """The standalone copy behaves as jmllm-align's modules (the packages that can import them
    do), case by case: numbers, exit codes, messages, the pixel limit."""
    options = pytest.importorskip("jmllm.align.options")
    images = pytest.importorskip("jmllm.align.images")
    assert (conventions.EXIT_USAGE, conventions.EXIT_FAILURE, conventions.EXIT_PARTIAL) == (
        options.EXIT_USAGE,
        options.EXIT_FAILURE,
        options.EXIT_PARTIAL,
    )
    assert conventions.MAX_IMAGE_PIXELS == images.MAX_IMAGE_PIXELS
    for args, texts in [
        ((0,), ["1", "0", "-1", "nan", "inf", "x"]),
        ((0, 2), ["2", "2.5", "1e309"]),
    ]:
        for text in texts:
            for kwargs in ({}, {"open_low": True}):
                outcomes = []
                for module in (conventions, options):
                    try:
                        outcomes.append(module.finite_float(*args, **kwargs)(text))
                    except argparse.ArgumentTypeError as exc:
                        outcomes.append(str(exc))
                assert outcomes[0] == outcomes[1], (args, kwargs, text)
    for text in ["1", "0", "70000", "1.5", "x"]:
        outcomes = []
        for module in (conventions, options):
            try:
                outcomes.append(module.integer(1, 65535)(text))
            except argparse.ArgumentTypeError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1], text
    for exc in [
        ValueError("x"),
        KeyError("k"),
        FileNotFoundError("f"),
        PermissionError(13, "denied"),
        OSError(28, "No space left on device"),
        MemoryError(),
        KeyboardInterrupt(),
        RuntimeError("bug"),
    ]:
        assert conventions.exit_code_for(exc) == options.exit_code_for(exc), exc
        assert conventions.one_line(exc) == options.one_line(exc), exc
    for size in [(28_000, 28_000), (20_000, 20_000), (20_001, 20_000), (0, 5)]:
        outcomes = []
        for module in (conventions, images):
            try:
                module.check_pixels(size, "x.png")
                outcomes.append(None)
            except ValueError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1], size


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_jmllm_align(tmp_path, monkeypatch, umask) -> None:  # type: ignore[no-untyped-def]
    """One atomic-write semantic for every package: the standalone copy and jmllm.align.files
    give the same file, the same mode (``0o666 & ~umask``), fsync before the rename, and leave
    nothing behind when the rename fails."""
    import os

    files = pytest.importorskip("jmllm.align.files")
    writers = {"copy": conventions.atomic_write_bytes, "align": files.atomic_write_bytes}
    modes, synced = {}, {}
    real_fsync = os.fsync
    old = os.umask(umask)
    try:
        for name, write in writers.items():
            calls: list[int] = []
            monkeypatch.setattr(
                os, "fsync", lambda fd, calls=calls: (calls.append(fd), real_fsync(fd))
            )
            path = write(tmp_path / name / "out.bin", b"data")
            monkeypatch.setattr(os, "fsync", real_fsync)
            assert path.read_bytes() == b"data"
            modes[name], synced[name] = os.stat(path).st_mode & 0o777, bool(calls)
    finally:
        os.umask(old)
    assert modes == {"copy": 0o666 & ~umask, "align": 0o666 & ~umask}
    assert synced == {"copy": True, "align": True}

    def fail(*args: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    for name, write in writers.items():
        folder = tmp_path / f"{name}-failing"
        folder.mkdir()
        (folder / "out.bin").write_bytes(b"old")
        with pytest.raises(OSError, match="rename failed"):
            write(folder / "out.bin", b"new")
        assert [p.name for p in folder.iterdir()] == ["out.bin"], name  # temporary file removed
        assert (folder / "out.bin").read_bytes() == b"old"


TEXTS = [
    "plain",
    "\x1b]0;PWNED\x07\x1b[2J",
    "two\nlines\ttab\r",
    "bidi \u202eevil\u202c and \u2066isolate\u2069",
    "<b>x</b> | *y* `z` [a](b) #h",
    "x" * 10_000,
    "é 日本 🎉",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_text_escaping_follows_jmllm_align(text: str) -> None:
    """Terminal, log and Markdown escaping, and message length, are the same everywhere."""
    options = pytest.importorskip("jmllm.align.options")
    for name in ("printable", "clip", "markdown_text"):
        assert getattr(conventions, name)(text) == getattr(options, name)(text), name
    assert conventions.printable(text, keep_newlines=True) == options.printable(
        text, keep_newlines=True
    )
    exc = ValueError(f"field {text}: bad")
    assert conventions.one_line(exc) == options.one_line(exc)
    shown = conventions.one_line(exc)
    assert len(shown) <= conventions.MESSAGE_LIMIT and "\x1b" not in shown
    assert "\n" not in shown and "\u202e" not in shown
    assert "\x1b" not in conventions.clip(text) and len(conventions.clip(text)) < 240


def _outcome(function, *args, **kwargs):  # type: ignore[no-untyped-def]
    try:
        result = function(*args, **kwargs)
    except Exception as exc:  # any outcome: compared across the copies
        return type(exc).__name__, str(exc)
    return "ok", str(result)


def test_path_rules_follow_jmllm_align(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Links refused at the final name, paths kept inside their root, JSON read with one-line
    errors, output folders claimed: the same outcome and message from both copies."""
    import os

    files = pytest.importorskip("jmllm.align.files")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "out-link").symlink_to(outside)
    (root / "file-link").symlink_to(outside / "victim")
    os.mkfifo(root / "fifo")
    (tmp_path / "deep.json").write_text("[" * 50_000 + "]" * 50_000)
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "bad-utf8.json").write_bytes(b"\xff\xfe")
    relatives: list[object] = [
        "ok.png",
        "sub/x.png",
        "../outside/secret.png",
        str(outside / "abs.png"),
        "out-link/secret.png",
        "",
        "a\x00b",
        ["list"],
        7,
        "x" * 5000,
    ]
    field = "images[0].file_name"
    for relative in relatives:
        a = _outcome(conventions.resolve_inside, root, relative, field)
        b = _outcome(files.resolve_inside, root, relative, field)
        assert a == b, relative
        assert a[0] == "ok" or len(a[1]) < 600
    expected = {
        "ok.png": "ok",
        "sub/x.png": "ok",
        "../outside/secret.png": "UnsafePathError",
        "out-link/secret.png": "UnsafePathError",
    }
    for relative, kind in expected.items():
        assert _outcome(files.resolve_inside, root, relative, field)[0] == kind, relative
    for name in ("ok.png", "file-link", "fifo", "sub", "missing"):
        a = _outcome(conventions.refuse_link, root / name)
        assert a == _outcome(files.refuse_link, root / name), name
        assert (a[0] == "ok") == (name in ("ok.png", "missing")), (name, a)
    for name in ("deep.json", "bad.json", "bad-utf8.json", "missing.json"):
        a = _outcome(conventions.read_json, tmp_path / name, "annotations")
        b = _outcome(files.read_json, tmp_path / name, "annotations")
        assert a[1] == b[1] and a[0] != "ok", name
    for module in (conventions, files):
        out = tmp_path / f"claimed-{module.__name__}"
        out.mkdir()
        (out / "README.md").write_text("the user's")
        refused = _outcome(module.claim_output_folder, out, "tool", ["report.md"])
        forced = module.claim_output_folder(out, "tool", ["report.md"], force=True)
        clash = _outcome(module.claim_output_folder, out, "tool", ["README.md"], force=True)
        assert forced == out and (out / "README.md").read_text() == "the user's"
        assert refused[0] == "ForeignOutputError" and clash[0] == "ForeignOutputError"
        assert module.foreign_entries(out, "tool") == ["README.md"]
        module.atomic_write_bytes(out / "report.md", b"r")
        assert module.foreign_entries(out, "tool") == ["README.md"]
        assert module.foreign_entries(out, "other tool") == ["README.md", "report.md"]
    a_msg = _outcome(conventions.claim_output_folder, root, "tool", ["ok.png"])[1]
    b_msg = _outcome(files.claim_output_folder, root, "tool", ["ok.png"])[1]
    assert a_msg == b_msg and "was not written by tool" in a_msg


def test_writers_never_follow_a_link(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A symbolic link planted at the name of a file the copy writes is refused with one line,
    and its target keeps its content."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "out.bin"
    link.symlink_to(victim)
    with pytest.raises(conventions.UnsafePathError, match="symbolic link"):
        conventions.atomic_write_bytes(link, b"overwritten")
    import os

    with pytest.raises(conventions.UnsafePathError, match="symbolic link"):
        conventions.open_nofollow(link, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert victim.read_text() == "precious" and link.is_symlink()
