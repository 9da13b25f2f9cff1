"""The faithfulness benchmark: batched curves equal the one-by-one loop, the in-place cascade
equals the copying one, the run resumes and refuses another run's folder, the report holds
every method × metric with intervals, the command line works and refuses bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jmllm.joint.faithfulness import (
    CurveScorer,
    FaithfulnessError,
    FaithfulnessSettings,
    RandomisationCascade,
    ToySource,
    auc,
    boxes_source,
    coco_source,
    pointing,
    run_faithfulness,
    ssim,
)
from jmllm.joint.faithfulness.metrics import (
    mixed_input,
    mixed_t,
    step_counts,
    step_masks,
    unbatched_log_probs,
)
from jmllm.joint.faithfulness.report import (
    METRICS,
    markdown,
    read_run,
    summarise,
    write_faithfulness_report,
)
from jmllm.joint.saliency.attribution import get_method, make_methods, prepare_request
from jmllm.joint.toy.scenes import SHAPES, make_scene

QUESTION = "What's in the image?"
REQUIRED_METRICS = ("deletion_auc", "insertion_auc", "pointing", "maxboxacc_iou50",
                    "randomisation_spearman")  # fmt: skip
REQUIRED_METHODS = ("ga", "gradient", "gradient_x_input", "integrated_gradients", "attention",
                    "logit_lens", "random")  # fmt: skip
# small and quick: every required method, both spaces, 3-point curves, the final stage only
QUICK = {"methods": REQUIRED_METHODS, "steps": 2, "ig_steps": 2, "cascade": "final",
         "protocol": "exact"}  # fmt: skip


@pytest.fixture(scope="module")
def toy():
    from jmllm.joint.toy import load_toy_joint

    return load_toy_joint()


@pytest.fixture(scope="module")
def toy_request(toy):
    scene = make_scene("heldout", 1000)
    obj = scene.objects[0]
    return prepare_request(
        toy, toy.embed([scene.image]), QUESTION, obj.shape, f"The image shows a {obj.name}",
        queries=list(SHAPES),
    )  # fmt: skip


# ------------------------------------------------------------------------------ curves


def test_steps_and_masks():
    assert step_counts(64, 16).tolist()[:3] == [0, 4, 8] and step_counts(10, 3).tolist() == [
        0, 3, 7, 10,
    ]  # fmt: skip
    masks = step_masks(np.array([2, 0, 1]), np.array([0, 1, 3]))
    assert masks.tolist() == [[False] * 3, [False, False, True], [True] * 3]
    with pytest.raises(ValueError, match="steps"):
        step_counts(4, 0)


def test_mixing_takes_rows_and_cells_from_the_baseline():
    t = torch.arange(5 * 3, dtype=torch.float32).reshape(1, 5, 3)
    base = -torch.ones_like(t)
    mixed = mixed_t(t, base, np.array([[True, False, False, True]]))
    assert torch.equal(mixed[0, 0], t[0, 0])  # CLS kept
    assert torch.equal(mixed[0, 1], base[0, 1]) and torch.equal(mixed[0, 2], t[0, 2])
    x = torch.full((1, 3, 6, 4), 2.0)
    (out,) = mixed_input(x, torch.zeros_like(x), np.array([[True, False, False, False]]))
    # the top-left cell of a 2 × 2 grid over 6 × 4 pixels is rows 0–2, columns 0–1
    assert (out[:, :3, :2] == 0).all() and (out[:, 3:, :] == 2).all() and (out[:, :, 2:] == 2).all()


def test_blank_baseline_is_the_mean_colour_image(toy, toy_request):
    """The blank baseline's t is the t J computes for a picture of CLIP's mean colour."""
    from PIL import Image

    from jmllm.joint.saliency.attribution import baseline_input, baseline_t, model_input

    grey = toy.embed([Image.new("RGB", (128, 128), (123, 117, 104))]).t  # CLIP's mean, rounded
    black = toy.embed([Image.new("RGB", (128, 128), (0, 0, 0))]).t
    blank = baseline_t(toy, toy_request, "blank")
    # the rounding to whole grey levels is all that separates the two
    assert float((blank - grey).norm()) < 0.05 * float((black - grey).norm())
    assert float(baseline_input(toy, toy_request, "blank").abs().max()) == 0.0
    x = model_input(toy, toy_request)
    torch.testing.assert_close(toy.owl_norm(toy_request.emb.images, toy.device), x)
    blurred = baseline_input(toy, toy_request, "blur")
    assert blurred.shape == x.shape and float((blurred - x).abs().mean()) > 0.01


def test_auc_is_the_trapezoid_area():
    x = np.linspace(0, 1, 5)
    assert auc(x, np.ones(5)) == pytest.approx(1.0)
    assert auc(x, x) == pytest.approx(0.5)
    assert auc(np.array([0, 0.5, 1]), np.array([1.0, 0.0, 0.0])) == pytest.approx(0.25)


@pytest.mark.parametrize("space", ["t", "pixels"])
def test_batched_curves_equal_the_one_by_one_loop(toy, toy_request, space):
    attribution = get_method("gradient", toy).attribute_request(toy_request)
    scorer = CurveScorer(toy, steps=4, spaces=(space,))
    fractions, removed = scorer.masks(toy_request, attribution)
    batched = scorer.log_probs(toy_request, space, removed)
    loop = unbatched_log_probs(toy, toy_request, space, removed)
    np.testing.assert_allclose(batched, loop, atol=1e-4)
    curves = scorer.curves(toy_request, {"gradient": attribution})
    deletion = curves.probabilities[(space, "deletion")]["gradient"]
    np.testing.assert_allclose(deletion, np.exp(loop), atol=1e-4)
    assert deletion[0] == pytest.approx(curves.clean) and deletion[-1] == pytest.approx(
        curves.empty[space]
    )
    insertion = curves.probabilities[(space, "insertion")]["gradient"]
    assert insertion[0] == pytest.approx(curves.empty[space])
    assert insertion[-1] == pytest.approx(curves.clean)
    assert curves.auc(space, "deletion", "gradient") == pytest.approx(auc(fractions, deletion))


def test_curves_of_many_maps_share_rows(toy, toy_request):
    """Every map's curve from one forward per space, identical points run once, and each
    map's curve the same as when scored alone."""
    maps = {n: m.attribute_request(toy_request) for n, m in make_methods(
        ["ga", "gradient", "random"], toy).items()}  # fmt: skip
    scorer = CurveScorer(toy, steps=4, spaces=("t",))
    together = scorer.curves(toy_request, maps)
    for name, attribution in maps.items():
        alone = scorer.curves(toy_request, {name: attribution})
        for curve in ("deletion", "insertion"):
            np.testing.assert_allclose(
                together.probabilities[("t", curve)][name],
                alone.probabilities[("t", curve)][name],
                atol=1e-6,
            )
    calls = []
    original = scorer.log_probs

    def counting(request, space, taken):
        calls.append(taken.shape[0])
        return original(request, space, taken)

    scorer.log_probs = counting  # type: ignore[method-assign]
    scorer.curves(toy_request, maps)
    # 3 maps × 2 curves × 3 inner points + the shared clean and empty inputs, one call
    assert len(calls) == 1 and calls[0] <= 3 * 2 * 3 + 2


def test_ranking_breaks_ties_by_a_seeded_order_not_by_position():
    from jmllm.joint.saliency.attribution import Attribution

    flat = Attribution("x", torch.zeros(64), (8, 8))
    a, b = flat.ranking(0), flat.ranking(1)
    assert sorted(a.tolist()) == list(range(64)) and not np.array_equal(a, np.arange(64))
    assert not np.array_equal(a, b) and np.array_equal(a, flat.ranking(0))
    scores = torch.zeros(64)
    scores[10] = 1.0
    assert Attribution("x", scores, (8, 8)).ranking(0)[0] == 10


# ------------------------------------------------------------------------ localisation


def test_ssim_matches_a_window_by_window_computation():
    rng = np.random.default_rng(0)
    a, b = rng.random((12, 14)), rng.random((12, 14))
    c1, c2, n = 0.01**2, 0.03**2, 49
    values = []
    for y in range(3, 9):
        for x in range(3, 11):
            wa, wb = a[y - 3 : y + 4, x - 3 : x + 4], b[y - 3 : y + 4, x - 3 : x + 4]
            ma, mb = wa.mean(), wb.mean()
            va, vb = wa.var(ddof=1), wb.var(ddof=1)
            cov = ((wa - ma) * (wb - mb)).sum() / (n - 1)
            values.append(
                ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    assert ssim(a, b) == pytest.approx(np.mean(values), abs=1e-10)
    assert ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="maps"):
        ssim(a, b[:, :3])


def test_pointing_takes_any_box():
    m = np.zeros((10, 10))
    m[7, 2] = 1.0
    assert pointing(m, np.array([[0, 0, 4, 4], [1, 6, 4, 9]]))
    assert not pointing(m, np.array([[0, 0, 4, 4]]))


# ----------------------------------------------------------------------------- cascade


def test_in_place_cascade_equals_the_copying_cascade_and_restores(toy):
    from jmllm.joint.toy.localisation import randomisation_cascade

    before = {k: v.clone() for k, v in toy.llava.state_dict().items()}
    copies = dict(randomisation_cascade(toy, seed=7))
    cascade = RandomisationCascade(toy, seed=7)
    seen = []
    for name, variant in cascade.stages():
        seen.append(name)
        expected = copies[name]
        for key, value in expected.llava.state_dict().items():
            assert torch.equal(variant.llava.state_dict()[key], value), (name, key)
        assert torch.equal(
            next(variant.alignment.parameters()), next(expected.alignment.parameters())
        )
        assert variant.owl is toy.owl
    assert seen == list(copies)
    for key, value in toy.llava.state_dict().items():
        assert torch.equal(value, before[key]), key
    # left early (an error in a method), the trained weights are back too
    for name, _ in cascade.stages():
        if name == "layer_2":
            break
    assert all(torch.equal(v, before[k]) for k, v in toy.llava.state_dict().items())
    final = RandomisationCascade(toy, seed=7, cascade="final")
    assert [n for n, _ in final.stages()] == ["layer_0"]
    assert list(RandomisationCascade(toy, cascade="none").stages()) == []


# ------------------------------------------------------------------------------- run


@pytest.fixture(scope="module")
def toy_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("faith") / "run"
    settings = FaithfulnessSettings(**QUICK)
    result = run_faithfulness(toy, ToySource(scenes=2), out, settings, progress=False)
    return out, settings, result


def test_run_records_every_method_and_metric(toy_run):
    out, settings, result = toy_run
    assert result.targets >= 2 and not result.failed
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["item_id"] for line in lines] == [f"heldout-{i}" for i in range(1000, 1002)]
    target = lines[0]["targets"][0]
    assert set(target["methods"]) == set(settings.methods)
    record = target["methods"]["ga"]
    for key in ("deletion_auc", "insertion_auc", "deletion_auc_pixels", "insertion_auc_pixels",
                "pointing", "ious", "cascade", "randomised"):  # fmt: skip
        assert key in record, key
    assert len(record["ious"]) == 100 and list(record["cascade"]) == ["layer_0"]
    assert len(target["curves"]["t/deletion"]["random"]) == settings.steps + 1


def test_run_resumes_and_refuses_another_runs_folder(toy, toy_run):
    out, settings, result = toy_run
    seen = []
    again = run_faithfulness(
        toy, ToySource(scenes=2), out, settings, progress=False, on_item=seen.append
    )
    assert seen == [] and again.kept == 2 and again.processed == 0
    assert again.lines == result.lines
    other = FaithfulnessSettings(**{**QUICK, "steps": 5})
    with pytest.raises(FaithfulnessError, match="steps"):
        run_faithfulness(toy, ToySource(scenes=2), out, other, progress=False)


def test_a_resumed_runs_summary_is_the_fresh_runs(toy, tmp_path):
    """A resumed run reads its records back from results.jsonl, whose keys are sorted
    (``head``, ``layer_0``, …, ``w``): the cascade keeps its order and the randomisation metric
    still reads the fully randomised J (``layer_0``), not the W-only stage."""
    settings = FaithfulnessSettings(
        methods=("ga", "random"), steps=2, ig_steps=2, cascade="full", protocol="exact"
    )
    out = tmp_path / "run"
    fresh = run_faithfulness(toy, ToySource(scenes=1, start=1000), out, settings, progress=False)
    again = run_faithfulness(toy, ToySource(scenes=1, start=1000), out, settings, progress=False)
    assert again.kept == 1 and again.processed == 0
    a, b = summarise(fresh, resamples=50), summarise(again, resamples=50)
    assert [row["stage"] for row in b["cascade"]["ga"]] == [
        "w", "head", "layer_2", "layer_1", "layer_0"
    ]  # fmt: skip
    assert b["cascade"] == a["cascade"] and b["methods"] == a["methods"]
    last = a["cascade"]["ga"][-1]["spearman"]["value"]
    assert a["methods"]["ga"]["randomisation_spearman"]["value"] == pytest.approx(last)


def test_report_has_every_required_method_and_metric(toy_run, tmp_path):
    out, settings, result = toy_run
    report = write_faithfulness_report(result, tmp_path, resamples=200)
    doc = json.loads(report.json_path.read_text())
    for method in REQUIRED_METHODS:
        for metric in REQUIRED_METRICS:
            entry = doc["methods"][method][metric]
            assert set(entry) == {"value", "ci_low", "ci_high"}, (method, metric)
            assert entry["ci_low"] <= entry["value"] + 1e-9 <= entry["ci_high"] + 2e-9
    assert doc["paired"]["reference"] == "ga" and "ga" not in doc["paired"]["methods"]
    assert doc["methods"]["random"]["randomisation_spearman"]["value"] == pytest.approx(1.0)
    assert set(doc["ranking"]["deletion_auc"]) == set(settings.methods)
    for path in (report.markdown_path, report.curves_path, report.cascade_path, report.html_path):
        assert path.is_file() and path.stat().st_size > 0
    assert report.curves_path.read_bytes()[:4] == b"\x89PNG"
    page = report.html_path.read_text()
    assert "integrated_gradients" in page and "<script" not in page
    assert summarise(read_run(out), resamples=200)["methods"] == doc["methods"]


def test_summary_pools_targets_and_resamples_images():
    """A hand-made run: two images, three targets; the values are the target means, the
    paired difference is per image, MaxBoxAccV2 takes its best threshold."""

    def target(ga, random, iou_ga, iou_random):
        def record(value, iou):
            return {"deletion_auc": value, "pointing": value > 0.5, "ious": [iou, iou / 2]}

        return {"methods": {"ga": record(ga, iou_ga), "random": record(random, iou_random)}}

    lines = [
        {"item_id": "a", "targets": [target(0.2, 0.6, 0.6, 0.2), target(0.4, 0.7, 0.2, 0.9)]},
        {"item_id": "b", "targets": [target(0.3, 0.3, 0.8, 0.1)]},
    ]
    settings = {"methods": ["ga", "random"], "steps": 1}
    summary = summarise({"lines": lines, "settings": settings}, resamples=100)
    ga, rnd = summary["methods"]["ga"], summary["methods"]["random"]
    assert ga["deletion_auc"]["value"] == pytest.approx(0.3)
    assert rnd["pointing"]["value"] == pytest.approx(2 / 3)
    assert ga["maxboxacc_iou50"]["value"] == pytest.approx(2 / 3)
    assert rnd["maxboxacc_iou50"]["value"] == pytest.approx(1 / 3)
    paired = summary["paired"]["methods"]["random"]["deletion_auc"]
    assert paired["value"] == pytest.approx((0.6 + 0.7 - 0.2 - 0.4 + 0.0) / 3)
    assert paired["images"] == 2 and paired["wilcoxon_p"] is not None
    assert summary["ranking"]["deletion_auc"] == ["ga", "random"]
    assert "| ga |" in markdown(summary)


# ------------------------------------------------------------------------------ data


def test_coco_and_boxes_sources_read_the_sample_data(toy, tmp_path):
    from jmllm.joint.toy.sample_data import write_sample_data

    root = write_sample_data(tmp_path / "sample", count=2, wsol_count=1)
    coco = coco_source(root / "coco" / "instances.json", root / "coco" / "images")
    scene = make_scene("heldout", 0)
    emb = toy.embed([coco.items[0].load()])
    truths, unscored = coco.targets(toy, emb, coco.items[0])
    assert unscored == 0 and sorted(t.name for t in truths) == sorted(
        o.shape for o in scene.objects
    )
    for truth in truths:
        obj = next(o for o in scene.objects if o.shape == truth.name)
        np.testing.assert_allclose(truth.boxes[0], obj.box)
        assert truth.answer.endswith(truth.name) and truth.queries == (truth.name,)
    cub = boxes_source(root / "cub", "bird")
    emb = toy.embed([cub.items[0].load()])
    (truth,), _ = cub.targets(toy, emb, cub.items[0])
    assert truth.name == "bird" and truth.answer == "The image shows a bird"
    request = prepare_request(toy, emb, cub.prompt, truth.target, truth.answer)
    assert request.label == "bird"


def test_coco_boxes_are_kept_and_bad_ones_counted(tmp_path):
    from jmllm.joint.audit.data import load_coco

    (tmp_path / "img").mkdir()
    doc = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [
            {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
            {"image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 4]},
            {"image_id": 1, "category_id": 1},
        ],
    }
    (tmp_path / "i.json").write_text(json.dumps(doc))
    ds = load_coco(tmp_path / "i.json", tmp_path / "img")
    assert ds.images[0].boxes_of("cat") == [(1.0, 2.0, 4.0, 6.0)]
    assert ds.skipped_boxes == 2 and ds.images[0].present == ("cat",)


def test_settings_refuse_bad_values():
    for bad in ({"methods": ("ga", "nope")}, {"methods": ()}, {"steps": 0}, {"baseline": "x"},
                {"spaces": ("z",)}, {"cascade": "half"}, {"protocol": "x"},
                {"methods": ("ga", "ga")}):  # fmt: skip
        with pytest.raises(FaithfulnessError):
            FaithfulnessSettings(**bad)


# ------------------------------------------------------------------------- command line


def _cli(*args: str) -> int:
    """The exit code of ``jmllm-joint faithfulness ARGS`` (usage errors exit from argparse)."""
    from jmllm.joint.cli import main

    try:
        return main(["faithfulness", *args])
    except SystemExit as exc:
        return int(exc.code or 0)


def test_cli_runs_on_the_toy_world_and_resumes(tmp_path, capsys):
    out = tmp_path / "faith"
    args = ["--tiny", "--out", str(out), "--scenes", "2", "--method", "ga", "--method", "random",
            "--steps", "2", "--cascade", "final", "--space", "t", "--protocol", "exact",
            "--resamples", "50", "--examples", "1"]  # fmt: skip
    assert _cli(*args) == 0
    printed = capsys.readouterr().out
    assert "Report:" in printed and "randomisation_spearman" in printed
    for name in ("results.jsonl", "settings.json", "faithfulness.json", "report.md",
                 "curves.png", "cascade.png", "faithfulness.html"):  # fmt: skip
        assert (out / name).is_file(), name
    doc = json.loads((out / "faithfulness.json").read_text())
    assert list(doc["methods"]) == ["ga", "random"] and doc["images"] == 2
    assert "data:image/png" in (out / "faithfulness.html").read_text()  # the example's maps
    assert _cli(*args) == 0
    assert "2 kept from an earlier run" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tiny", "--annotations", "x.json"], "--annotations and --images"),
        (["--tiny", "--data-dir", "d", "--images", "i"], "--data-dir"),
        (["--tiny", "--data-dir", "/nonexistent/folder"], "no such folder"),
        ([], "data:"),
        (["--tiny", "--steps", "0"], "--steps"),
        (["--tiny", "--method", "nope"], "--method"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys, args, message):
    assert _cli(*args, "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


DOCS = __import__("pathlib").Path(__file__).resolve().parents[3] / "docs"


@pytest.mark.skipif(not (DOCS / "faithfulness.md").is_file(), reason="needs the source tree")
def test_metric_and_method_names_are_documented():
    from jmllm.joint.saliency.attribution import METHODS

    text = (DOCS / "faithfulness.md").read_text()
    for name in (*METRICS, *METHODS):
        assert f"`{name}`" in text, name


@pytest.mark.skipif(not (DOCS / "faithfulness.md").is_file(), reason="needs the source tree")
def test_the_pages_figures_are_the_documented_commands():
    """docs/faithfulness.md's tables are made from docs/faithfulness-toy.json, which is the
    report of the page's own command with every default (docs/faithfulness_figures.py writes
    both; rerun it after the toy world changes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "faithfulness_figures", DOCS / "faithfulness_figures.py"
    )
    assert spec and spec.loader
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    summary = json.loads((DOCS / "faithfulness-toy.json").read_text())
    page = (DOCS / "faithfulness.md").read_text()
    assert figures.page_with(figures.tables(summary), page) == page
    assert summary["settings"] == FaithfulnessSettings().to_dict()
    assert summary["source"] == ToySource().describe()
    assert summary["bootstrap"]["resamples"] == 2000 and summary["bootstrap"]["seed"] == 0
    for name in ("faithfulness-curves.png", "faithfulness-cascade.png"):
        assert (DOCS / "images" / name).is_file(), name
    # the page's time is the whole run's: a resumed invocation would say it counts only part
    assert summary["images_kept"] == 0 and summary["images_scored_now"] >= summary["images"] > 0
    resumed = {**summary, "seconds": 3.0, "images_scored_now": 0, "images_kept": 99}
    assert "99 were scored by an earlier invocation" in figures.tables(resumed)
    # --check: a rerun that took other seconds is up to date, one with another figure is not
    slower = figures.page_with(
        figures.tables({**summary, "seconds": summary["seconds"] + 17}), page
    )
    assert slower != page and figures._figures(slower) == figures._figures(page)
    ga = summary["methods"]["ga"]["pointing"]
    moved = {
        **summary,
        "methods": {
            **summary["methods"],
            "ga": {**summary["methods"]["ga"], "pointing": {**ga, "value": ga["value"] + 0.01}},
        },
    }
    assert figures._figures(figures.page_with(figures.tables(moved), page)) != figures._figures(
        page
    )


@pytest.mark.slow
def test_gpu_checks_real_shape_run_works_small_on_the_cpu():
    """``./dev -s gpu``'s faithfulness run, in its small CPU code-path mode."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "faithfulness.py"
    if not path.is_file():
        pytest.skip("needs the repository's benchmarks/")
    spec = importlib.util.spec_from_file_location("faithfulness_bench", path)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.bench_gpu(torch.device("cpu"), "small")
    assert result["finite"] and result["methods"] == list(REQUIRED_METHODS)
    assert set(result["deletion_auc_t"]) == set(REQUIRED_METHODS)
    assert all(0.0 <= v <= 1.0 for v in result["insertion_auc_pixels"].values())
    assert result["randomisation"]["random"]["spearman"] == pytest.approx(1.0)


def test_integrated_gradients_defaults_are_complete_on_the_toy_world(toy):
    """On the toy world the path from the blank image to a scene jumps; at the default 64
    trapezoid steps the patches still sum to the logit's change (16 steps do not, docs)."""
    from jmllm.joint.saliency.attribution import baseline_t, target_logit

    source = ToySource(scenes=2, start=7000)
    errors = []
    for item in source.items:
        emb = toy.embed([item.load()])
        truths, _ = source.targets(toy, emb, item)
        for truth in truths[:1]:
            request = prepare_request(toy, emb, source.prompt, truth.target, truth.answer,
                                      occurrence=truth.occurrence)  # fmt: skip
            scores = get_method("integrated_gradients", toy).attribute_request(request).scores
            with torch.no_grad():
                change = float(
                    target_logit(toy, request, request.t)
                    - target_logit(toy, request, baseline_t(toy, request, "blank"))
                )
            errors.append(abs(float(scores.sum()) - change) / abs(change))
    assert errors and max(errors) < 0.15, errors


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_equal_one(tmp_path):
    """Split between two processes (gloo on the CPU), the run scores every image once and
    its records equal one process's."""
    import os
    import subprocess
    import sys

    pytest.importorskip("accelerate")
    args = ["faithfulness", "--tiny", "--scenes", "4", "--method", "ga", "--method", "random",
            "--steps", "2", "--cascade", "final", "--space", "t", "--resamples", "50",
            "--examples", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "jmllm.joint"]  # fmt: skip
    split, single = tmp_path / "split", tmp_path / "single"
    done = subprocess.run([*launch, *args, "--out", str(split)], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[process 0]" in done.stderr and "[process 1]" in done.stderr
    one = subprocess.run([sys.executable, "-m", "jmllm.joint", *args, "--out", str(single)],
                         env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]

    def records(folder):
        lines = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        return {line["item_id"]: line["targets"] for line in lines}

    two, first = records(split), records(single)
    assert sorted(two) == [f"heldout-{i}" for i in range(1000, 1004)] and two.keys() == first.keys()
    for item_id, targets in first.items():
        for a, b in zip(targets, two[item_id], strict=True):
            for method in ("ga", "random"):
                assert a["methods"][method]["ious"] == b["methods"][method]["ious"]
                assert a["methods"][method]["deletion_auc"] == pytest.approx(
                    b["methods"][method]["deletion_auc"], abs=1e-5
                )


@pytest.fixture(scope="module")
def separation(toy):
    settings = FaithfulnessSettings(
        methods=("ga", "logit_lens", "random"), steps=4, cascade="final", protocol="exact"
    )
    result = run_faithfulness(toy, ToySource(scenes=4, start=7000), None, settings,
                              progress=False)  # fmt: skip
    return result, summarise(result, resamples=200)


def test_every_metric_separates_trained_from_randomised_maps(separation):
    """Each metric tells the trained J's maps from the fully randomised J's for a method that
    explains the model (the logit lens: its maps come from the language model's own states)."""
    _, summary = separation
    lens = summary["separation"]["logit_lens"]
    for metric in ("deletion_auc", "deletion_auc_pixels"):
        assert lens[metric]["trained"] < lens[metric]["randomised"] - 0.1, (metric, lens[metric])
    for metric in ("insertion_auc", "insertion_auc_pixels"):
        assert lens[metric]["trained"] > lens[metric]["randomised"] + 0.05, (metric, lens[metric])
    for metric in ("pointing", "maxboxacc_iou50", "maxboxacc"):
        assert lens[metric]["trained"] > lens[metric]["randomised"], (metric, lens[metric])
    rho = summary["methods"]
    assert rho["logit_lens"]["randomisation_spearman"]["value"] < 0.6
    assert rho["random"]["randomisation_spearman"]["value"] == pytest.approx(1.0)


def test_where_the_check_cannot_separate_and_why(toy, separation):
    """Documented non-separations: a model-free map is the same map on both models (random:
    every difference exactly 0, nothing separates), and GA's randomised maps are painted from
    the same OWL-ViT boxes as its trained maps (OWL-ViT is never randomised), which is why GA's
    localisation scores survive the randomisation (docs/faithfulness.md)."""
    result, summary = separation
    for metric, row in summary["separation"]["random"].items():
        assert row["value"] == 0.0 and not row["separates"], metric
    line = result.lines[0]
    truth_target = line["targets"][0]
    source = ToySource(scenes=1, start=7000)
    emb = toy.embed([source.items[0].load()])
    truths, _ = source.targets(toy, emb, source.items[0])
    request = prepare_request(toy, emb, source.prompt, truths[0].target, truths[0].answer,
                              queries=truths[0].queries, occurrence=truths[0].occurrence)  # fmt: skip
    assert request.label == truth_target["label"]
    method = get_method("ga", toy)
    trained = method.attribute_request(request).detail
    for _, randomised in RandomisationCascade(toy, cascade="final").stages():
        shuffled = method.bound_to(randomised).attribute_request(request).detail
        np.testing.assert_array_equal(shuffled.boxes_xyxy, trained.boxes_xyxy)
        assert not torch.equal(shuffled.normalised, trained.normalised)


def test_cascade_plot_keeps_every_correlation_on_the_picture():
    """A correlation below the usual floor (the toy world's logit lens reached -0.28) widens the
    plot instead of falling off it; the floor never rises above -0.25."""
    from jmllm.joint.faithfulness.figures import cascade_floor

    for lowest in (0.4, 0.0, -0.2, -0.21, -0.28, -0.6, -1.0):
        floor = cascade_floor(lowest)
        assert floor <= -0.25 and floor <= lowest - 0.05 + 1e-9, (lowest, floor)
        assert floor > lowest - 0.11 or floor == -0.25  # no needless empty band
