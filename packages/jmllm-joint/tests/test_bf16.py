"""bfloat16, the GPU default: GA, its maps and reports, the hallucination view, WSOL, the demo's
explanation and the user-study hook all run on a bf16 J, and GA results leave it in float32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jmllm.joint import GradientAlignment, JointModel, cli, explain_object
from jmllm.joint.hallucination import check_hallucinations, write_hallucination_report
from jmllm.joint.render.explanation import write_explanation_report
from jmllm.joint.wsol import run_wsol

QUESTION = "What's in the image?"
ANSWER = "The image shows a bird near a house and a dog"
TENSOR_FIELDS = (
    "similarities",
    "normalised",
    "numerators",
    "norms",
    "boxes",
    "class_scores",
    "patch_gradient_norms",
)


@pytest.fixture(scope="module")
def bf16_joint(tiny_joint_paths) -> JointModel:
    """The tiny random J loaded in bfloat16 (its weights, t and W all bf16)."""
    model = JointModel.from_pretrained(
        tiny_joint_paths.owl,
        tiny_joint_paths.llava,
        tiny_joint_paths.alignment,
        device="cpu",
        dtype=torch.bfloat16,
    )
    assert (
        model.dtype == torch.bfloat16 and next(model.alignment.parameters()).dtype == torch.bfloat16
    )
    return model


def _float32_everywhere(result) -> None:
    for name in TENSOR_FIELDS:
        tensor = getattr(result, name)
        assert tensor.dtype == torch.float32 and bool(torch.isfinite(tensor).all()), name
    for weighting in ("class", "coord", "any", "gradient"):
        m = result.map(weighting)
        assert m.dtype == np.float32 and m.shape == result.image_size[::-1]
        assert np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0, weighting


def test_bf16_ga_is_float32_and_close_to_fp32(bf16_joint, tiny_joint, sample_images):
    image = sample_images[0]
    queries = ["bird", "house", "dog"]
    r16 = GradientAlignment(bf16_joint).attribute(image, QUESTION, "bird", queries, answer=ANSWER)
    r32 = GradientAlignment(tiny_joint).attribute(image, QUESTION, "bird", queries, answer=ANSWER)
    _float32_everywhere(r16)
    corr = np.corrcoef(r16.similarities.flatten(), r32.similarities.flatten())[0, 1]
    assert corr > 0.97, f"bf16 vs fp32 similarity correlation {corr:.4f}"
    map_corr = np.corrcoef(r16.map("class").ravel(), r32.map("class").ravel())[0, 1]
    assert map_corr > 0.9, f"bf16 vs fp32 class-map correlation {map_corr:.4f}"


def test_bf16_answer_explanation_and_report(bf16_joint, sample_images, tmp_path):
    exp = GradientAlignment(bf16_joint).explain_answer(
        sample_images[1], QUESTION, ["bird", "house"], answer=ANSWER
    )
    assert len(exp.word_results) == len(ANSWER.split())
    for result in exp.word_results:
        _float32_everywhere(result)
    for weighting in ("class", "gradient"):
        page = write_explanation_report(
            tmp_path / weighting, exp.image, exp.prompt, exp.answer_text, exp.word_results,
            weighting=weighting,
        )  # fmt: skip
        assert page.is_file()
        summary = json.loads((tmp_path / weighting / "explanation.json").read_text())
        assert len(summary["results"]) == len(exp.word_results)


def test_bf16_hallucination_view(bf16_joint, sample_images, tmp_path):
    report = check_hallucinations(
        bf16_joint, sample_images[0], QUESTION, answer=ANSWER, extra_queries=["car"]
    )
    assert set(report.objects) == {"bird", "dog", "car"}
    for check in report.objects.values():
        assert 0.0 <= check.score <= 1.0
    _float32_everywhere(report.objects["bird"].ga)
    assert write_hallucination_report(report, tmp_path).is_file()


def test_bf16_wsol(bf16_joint, sample_images, tmp_path):
    root = tmp_path / "cub"
    (root / "images").mkdir(parents=True)
    rows = ["image_id,x0,y0,x1,y1"]
    for i, im in enumerate(sample_images[:2]):
        im.save(root / "images" / f"{i}.png")
        rows.append(f"{i}.png,2,2,{im.width - 3},{im.height - 3}")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    report = run_wsol(bf16_joint, root, progress=False)
    assert report.num_images == 2 and not report.skipped
    assert all(0.0 <= r.value <= 100.0 for r in report.results.values())


def test_bf16_user_study_hook(bf16_joint, sample_images):
    picture = explain_object(sample_images[0], "red house", model=bf16_joint)
    assert picture.mode == "RGB" and picture.width > 100


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "{image}", "-p", QUESTION, "--answer", ANSWER, "-q", "bird",
         "--weighting", "gradient", "--out", "{out}"],
        ["hallucinations", "{image}", "-p", QUESTION, "--answer", ANSWER, "--out", "{out}"],
        ["demo", "--max-new-tokens", "4", "--out", "{out}"],
    ],
    ids=["explain", "hallucinations", "demo"],
)  # fmt: skip
def test_bf16_command_line(argv, cli_env, sample_images, tmp_path, capsys):
    image = tmp_path / "img.png"
    sample_images[0].save(image)
    out = tmp_path / "out"
    code = cli.main(
        [a.format(image=image, out=out) for a in argv] + ["--tiny", "--dtype", "bfloat16"]
    )
    assert code == 0, capsys.readouterr().err
    assert any(out.rglob("*.html"))
    if argv[0] == "demo":
        assert (out / "explanation" / "report.html").is_file()


def test_bf16_owlv2_detection_and_ga(owlv2_paths, owlv2_joint, sample_images):
    """J with OWLv2 in bfloat16: detections (with objectness) and GA on its objectness
    channel run, leave in float32, and stay close to float32."""
    model = JointModel.from_pretrained(
        owlv2_paths.owl, owlv2_paths.llava, owlv2_paths.alignment, dtype=torch.bfloat16
    )
    assert model.dtype == torch.bfloat16 and model.pads_to_square
    image = sample_images[2]
    dets = model.detect([image], ["bird"], threshold=0.0)[0]
    ref = owlv2_joint.detect([image], ["bird"], threshold=0.0)[0]
    assert dets.objectness is not None and ref.objectness is not None
    assert dets.objectness.dtype == torch.float32
    assert float((dets.objectness.sort().values - ref.objectness.sort().values).abs().max()) < 0.05
    queries = ["bird", "dog"]
    r16 = GradientAlignment(model, class_query="objectness").attribute(
        image, QUESTION, "bird", queries, answer=ANSWER
    )
    r32 = GradientAlignment(owlv2_joint, class_query="objectness").attribute(
        image, QUESTION, "bird", queries, answer=ANSWER
    )
    _float32_everywhere(r16)
    assert r16.channels[-1] == "objectness"
    assert float(torch.corrcoef(torch.stack([r16.weights(), r32.weights()]))[0, 1]) > 0.8
