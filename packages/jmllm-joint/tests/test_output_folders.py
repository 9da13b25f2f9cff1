"""Output folders are the command's own (jmllm.align.files.claim_output_folder): a folder
holding files the command did not write is refused without --force, and --force never
replaces or deletes them. Here for ``sample-data`` (which replaced a repository's README) and
``toy train`` (which deleted a user's llava/, owlvit/ and alignment.safetensors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jmllm.joint import cli


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip()


def _user_files(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"README.md": "# my project\n", "coco/mine.json": "{}", "notes.txt": "keep me"}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return files


def _unchanged(folder: Path, files: dict[str, str]) -> bool:
    return all((folder / name).read_text() == text for name, text in files.items())


SAMPLE = ("sample-data", "-n", "2", "--wsol-images", "1")


@pytest.mark.parametrize("through_link", [False, True])
def test_sample_data_never_overwrites_a_users_files(tmp_path, capsys, through_link) -> None:
    repo = tmp_path / "repo"
    files = _user_files(repo)
    out = repo
    if through_link:  # a symlinked folder is followed (the user named it) but still checked
        out = tmp_path / "link"
        out.symlink_to(repo)
    code, err = _run(capsys, *SAMPLE, "--out", str(out))
    assert code == 2 and err.count("\n") == 0
    assert "README.md" in err and "not written by jmllm-joint sample-data" in err
    code, err = _run(capsys, *SAMPLE, "--out", str(out), "--force")  # README.md, coco/: taken
    assert code == 2 and "never replaces what it did not write, even with --force" in err
    assert _unchanged(repo, files) and sorted(p.name for p in repo.iterdir()) == [
        "README.md",
        "coco",
        "notes.txt",
    ]


def test_sample_data_force_writes_beside_other_files_and_reruns_freely(
    tmp_path, capsys, monkeypatch
) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, err = _run(capsys, *SAMPLE, "--out", str(out))
    assert code == 2 and "holds 1 entry jmllm-joint sample-data did not write (notes.txt)" in err
    assert "--force" in err
    code, err = _run(capsys, *SAMPLE, "--out", str(out), "--force")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "keep me" and (
        out / "coco" / "instances.json"
    ).is_file()
    # its own files: a rerun replaces them (with --force for the user's notes.txt beside them)
    assert _run(capsys, *SAMPLE, "--out", str(out), "--force")[0] == 0
    (out / "notes.txt").unlink()
    monkeypatch.chdir(out)
    assert _run(capsys, *SAMPLE, "--out", ".")[0] == 0  # only its own files left: no --force


def test_sample_data_refuses_a_planted_link_inside_its_own_folder(tmp_path, capsys) -> None:
    out = tmp_path / "data"
    assert _run(capsys, *SAMPLE, "--out", str(out))[0] == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (out / "cub").rename(tmp_path / "old-cub")
    (out / "cub").symlink_to(victim)  # its own name, now a link: not its own entry
    code, err = _run(capsys, *SAMPLE, "--out", str(out), "--force")
    assert code == 2 and "cub was not written by jmllm-joint sample-data" in err
    assert list(victim.iterdir()) == []


def test_toy_train_never_deletes_a_users_models(tmp_path, capsys) -> None:
    out = tmp_path / "models"
    (out / "llava").mkdir(parents=True)
    (out / "llava" / "config.json").write_text("{}")
    (out / "owlvit").mkdir()
    (out / "alignment.safetensors").write_bytes(b"the user's W")
    for force in ([], ["--force"]):
        code, err = _run(capsys, "toy", "train", "--quick", "--out", str(out), *force)
        assert code == 2, err
        assert "not written by jmllm-joint toy train" in err
        assert all(name in err for name in ("alignment.safetensors", "llava", "owlvit"))
    assert (out / "llava" / "config.json").read_text() == "{}"
    assert (out / "alignment.safetensors").read_bytes() == b"the user's W"
    assert sorted(p.name for p in out.iterdir()) == ["alignment.safetensors", "llava", "owlvit"]


def test_toy_train_refuses_other_files_without_force(tmp_path, capsys) -> None:
    out = tmp_path / "models"
    out.mkdir()
    (out / "paper.pdf").write_bytes(b"%PDF")
    code, err = _run(capsys, "toy", "train", "--quick", "--out", str(out))
    assert code == 2 and "holds 1 entry jmllm-joint toy train did not write (paper.pdf)" in err
    assert sorted(p.name for p in out.iterdir()) == ["paper.pdf"]


def test_claim_beside_protects_the_names_the_user_did_not_choose(tmp_path):
    """``claim_beside``: outputs written beside a named file must be new or the command's own;
    the named file is the user's choice unless another command recorded it as its output."""
    from jmllm.align.files import OUTPUTS_RECORD, ForeignOutputError, claim_beside

    named = tmp_path / "run" / "cub.json"
    assert claim_beside(named, "tool", ["cub.html"]) == named.parent  # a new folder
    (named.parent / "cub.html").write_text("tool's page")
    named.write_text("{}")
    claim_beside(named, "tool", ["cub.html"])  # a rerun: its own outputs
    with pytest.raises(ForeignOutputError, match=r"cub\.html exists and was not written by other"):
        claim_beside(named.parent / "new.json", "other", ["cub.html"])
    with pytest.raises(ForeignOutputError, match="was written by tool"):
        claim_beside(named, "other", [])
    (named.parent / "mine.json").write_text("the user's own file, named by them")
    claim_beside(named.parent / "mine.json", "other", [])  # theirs to replace
    with pytest.raises(ForeignOutputError, match="record of a folder's outputs"):
        claim_beside(named.parent / OUTPUTS_RECORD, "tool", [])
