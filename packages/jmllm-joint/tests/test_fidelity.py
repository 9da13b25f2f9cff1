"""Paper fidelity of J's paths: which conversation template each command and API sends, GA's
painting (the authors' ``int()`` boxes, first-query class map) against an independent
re-implementation of their loop, and the WSOL runner's authors' pipeline end to end.

``docs/fidelity.md`` lists every choice; these tests pin the defaults it documents.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from jmllm.joint import GradientAlignment, explain_object
from jmllm.joint.cli import main
from jmllm.joint.hallucination import check_hallucinations
from jmllm.joint.saliency import box_pixels
from jmllm.joint.testing import record_prompts
from jmllm.joint.wsol import max_box_acc_v2, run_wsol

QUESTION = "What's in the image?"
# The two conversation templates, verbatim.
LLAVA = "USER: <image>\n{} ASSISTANT:"
PAPER = "<image>\nUSER: {}\nASSISTANT:"


# --------------------------------------------------------------------------- painting


def authors_class_map(result, width: int, height: int, channel=0) -> np.ndarray:
    """The authors' painting loop, re-written from its documented behaviour: every patch fills
    its box, corners ``np.clip(int(size * (c ∓ extent / 2)), 0, size)`` on float32 tensors, with
    the normalised similarity of query channel ``channel`` (or the maximum over channels), pixel-wise
    maximum over patches."""
    out = np.zeros((height, width))
    for k in range(result.boxes.shape[0]):
        box = result.boxes[k].float()
        x0 = np.clip(int(width * (box[0] - (box[2] / 2))), 0, width)
        x1 = np.clip(int(width * (box[0] + (box[2] / 2))), 0, width)
        y0 = np.clip(int(height * (box[1] - (box[3] / 2))), 0, height)
        y1 = np.clip(int(height * (box[1] + (box[3] / 2))), 0, height)
        classes = result.normalised[k, : result.num_queries]
        weight = float(classes.max() if channel == "max" else classes[channel])
        overlay = np.zeros_like(out)
        overlay[y0:y1, x0:x1] = weight
        out = np.maximum(overlay, out)
    return out


@pytest.fixture(scope="module")
def two_query_result(tiny_joint, sample_images):
    ga = GradientAlignment(tiny_joint)
    return ga.attribute(
        sample_images[2], QUESTION, "bird", ["bird", "dog"], answer="The image shows a bird"
    )


def test_class_map_is_the_authors_first_query_truncated_painting(two_query_result):
    res = two_query_result
    width, height = res.image_size
    # the default channel is the query the explained word names: here "bird", the first query,
    # which is the authors' class_id=[0] written for the object itself
    assert (res.class_query, res.box_rounding) == ("matching", "truncate")
    assert (res.class_match.index, res.class_match.rule) == (0, "phrase head 'bird'")
    expected = authors_class_map(res, width, height, channel=0)
    assert np.array_equal(res.map("class"), expected.astype(np.float32))
    # the authors' CUB pipeline paints at 224 px
    assert np.array_equal(
        res.map("class", size=(224, 224)), authors_class_map(res, 224, 224).astype(np.float32)
    )
    # by name: the maximum over the queries
    assert np.array_equal(
        res.map("class", query="max"), authors_class_map(res, width, height, "max")
    )
    assert np.array_equal(res.map("class", query=1), authors_class_map(res, width, height, 1))
    assert np.array_equal(res.map("class", query="first"), expected.astype(np.float32))
    assert not np.array_equal(res.map("class", query="max"), res.map("class"))  # not vacuous


def test_matching_channel_follows_the_word_where_first_does_not(tiny_joint, sample_images):
    """With the explained object's query second, the default map is that query's channel (the
    authors' painting of channel 1), while "first" keeps the letter of their one-query code."""
    ga = GradientAlignment(tiny_joint)
    res = ga.attribute(
        sample_images[2], QUESTION, "bird", ["dog", "bird"], answer="The image shows a bird"
    )
    width, height = res.image_size
    assert res.class_match.index == 1
    assert np.array_equal(res.map("class"), authors_class_map(res, width, height, 1))
    assert np.array_equal(res.map("class", query="first"), authors_class_map(res, width, height, 0))
    assert not np.array_equal(res.map("class"), res.map("class", query="first"))
    # a word no query names falls back to the maximum over the queries, and says so
    other = ga.attribute(
        sample_images[2], QUESTION, "shows", ["dog", "bird"], answer="The image shows a bird"
    )
    assert other.class_match.index is None and "maximum" in other.class_match.rule
    assert np.array_equal(other.map("class"), authors_class_map(other, width, height, "max"))


def test_outward_rounding_is_available_by_name(tiny_joint, sample_images, two_query_result):
    boxes = two_query_result.boxes
    size = two_query_result.image_size
    truncated, outward = box_pixels(boxes, size), box_pixels(boxes, size, "outward")
    b = boxes.double().numpy()
    assert np.array_equal(
        outward[:, 2], np.clip(np.ceil(size[0] * (b[:, 0] + b[:, 2] / 2)), 0, size[0])
    )
    assert (outward[:, 2:] >= truncated[:, 2:]).all() and (outward != truncated).any()
    ga = GradientAlignment(tiny_joint, box_rounding="outward", class_query="max")
    res = ga.attribute(
        sample_images[2], QUESTION, "bird", ["bird", "dog"], answer="The image shows a bird"
    )
    assert np.array_equal(res.boxes_xyxy, box_pixels(res.boxes, size, "outward"))
    assert torch.equal(res.weights("class"), res.normalised[:, :2].max(-1).values)
    with pytest.raises(ValueError, match="box_rounding: 'round' is not one of truncate, outward"):
        GradientAlignment(tiny_joint, box_rounding="round")
    with pytest.raises(ValueError, match="class_query: 'mean' is not one of matching, first, max"):
        GradientAlignment(tiny_joint, class_query="mean")


# --------------------------------------------------------------------------- templates, API


def test_ga_prompts_like_generate_by_default_and_paper_by_name(tiny_joint, sample_images):
    ga = GradientAlignment(tiny_joint)
    emb = tiny_joint.embed(sample_images[0])
    with record_prompts() as sent:
        res = ga.attribute(emb, QUESTION, 0, ["cat"], answer="a cat")
    assert sent == [LLAVA.format(QUESTION)] and res.meta["template"] == "llava-1.5"
    with record_prompts() as sent:
        exp = ga.explain_answer(emb, QUESTION, ["cat"], max_new_tokens=2, template="paper")
    assert sent == [PAPER.format(QUESTION)] and exp.template == "paper"
    # a JointAnswer brings its own prompt: explained as generated, its template recorded
    answer = tiny_joint.generate(emb, QUESTION, max_new_tokens=3, template="paper")[0]
    with record_prompts() as sent:
        exp = ga.explain_answer(emb, QUESTION, ["cat"], answer=answer)
    assert sent == [] and exp.template == "paper"
    assert all(r.meta["template"] == "paper" for r in exp.word_results)
    with pytest.raises(ValueError, match=r"unknown conversation template 'a photo of a \{\}'"):
        ga.attribute(emb, QUESTION, 0, ["cat"], answer="a cat", template="a photo of a {}")


def test_explain_object_prompts_with_the_authors_template(tiny_joint, sample_images):
    with record_prompts() as sent:
        explain_object(sample_images[0], "cat", model=tiny_joint)
    assert sent == [PAPER.format(QUESTION)]
    with record_prompts() as sent:
        explain_object(sample_images[0], "cat", model=tiny_joint, template="llava-1.5")
    assert sent == [LLAVA.format(QUESTION)]


def test_hallucination_view_prompts_like_chat_by_default(tiny_joint, sample_images):
    with record_prompts() as sent:
        report = check_hallucinations(tiny_joint, sample_images[0], QUESTION, max_new_tokens=3)
    assert sent == [LLAVA.format(QUESTION)] and report.template == "llava-1.5"
    with record_prompts() as sent:
        report = check_hallucinations(
            tiny_joint, sample_images[0], QUESTION, answer="a cat", template="paper"
        )
    assert sent == [PAPER.format(QUESTION)] and report.to_json()["template"] == "paper"


@pytest.fixture
def wsol_folder(tmp_path, sample_images):
    root = tmp_path / "cub"
    (root / "images").mkdir(parents=True)
    rows = ["image_id,x0,y0,x1,y1"]
    for i, image in enumerate(sample_images[1:]):
        image.save(root / "images" / f"{i}.png")
        rows.append(f"{i}.png,3,5,{image.width - 7},{image.height - 4}")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    return root


def test_wsol_runner_is_the_authors_pipeline(tiny_joint, wsol_folder, sample_images):
    """run_wsol = GA in the paper template, painted at 224 px with int() boxes, boxes resized
    with int(x · 224 / width), scored by the reference protocol — recomputed here by hand."""
    with record_prompts() as sent:
        report = run_wsol(tiny_joint, wsol_folder, progress=False)
    assert sent == [PAPER.format(QUESTION)] * 2  # verbatim, once per image
    ga = GradientAlignment(tiny_joint)
    maps, baseline, gts = [], [], []
    for i, image in enumerate(sample_images[1:]):
        res = ga.attribute(
            wsol_folder / "images" / f"{i}.png",
            QUESTION,
            "bird",
            ["bird"],
            answer="The image shows a bird",
            template="paper",
        )
        maps.append(authors_class_map(res, 224, 224))
        baseline.append(res.map("gradient", size=(224, 224)))
        w, h = image.size
        box = (3, 5, w - 7, h - 4)
        gts.append(
            np.array(
                [
                    [
                        int(box[0] * 224.0 / w),
                        int(box[1] * 224.0 / h),
                        int(box[2] * 224.0 / w),
                        int(box[3] * 224.0 / h),
                    ]
                ]
            )
        )
    assert report.results["ga"].curve == max_box_acc_v2(maps, gts).curve
    assert report.results["gradient"].curve == max_box_acc_v2(baseline, gts).curve
    original = run_wsol(
        tiny_joint, wsol_folder, progress=False, pipeline="original", protocol="exact",
        template="llava-1.5",
    )  # fmt: skip
    assert original.setting["map_size"] == "original"
    assert original.results["ga"].protocol == "exact"


# --------------------------------------------------------------------------- templates, CLI


@pytest.fixture
def image_path(tmp_path, sample_images):
    path = tmp_path / "in.png"
    sample_images[0].save(path)
    return path


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["describe", "{image}", "-p", "Q?"], LLAVA.format("Q?")),
        (["describe", "{image}", "-p", "Q?", "--template", "paper"], PAPER.format("Q?")),
        (["chat", "{image}", "-p", "Q?"], LLAVA.format("Q?")),
        (["chat", "{image}", "-p", "Q?", "--template", "paper"], PAPER.format("Q?")),
        (["explain", "{image}", "-p", "Q?", "-q", "cat", "--out", "{tmp}/e"], LLAVA.format("Q?")),
        (
            [
                "explain",
                "{image}",
                "-p",
                "Q?",
                "-q",
                "cat",
                "--out",
                "{tmp}/e",
                "--template",
                "paper",
            ],
            PAPER.format("Q?"),
        ),
        (["hallucinations", "{image}", "-p", "Q?", "--out", "{tmp}/h"], LLAVA.format("Q?")),
        (
            ["hallucinations", "{image}", "-p", "Q?", "--out", "{tmp}/h", "--template", "paper"],
            PAPER.format("Q?"),
        ),
    ],
)
def test_cli_commands_send_their_template(cli_env, image_path, tmp_path, capsys, argv, expected):
    values = {"image": str(image_path), "tmp": str(tmp_path)}
    args = [a.format(**values) for a in argv] + ["--tiny", "--max-new-tokens", "2"]
    with record_prompts() as sent:
        assert main(args) == 0
    assert sent and set(sent) == {expected}


def test_cli_demo_and_wsol_defaults(cli_env, wsol_folder, tmp_path, capsys):
    with record_prompts() as sent:
        assert main(["demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "2"]) == 0
    # J and stock LLaVA both answer in the model card's template; turn 2 continues it
    assert sent and all(s.startswith("USER: <image>\n") for s in sent)
    assert LLAVA.format("What's the content of the image?") in sent
    record = json.loads((tmp_path / "demo" / "result.json").read_text())
    assert record["template"] == "llava-1.5"
    assert "Conversation template: llava-1.5" in (tmp_path / "demo" / "report.html").read_text()
    capsys.readouterr()
    with record_prompts() as sent:
        assert main(["wsol", str(wsol_folder), "--tiny"]) == 0
    assert set(sent) == {PAPER.format(QUESTION)}
    summary = json.loads(capsys.readouterr().out)
    assert summary["setting"] == {
        "target": "bird",  # the paper's word: the fixture's boxes.csv has no label column
        "template": "paper",
        "tokenization": "legacy",
        "preprocessing": "authors",
        "dtype": "float32",
        "protocol": "wsolevaluation",
        "pipeline": "authors",
        "box_rounding": "truncate",
    }


# --------------------------------------------------------------------------- tokenization, pixels


@contextlib.contextmanager
def record_preprocessing():
    """The preprocessing of every JointModel.embed call made in the block."""
    from jmllm.joint.model import JointModel

    seen: list[str] = []
    original = JointModel.embed

    def recording(self, images, batch_size=32, preprocessing="exif"):
        seen.append(preprocessing)
        return original(self, images, batch_size, preprocessing)

    JointModel.embed = recording
    try:
        yield seen
    finally:
        JointModel.embed = original


@pytest.mark.parametrize(
    ("argv", "tokenization", "preprocessing"),
    [
        (["describe", "{image}", "-p", "Q?"], "checkpoint", "exif"),
        (
            ["describe", "{image}", "-p", "Q?", "--tokenization", "legacy", "--preprocessing",
             "authors"],
            "legacy",
            "authors",
        ),
        (["chat", "{image}", "-p", "Q?"], "checkpoint", "exif"),
        (["explain", "{image}", "-p", "Q?", "-q", "cat", "--out", "{tmp}/e"], "checkpoint", "exif"),
        (["hallucinations", "{image}", "-p", "Q?", "--out", "{tmp}/h"], "checkpoint", "exif"),
        (["wsol", "{cub}"], "legacy", "authors"),
        (["wsol", "{cub}", "--tokenization", "checkpoint", "--preprocessing", "exif"],
         "checkpoint", "exif"),
    ],
)  # fmt: skip
def test_cli_commands_tokenise_and_embed_by_name(
    cli_env, image_path, wsol_folder, tmp_path, capsys, argv, tokenization, preprocessing
):
    """Interactive commands: the checkpoint's tokenization, EXIF-oriented pixels; the paper's
    WSOL: the authors' token ids and pixels. Every prompt and every embedding follows the flag."""
    values = {"image": str(image_path), "tmp": str(tmp_path), "cub": str(wsol_folder)}
    args = [a.format(**values) for a in argv] + ["--tiny"]
    if argv[0] != "wsol":
        args += ["--max-new-tokens", "2"]
    tokenizations: list[str] = []
    with record_prompts(tokenizations), record_preprocessing() as embedded:
        assert main(args) == 0
    assert tokenizations and set(tokenizations) == {tokenization}
    assert embedded and set(embedded) == {preprocessing}


def test_reports_record_how_j_read_its_inputs(cli_env, image_path, tmp_path, capsys):
    assert main(["describe", str(image_path), "--tiny", "--max-new-tokens", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {k: record[k] for k in ("template", "tokenization", "preprocessing", "dtype")} == {
        "template": "llava-1.5",
        "tokenization": "checkpoint",
        "preprocessing": "exif",
        "dtype": "float32",
    }
    out = tmp_path / "e"
    argv = ["explain", str(image_path), "-p", "Q?", "-q", "cat", "--out", str(out), "--tiny"]
    assert main([*argv, "--max-new-tokens", "2", "--preprocessing", "authors"]) == 0
    summary = json.loads((out / "explanation.json").read_text())
    assert (summary["tokenization"], summary["preprocessing"]) == ("checkpoint", "authors")
    detect = tmp_path / "d"
    assert main(["detect", str(image_path), "-q", "cat", "--out", str(detect), "--tiny"]) == 0
    result = json.loads((detect / "result.json").read_text())
    assert result["preprocessing"] == "exif" and "tokenization" not in result


def test_the_audits_precision_is_its_own():
    """The audit's float32 default must not leak into the other commands through the shared
    ``--dtype`` option: ``auto`` stays bfloat16-on-GPU everywhere else."""
    from jmllm.joint.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["describe", "x.png"]).dtype == "auto"
    assert parser.parse_args(["wsol", "cub"]).dtype == "auto"
    audit = parser.parse_args(["hallucination-audit", "--out", "o"])
    assert audit.dtype == "auto"  # resolved to float32 by the authors' protocol when it runs
