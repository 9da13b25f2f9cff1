"""No writer of any jmllm package writes through a symbolic link (docs/conventions.md).

Two halves:

- **the walk**: every writer, called for real with a link planted at the name it writes, is
  refused with one line and the link's target keeps its content;
- **the census**: every place in the five packages' sources that creates or replaces a file
  with a raw primitive (``open`` for writing, ``os.open``, ``write_text``, ``save_pretrained``,
  ``torch.save``, ``sqlite3.connect``, ``os.replace`` …) is one of the known, checked sites
  listed here, so a new writer cannot bypass the rules unnoticed.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

PACKAGES = Path(__file__).resolve().parents[2]
VICTIM_TEXT = b"precious: not yours to overwrite\n"


def _image() -> Image.Image:
    return Image.fromarray(np.full((8, 8, 3), 90, np.uint8))


# --------------------------------------------------------------------------------- the writers
# name -> (the file the writer writes, relative to the folder it is given; write(folder))
Writer = tuple[str, Callable[[Path], Any]]


def _locked(folder_lock: Callable[..., Any], *args: Any) -> None:
    with folder_lock(*args):
        pass


def _align_writers() -> dict[str, Writer]:
    from jmllm.align import AlignmentConfig, AlignmentLayer, files, save_alignment, testing
    from jmllm.align.train import checkpoint

    layer = AlignmentLayer(AlignmentConfig("llava-mlp", in_dim=4, out_dim=8, num_tokens=4))
    return {
        "align atomic_write": ("a.bin", lambda d: files.atomic_write(d / "a.bin", lambda t: Path(t).write_bytes(b"x"))),
        "align atomic_write_text": ("a.txt", lambda d: files.atomic_write_text(d / "a.txt", "x")),
        "align append_jsonl": ("log.jsonl", lambda d: files.append_jsonl(d / "log.jsonl", {"a": 1})),
        "align folder_lock": (".jmllm.lock", lambda d: _locked(files.folder_lock, d, "test")),
        "align output record": (files.OUTPUTS_RECORD, lambda d: files.claim_output_folder(d, "t", ["x"])),
        "align save_alignment": ("w.safetensors", lambda d: save_alignment(layer, d / "w.safetensors")),
        "align training checkpoint": ("ckpt.pt", lambda d: checkpoint.save_checkpoint(d / "ckpt.pt", {"a": 1})),
        "align training metrics": ("metrics.jsonl", lambda d: checkpoint._append_jsonl(d / "metrics.jsonl", {"step": 1})),
        "align write_image_folder": ("part0/img0000.jpg", lambda d: testing.write_image_folder(d, 1)),
        "align write_large_png": ("big.png", lambda d: testing.write_large_png(d / "big.png", 4, 4, "L")),
    }  # fmt: skip


def _joint_writers() -> dict[str, Writer]:
    from jmllm.joint import testing, wsol
    from jmllm.joint.render import report
    from jmllm.joint.render.explanation import save_arrays
    from jmllm.joint.toy.sample_data import write_sample_data

    def cub(d: Path) -> None:
        source = d.parent / "cub-source"
        source.mkdir(exist_ok=True)
        (source / "images.txt").write_text("1 a/b.jpg\n")
        (source / "train_test_split.txt").write_text("1 0\n")
        (source / "bounding_boxes.txt").write_text("1 1 2 3 4\n")
        wsol.cub_to_boxes_csv(source, d / "boxes.csv")

    return {
        "joint save_png": ("p.png", lambda d: report.save_png(_image(), d / "p.png")),
        "joint write_report": ("report.html", lambda d: report.write_report(d / "report.html", _image())),
        "joint save_arrays": ("arrays.safetensors", lambda d: save_arrays(d / "arrays.safetensors", [])),
        "joint cub_to_boxes_csv": ("boxes.csv", cub),
        "joint write_coco_folder": ("instances.json", lambda d: testing.write_coco_folder(d, count=1)),
        "joint sample-data --force": ("README.md", lambda d: write_sample_data(d, 1, 1, force=True)),
    }  # fmt: skip


def _bias_writers() -> dict[str, Writer]:
    from jmllm.bias import files
    from jmllm.bias.contact_sheet import write_contact_sheet

    def sheet(d: Path) -> None:
        _image().save(d.parent / "p.png")
        write_contact_sheet([("g", [d.parent / "p.png"])], d / "sheet.png", title="t")

    return {
        "bias atomic_write_text": ("r.md", lambda d: files.atomic_write_text(d / "r.md", "x")),
        "bias append_jsonl": ("results.jsonl", lambda d: files.append_jsonl(d / "results.jsonl", {"a": 1})),
        "bias assess lock": (files.LOCK_FILE, lambda d: _locked(files.folder_lock, d, "assess")),
        "bias contact sheet": ("sheet.png", sheet),
    }  # fmt: skip


def _judge_writers() -> dict[str, Writer]:
    from jmllm.judge import files, testing
    from jmllm.judge.cache import JudgeCache
    from jmllm.judge.captions import SystemCaptions, save_captions
    from jmllm.judge.manifest import Manifest, ManifestImage
    from jmllm.judge.report import build_report, write_report
    from jmllm.judge.runner import RunResults, save_results

    manifest = Manifest([ManifestImage(image_id="1", url="http://x/1.jpg")], seed=0)
    captions = SystemCaptions("A", {"1": "a cat"})
    results = RunResults(settings={"model": "m"}, systems=[], records=[], n_images=0)

    def cache(d: Path) -> None:
        with JudgeCache(d / "c.sqlite"):
            pass

    return {
        "judge atomic_write_text": ("a.txt", lambda d: files.atomic_write_text(d / "a.txt", "x")),
        "judge write_jsonl": ("c.jsonl", lambda d: files.write_jsonl(d / "c.jsonl", [{"a": 1}])),
        "judge manifest": ("manifest.json", lambda d: manifest.save(d / "manifest.json")),
        "judge captions": ("A.jsonl", lambda d: save_captions(d / "A.jsonl", captions, manifest)),
        "judge results": ("results.json", lambda d: save_results(d / "results.json", results)),
        "judge report": ("report.md", lambda d: write_report(build_report(results, resamples=10), d)),
        "judge cache": ("c.sqlite", cache),
        "judge cache journal": ("c.sqlite-journal", cache),
        "judge cache wal": ("c.sqlite-wal", cache),
        "judge test images": ("000000000000.jpg", lambda d: testing.make_test_images(d, 1)),
        "judge test captions": ("captions.json", lambda d: testing.write_coco_captions(d / "captions.json", [])),
    }  # fmt: skip


def _userstudy_writers() -> dict[str, Writer]:
    from jmllm.userstudy import atomic, testing
    from jmllm.userstudy.example import write_example

    return {
        "userstudy atomic_write_text": ("a.txt", lambda d: atomic.atomic_write_text(d / "a.txt", "x")),
        "userstudy example": ("study.yaml", lambda d: write_example(d, force=True)),
        "userstudy png header": ("h.png", lambda d: testing.write_png_header(d / "h.png", 4, 4)),
    }  # fmt: skip


def _all_writers() -> dict[str, Writer]:
    """Every package's writers; a package that is not installed here contributes none."""
    writers: dict[str, Writer] = {}
    for table in (_align_writers, _joint_writers, _bias_writers, _judge_writers,
                  _userstudy_writers):  # fmt: skip
        try:
            writers.update(table())
        except ModuleNotFoundError:  # the standalone packages may be installed alone
            continue
    return writers


WRITERS = _all_writers()


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_planted_link_is_refused_and_its_target_untouched(tmp_path, name) -> None:
    target, write = WRITERS[name]
    folder = tmp_path / "out"
    link = folder / target
    link.parent.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM_TEXT)
    link.symlink_to(victim)
    with pytest.raises(Exception) as info:
        write(folder)
    chain, current = [], info.value
    while current is not None:
        chain.append(str(current))
        current = current.__cause__ or current.__context__
    assert any("symbolic link" in text or "not written by" in text for text in chain), chain
    assert "\n" not in str(info.value)
    assert victim.read_bytes() == VICTIM_TEXT and link.is_symlink()


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_the_same_writers_write_when_no_link_is_in_the_way(tmp_path, name) -> None:
    """So that a refusal above is the link's, not a broken call."""
    target, write = WRITERS[name]
    write(tmp_path)
    transient = target.endswith((".lock", "-journal", "-wal"))  # removed after use
    assert transient or (tmp_path / target).is_file(), name


def test_every_package_has_writers_walked() -> None:
    prefixes = {name.split(" ", 1)[0] for name in WRITERS}
    installed = {p for p in ("align", "joint", "bias", "judge", "userstudy")
                 if importlib.util.find_spec(f"jmllm.{p}") is not None}  # fmt: skip
    assert prefixes == installed and len(WRITERS) >= 30


# --------------------------------------------------------------------------------- the census
# Raw file-creating primitives, and why each site is safe. Everything else writes through
# jmllm.align.files (or the standalone copies): atomic writes refuse a link at the target,
# appends and locks open with O_NOFOLLOW, output folders are claimed.
KNOWN_SITES: dict[tuple[str, str, str], str] = {
    # the shared writers themselves
    ("align/files.py", "atomic_write", "tempfile.mkstemp"): "a new private file (O_EXCL)",
    ("align/files.py", "atomic_write", "open(rb+)"): "the temporary file, to fsync it",
    ("align/files.py", "atomic_write", "os.replace"): "replaces the link itself, refused before",
    ("align/files.py", "atomic_write_bytes", "write_bytes"): "the temporary file",
    ("align/files.py", "open_nofollow", "os.open"): "O_NOFOLLOW, regular files only",
    ("judge/conventions.py", "atomic_write_bytes", "tempfile.mkstemp"): "as align's",
    ("judge/conventions.py", "atomic_write_bytes", "os.replace"): "as align's",
    ("judge/conventions.py", "open_nofollow", "os.open"): "as align's",
    ("userstudy/conventions.py", "atomic_write_bytes", "tempfile.mkstemp"): "as align's",
    ("userstudy/conventions.py", "atomic_write_bytes", "os.replace"): "as align's",
    ("userstudy/conventions.py", "open_nofollow", "os.open"): "as align's",
    # writers handed a fresh temporary path by atomic_write
    ("align/train/checkpoint.py", "save_checkpoint", "save"): "torch.save to atomic_write's tmp",
    ("align/train/checkpoint.py", "_truncate_metrics", "write_text"): "atomic_write's tmp",
    ("align/train/loop.py", "_train", "write_text"): "atomic_write's tmp",
    ("align/weights.py", "save_alignment", "save_file"): "atomic_write's tmp",
    # models saved into a fresh temporary folder, then renamed into place
    ("align/testing.py", "_save_owl", "save_pretrained"): "into _atomic_dir's new folder",
    ("align/testing.py", "_save_llava", "save_pretrained"): "into _atomic_dir's new folder",
    ("align/testing.py", "_save_owlv2", "save_pretrained"): "into _atomic_dir's new folder",
    ("align/testing.py", "_atomic_dir", "tempfile.mkdtemp"): "a new private folder",
    (
        "align/testing.py",
        "llava_1_5_tokenizer",
        "save_pretrained",
    ): "into the caller's (test) folder",
    ("align/testing.py", "_atomic_dir", "os.replace"): "a folder over the cache's own folder",
    ("align/testing.py", "_distributed_worker", "save"): "into its own mkdtemp folder",
    ("align/testing.py", "train_distributed_cpu", "tempfile.mkdtemp"): "a new private folder",
    ("bias/testing.py", "_save_base_and_refiner", "save_pretrained"): "into a new mkdtemp folder",
    ("bias/testing.py", "build_tiny_sdxl", "tempfile.mkdtemp"): "a new private folder",
    ("bias/testing.py", "build_tiny_sdxl", "os.replace"): "folders into the cache's own folder",
    (
        "joint/testing/checkpoints.py",
        "_calibrated_owl",
        "save_pretrained",
    ): "into a new mkdtemp folder",
    ("joint/testing/checkpoints.py", "_calibrated_owl", "tempfile.mkdtemp"): "a new private folder",
    (
        "joint/testing/checkpoints.py",
        "_calibrated_owl",
        "os.replace",
    ): "into the cache's own folder",
    ("joint/toy/models.py", "save_owl", "save_pretrained"): "into toy train's staging folder",
    ("joint/toy/models.py", "save_llava", "save_pretrained"): "into toy train's staging folder",
    ("joint/toy/qwen.py", "save_qwen", "save_pretrained"): "into toy train's staging folder",
    ("joint/toy/qwen.py", "save_qwen", "write_text"): "into its own TemporaryDirectory",
    ("joint/toy/train.py", "_shipped_owl", "shutil.copytree"): "into toy train's staging folder",
    ("joint/toy/train.py", "_train_toy_world", "tempfile.mkdtemp"): "the staging folder",
    ("joint/toy/train.py", "_train_toy_world", "os.replace"): "into its claimed --out",
    # reads, or writes of the cache guarded by open_nofollow and refuse_link
    ("judge/cache.py", "__init__", "sqlite3.connect"): "after open_nofollow and the journals",
    ("judge/cli.py", "_discard_empty_cache", "sqlite3.connect"): "read-only (mode=ro)",
    ("userstudy/serve.py", "_check_writable", "tempfile.mkstemp"): "a new probe file (O_EXCL)",
    ("joint/app/page.py", "build_app", "tempfile.mkdtemp"): "a new private folder",
    # an example image written by the explorer app into its own cache folder
    (
        "joint/app/widgets.py",
        "builtin_examples",
        "save",
    ): "the app's cache folder (issue of the app)",
    # objects with a .save that writes through the atomic writers, or into memory
    ("joint/render/explanation.py", "save_arrays", "save"): "safetensors' save returns bytes",
    (
        "joint/render/explanation.py",
        "write_attribution_report",
        "save",
    ): "safetensors' save returns bytes",
    (
        "align/testing_families.py",
        "_save_family",
        "save_pretrained",
    ): "into _atomic_dir's new folder",
    ("align/testing_families.py", "_image_processor", "write_text"): "its own TemporaryDirectory",
    ("joint/cli/explain.py", "cmd_wsol", "save"): "WsolReport.save: atomic_write_text",
    ("judge/cli.py", "_cmd_sample", "save"): "Manifest.save: atomic_write_text",
}

_PRIMITIVES = {"write_text", "write_bytes", "touch", "save_pretrained", "savefig", "save_file"}
_MODULE_CALLS = {
    "os": {"open", "replace", "rename", "link", "symlink"},
    "shutil": {"copy", "copy2", "copyfile", "copytree", "move"},
    "tempfile": {"mkstemp", "mkdtemp"},
    "sqlite3": {"connect"},
}


def _file_writes(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(function, primitive, line) of every raw file-creating call in a module."""
    owner: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                owner.setdefault(id(inner), node.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn, kind = node.func, None
        if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name):
            if fn.attr in _MODULE_CALLS.get(fn.value.id, ()):
                kind = f"{fn.value.id}.{fn.attr}"
        if kind is None and isinstance(fn, ast.Attribute | ast.Name):
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id
            if name in _PRIMITIVES:
                kind = name
            elif name == "save" and not _to_buffer(node):
                kind = "save"
            elif name == "open":
                mode = _mode(node, isinstance(fn, ast.Name))
                if mode is not None and any(c in mode for c in "wax+"):
                    kind = f"open({mode})"
        if kind == "savefig" and _to_buffer(node):
            kind = None
        if kind is not None:
            found.append((owner.get(id(node), "<module>"), kind, node.lineno))
    return found


def _to_buffer(call: ast.Call) -> bool:
    """``x.save(buffer, format=...)``: into memory (a BytesIO), not a file."""
    return bool(call.args) and isinstance(call.args[0], ast.Name) and "buf" in call.args[0].id


def _mode(call: ast.Call, builtin: bool) -> str | None:
    args = call.args[1:2] if builtin else call.args[:1]
    values = [a.value for a in args if isinstance(a, ast.Constant)]
    values += [k.value.value for k in call.keywords
               if k.arg == "mode" and isinstance(k.value, ast.Constant)]  # fmt: skip
    return str(values[0]) if values else None


def test_every_raw_file_write_is_a_known_checked_site() -> None:
    seen: set[tuple[str, str, str]] = set()
    unknown = []
    for path in sorted(PACKAGES.glob("*/src/jmllm/**/*.py")):
        module = path.relative_to(path.parents[len(path.relative_to(
            next(p for p in path.parents if p.name == "jmllm")).parts) - 1]).as_posix()  # fmt: skip
        for function, kind, line in _file_writes(ast.parse(path.read_text(encoding="utf-8"))):
            site = (module, function, kind)
            seen.add(site)
            if site not in KNOWN_SITES:
                unknown.append(f"{module}:{line} {function}: {kind}")
    assert not unknown, (
        "new raw file writes: write through jmllm.align.files (or the standalone packages' "
        "conventions), or add the site here with the reason it is safe:\n" + "\n".join(unknown)
    )
    stale = set(KNOWN_SITES) - seen
    assert not stale, f"listed sites that no longer exist: {sorted(stale)}"


def test_the_census_finds_a_raw_write() -> None:
    tree = ast.parse(
        "def f(p, buffer):\n"
        "    open(p, 'w').write('x')\n"
        "    p.write_text('x')\n"
        "    img.save(p)\n"
        "    img.save(buffer, format='PNG')\n"
        "    os.replace(a, b)\n"
        "    open(p).read()\n"
    )
    assert sorted((f, k) for f, k, _ in _file_writes(tree)) == [
        ("f", "open(w)"),
        ("f", "os.replace"),
        ("f", "save"),
        ("f", "write_text"),
    ]


def test_cli_writers_refuse_a_planted_link(tmp_path, capsys) -> None:
    """Through the command line too: one line, exit 2, the target untouched."""
    from jmllm.joint import cli

    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM_TEXT)
    out = tmp_path / "cub"
    out.mkdir()
    for name in ("images.txt", "train_test_split.txt", "bounding_boxes.txt"):
        (out / name).write_text({"images.txt": "1 a.jpg\n", "train_test_split.txt": "1 0\n",
                                 "bounding_boxes.txt": "1 1 2 3 4\n"}[name])  # fmt: skip
    (out / "boxes.csv").symlink_to(victim)
    from jmllm.joint.wsol import cub_to_boxes_csv

    with pytest.raises(ValueError, match="symbolic link"):
        cub_to_boxes_csv(out, out / "boxes.csv")
    sample = tmp_path / "sample"
    sample.mkdir()
    (sample / "README.md").symlink_to(victim)
    code = cli.main(
        ["sample-data", "--out", str(sample), "-n", "1", "--wsol-images", "1", "--force"]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "README.md" in err
    assert victim.read_bytes() == VICTIM_TEXT
