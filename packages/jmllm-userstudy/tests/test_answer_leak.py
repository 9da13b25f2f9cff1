"""Nothing a participant can see or read in the questionnaire names the object an explanation is
for: not the pictures' pixels (no title), not their metadata, not file names, data attributes or
alt texts, and not the order in which the page holds each pair of explanations. The object names
appear where the question names them, and nowhere else."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from jmllm.userstudy.from_joint import joint_explainer, write_explanations
from jmllm.userstudy.render import render_questionnaire
from jmllm.userstudy.spec import StudySpec, answer_text, load_spec, question_text

OBJECTS = [("giraffe", "umbrella"), ("zebra", "suitcase")]


def study_data(page: str) -> dict:
    return json.loads(re.search(r'id="study-data">(.*?)</script>', page, re.S).group(1))


def embedded_images(page: str) -> list[bytes]:
    return [
        base64.b64decode(m) for m in re.findall(r"data:image/[a-z]+;base64,([A-Za-z0-9+/=]+)", page)
    ]


def assert_names_only_in_question_texts(page: str, spec: StudySpec) -> None:
    """Every occurrence of an object name in the page is inside its question text or one of its
    two answer texts, and no embedded image carries a name in its bytes (metadata)."""
    # the page minus its images and the package's own script and stylesheet (fixed code, in
    # which "cat" is part of "catch"); the study data and all markup stay
    visible = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "IMAGE", page)
    visible = re.sub(r"<script>.*?</script>|<style>.*?</style>", "", visible, flags=re.S)
    study = study_data(page)
    allowed: dict[str, int] = {}
    for q in spec.questions:
        texts = [question_text(q.objects), *(answer_text(a, q.objects) for a in ("A1", "A2"))]
        shown = next(s for s in study["questions"] if s["id"] == q.id)
        assert [shown["text"], shown["answers"]["A1"], shown["answers"]["A2"]] == texts
        for name in q.objects:
            allowed[name] = allowed.get(name, 0) + sum(len(_word(name).findall(t)) for t in texts)
    for name, count in allowed.items():
        assert len(_word(name).findall(visible)) == count, name
        for data in embedded_images(page):
            assert name.encode() not in data, f"{name} inside an embedded image"


def _word(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])")


def write_spec(root: Path, questions: list[dict]) -> StudySpec:
    lines = ["title: Leak check", "seed: 5", "questions:"]
    for q in questions:
        lines += [
            f"  - id: {q['id']}",
            f"    image: {q['image']}",
            f"    objects: [{q['objects'][0]}, {q['objects'][1]}]",
            f"    explanations: [{q['explanations'][0]}, {q['explanations'][1]}]",
            f"    correct: {q['correct']}",
        ]
    (root / "study.yaml").write_text("\n".join(lines) + "\n")
    return load_spec(root / "study.yaml")


def test_questionnaire_from_the_joint_model_does_not_give_the_answer_away(
    tmp_path: Path, shared_tiny: Path
) -> None:
    """Explanations of known objects drawn by J (tiny) through joint_explainer: untitled pixels,
    no names in the page except in the question, and a page independent of the spec's order."""
    joint = pytest.importorskip("jmllm.joint")
    testing = pytest.importorskip("jmllm.joint.testing")
    from jmllm.joint import GradientAlignment
    from jmllm.joint.render.explanation import OBJECT_ANSWER, OBJECT_QUESTION, box_view_png
    from jmllm.joint.saliency import answer_tokens

    model = testing.tiny_joint_model(shared_tiny)
    root = tmp_path / "study"
    (root / "images").mkdir(parents=True)
    explain = joint_explainer(model=model)
    questions = []
    for number, (pair, picture) in enumerate(
        zip(OBJECTS, testing.generated_images(len(OBJECTS), size=64, seed=11), strict=True),
        start=1,
    ):
        picture.save(root / "images" / f"q{number}.png")
        first, second = write_explanations(
            root / "images" / f"q{number}.png", pair, root / "images", explain
        )
        # the researcher's files are named after the objects: the page must not show it
        assert pair[0] in first.name and pair[1] in second.name
        questions.append(
            {"id": f"q{number}", "image": f"images/q{number}.png", "objects": pair,
             "explanations": [f"images/{first.name}", f"images/{second.name}"], "correct": "A1"}
        )  # fmt: skip

    # 1. The pixels carry no title: each file equals an untitled drawing of the same GA result,
    #    made here from the model's parts, and differs from the titled drawing.
    ga = GradientAlignment(model)
    for q in questions:
        with Image.open(root / q["image"]) as im:
            # explain_object's defaults: the paper's pixels and token ids
            emb = model.embed(im.convert("RGB"), preprocessing="authors")
        for name, file in zip(q["objects"], q["explanations"], strict=True):
            answer = OBJECT_ANSWER.format(name)
            ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
            text, tokens = answer_tokens(model.tokenizer, ids)
            positions = [t.position for t in tokens if t.end > text.rfind(name)]
            result = ga.attribute(
                emb,
                OBJECT_QUESTION,
                positions,
                [name],
                answer=answer,
                template="paper",
                tokenization="legacy",
            )
            with Image.open(root / file) as written:
                got = np.asarray(written.convert("RGB"))
            for title, same in (("", True), (f"GA: {name}", False)):
                with Image.open(io.BytesIO(box_view_png(emb.pil_image(0), result, title))) as im:
                    want = np.asarray(im.convert("RGB"))
                assert np.array_equal(got, want) == same, (name, title)
    assert joint.explain_object  # the hook drew through jmllm.joint's own function

    # 2. The page names the objects only where the question does.
    spec = write_spec(root, questions)
    page = render_questionnaire(spec)
    assert_names_only_in_question_texts(page, spec)

    # 3. The page does not follow the spec's order: listing each pair the other way round (and
    #    flipping the correct answer, the same study) gives the same page but for the
    #    fingerprint, so the order in the page says nothing about the answer.
    reversed_questions = [
        {**q, "explanations": q["explanations"][::-1], "correct": "A2"} for q in questions
    ]
    other = render_questionnaire(write_spec(root, reversed_questions))
    fingerprint = study_data(page)["fingerprint"]
    assert other.replace(study_data(other)["fingerprint"], fingerprint) == page


def test_explanation_metadata_and_file_names_never_reach_the_page(example_dir: Path) -> None:
    """Explanation files named after their objects, carrying the object in PNG text chunks
    (title, description) and in EXIF: none of it is in the page; the pixels are."""
    spec = load_spec(example_dir / "study.yaml")
    q = spec.questions[0]
    renamed = []
    for name, path in zip(q.objects, q.explanations, strict=True):
        slug = re.sub(r"\W", "_", name)
        target = path.with_name(f"explanation_for_{slug}.png")
        with Image.open(path) as im:
            info = PngImagePlugin.PngInfo()
            info.add_text("Title", f"GA: {name}")
            info.add_itxt("Description", f"explanation of the {name}")
            exif = Image.Exif()
            exif[0x010E] = f"GA map of {name}"  # ImageDescription
            im.save(target, pnginfo=info, exif=exif)
        renamed.append(target.name)
    text = (example_dir / "study.yaml").read_text()
    text = text.replace("images/q1_e1.png", f"images/{renamed[0]}")
    text = text.replace("images/q1_e2.png", f"images/{renamed[1]}")
    (example_dir / "study.yaml").write_text(text)
    spec = load_spec(example_dir / "study.yaml")
    page = render_questionnaire(spec)
    assert_names_only_in_question_texts(page, spec)
    assert "explanation_for" not in page and "GA:" not in page
    # the pixels themselves are embedded unchanged
    shown = study_data(page)["questions"][0]["explanations"]
    for url, path in zip(shown, spec.questions[0].page_explanations(), strict=True):
        with (
            Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im,
            Image.open(path) as original,
        ):
            assert np.array_equal(
                np.asarray(im.convert("RGB")), np.asarray(original.convert("RGB"))
            )


def test_alt_texts_and_attributes_are_neutral(example_spec: StudySpec) -> None:
    page = render_questionnaire(example_spec)
    markup = page.split('<script type="application/json"')[0]
    alts = re.findall(r'alt="([^"]*)"', markup)
    assert alts == ["The image", "Explanation 1", "Explanation 2"]
    assert not re.search(r"\sdata-[a-z-]+=", markup)
