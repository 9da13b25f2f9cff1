from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from jmllm.userstudy.spec import SpecError, answer_text, load_spec


def test_example_spec_has_the_papers_questions(example_spec):
    assert [q.objects for q in example_spec.questions] == [
        ("cat", "TV/monitor"),
        ("person", "horse"),
        ("person", "boat"),
        ("person", "motorbike"),
        ("person", "horse"),
    ]
    assert [q.correct for q in example_spec.questions] == ["A1", "A2", "A2", "A1", "A1"]
    assert [q.reference_share_correct for q in example_spec.questions] == [1.0, 0.71, 1.0, 1.0, 1.0]
    assert all(q.image.is_file() and q.explanations[1].is_file() for q in example_spec.questions)


def test_answer_texts_follow_the_paper():
    objects = ("cat", "TV/monitor")
    assert (
        answer_text("A1", objects)
        == 'Explanation 1 explains "cat" and Explanation 2 explains "TV/monitor"'
    )
    assert (
        answer_text("A2", objects)
        == 'Explanation 1 explains "TV/monitor" and Explanation 2 explains "cat"'
    )


def test_json_spec_is_accepted(example_dir):
    json_spec = example_dir / "study.json"
    json_spec.write_text(
        '{"seed": 1, "questions": [{"image": "images/q1.png", "objects": ["a", "b"],'
        ' "explanations": ["images/q1_e1.png", "images/q1_e2.png"], "correct": "A2"}]}'
    )
    spec = load_spec(json_spec)
    assert spec.questions[0].id == "q1" and spec.questions[0].correct == "A2"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "images/q2_e2.png]",
            "images/missing.png]",
            r"questions\[1\]\.explanations\[1\]: image file not found: images/missing.png",
        ),
        (
            "image: images/q3.png",
            "image: notes.txt",
            r"questions\[2\]\.image: not a readable image: notes.txt",
        ),
        (
            "correct: A2\n    reference_share_correct: 0.71",
            "correct: B\n    reference_share_correct: 0.71",
            r"questions\[1\]\.correct: must be 'A1' or 'A2'",
        ),
        ("seed: 2024\n", "", r"seed: missing"),
        ("seed: 2024", "seed: twenty", r"seed: must be an integer"),
        ("id: q2\n", "id: q1\n", r"questions\[1\]\.id: duplicate id 'q1'"),
        (
            '["person", "boat"]',
            '["person", "person"]',
            r"questions\[2\]\.objects: the two objects are the same",
        ),
        (
            '["person", "boat"]',
            '["person"]',
            r"questions\[2\]\.objects: must be a list of exactly two",
        ),
        (
            "    correct: A1\n    reference_share_correct: 1.0\n  - id: q2",
            "    correct: A1\n    corect: A1\n  - id: q2",
            r"questions\[0\]\.corect: unknown key",
        ),
        ("title:", "titel:", r"titel: unknown key"),
        (
            "reference_share_correct: 0.71",
            "reference_share_correct: 71",
            r"questions\[1\]\.reference_share_correct: must be a number in \[0, 1\]",
        ),
    ],
)
def test_bad_specs_name_the_file_and_field(example_dir, spec_editor, old, new, message):
    (example_dir / "notes.txt").write_text("not an image")
    path = spec_editor(example_dir, old, new)
    with pytest.raises(SpecError, match=message) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_malformed_yaml_reports_the_line(example_dir, spec_editor):
    path = spec_editor(example_dir, "seed: 2024", "seed: [2024")
    with pytest.raises(SpecError, match=r"study\.yaml: not valid YAML/JSON at line \d+"):
        load_spec(path)


def test_missing_spec_and_non_mapping(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(tmp_path / "list.yaml")


def test_truncated_image_is_rejected(example_dir):
    data = (example_dir / "images/q1_e1.png").read_bytes()
    (example_dir / "images/q1_e1.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SpecError, match=r"questions\[0\]\.explanations\[0\]: not a readable image"):
        load_spec(example_dir / "study.yaml")


def test_fingerprint_tracks_what_participants_see(example_dir, spec_editor):
    base = load_spec(example_dir / "study.yaml").fingerprint()
    assert load_spec(example_dir / "study.yaml").fingerprint() == base
    # A reference rate is a note for the report: changing it keeps answers valid.
    spec_editor(example_dir, "reference_share_correct: 0.71", "reference_share_correct: 0.5")
    assert load_spec(example_dir / "study.yaml").fingerprint() == base
    # One changed pixel in one explanation is another study.
    path: Path = example_dir / "images/q4_e2.png"
    with Image.open(path) as im:
        im = im.convert("RGB")
    im.putpixel((0, 0), (1, 2, 3))
    im.save(path)
    changed = load_spec(example_dir / "study.yaml").fingerprint()
    assert changed != base
    spec_editor(
        example_dir,
        "correct: A2\n    reference_share_correct: 0.5",
        "correct: A1\n    reference_share_correct: 0.5",
    )
    assert load_spec(example_dir / "study.yaml").fingerprint() != changed


@pytest.mark.parametrize(
    ("where", "reason"),
    [("dotdot", "leaves its folder"), ("absolute", "absolute path"), ("link", "leads out")],
)
def test_spec_images_stay_in_the_specs_folder(example_dir, spec_editor, tmp_path, where, reason):
    """An image path that leaves the spec's folder is refused in one line naming the field; the
    file outside is never read (or shown to participants)."""
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    Image.new("RGB", (8, 8)).save(secret)
    value = {"dotdot": "../outside/secret.png", "absolute": str(secret), "link": "images/in.png"}
    if where == "link":
        (example_dir / "images" / "in.png").symlink_to(secret)
    path = spec_editor(example_dir, "image: images/q1.png", f"image: {value[where]}")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: questions[0].image") and reason in message
    assert "\n" not in message
