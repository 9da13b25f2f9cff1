"""GA pictures, the HTML report and the explain/wsol CLI on the tiny J."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from jmllm.joint.cli import main
from jmllm.joint.render.explanation import (
    SHOWN_SCALE,
    box_view_png,
    explain_object,
    heatmap_overlay_png,
    highlighted_answer,
    map_title,
    write_explanation_report,
)
from jmllm.joint.saliency import GAError, GradientAlignment

QUESTION = "What's in the image?"
ANSWER = "The image shows a bird on a branch"


def _assert_self_contained(text: str) -> None:
    # every src/href is a data URL or an in-page anchor: no network resource
    for ref in re.findall(r"(?:src|href)\s*=\s*['\"]([^'\"]*)", text):
        assert ref.startswith(("data:", "#")), ref
    assert "http://" not in text and "https://" not in text


@pytest.fixture(scope="module")
def explanation(tiny_joint, sample_images):
    return GradientAlignment(tiny_joint).explain_answer(
        sample_images[2], QUESTION, ["bird", "branch"], answer=ANSWER
    )


def test_pictures_are_pngs(explanation):
    res = explanation.word_results[0]
    overlay = heatmap_overlay_png(explanation.image, res.map("class"), "t")
    boxes = box_view_png(explanation.image, res, "b", class_threshold=0.0)
    assert overlay[:8] == b"\x89PNG\r\n\x1a\n" and boxes[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(boxes) > 1000


def test_report_is_self_contained_and_escaped(explanation, tmp_path):
    path = write_explanation_report(
        tmp_path,
        explanation.image,
        "<script>alert(1)</script>",
        explanation.answer_text,
        explanation.word_results,
    )
    text = path.read_text()
    _assert_self_contained(text)
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;" in text
    words = [w.text for w in explanation.words]
    assert words == ["The", "image", "shows", "a", "bird", "on", "a", "branch"]
    assert text.count("<button class='w'") == len(words)  # every word is clickable
    assert text.count("class='panel'") == len(words)
    summary = json.loads((tmp_path / "explanation.json").read_text())
    assert [r["target"] for r in summary["results"]] == words
    arrays = load_file(tmp_path / "arrays.safetensors")
    assert arrays["004_bird/similarities"].shape == (36, 6)
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2 * len(words)


def test_report_opens_on_the_first_word_naming_a_query(explanation, tmp_path):
    """The page shows a word before any click: the first that names a query ("bird", word 5),
    not "The", whose map names nothing; with no such word, the first word."""
    text = write_explanation_report(
        tmp_path, explanation.image, QUESTION, explanation.answer_text, explanation.word_results
    ).read_text()
    selected = re.findall(r"<option value='(r\d+)' selected>([^<]*)</option>", text)
    assert selected == [("r4", "bird")]
    nameless = [r for r in explanation.word_results if r.target in ("The", "image", "shows")]
    other = write_explanation_report(
        tmp_path / "nameless", explanation.image, QUESTION, "The image shows", nameless
    ).read_text()
    assert re.findall(r"<option value='(r\d+)' selected>", other) == ["r0"]


def test_explain_object_is_the_paper_setting_drawn(tiny_joint, sample_images):
    """explain_object = attribute on 'The image shows a <name>' over every name token, in the
    authors' conversation template, drawn."""
    image = sample_images[2]
    emb = tiny_joint.embed(image)
    answer = "The image shows a hot dog"
    ga = GradientAlignment(tiny_joint)
    words = [ga.attribute(emb, QUESTION, w, ["hot dog"], answer=answer) for w in ("hot", "dog")]
    positions = [t.position for r in words for t in r.tokens]
    expected = ga.attribute(emb, QUESTION, positions, ["hot dog"], answer=answer, template="paper")

    def pixels(png: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(png)) as im:
            return np.asarray(im.convert("RGB"))

    # untitled by default: user-study participants must not read the object's name
    got = explain_object(image, "  hot   dog ", model=tiny_joint)
    want = pixels(box_view_png(emb.pil_image(0), expected, ""))
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)
    titled = explain_object(image, "hot dog", model=tiny_joint, title="GA: hot dog")
    want_titled = pixels(box_view_png(emb.pil_image(0), expected, "GA: hot dog"))
    assert np.array_equal(np.asarray(titled), want_titled)
    assert not np.array_equal(want_titled, want)  # the title is in the pixels when asked for
    overlay = explain_object(image, "hot dog", model=tiny_joint, view="overlay", weighting="coord")
    # the bar names the weighting shown and its contrast, never the query (the object's name)
    label = f"{map_title('coord')}; {SHOWN_SCALE}"
    assert label == "GA box-coordinate weight; 0: median patch, 1: top patch"
    want = pixels(heatmap_overlay_png(emb.pil_image(0), expected.shown("coord"), "", label=label))
    assert np.array_equal(np.asarray(overlay), want)
    with pytest.raises(GAError, match="object_name: is empty"):
        explain_object(image, " ", model=tiny_joint)
    with pytest.raises(GAError, match="view: expected one of box, overlay"):
        explain_object(image, "cat", model=tiny_joint, view="pie")
    with pytest.raises(GAError, match="weighting"):
        explain_object(image, "cat", model=tiny_joint, view="overlay", weighting="nope")


def test_highlighting_escapes_model_text():
    out = highlighted_answer("a <b>x</b> & y", [(3, 4, "k", "t'\"")])
    assert out == (
        "a &lt;<button class='w' data-k='k' title='t&#x27;&quot;'>b</button>&gt;x&lt;/b&gt; &amp; y"
    )


def test_cli_explain_all_and_token(cli_env, sample_images, tmp_path, capsys):
    image = tmp_path / "img.png"
    sample_images[0].save(image)
    out = tmp_path / "all"
    rc = main(
        [
            "explain",
            str(image),
            "--tiny",
            "-p",
            QUESTION,
            "--answer",
            ANSWER,
            "-q",
            "bird",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and (out / "report.html").is_file()
    assert "Report:" in capsys.readouterr().out
    one = tmp_path / "one"
    rc = main(
        [
            "explain",
            str(image),
            "--tiny",
            "-p",
            QUESTION,
            "--answer",
            ANSWER,
            "--token",
            "bird",
            "--weighting",
            "any",
            "--out",
            str(one),
        ]
    )
    assert rc == 0
    summary = json.loads((one / "explanation.json").read_text())
    assert [r["target"] for r in summary["results"]] == ["bird"]
    assert summary["queries"] == ["bird"]  # --token WORD queries WORD by default


@pytest.mark.parametrize("weighting", ["class", "coord", "any", "gradient"])
def test_cli_explain_every_documented_weighting(
    weighting, cli_env, sample_images, tmp_path, capsys
):
    """Each --weighting the help and docs offer writes its report (gradient crashed after the
    whole computation: the top-patches table asked the box weights for it)."""
    image = tmp_path / "img.png"
    sample_images[0].save(image)
    out = tmp_path / weighting
    argv = ["explain", str(image), "--tiny", "-p", QUESTION, "--answer", ANSWER, "-q", "bird"]
    rc = main([*argv, "--token", "bird", "--weighting", weighting, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "explanation.json").read_text())
    assert summary["weighting"] == weighting and len(summary["results"]) == 1
    assert len(list((out / "maps").glob(f"*_{weighting}.png"))) == 1
    assert len(summary["results"][0]["top_patches"]) == 10


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--token", "zebra", "--answer", ANSWER], "word 'zebra' is not in the answer"),
        (["--position", "40", "--answer", ANSWER, "-q", "bird"], "position 40 is outside"),
        (["--answer", " ", "-q", "bird"], "--answer: empty answer"),
    ],
)
def test_cli_explain_bad_input(cli_env, sample_images, tmp_path, capsys, extra, message):
    image = tmp_path / "img.png"
    sample_images[0].save(image)
    rc = main(
        ["explain", str(image), "--tiny", "-p", QUESTION, "--out", str(tmp_path / "o"), *extra]
    )
    err = capsys.readouterr().err
    assert rc != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_explain_needs_queries_beyond_the_toy_world(cli_env, sample_images, tmp_path, capsys):
    """With --tiny the queries default to the toy world's shapes; given models of its own, the
    user names them (refused before any model loads)."""
    image = tmp_path / "img.png"
    sample_images[0].save(image)
    argv = ["explain", str(image), "-p", QUESTION, "--out", str(tmp_path / "o"), "--all"]
    rc = main([*argv, "--owl", "x", "--llava", "y", "--alignment", "z.safetensors"])
    err = capsys.readouterr().err
    assert rc == 2 and "-q/--query: give at least one" in err and "Traceback" not in err


def test_cli_explain_missing_image(cli_env, tmp_path, capsys):
    rc = main(
        [
            "explain",
            str(tmp_path / "nope.jpg"),
            "--tiny",
            "-p",
            QUESTION,
            "-q",
            "bird",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "nope.jpg: no such image file" in err
    rc = main(["describe", str(tmp_path), "--tiny"])  # a folder where an image goes
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path}: is a folder, not an image file" in err, err


def test_cli_wsol(cli_env, sample_images, tmp_path, capsys):
    root = tmp_path / "cub"
    (root / "images").mkdir(parents=True)
    rows = ["image_id,x0,y0,x1,y1"]
    for i, im in enumerate(sample_images[:2]):
        im.save(root / "images" / f"{i}.png")
        rows.append(f"{i}.png,2,2,{im.width - 3},{im.height - 3}")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    rc = main(["wsol", str(root), "--tiny", "--json-out", str(tmp_path / "w.json")])
    out = capsys.readouterr()
    summary = json.loads(out.out)  # stdout is the JSON summary alone
    assert rc == 0 and summary["num_images"] == 2
    assert set(summary["max_box_acc_v2"]) == {"ga", "gradient"}
    record = json.loads((tmp_path / "w.json").read_text())
    # beside the JSON: the page and the sample's map pictures (both images, both methods)
    page = (tmp_path / "w.html").read_text()
    assert f"Page: {tmp_path / 'w.html'}" in out.err
    maps = sorted(p.name for p in (tmp_path / "w_maps").iterdir())
    assert maps == [
        "00_0_png_ga.png",
        "00_0_png_gradient.png",
        "01_1_png_ga.png",
        "01_1_png_gradient.png",
    ]
    for name in maps:
        with Image.open(tmp_path / "w_maps" / name) as im:
            assert im.format == "PNG" and max(im.size) == 512
    assert page.count("class='labelled' src='data:image/png;base64,") == 4
    assert "MaxBoxAccV2" in page and f"{record['max_box_acc_v2']['ga']:.1f}" in page
    # every sampled image's predicted box and IoU are in the JSON, IoU in the page's caption
    assert [s["image_id"] for s in record["samples"]] == ["0.png", "1.png"]
    for sample in record["samples"]:
        for method in ("ga", "gradient"):
            assert f"best IoU {sample[method]['iou']:.2f}" in page
            assert 0 <= sample[method]["iou"] <= 1 and len(sample[method]["box"]) == 4
    rc = main(
        ["wsol", str(root), "--tiny", "--json-out", str(tmp_path / "w2.json"), "--samples", "0"]
    )
    assert rc == 0 and (tmp_path / "w2.html").is_file() and not (tmp_path / "w2_maps").exists()
    assert "data:image/png;base64," in (tmp_path / "w2.html").read_text()  # the curves
    capsys.readouterr()
    rc = main(["wsol", str(root), "--tiny", "--json-out", str(tmp_path / "w.html")])
    assert rc == 2 and "ends in .html" in capsys.readouterr().err
    (root / "boxes.csv").write_text("image_id,x0\n")
    rc = main(["wsol", str(root), "--tiny"])
    assert rc != 0 and "header must be" in capsys.readouterr().err


def test_cli_wsol_never_replaces_what_it_did_not_write(cli_env, sample_images, tmp_path, capsys):
    """The page and maps wsol writes beside ``--json-out`` are names the user did not choose:
    another command's report, a user's file or a link there is refused before any work, and
    left as it was; wsol's own page is replaced by its rerun."""
    root = tmp_path / "cub"
    (root / "images").mkdir(parents=True)
    sample_images[0].save(root / "images" / "0.png")
    (root / "boxes.csv").write_text("image_id,x0,y0,x1,y1\n0.png,2,2,20,20\n")
    demo = tmp_path / "demo"
    assert main(["sample-data", "-o", str(demo)]) == 0  # a folder another command owns
    capsys.readouterr()
    readme = (demo / "README.md").read_bytes()
    wsol = ["wsol", str(root), "--tiny", "--protocol", "exact", "--samples", "1"]
    # the named file is sample-data's README.md
    rc = main([*wsol, "--json-out", str(demo / "README.md")])
    err = capsys.readouterr().err
    assert rc == 2 and "was written by jmllm-joint sample-data" in err, err
    assert (demo / "README.md").read_bytes() == readme
    # a page of the user's where wsol's would go
    (tmp_path / "w.html").write_text("the user's page")
    rc = main([*wsol, "--json-out", str(tmp_path / "w.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "w.html exists and was not written by jmllm-joint wsol" in err, err
    assert (tmp_path / "w.html").read_text() == "the user's page"
    assert not (tmp_path / "w.json").exists()
    # a planted link in place of the maps' folder
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "v_maps").symlink_to(victim)
    rc = main([*wsol, "--json-out", str(tmp_path / "v.json")])
    assert rc == 2 and "v_maps exists" in capsys.readouterr().err
    assert not any(victim.iterdir())
    # wsol's own outputs: a rerun replaces them
    assert main([*wsol, "--json-out", str(tmp_path / "x.json")]) == 0
    assert main([*wsol, "--json-out", str(tmp_path / "x.json")]) == 0
    assert (tmp_path / "x.html").is_file() and (tmp_path / "x_maps").is_dir()
    capsys.readouterr()
    rc = main([*wsol, "--json-out", "-"])
    assert rc == 2 and "needs a file name" in capsys.readouterr().err
    assert not (Path.cwd() / "-").exists()


def test_reports_say_the_image_is_not_a_toy_scene(cli_env, tmp_path, capsys):
    """The terminal's warning that a photo means nothing to the toy world heads every page
    written for it (and its JSON); a toy scene's pages carry no such notice."""
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(photo)
    scene = tmp_path / "scene.png"
    from jmllm.joint.toy.scenes import make_scene

    make_scene("heldout", 114).image.save(scene)
    answer = ["--answer", "a yellow triangle and a green cross"]
    for image, warned in ((photo, True), (scene, False)):
        explain = tmp_path / f"explain-{image.stem}"
        rc = main(["explain", str(image), "--tiny", "-p", QUESTION, *answer, "-o", str(explain)])
        hall = tmp_path / f"hall-{image.stem}"
        rc2 = main(
            ["hallucinations", str(image), "--tiny", "-p", QUESTION, *answer, "-o", str(hall)]
        )
        capsys.readouterr()
        assert rc == rc2 == 0
        page = (explain / "report.html").read_text()
        notes = json.loads((explain / "explanation.json").read_text())["notes"]
        hall_page = (hall / "hallucinations.html").read_text()
        hall_notes = json.loads((hall / "hallucinations.json").read_text())["notes"]
        if warned:
            assert any("mean nothing" in n for n in notes), notes
            assert notes == hall_notes
            for html in (page, hall_page):
                assert 'class="notice"' in html and "mean nothing" in html
        else:
            assert notes == hall_notes == []
            assert 'class="notice"' not in page and 'class="notice"' not in hall_page


def test_explain_and_hallucinations_ask_describes_question_by_default(cli_env, tmp_path, capsys):
    """-p is optional, as on describe: the same default question (the demo's)."""
    from jmllm.joint.cli.common import DEFAULT_QUESTION
    from jmllm.joint.toy.scenes import make_scene

    scene = tmp_path / "scene.png"
    make_scene("heldout", 114).image.save(scene)
    answer = ["--answer", "a yellow triangle and a green cross"]
    assert main(["explain", str(scene), "--tiny", *answer, "-o", str(tmp_path / "e")]) == 0
    assert main(["hallucinations", str(scene), "--tiny", *answer, "-o", str(tmp_path / "h")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "e" / "explanation.json").read_text())["prompt"] == (
        DEFAULT_QUESTION
    )
    assert json.loads((tmp_path / "h" / "hallucinations.json").read_text())["prompt"] == (
        DEFAULT_QUESTION
    )
