"""The hallucination audit against hostile inputs and folders: planted links in --out, file
names that leave --images, ids that collide, resumes over a changed dataset, settings recorded
by a refused run, malformed and deeply nested annotation files, text that would drive a
terminal or inject HTML into report.md."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from jmllm.joint.audit import RESULTS_FILE, SETTINGS_FILE, AuditSettings, run_audit
from jmllm.joint.audit.data import AuditDataset, AuditError, AuditImage, load_coco
from jmllm.joint.audit.report import write_audit_report
from jmllm.joint.testing import generated_images, write_coco_folder


def _tiny_sources(base: Path) -> list[str]:
    root = Path(base) / "tiny"
    return ["--owl", str(root / "owlvit-joint"), "--llava", str(root / "llava"),
            "--alignment", str(root / "alignment.safetensors"), "--device", "cpu"]  # fmt: skip


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from jmllm.joint.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    """The one error line of stderr (progress bars aside), without a traceback."""
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def coco(tmp_path) -> tuple[Path, Path]:
    return write_coco_folder(tmp_path / "coco", count=3, seed=2)


def _rewrite(annotations: Path, change) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(annotations.read_text())
    change(doc)
    annotations.write_text(json.dumps(doc))


def _audit_args(base: Path, annotations: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["hallucination-audit", *_tiny_sources(base), "--annotations", str(annotations),
            "--images", str(images), "--out", str(out), "--max-new-tokens", "1",
            "--resamples", "20", "--top-k", "0", *extra]  # fmt: skip


# ----------------------------------------------------------------- 1. outputs follow symlinks
@pytest.mark.parametrize("name", [".jmllm-audit.lock", RESULTS_FILE, SETTINGS_FILE, "report.md"])
def test_a_planted_link_in_out_is_refused_and_its_target_untouched(
    cli_env, coco, tmp_path, capsys, name
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / name).symlink_to(victim)
    args = _audit_args(cli_env, *coco, out, "--limit", "1")
    for force in ([], ["--force"]):  # --force writes beside others' files, never over them
        code, _, err = _cli(capsys, *args, *force)
        line = _one_error_line(err)
        assert code == 2 and f"{name} was not written by jmllm-joint hallucination-audit" in line
    assert victim.read_text() == "precious\n" and (out / name).is_symlink()


def test_an_out_folder_with_other_files_needs_force_and_keeps_them(
    cli_env, coco, tmp_path, capsys
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "link").symlink_to(tmp_path)
    args = _audit_args(cli_env, *coco, out, "--limit", "1")
    code, _, err = _cli(capsys, *args)
    line = _one_error_line(err)
    assert code == 2 and "holds 2 entries jmllm-joint hallucination-audit did not write" in line
    assert "--force" in line and sorted(p.name for p in out.iterdir()) == ["link", "notes.txt"]
    code, _, err = _cli(capsys, *args, "--force")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / RESULTS_FILE).is_file()
    code, _, err = _cli(capsys, *args)  # its own files now: the rerun needs --force only for
    assert code == 2 and "holds 2 entries" in err  # the user's two entries


def test_run_audit_never_writes_through_a_lock_or_log_link(tiny_joint, coco, tmp_path) -> None:
    """The library path too (no CLI claim): the lock and the log are opened without following
    links."""
    ds = load_coco(*coco, limit=1)
    for name in (".jmllm-audit.lock", RESULTS_FILE):
        out = tmp_path / name.strip(".")
        out.mkdir()
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious")
        (out / name).symlink_to(victim)
        with pytest.raises(ValueError, match="symbolic link"):
            run_audit(tiny_joint, ds, out, AuditSettings(max_new_tokens=1), progress=False)
        assert victim.read_text() == "precious"


# ----------------------------------------------------------- 2. reads outside --images
@pytest.mark.parametrize("where", ["dotdot", "absolute", "link"])
def test_file_names_that_leave_the_image_folder_are_refused(
    cli_env, coco, tmp_path, capsys, where
) -> None:
    annotations, images = coco
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    generated_images(1, seed=3)[0].save(secret)
    if where == "dotdot":
        name = "../../outside/secret.png"
    elif where == "absolute":
        name = str(secret)
    else:
        (images / "inside.png").symlink_to(secret)
        name = "inside.png"
    _rewrite(annotations, lambda doc: doc["images"][1].update(file_name=name))
    with pytest.raises(AuditError, match=r"images\[1\]\.file_name"):
        load_coco(annotations, images)
    out = tmp_path / "o"
    code, _, err = _cli(capsys, *_audit_args(cli_env, annotations, images, out))
    line = _one_error_line(err)
    assert code == 2 and "images[1].file_name" in line, line
    assert not out.exists()  # refused before anything was written
    # a link that stays inside the folder is an ordinary file
    (images / "alias.png").symlink_to(images / "0000.png")
    _rewrite(annotations, lambda doc: doc["images"][1].update(file_name="alias.png"))
    assert load_coco(annotations, images).images[1].file == "alias.png"


# ------------------------------------------------------------ 10. ids by type and value
def test_ids_one_and_string_one_are_refused_not_merged(coco, tmp_path) -> None:
    annotations, images = coco

    def collide(doc: dict) -> None:
        doc["images"][0]["id"] = 1
        doc["images"][1]["id"] = "1"

    _rewrite(annotations, collide)
    with pytest.raises(AuditError, match=r"images\[1\]\.id '1' and id 1 are both '1' as text"):
        load_coco(annotations, images)


def test_annotations_match_images_by_type_and_value(coco) -> None:
    annotations, images = coco

    def as_strings(doc: dict) -> None:
        for ann in doc["annotations"]:
            ann["image_id"] = str(ann["image_id"])  # "100" names no image: image 100 is int

    before = load_coco(annotations, images)
    _rewrite(annotations, as_strings)
    after = load_coco(annotations, images)
    assert sum(len(i.present) for i in before.images) > 0
    assert all(i.present == () for i in after.images)
    assert after.skipped_annotations == len(json.loads(annotations.read_text())["annotations"])


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("images.0.id", 100, r"images\[1\]\.id 100 appears twice"),
        ("categories.0.id", 2, r"categories\[1\]\.id 2 appears twice"),
    ],
)
def test_duplicate_ids_are_refused(coco, field, value, needle) -> None:
    annotations, images = coco
    part, _, key = field.split(".")

    def dup(doc: dict) -> None:
        doc[part][1][key] = doc[part][0][key] = value

    _rewrite(annotations, dup)
    with pytest.raises(AuditError, match=needle):
        load_coco(annotations, images)


# ------------------------------------------------- 11. resume matches id and file hash
def test_resume_asks_again_an_image_whose_id_points_at_another_file(
    tiny_joint, coco, tmp_path
) -> None:
    annotations, images = coco
    settings = AuditSettings(max_new_tokens=1)
    out = tmp_path / "o"
    first = run_audit(tiny_joint, load_coco(annotations, images, limit=2), out, settings,
                      progress=False)  # fmt: skip
    assert first.processed == 2
    generated_images(1, seed=99)[0].save(images / "other.png")
    _rewrite(annotations, lambda doc: doc["images"][0].update(file_name="other.png"))
    asked: list[str] = []
    second = run_audit(tiny_joint, load_coco(annotations, images, limit=2), out, settings,
                       progress=False, on_image=asked.append)  # fmt: skip
    assert asked == ["100"] and second.kept == 1 and second.processed == 1
    lines = [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]
    from jmllm.joint.audit.data import _file_fingerprint

    assert lines[-1]["image_id"] == "100"
    assert lines[-1]["sha256"] == _file_fingerprint(images / "other.png")
    # the same file again: nothing is asked
    third = run_audit(tiny_joint, load_coco(annotations, images, limit=2), out, settings,
                      progress=False)  # fmt: skip
    assert third.kept == 2 and third.processed == 0


# ------------------------------------------------- 12. settings only after a success
def test_a_run_refused_at_its_first_question_records_no_settings(
    cli_env, coco, tmp_path, capsys
) -> None:
    out = tmp_path / "o"
    args = _audit_args(cli_env, *coco, out, "--limit", "1")
    bad = [a if a != "1" or args[i - 1] != "--max-new-tokens" else "4096"
           for i, a in enumerate(args)]  # fmt: skip
    code, _, err = _cli(capsys, *bad)
    line = _one_error_line(err)
    assert code == 2 and "exceed the MLLM's" in line, line
    assert not (out / SETTINGS_FILE).exists()
    code, _, err = _cli(capsys, *args)
    assert code == 0, err
    assert json.loads((out / SETTINGS_FILE).read_text())["settings"]["max_new_tokens"] == 1


# ------------------------------------------------- 13/14. malformed files, unbounded echoes
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d["categories"][0].update(id=[1]), "categories[0].id: must be an integer"),
        (lambda d: d["images"][0].update(id={"a": 1}), "images[0].id: must be an integer"),
        (lambda d: d["annotations"][0].update(image_id=[100]), "annotations[0].image_id"),
        (lambda d: d["annotations"][0].update(category_id={}), "annotations[0].category_id"),
        (lambda d: d["images"][0].update(id=True), "images[0].id: must be an integer"),
        (lambda d: d["categories"][0].update(name=["x"]), "categories[0].name"),
    ],
)
def test_malformed_ids_exit_2_in_one_line(cli_env, coco, tmp_path, capsys, change, needle) -> None:
    annotations, images = coco
    _rewrite(annotations, change)
    code, _, err = _cli(capsys, *_audit_args(cli_env, annotations, images, tmp_path / "o"))
    line = _one_error_line(err)
    assert code == 2 and needle in line, line


def test_deeply_nested_annotations_exit_2_in_one_line(cli_env, coco, tmp_path, capsys) -> None:
    annotations, images = coco
    annotations.write_text('{"images": ' + "[" * 200_000 + "]" * 200_000 + "}")
    code, _, err = _cli(capsys, *_audit_args(cli_env, annotations, images, tmp_path / "o"))
    line = _one_error_line(err)
    assert code == 2 and "nested too deeply" in line, line


def test_a_huge_category_name_gives_a_short_error(cli_env, coco, tmp_path, capsys) -> None:
    annotations, images = coco
    _rewrite(annotations, lambda d: d["categories"][0].update(name="x" * 10_000 + "\x1b[2J"))
    code, _, err = _cli(capsys, *_audit_args(cli_env, annotations, images, tmp_path / "o"))
    line = _one_error_line(err)
    assert code == 2 and len(line) < 500 and "\x1b" not in line, (len(line), line[:300])


# ------------------------------------------------------------ 15. report.md escapes names
def test_report_markdown_escapes_class_names_and_answers(tiny_joint, tmp_path) -> None:
    image = tmp_path / "a|b`<i>.png"
    generated_images(1, seed=9)[0].save(image)
    evil = "<b>x</b>"
    ds = AuditDataset(
        (evil, "cat"), (AuditImage("1", image, (), image.name),), name="<script>alert(1)</script>"
    )
    result = run_audit(tiny_joint, ds, tmp_path / "o", AuditSettings(max_new_tokens=1),
                       progress=False)  # fmt: skip
    records = [
        replace(r, answer="Yes <img src=x onerror=alert(1)>\n# heading") for r in result.records
    ]
    report = write_audit_report(replace(result, records=records), rule="pope", n_resamples=20)
    text = report.markdown_path.read_text()
    assert "<b>" not in text and "<script>" not in text and "<img" not in text and "<i>" not in text
    assert "&lt;b&gt;x&lt;/b&gt;" in text and "&lt;script&gt;" in text
    assert "\n# heading" not in text  # the answer stays in its table cell
    for line in text.splitlines():
        if line.startswith("| ") and "a\\|b" in line:
            assert line.count(" | ") == 4  # the file name's "|" did not add a column


def test_no_traceback_on_an_unreadable_settings_file(tiny_joint, coco, tmp_path) -> None:
    """A corrupt audit.json (say, nested too deeply) is not this audit's and not an error."""
    out = tmp_path / "o"
    out.mkdir()
    (out / SETTINGS_FILE).write_text("[" * 100_000)
    result = run_audit(tiny_joint, load_coco(*coco, limit=1), out,
                       AuditSettings(max_new_tokens=1), progress=False)  # fmt: skip
    assert result.processed == 1
    assert os.path.getsize(out / SETTINGS_FILE) < 10_000
