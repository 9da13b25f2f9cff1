"""POPE and CHAIR on J (jmllm.joint.audit.benchmark, benchmark_report, cli_benchmark): batched
answers equal the one-at-a-time ones, OWL-ViT's evidence is read from the same t, runs resume,
the report's numbers equal an independent re-implementation of LLaVA's eval_pope.py and of
CHAIR on the run's own records, and the command runs offline on sample-data's toy files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jmllm.joint.audit.benchmark import (
    BenchmarkImage,
    BenchmarkResult,
    BenchmarkSettings,
    chair_images,
    pope_images,
    run_benchmark,
)
from jmllm.joint.audit.benchmark_report import ChairInputs, write_benchmark_report
from jmllm.joint.audit.chair import ChairVocabulary, image_truth, load_reference_captions
from jmllm.joint.audit.pope import load_pope, yes_no_token_ids
from jmllm.joint.cli.benchmark import TOY_POPE_QUESTION
from jmllm.joint.toy import load_toy_joint
from jmllm.joint.toy.sample_data import write_sample_data
from jmllm.joint.toy.scenes import CONTENT_QUESTION, HALLUCINATION_QUESTION, SHAPES

SCENES = 8


@pytest.fixture(scope="module")
def toy():
    return load_toy_joint()


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "data"
    write_sample_data(root, count=SCENES, wsol_count=1)
    return root


@pytest.fixture(scope="module")
def pope_run(toy, sample, tmp_path_factory):
    data = load_pope(sample / "pope", sample / "coco" / "images")
    settings = BenchmarkSettings("pope", TOY_POPE_QUESTION, "paper", 8)
    out = tmp_path_factory.mktemp("pope-run")
    result = run_benchmark(toy, pope_images(data), out, settings, batch_size=6, progress=False)
    return data, settings, result, out


def _cli(*args: str) -> int:
    from jmllm.joint.cli import main

    try:
        return main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)


# ------------------------------------------------------------------------- batched generation
@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_batched_answers_equal_one_at_a_time(which, tiny_joint, toy, sample_images):
    """One batched generate (left padding, prompts of different lengths, several images) gives
    exactly the answers of batch 1, and the first-token logits of a plain forward."""
    model = tiny_joint if which == "tiny" else toy
    if which == "toy":
        from jmllm.joint.toy.scenes import make_scene

        images = [make_scene("heldout", i).image for i in range(3)]
        prompts = [HALLUCINATION_QUESTION.format(s) for s in ("circle", "cross", "square")]
        prompts.append(CONTENT_QUESTION)
        images.append(images[0])
    else:
        images = [*sample_images, sample_images[0]]
        prompts = ["Is there a dog?", "What is in the image? Describe it.", "Hi", "Why?"]
    emb = model.embed(images)
    batched = model.generate(emb, prompts, max_new_tokens=12, first_token_logits=True)
    for i, prompt in enumerate(prompts):
        alone = model.generate(emb.select([i]), prompt, max_new_tokens=12)[0]
        assert batched[i].token_ids.tolist() == alone.token_ids.tolist(), (which, i)
        assert batched[i].text == alone.text and batched[i].finished == alone.finished
        assert alone.first_logits is None  # only when asked for
        ids = model.prompt_inputs(prompt)["input_ids"]
        reference = model.language_logits(emb.t[i : i + 1], ids)[0, -1].float()
        torch.testing.assert_close(batched[i].first_logits, reference, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------- POPE run
def test_pope_run_asks_each_distinct_question_once_with_owl_evidence(toy, pope_run):
    data, settings, result, _ = pope_run
    assert set(result.lines) == set(data.image_names()) and not result.failed
    yes_ids, no_ids = yes_no_token_ids(toy.tokenizer)
    for image in data.image_names()[:3]:
        line = result.lines[image]
        texts = [a["text"] for a in line["answers"]]
        assert texts == list(dict.fromkeys(r.text for r in data.rows if r.image == image))
        emb = toy.embed([data.images / image])
        for entry in line["answers"]:
            prompt = settings.prompt(entry["text"])
            assert prompt == HALLUCINATION_QUESTION.format(entry["text"].split()[3])
            alone = toy.generate(emb, prompt, max_new_tokens=8, template="paper")[0]
            assert entry["tokens"] == alone.token_ids.tolist()  # batched across images: same
            ids = toy.prompt_inputs(prompt, "paper")["input_ids"]
            first = toy.language_logits(emb.t, ids)[0, -1]
            expected = float(torch.logsumexp(first[yes_ids], 0) - torch.logsumexp(first[no_ids], 0))
            assert entry["margin"] == pytest.approx(expected, abs=1e-4)
        for obj, (score, *box) in line["owl"].items():
            logits, _ = toy.detection_heads(emb.t, toy.encode_queries([obj], "{}"))
            assert score == pytest.approx(float(torch.sigmoid(logits[0, :, 0]).max()), abs=1e-5)
            assert len(box) == 4 and 0 <= box[0] <= box[2] <= 128


def _eval_pope(answers: list[str], labels: list[str]) -> dict[str, float]:
    """LLaVA's eval_pope.py, re-implemented straightforwardly: answers zipped with the labels in
    file order."""
    preds = []
    for text in answers:
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
    truth = [0 if label == "no" else 1 for label in labels]
    tp = sum(p == 1 and t == 1 for p, t in zip(preds, truth, strict=True))
    fp = sum(p == 1 and t == 0 for p, t in zip(preds, truth, strict=True))
    tn = sum(p == 0 and t == 0 for p, t in zip(preds, truth, strict=True))
    fn = sum(p == 0 and t == 1 for p, t in zip(preds, truth, strict=True))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {
        "accuracy": (tp + tn) / len(preds),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall),
        "yes_ratio": preds.count(1) / len(preds),
    }


def test_pope_report_matches_eval_pope_and_holds_every_key(toy, pope_run):
    data, _, result, out = pope_run
    report = write_benchmark_report(result, out / "report", toy, pope=data, top_k=1)
    doc = json.loads(report.json_path.read_text())
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_key = {(r["image_id"], a["text"]): a["answer"] for r in records for a in r["answers"]}
    f1s = []
    for split in ("random", "popular", "adversarial"):
        rows = [json.loads(line) for line in data.files[split].path.read_text().splitlines()]
        expected = _eval_pope(
            [by_key[(r["image"], r["text"])] for r in rows], [r["label"] for r in rows]
        )
        for metric, value in expected.items():
            assert doc["pope"][split][metric] == pytest.approx(value), (split, metric)
        assert doc["pope_rows"][split]["rows"] == len(rows) == doc["pope_rows"][split]["answered"]
        f1s.append(expected["f1"])
    assert doc["pope"]["mean"]["f1"] == pytest.approx(sum(f1s) / 3)
    assert doc["pope"]["rule"] == "llava"
    assert set(doc["pope_rules"]) == {"llava", "lmms-eval", "vlmevalkit", "first-token"}
    pvl = doc["perception_vs_language"]
    assert set(pvl) >= {"perception", "language"}
    judged = pvl["counts"]["perception"] + pvl["counts"]["language"]
    assert judged == pvl["errors"] - pvl["without_evidence"]
    if judged:
        assert pvl["perception"] + pvl["language"] == pytest.approx(1.0)
    assert doc["auroc_owl_predicts_truth"] >= 0.8  # OWL-ViT sees the toy shapes
    assert doc["first_token"]["available"] and doc["first_token"]["auroc"] >= 0.8
    assert report.curve_path.is_file() and report.gallery_path.is_file()
    if report.cards:
        card = report.cards[0]
        assert card.pictures and card.side in ("perception", "language")


def test_pope_run_resumes_after_a_kill(toy, sample, pope_run, tmp_path):
    data, settings, full, _ = pope_run
    images = pope_images(data)

    class Killed(Exception):
        pass

    def kill(_ids):
        raise Killed

    with pytest.raises(Killed):
        run_benchmark(toy, images, tmp_path, settings, batch_size=6, progress=False,
                      on_batch=kill)  # fmt: skip
    saved = (tmp_path / "results.jsonl").read_text().splitlines()
    assert 0 < len(saved) < len(images)  # the first batch was saved before the kill
    resumed = run_benchmark(toy, images, tmp_path, settings, batch_size=6, progress=False)
    assert resumed.kept == len(saved) and resumed.processed == len(images) - len(saved)
    assert {k: v["answers"] for k, v in resumed.lines.items()} == {
        k: v["answers"] for k, v in full.lines.items()
    }
    other = BenchmarkSettings("pope", TOY_POPE_QUESTION, "llava-1.5", 8)
    from jmllm.joint.audit.data import AuditError

    with pytest.raises(AuditError, match="other settings"):
        run_benchmark(toy, images, tmp_path, other, progress=False)


def test_pope_resume_asks_again_an_image_whose_file_changed(toy, sample, pope_run, tmp_path):
    """Resume matches each image by its id and its file's SHA-256: a file replaced since the
    first run is asked again, the others are kept."""
    import shutil

    _, settings, _, _ = pope_run
    images_dir = Path(shutil.copytree(sample / "coco" / "images", tmp_path / "images"))
    images = pope_images(load_pope(sample / "pope", images_dir))
    out = tmp_path / "run"
    first = run_benchmark(toy, images, out, settings, batch_size=6, progress=False)
    changed = images[0].image_id
    other = next(p for p in sorted(images_dir.iterdir()) if p.name != changed)
    (images_dir / changed).write_bytes(other.read_bytes())
    asked: list[str] = []
    again = run_benchmark(toy, images, out, settings, batch_size=6, progress=False,
                          on_batch=asked.extend)  # fmt: skip
    assert asked == [changed] and again.kept == len(images) - 1 and again.processed == 1
    assert first.processed == len(images)


# ------------------------------------------------------------------------- CHAIR run
def test_chair_run_and_report_on_the_toy_world(toy, sample, tmp_path):
    from jmllm.joint.audit.chair import chair_metrics, score_caption
    from jmllm.joint.audit.data import load_coco

    vocabulary = ChairVocabulary.from_file(sample / "chair" / "synonyms.txt")
    dataset = load_coco(sample / "coco" / "instances.json", sample / "coco" / "images")
    truth = image_truth(
        vocabulary,
        {im.image_id: im.present for im in dataset.images},
        load_reference_captions(sample / "coco" / "captions.json"),
    )
    files = {im.image_id: im.file for im in dataset.images}
    images = chair_images(files, sample / "coco" / "images", vocabulary.categories)
    settings = BenchmarkSettings("chair", CONTENT_QUESTION, "paper", 32)
    result = run_benchmark(toy, images, tmp_path / "run", settings, progress=False)
    report = write_benchmark_report(
        result, tmp_path / "run", toy, chair=ChairInputs(vocabulary, truth), top_k=1
    )
    doc = json.loads(report.json_path.read_text())
    captions = {i: line["answers"][0]["answer"] for i, line in result.lines.items()}
    scores = [score_caption(vocabulary, i, c, truth[i]) for i, c in captions.items()]
    expected = chair_metrics(scores)
    for key in ("chair_s", "chair_i", "recall"):
        assert doc["chair"][key] == expected[key]
    assert doc["chair"]["max_new_tokens"] == 32 and doc["chair"]["prompt"] == CONTENT_QUESTION
    assert doc["chair"]["recall"] >= 0.6  # the toy J captions its scenes
    for caption in doc["captions"]:
        owl = result.lines[caption["image_id"]]["owl"]
        assert set(owl) == set(SHAPES)  # every category scored on the same t
        for m in caption["mentions"]:
            assert m["owl_score"] == owl[m["category"]][0]
            assert m["hallucinated"] == (m["category"] not in truth[caption["image_id"]])
    assert set(doc["perception_vs_language"]) >= {"perception", "language"}
    card = report.cards[0]
    assert card.page and (tmp_path / "run" / card.page).is_file()  # its hallucination view
    assert len(card.pictures) >= 2  # the boxes and at least one GA map


def test_gallery_escapes_model_text(tmp_path):
    """A caption is text: markup in it is shown, never run (no model needed)."""
    vocabulary = ChairVocabulary.parse("dog, puppy\ncat\n", name="pets")
    settings = BenchmarkSettings("chair", "Describe <b>it</b>.", "paper", 4)
    image = BenchmarkImage("1", tmp_path / "x.png", "x<img>.png", ("",), ("dog", "cat"))
    line = {"image_id": "1", "file": "x<img>.png", "settings": "d", "owl": {
        "dog": [0.9, 0, 0, 1, 1], "cat": [0.05, 0, 0, 1, 1]},
        "answers": [{"text": "", "answer": "<script>alert(1)</script> a cat", "tokens": [],
                     "finished": True}]}  # fmt: skip
    result = BenchmarkResult(settings, [image], {"1": line})
    report = write_benchmark_report(result, tmp_path, chair=ChairInputs(vocabulary, {"1": {"dog"}}))
    page = report.gallery_path.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "x&lt;img&gt;.png" in page
    doc = report.metrics
    assert doc["chair"]["chair_s"] == 1.0 and doc["chair"]["recall"] == 0.0
    # the hallucinated cat scored 0.05 < 0.1: OWL-ViT was right, the language model erred
    assert doc["perception_vs_language"]["language"] == 1.0


# ------------------------------------------------------------------------- the command
def test_cli_tiny_pope_and_chair_on_sample_data(sample, tmp_path, capsys):
    common = ["hallucination-audit", "--tiny", "--data", str(sample), "--top-k", "1"]
    assert _cli(*common, "--benchmark", "pope", "--out", str(tmp_path / "pope")) == 0
    printed = capsys.readouterr().out
    assert "POPE mean (rule llava)" in printed and "perception" in printed
    doc = json.loads((tmp_path / "pope" / "report.json").read_text())
    for split in ("random", "popular", "adversarial", "mean"):
        assert set(doc["pope"][split]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert doc["run"]["settings"]["question"] == TOY_POPE_QUESTION
    assert {"perception", "language"} <= set(doc["perception_vs_language"])
    assert _cli(*common, "--benchmark", "chair", "--out", str(tmp_path / "chair")) == 0
    doc = json.loads((tmp_path / "chair" / "report.json").read_text())
    assert {"chair_s", "chair_i", "recall"} <= set(doc["chair"])
    assert doc["chair"]["synonyms"].endswith("synonyms.txt")
    assert doc["chair"]["truth"] == "instances and reference captions"
    assert doc["chair"]["sample"]["images"] == SCENES


def test_toy_pope_question_is_the_toy_world_s_question():
    assert TOY_POPE_QUESTION.format("Is there a cross in the image?") == (
        HALLUCINATION_QUESTION.format("cross")
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--benchmark", "pope", "--sampling", "random"], "--sampling: only with --benchmark authors"),
        (["--benchmark", "pope", "--parse", "strict"], "--parse: 'strict' is not a POPE rule"),
        (["--benchmark", "chair", "--parse", "llava"], "--parse: only with --benchmark pope"),
        (["--benchmark", "pope", "--synonyms", "x.txt"], "--synonyms: only with --benchmark chair"),
        (["--benchmark", "chair", "--limit", "3"], "--limit: not with --benchmark chair"),
        (["--benchmark", "authors"], "--data: only with --benchmark pope or chair"),
        (["--benchmark", "chair", "--first-token-threshold", "1"],
         "--first-token-threshold: only with --benchmark pope"),
        (["--benchmark", "pope", "--sample-images", "5"],
         "--sample-images: only with --benchmark chair"),
        (["--benchmark", "pope", "--threshold", "1"], "argument --threshold: must be in (0, 1)"),
    ],
)  # fmt: skip
def test_cli_refuses_options_that_would_be_ignored(sample, tmp_path, capsys, extra, message):
    code = _cli("hallucination-audit", "--tiny", "--data", str(sample), "--out",
                str(tmp_path / "o"), *extra)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_pope_without_its_files_is_one_line(tmp_path, capsys):
    code = _cli("hallucination-audit", "--tiny", "--benchmark", "pope", "--data",
                str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "o"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "no POPE split file" in err and len(err.strip().splitlines()) == 1


def test_cli_pope_with_a_missing_image_is_partial_and_retried(sample, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample, data)
    missing = sorted((data / "coco" / "images").iterdir())[0]
    kept = missing.read_bytes()
    missing.unlink()
    args = ["hallucination-audit", "--tiny", "--benchmark", "pope", "--data", str(data),
            "--out", str(tmp_path / "o"), "--top-k", "0"]  # fmt: skip
    assert _cli(*args) == 3
    assert "1 image(s) could not be read" in capsys.readouterr().out
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    assert list(doc["run"]["failed"]) == [missing.name]
    assert doc["pope_rows"]["random"]["answered"] < doc["pope_rows"]["random"]["rows"]
    missing.write_bytes(kept)
    assert _cli(*args) == 0  # the rerun answers only the image that failed
    assert f"1 answered now, {SCENES - 1} kept" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.xdist_group("torch-distributed-port")  # accelerate's default port
def test_two_processes_under_accelerate_launch_equal_one(sample, tmp_path):
    """POPE split between two CPU processes: every image answered once, the same answers as
    one process (batches differ, answers do not), one report."""
    import os
    import subprocess
    import sys

    pytest.importorskip("accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": "",
           "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = ["hallucination-audit", "--tiny", "--benchmark", "pope", "--data", str(sample),
            "--top-k", "0", "--batch-size", "4"]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "jmllm.joint"]  # fmt: skip
    split = subprocess.run([*launch, *args, "--out", str(tmp_path / "split")], env=env,
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert split.returncode == 0, split.stderr[-3000:]
    assert "[process 0]" in split.stderr and "[process 1]" in split.stderr
    one = subprocess.run([sys.executable, "-m", "jmllm.joint", *args, "--out",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]

    def records(folder):
        lines = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
        assert len({r["image_id"] for r in lines}) == len(lines)  # no image answered twice
        return {r["image_id"]: r for r in lines}

    two_lines, one_lines = records(tmp_path / "split"), records(tmp_path / "one")
    assert set(two_lines) == set(one_lines) and len(one_lines) == SCENES
    for image, line in one_lines.items():
        other = two_lines[image]
        assert [(a["text"], a["tokens"]) for a in line["answers"]] == [
            (a["text"], a["tokens"]) for a in other["answers"]
        ]
        for a, b in zip(line["answers"], other["answers"], strict=True):
            assert a["margin"] == pytest.approx(b["margin"], abs=1e-4)
        for obj, evidence in line["owl"].items():
            assert evidence == pytest.approx(other["owl"][obj], abs=1e-4)
    two = json.loads((tmp_path / "split" / "report.json").read_text())
    single = json.loads((tmp_path / "one" / "report.json").read_text())
    assert two["pope"] == single["pope"]


def test_cli_authors_refuses_the_benchmarks_options(sample, tmp_path, capsys):
    coco = ["--annotations", str(sample / "coco" / "instances.json"), "--images",
            str(sample / "coco" / "images"), "--out", str(tmp_path / "o")]  # fmt: skip
    for extra, flag in ((["--vision", "llava"], "--vision"), (["--threshold", "0.5"], "--threshold"),
                        (["--parse", "lmms-eval"], "--parse")):  # fmt: skip
        assert _cli("hallucination-audit", "--tiny", *coco, *extra) == 2
        err = capsys.readouterr().err
        assert flag in err and len(err.strip().splitlines()) == 1
