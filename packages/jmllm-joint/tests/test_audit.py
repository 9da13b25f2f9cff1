"""The hallucination audit on the tiny J: data, question plans, the fast path proved equal to the
authors' per-question loop, resuming, the report and the CLI."""

from __future__ import annotations

import doctest
import importlib
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from jmllm.joint.audit.data import (
    AuditDataset,
    AuditError,
    AuditImage,
    load_coco,
    load_objects_dataset,
    plan_questions,
    question_text,
)
from jmllm.joint.audit.report import write_audit_report
from jmllm.joint.audit.run import (
    RESULTS_FILE,
    AuditSettings,
    YesNoAuditor,
    _shared_prefix_length,
    ask_one_by_one,
    run_audit,
)
from jmllm.joint.testing import COCO_FIXTURE_CLASSES, generated_images, write_coco_folder


def _tiny_sources(base) -> list[str]:
    """The session's tiny random-weight J as explicit sources (``--tiny`` is the toy world, whose
    small tokenizer does not know the COCO fixture's class names)."""
    root = Path(base) / "tiny"
    return ["--owl", str(root / "owlvit-joint"), "--mllm", str(root / "llava"),
            "--alignment", str(root / "alignment.safetensors"), "--device", "cpu"]  # fmt: skip


QUESTION = "Is there a {} in the image? Only answer with 'yes' or 'no'."


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, Path]:
    return write_coco_folder(tmp_path_factory.mktemp("coco"), count=6, seed=2)


def _answers(answered) -> list[tuple[str, list[int], bool]]:
    return [(a.class_name, a.answer.token_ids.tolist(), a.answer.finished) for a in answered]


# ------------------------------------------------------------------------------------ data
def test_load_coco_reads_classes_and_present_objects(coco) -> None:
    ann, images = coco
    ds = load_coco(ann, images)
    doc = json.loads(ann.read_text())
    assert ds.classes == COCO_FIXTURE_CLASSES
    assert len(ds) == 6 and ds.images[0].image_id == "100"
    names = {c["id"]: c["name"] for c in doc["categories"]}
    for image in ds.images:
        expected = []
        for a in doc["annotations"]:
            if str(a["image_id"]) == image.image_id and names[a["category_id"]] not in expected:
                expected.append(names[a["category_id"]])
        assert list(image.present) == expected  # each once, in annotation order
    assert len(ds.images[0].present) == 2 and ds.images[1].present == ()  # kept without objects
    assert load_coco(ann, images, limit=2).images == ds.images[:2]


def test_load_coco_bad_inputs_are_one_line_errors(tmp_path, coco) -> None:
    _, images = coco
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AuditError, match=r"bad\.json: not valid JSON"):
        load_coco(bad, images)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(AuditError, match="'categories' is missing"):
        load_coco(bad, images)
    bad.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": ""}]}))
    with pytest.raises(AuditError, match="non-empty string"):
        load_coco(bad, images)
    with pytest.raises(AuditError, match="no such image folder"):
        load_coco(bad, tmp_path / "nowhere")
    with pytest.raises(AuditError, match="no such annotation file"):
        load_coco(tmp_path / "missing.json", images)
    doc = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [
            {"image_id": 1, "category_id": 1},
            {"image_id": 9, "category_id": 1},  # unknown image
            {"image_id": 1, "category_id": 7},  # unknown category
        ],
    }
    bad.write_text(json.dumps(doc))
    ds = load_coco(bad, images)
    assert ds.skipped_annotations == 2 and ds.images[0].present == ("cat",)


def test_question_text_articles() -> None:
    assert question_text("apple") == QUESTION.format("apple")  # the authors: always "a"
    assert question_text("apple", articles="a-an").startswith("Is there an apple in")
    assert question_text("cat", articles="a-an") == QUESTION.format("cat")
    with pytest.raises(AuditError, match="articles"):
        question_text("cat", articles="the")


# ------------------------------------------------------------------------------------ plans
VOCAB = ("person", "cat", "dog", "car", "apple")


def _dataset(*present: tuple[str, ...]) -> AuditDataset:
    images = tuple(
        AuditImage(str(i), f"{i}.png", names, f"{i}.png") for i, names in enumerate(present)
    )
    return AuditDataset(VOCAB, images)


def _plan(plan) -> dict[str, list[tuple[str, bool]]]:
    return {k: [(q.class_name, q.present) for q in v] for k, v in plan.questions.items()}


def test_all_classes_plan_is_the_authors_protocol() -> None:
    plan = plan_questions(_dataset(("dog", "cat"), ()))
    assert _plan(plan)["0"] == [("dog", True), ("cat", True)] + [
        (c, False) for c in ("person", "car", "apple")
    ]
    assert _plan(plan)["1"] == [(c, False) for c in VOCAB]
    assert plan.num_questions == 10


def test_pope_popular_and_adversarial_hand_worked() -> None:
    # frequency: cat 3, dog 2, car 2, person 1 (apple never seen: never asked)
    ds = _dataset(("cat", "dog"), ("cat", "car"), ("dog", "car", "person"), ("cat",))
    popular = _plan(plan_questions(ds, "popular", k=1))
    assert popular == {
        "0": [("cat", True), ("car", False)],  # dog is present; car next (ties: vocabulary)
        "1": [("cat", True), ("dog", False)],
        "2": [("dog", True), ("cat", False)],
        "3": [("cat", True), ("dog", False)],
    }
    # co-occurrence: cat ~ dog 1, car 1; dog ~ cat 1, car 1, person 1
    adversarial = _plan(plan_questions(ds, "adversarial", k=1))
    assert adversarial == {
        "0": [("cat", True), ("car", False)],
        "1": [("cat", True), ("dog", False)],
        "2": [("dog", True), ("cat", False)],  # person (first partner) is present
        "3": [("cat", True), ("dog", False)],
    }


def test_pope_random_is_seeded_per_image_and_valid() -> None:
    rng = random.Random(0)
    present = [tuple(rng.sample(VOCAB[:4], rng.randint(0, 3))) for _ in range(30)]
    ds = _dataset(*present)
    a = plan_questions(ds, "random", k=2, seed=7)
    assert _plan(a) == _plan(plan_questions(ds, "random", k=2, seed=7))
    assert _plan(a) != _plan(plan_questions(ds, "random", k=2, seed=8))
    assert set(a.excluded) == {str(i) for i, p in enumerate(present) if len(p) < 2}
    pool = {c for p in present if len(p) >= 2 for c in p}
    for image_id, questions in a.questions.items():
        names = [q.class_name for q in questions]
        assert len(names) == len(set(names))  # never asked twice
        positives = [q for q in questions if q.present]
        negatives = [q for q in questions if not q.present]
        assert [q.class_name for q in positives] == list(present[int(image_id)][:2])
        assert questions[0].present and questions[1:2] == negatives[:1]  # pos, neg, pos, ...
        left = pool - set(present[int(image_id)])
        assert len(negatives) == min(2, len(left))
        assert (image_id in a.short) == (len(negatives) < 2)
        for q in questions:
            assert q.present == (q.class_name in present[int(image_id)])
            assert q.class_name in pool
    # an image's plan does not depend on the other images or their order
    shuffled = AuditDataset(VOCAB, tuple(reversed(ds.images)))
    assert _plan(plan_questions(shuffled, "random", k=2, seed=7)) == _plan(a)


def test_plan_options_are_checked() -> None:
    with pytest.raises(AuditError, match="sampling"):
        plan_questions(_dataset(("cat",)), "frequent")
    with pytest.raises(AuditError, match="k: must be a positive integer"):
        plan_questions(_dataset(("cat",)), "random", k=0)
    with pytest.raises(AuditError, match=r"question 'Is there a cat\?': must contain exactly one"):
        AuditSettings(question="Is there a cat?")
    with pytest.raises(AuditError, match="the field must be a bare"):
        AuditSettings(query_template="a {name}")
    with pytest.raises(AuditError, match="template"):
        AuditSettings(template="vicuna")


# ------------------------------------------------------------------------------------ fast path
def test_the_shared_prefix_ends_at_the_class_name(tiny_joint) -> None:
    auditor = YesNoAuditor(tiny_joint, AuditSettings(), COCO_FIXTURE_CLASSES)
    rows = [auditor.prompt(c)[0] for c in COCO_FIXTURE_CLASSES]
    P = auditor.prefix_length()
    assert _shared_prefix_length(rows) == P
    prefix = tiny_joint.tokenizer.decode(rows[0][:P])
    # BOS, the image tokens, the paper template's opening and the question up to the class
    assert (rows[0][:P] == tiny_joint.llava.config.image_token_id).sum() == 36
    assert prefix.replace("<image>", "").strip().endswith("USER: Is there a")
    assert all(r.numel() > P for r in rows)
    assert _shared_prefix_length([rows[0], rows[0]]) == rows[0].numel() - 1


@pytest.mark.parametrize("batch_size", [None, 4])
def test_fast_path_equals_the_per_question_loop(tiny_joint, batch_size) -> None:
    """Answers token for token, first-token logits and OWL-ViT scores against the authors'
    semantics: re-embed for every question, full prompt, greedy generate."""
    settings = AuditSettings(max_new_tokens=6)
    classes = list(COCO_FIXTURE_CLASSES)
    auditor = YesNoAuditor(tiny_joint, settings, classes, batch_size=batch_size)
    for image in generated_images(2, size=64, seed=21):
        emb = tiny_joint.embed([image], preprocessing=settings.preprocessing)  # authors'
        fast = auditor.ask(emb.t, classes, return_logits=True)
        slow = ask_one_by_one(tiny_joint, image, classes, settings, return_logits=True)
        assert _answers(fast) == _answers(slow)
        assert [f.answer.text for f in fast] == [s.answer.text for s in slow]
        assert [f.answer.reply for f in fast] == [s.answer.reply for s in slow]
        assert {f.answer.tokenization for f in fast} == {"legacy"}
        assert [f.answer.prompt for f in fast] == [s.answer.prompt for s in slow]
        assert {f.answer.template for f in fast} == {s.answer.template for s in slow} == {"paper"}
        assert [f.answer.prompt_ids.tolist() for f in fast] == [
            s.answer.prompt_ids.tolist() for s in slow
        ]
        for f, s in zip(fast, slow, strict=True):
            torch.testing.assert_close(
                f.first_token_logits, s.first_token_logits, atol=1e-4, rtol=1e-4
            )
            assert f.owl_score == pytest.approx(s.owl_score, abs=1e-5)
            assert f.first_token_logits.dtype == torch.float32


def test_fast_path_in_bfloat16(tiny_joint_paths) -> None:
    """bf16: first-token logits within bf16 rounding; an answer may differ only where the
    loop's own choice was a near-tie (top-2 margin within the tolerance)."""
    from jmllm.joint import JointModel

    model = JointModel.from_pretrained(
        tiny_joint_paths.owl,
        tiny_joint_paths.llava,
        tiny_joint_paths.alignment,
        device="cpu",
        dtype=torch.bfloat16,
    )
    settings = AuditSettings(max_new_tokens=4)
    classes = list(COCO_FIXTURE_CLASSES)
    auditor = YesNoAuditor(model, settings, classes)
    tol = 0.05
    differing = 0
    for image in generated_images(3, size=64, seed=5):
        t = model.embed([image]).t
        fast = auditor.ask(t, classes, return_logits=True)
        slow = ask_one_by_one(model, image, classes, settings, return_logits=True)
        for f, s in zip(fast, slow, strict=True):
            assert isinstance(f.owl_score, float) and f.first_token_logits.dtype == torch.float32
            assert (f.first_token_logits - s.first_token_logits).abs().max() <= tol
            assert f.owl_score == pytest.approx(s.owl_score, abs=1e-2)
            if f.answer.token_ids.tolist() != s.answer.token_ids.tolist():
                differing += 1
                assert _near_tie(model, t, s.answer, f.answer, 2 * tol)
    assert differing <= 2  # near-ties are rare: most answers are identical


def _near_tie(model, t, ref, other, margin: float) -> bool:
    """Whether the loop's answer, at the first token where the two answers part, chose between
    two tokens whose logits lie within ``margin`` (teacher-forced, one plain forward)."""
    a, b = ref.token_ids.tolist(), other.token_ids.tolist()
    shared = min(len(a), len(b))
    k = next((i for i in range(shared) if a[i] != b[i]), shared)
    ids = torch.cat([ref.prompt_ids, ref.token_ids[:k]]).unsqueeze(0)
    with torch.no_grad():
        top2 = model.language_logits(t, ids)[0, -1].float().topk(2).values
    return float(top2[0] - top2[1]) <= margin


def test_batches_follow_the_kv_cache_budget(tiny_joint) -> None:
    classes = list(COCO_FIXTURE_CLASSES)
    auditor = YesNoAuditor(tiny_joint, AuditSettings(max_new_tokens=3), classes)
    tokens = max(int(auditor.prompt(c)[0].numel()) for c in classes)
    per_question = auditor.kv_bytes_per_question(tokens)
    text = tiny_joint.llava.config.text_config  # 2 layers, 4 heads of 12, float32
    assert per_question == 2 * 2 * 4 * 12 * (tokens + 3) * 4
    assert auditor.rows_per_batch(6, tokens) == 6  # the default budget holds them all
    tight = YesNoAuditor(
        tiny_joint, AuditSettings(max_new_tokens=3), classes,
        kv_cache_gib=2.5 * per_question / 2**30,
    )  # fmt: skip
    assert tight.rows_per_batch(6, tokens) == 2  # two fit: three equal batches
    assert tight.rows_per_batch(5, tokens) == 2  # 2 + 2 + 1
    image = generated_images(1, seed=13)[0]
    t = tiny_joint.embed([image]).t
    assert _answers(tight.ask(t, classes)) == _answers(auditor.ask(t, classes))
    assert text.num_hidden_layers == 2
    with pytest.raises(AuditError, match="kv_cache_gib"):
        YesNoAuditor(tiny_joint, AuditSettings(), classes, kv_cache_gib=float("nan"))


def test_template_with_the_image_after_the_question_is_refused(tiny_joint) -> None:
    from jmllm.joint.chat import ConversationTemplate

    late = ConversationTemplate("late", "USER: {question}\n{image} ASSISTANT:", "", "")
    auditor = YesNoAuditor(tiny_joint, AuditSettings(), ["cat", "dog"])
    auditor._template = late
    with pytest.raises(AuditError, match="image must come before the question"):
        auditor.ask(tiny_joint.embed(generated_images(1)).t, ["cat", "dog"])


def test_llava_template_also_matches_the_loop(tiny_joint) -> None:
    settings = AuditSettings(template="llava-1.5", max_new_tokens=3, articles="a-an")
    classes = ["apple", "cat", "teddy bear"]
    image = generated_images(1, seed=3)[0]
    fast = YesNoAuditor(tiny_joint, settings, classes).ask(tiny_joint.embed([image]).t, classes)
    assert fast[0].answer.prompt.startswith("USER: <image>\nIs there an apple")
    assert _answers(fast) == _answers(ask_one_by_one(tiny_joint, image, classes, settings))


# ------------------------------------------------------------------------------------ runs
def _by_question(result) -> dict[tuple[str, str], tuple]:
    return {
        (r.image_id, r.class_name): (r.present, r.answer, r.tokens, r.finished, r.owl_score)
        for r in result.records
    }


class _Stop(Exception):
    pass


def test_run_audit_answers_every_planned_question(tiny_joint, coco) -> None:
    ds = load_coco(*coco)
    settings = AuditSettings(max_new_tokens=4)
    result = run_audit(tiny_joint, ds, None, settings, progress=False)
    assert result.images == 6 and result.processed == 6 and not result.failed
    assert len(result.records) == 6 * len(COCO_FIXTURE_CLASSES) == result.plan.num_questions
    # each image's records are exactly what the loop gives for that image
    image = ds.images[3]
    mine = [r for r in result.records if r.image_id == image.image_id]
    loop = ask_one_by_one(tiny_joint, image.load(), [r.class_name for r in mine], settings)
    assert [(r.class_name, list(r.tokens), r.finished) for r in mine] == _answers(loop)
    assert [r.present for r in mine] == [c in image.present for c in (r.class_name for r in mine)]
    for r, a in zip(mine, loop, strict=True):
        assert r.owl_score == pytest.approx(a.owl_score, abs=1e-5)


def test_interrupted_run_resumes_without_redoing_images(tiny_joint, coco, tmp_path) -> None:
    ds = load_coco(*coco)
    settings = AuditSettings(max_new_tokens=3)
    seen: list[str] = []

    def stop_after_two(image_id: str) -> None:
        seen.append(image_id)
        if len(seen) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        run_audit(tiny_joint, ds, tmp_path / "a", settings, progress=False, on_image=stop_after_two)
    lines = (tmp_path / "a" / RESULTS_FILE).read_text().splitlines()
    assert len(lines) == 2
    # a torn last line (killed while writing) is skipped, and does not swallow the next record
    with open(tmp_path / "a" / RESULTS_FILE, "a") as f:
        f.write('{"image_id": "10')
    redone: list[str] = []
    resumed = run_audit(
        tiny_joint, ds, tmp_path / "a", settings, progress=False, on_image=redone.append
    )
    assert resumed.kept == 2 and resumed.processed == 4
    assert sorted(redone) == sorted(set(resumed.plan.questions) - set(seen))
    fresh = run_audit(tiny_joint, ds, tmp_path / "b", settings, progress=False)
    assert _by_question(resumed) == _by_question(fresh)
    assert [r.image_id for r in resumed.records] == [r.image_id for r in fresh.records]
    # a third run does nothing
    again = run_audit(tiny_joint, ds, tmp_path / "a", settings, progress=False)
    assert again.kept == 6 and again.processed == 0 and _by_question(again) == _by_question(fresh)


def test_other_settings_in_the_same_folder_are_refused(tiny_joint, coco, tmp_path) -> None:
    ds = load_coco(*coco, limit=1)
    run_audit(tiny_joint, ds, tmp_path, AuditSettings(max_new_tokens=2), progress=False)
    with pytest.raises(AuditError, match=r"other settings \(max_new_tokens: 2 → 3\)"):
        run_audit(tiny_joint, ds, tmp_path, AuditSettings(max_new_tokens=3), progress=False)


def test_a_second_run_into_a_busy_folder_is_refused(tiny_joint, coco, tmp_path) -> None:
    import os
    import threading

    from jmllm.align.files import folder_lock
    from jmllm.joint.audit import LOCK_FILE, LOCK_OWNER

    out = tmp_path / "o"
    ds, settings = load_coco(*coco, limit=1), AuditSettings(max_new_tokens=1)
    held, release = threading.Event(), threading.Event()

    def other_run() -> None:  # another writer of the folder (its own lock file descriptor)
        with folder_lock(out, LOCK_OWNER, LOCK_FILE, AuditError):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=other_run)
    thread.start()
    assert held.wait(30)
    try:
        busy = rf"another jmllm-joint hallucination-audit \(process {os.getpid()}\) is writing here"
        with pytest.raises(AuditError, match=busy):
            run_audit(tiny_joint, ds, out, settings, progress=False)
        assert not (out / RESULTS_FILE).exists() and not (out / "audit.json").exists()
    finally:
        release.set()
        thread.join()
    done = run_audit(tiny_joint, ds, out, settings, progress=False)  # free again: it runs
    assert done.processed == 1 and not (out / LOCK_FILE).exists()


def test_unreadable_images_are_skipped_and_counted(tiny_joint, coco, tmp_path) -> None:
    ann, images = coco
    broken = tmp_path / "images"
    broken.mkdir()
    for f in images.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (broken / "0002.png").unlink()
    result = run_audit(
        tiny_joint, load_coco(ann, broken), tmp_path / "out", AuditSettings(max_new_tokens=2),
        progress=False,
    )  # fmt: skip
    assert set(result.failed) == {"101", "102"}
    assert "0001.png: not a readable image" in result.failed["101"]
    assert "no such image file" in result.failed["102"]
    assert result.images == 4 and result.processed == 4


def test_objects_dataset_with_class_labels(tiny_joint, tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "objects": {
                "category": datasets.Sequence(datasets.ClassLabel(names=["cat", "dog", "car"]))
            },
        }
    )
    rows = {
        "image": generated_images(3, seed=4),
        "image_id": [7, 8, 9],
        "objects": [{"category": [0, 2, 0]}, {"category": []}, {"category": [1]}],
    }
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    audit_ds = load_objects_dataset(str(tmp_path / "saved"))
    assert audit_ds.classes == ("cat", "dog", "car")
    assert [(i.image_id, i.present) for i in audit_ds.images] == [
        ("7", ("cat", "car")), ("8", ()), ("9", ("dog",)),
    ]  # fmt: skip
    result = run_audit(tiny_joint, audit_ds, None, AuditSettings(max_new_tokens=2), progress=False)
    assert len(result.records) == 9 and not result.failed
    # the same audit from the images themselves gives the same answers
    pictures = tmp_path / "pics"
    pictures.mkdir()
    for i, image in enumerate(rows["image"]):
        image.save(pictures / f"{i}.png")
    by_path = AuditDataset(
        audit_ds.classes,
        tuple(replace(im, source=pictures / f"{i}.png") for i, im in enumerate(audit_ds.images)),
    )
    again = run_audit(tiny_joint, by_path, None, AuditSettings(max_new_tokens=2), progress=False)
    assert [(r.class_name, r.tokens) for r in again.records] == [
        (r.class_name, r.tokens) for r in result.records
    ]
    assert [r.owl_score for r in again.records] == pytest.approx(
        [r.owl_score for r in result.records], abs=1e-6
    )
    # string categories, a list of object dicts
    plain = datasets.Dataset.from_dict(
        {"image": rows["image"][:1], "objects": [[{"shape": "star"}, {"shape": "circle"}]]}
    )
    named = load_objects_dataset(plain, category_field="shape")
    assert named.classes == ("star", "circle") and named.images[0].image_id == "0"
    with pytest.raises(AuditError, match="no column 'objects'"):
        load_objects_dataset(plain.remove_columns("objects"))


# ------------------------------------------------------------------------------------ report
def _yes_tokens(model) -> tuple[int, ...]:
    return tuple(model.tokenizer("Yes", add_special_tokens=False)["input_ids"])


def _fake_answers(result, model, yes_absent: set[str]):
    """The run's records with J's answers replaced: "Yes" to the present classes and to the
    absent classes named, "No" to the rest, one "<b>maybe</b>" (unparsed)."""
    records = []
    for i, r in enumerate(result.records):
        yes = r.present or r.class_name in yes_absent
        answer = "Yes" if yes else "No"
        if i == 1:
            answer = "<b>maybe</b>"
        tokens = tuple(model.tokenizer(answer, add_special_tokens=False)["input_ids"])
        records.append(replace(r, answer=answer, reply=answer, tokens=tokens, finished=True))
    return replace(result, records=records)


def test_report_files_and_numbers(tiny_joint, coco, tmp_path) -> None:
    ds = load_coco(*coco)
    base = run_audit(tiny_joint, ds, tmp_path, AuditSettings(max_new_tokens=2), progress=False)
    result = _fake_answers(base, tiny_joint, {"dog", "apple"})
    report = write_audit_report(result, tmp_path, tiny_joint, top_k=3, n_resamples=200)
    doc = json.loads(report.json_path.read_text())
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert key in doc["pope"] and key in doc["pope_ci"]
    for key in ("yes_present", "no_present", "yes_absent", "no_absent"):
        assert key in doc["owl_confidence"]
    assert doc["questions"] == 36 and doc["unparsed"] == 1
    assert doc["pope"]["recall"] == 1.0  # every present class answered yes
    absent = [r for r in result.records if not r.present and r.parsed() != "other"]
    fp = sum(r.class_name in {"dog", "apple"} for r in absent)
    assert doc["pope"]["fp"] == fp and doc["pope"]["tn"] == len(absent) - fp
    assert doc["auroc_owl_predicts_yes"] is not None
    # the gallery: the three most confident positive hallucinations, highest score first
    hall = sorted(
        (r for r in absent if r.class_name in {"dog", "apple"}), key=lambda r: -r.owl_score
    )[:3]
    assert [(h["image_id"], h["class"]) for h in doc["hallucinations"]] == [
        (r.image_id, r.class_name) for r in hall
    ]
    for item in report.hallucinations:
        assert item.error is None and item.ga_png and item.detections_png
        assert item.boxes and item.boxes[0]["score"] == pytest.approx(
            item.record.owl_score, abs=1e-4
        )
    pictures = sorted((tmp_path / "hallucinations").iterdir())
    assert len(pictures) == 6 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pictures)
    assert Image.open(report.histograms_path).size[0] > 500
    md = report.markdown_path.read_text()
    assert "| accuracy |" in md and "## Per class" in md and "confidence_histograms.png" in md
    page = report.gallery_path.read_text()
    assert page.count("class='card'") == 3 and "http" not in page.replace("http-equiv", "")


def test_gallery_escapes_names_and_answers(tiny_joint, tmp_path) -> None:
    image = tmp_path / "<img src=x onerror=alert(1)>.png"
    generated_images(1, seed=9)[0].save(image)
    evil = "<i>x</i>"  # a class name OWL-ViT's 16 text positions take
    ds = AuditDataset((evil, "cat"), (AuditImage("1", image, (), image.name),), name="<b>data</b>")
    base = run_audit(
        tiny_joint, ds, tmp_path / "o", AuditSettings(max_new_tokens=2), progress=False
    )
    result = _fake_answers(base, tiny_joint, {evil})
    records = [
        replace(r, answer=evil + " Yes") if r.class_name == evil else r for r in result.records
    ]
    report = write_audit_report(
        replace(result, records=records), model=tiny_joint, rule="pope", n_resamples=50
    )
    page = report.gallery_path.read_text()
    assert "<i>x" not in page and "<img src=x" not in page and "<b>data" not in page
    assert "&lt;i&gt;x&lt;/i&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;.png" in page
    assert report.hallucinations[0].ga_png  # the word "Yes" of the answer was explained


def test_docstring_examples() -> None:
    for name in ("audit.run", "audit.data", "audit.metrics", "audit.report", "render.report"):
        module = importlib.import_module(f"jmllm.joint.{name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, name


# ------------------------------------------------------------------------------------ CLI
def _cli(*args: str) -> int:
    """The exit code of ``jmllm-joint ARGS`` (usage errors exit from argparse)."""
    from jmllm.joint.cli import main

    try:
        return main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)


def test_cli_runs_resumes_and_reports(cli_env, coco, tmp_path, capsys) -> None:
    ann, images = coco
    out = tmp_path / "out"
    args = ["hallucination-audit", *_tiny_sources(cli_env), "--annotations", str(ann), "--images", str(images),
            "--out", str(out), "--max-new-tokens", "2", "--resamples", "100", "--limit", "3"]  # fmt: skip
    assert _cli(*args) == 0
    printed = capsys.readouterr().out
    assert "3 images (3 audited now, 0 kept" in printed and "Report:" in printed
    for name in ("results.jsonl", "audit.json", "report.json", "report.md", "gallery.html",
                 "confidence_histograms.png"):  # fmt: skip
        assert (out / name).is_file(), name
    doc = json.loads((out / "report.json").read_text())
    assert doc["questions"] == 18 and doc["run"]["settings"]["template"] == "paper"
    assert doc["run"]["settings"]["query_template"] == "{}"
    # the authors' token ids, pixels and precision, recorded in every report file
    settings = doc["run"]["settings"]
    assert (settings["tokenization"], settings["preprocessing"]) == ("legacy", "authors")
    assert doc["run"]["dtype"] == "float32" and doc["run"]["notes"] == []
    assert (
        "tokenization legacy, preprocessing authors, dtype float32"
        in (out / "report.md").read_text()
    )
    assert "dtype <code>float32</code>" in (out / "gallery.html").read_text()
    audit = json.loads((out / "audit.json").read_text())
    assert audit["settings"]["tokenization"] == "legacy"
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert all("reply" in q for line in lines for q in line["questions"])
    assert _cli(*args[:-1], "6") == 0
    assert "6 images (3 audited now, 3 kept" in capsys.readouterr().out
    # another precision is run as asked, and the report says it is not the authors'
    other = tmp_path / "bf16"
    assert _cli(*args[:-7], str(other), "--max-new-tokens", "2", "--resamples", "100",
                "--limit", "1", "--top-k", "0", "--dtype", "bfloat16") == 0  # fmt: skip
    doc = json.loads((other / "report.json").read_text())
    assert doc["run"]["dtype"] == "bfloat16"
    assert any("not in float32 as the authors' notebook" in n for n in doc["run"]["notes"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--confidence", "nan"], "argument --confidence: must be a finite number, got nan"),
        (["--confidence", "1"], "argument --confidence: must be in (0, 1), got 1"),
        (["--top-k", "-1"], "argument --top-k: must be >= 0, got -1"),
        (["-k", "0"], "argument -k: must be in [1, 10000], got 0"),
        (["--limit", "0"], "argument --limit: must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be in [1, 4096], got 0"),
        (["--question", "Is there a cat?"], "must contain exactly one {} (found 0)"),
        (["--query-template", "a {} {}"], "must contain exactly one {} (found 2)"),
        (["--dataset", "x"], "either --dataset or --annotations"),
    ],
)
def test_cli_bad_input_exits_2(cli_env, coco, tmp_path, capsys, extra, message) -> None:
    ann, images = coco
    code = _cli("hallucination-audit", *_tiny_sources(cli_env), "--annotations", str(ann), "--images",
                str(images), "--out", str(tmp_path / "o"), *extra)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_missing_annotations_exits_2(cli_env, tmp_path, capsys) -> None:
    code = _cli("hallucination-audit", *_tiny_sources(cli_env), "--annotations", str(tmp_path / "none.json"),
                "--images", str(tmp_path), "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and "none.json: no such annotation file" in capsys.readouterr().err


def test_cli_partial_run_exits_3(cli_env, coco, tmp_path, capsys) -> None:
    ann, images = coco
    copy = tmp_path / "images"
    copy.mkdir()
    for f in sorted(images.iterdir())[:2]:
        (copy / f.name).write_bytes(f.read_bytes())
    code = _cli("hallucination-audit", *_tiny_sources(cli_env), "--annotations", str(ann), "--images",
                str(copy), "--out", str(tmp_path / "o"), "--max-new-tokens", "1", "--limit", "3",
                "--resamples", "50")  # fmt: skip
    out = capsys.readouterr().out
    assert code == 3 and "1 image(s) could not be read" in out


def test_cli_dataset_option(cli_env, tmp_path, capsys) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {
        "image": generated_images(2, seed=8),
        "objects": [{"shape": ["star"]}, {"shape": ["circle", "star"]}],
    }
    splits = datasets.DatasetDict({"heldout": datasets.Dataset.from_dict(rows)})
    splits.save_to_disk(str(tmp_path / "scenes"))
    args = ["hallucination-audit", *_tiny_sources(cli_env), "--dataset", str(tmp_path / "scenes"),
            "--category-field", "shape", "--out", str(tmp_path / "o"), "--max-new-tokens", "1",
            "--resamples", "50"]  # fmt: skip
    assert _cli(*args) == 2
    assert "choose one with split=" in capsys.readouterr().err
    assert _cli(*args, "--split", "heldout") == 0
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    assert doc["questions"] == 4 and doc["run"]["dataset"].endswith("scenes")
    assert {c["class"]: c["present_questions"] for c in doc["per_class"]} == {
        "star": 2,
        "circle": 1,
    }
