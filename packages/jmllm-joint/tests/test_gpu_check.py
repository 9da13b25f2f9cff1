"""The GPU check driver (benchmarks/_gpu_check.py, ``./dev -s gpu``): every benchmark runs in
its own process under a time cap; one that fails or overruns is recorded and the rest still run."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parents[3] / "benchmarks" / "_gpu_check.py"
pytestmark = pytest.mark.skipif(not DRIVER.is_file(), reason="needs the repository's benchmarks/")


@pytest.fixture
def driver(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", DRIVER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scripts = {
        "ok.py": """
            import json, sys
            out = sys.argv[sys.argv.index("--json-out") + 1]
            json.dump({"batch1": {"decode_ratio_joint_over_llava": 0.97}, "args": sys.argv[1:]},
                      open(out, "w"))
        """,
        "fails.py": "raise SystemExit('no CUDA device: --gpu needs one')",
        "slow.py": "import time; time.sleep(60)",
    }
    for name, code in scripts.items():
        (tmp_path / name).write_text(textwrap.dedent(code))
    monkeypatch.setattr(module, "HERE", tmp_path)
    monkeypatch.setattr(
        module,
        "BENCHMARKS",
        {
            "generate_throughput": ("ok.py", ["--gpu"], ["--small"], 0.4),
            "ga_saliency": ("fails.py", [], [], 0.3),
            "align_train": ("slow.py", [], [], 0.3),
        },
    )
    return module


def test_driver_records_each_outcome_and_writes_one_json(driver, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    code = driver.main(["--json-out", str(out), "--budget-seconds", "30", "--cpu"])
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    runs = report["benchmarks"]
    assert runs["generate_throughput"]["status"] == "ok"
    assert runs["generate_throughput"]["result"]["args"][0] == "--small"  # the CPU arguments
    assert runs["ga_saliency"]["status"] == "failed"
    assert "no CUDA device" in runs["ga_saliency"]["stderr_tail"][-1]
    assert runs["align_train"]["status"] == "timed_out" and runs["align_train"]["seconds"] < 20
    assert report["summary"]["decode_ratio_joint_over_llava_batch1"] == 0.97
    assert report["mode"] == "cpu-small-code-path-only" and code == 3
    assert report["wall_seconds"] < 40


def test_driver_refuses_a_bad_budget(driver, tmp_path):
    with pytest.raises(SystemExit) as info:
        driver.main(["--json-out", str(tmp_path / "g.json"), "--budget-seconds", "nan"])
    assert info.value.code == 2


def _real_driver():
    spec = importlib.util.spec_from_file_location("gpu_check_real", DRIVER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hallucination_entries_are_in_the_check():
    module = _real_driver()
    assert {"hallucination_batching", "hallucination_toy_run"} <= set(module.BENCHMARKS)
    assert abs(sum(share for *_, share in module.BENCHMARKS.values()) - 1.0) < 1e-9
    script, gpu_args, cpu_args, _ = module.BENCHMARKS["hallucination_toy_run"]
    assert script == "hallucination_audit.py" and "cuda" in gpu_args and "cuda" not in cpu_args


@pytest.mark.slow
def test_hallucination_entries_run_in_their_cpu_small_mode(monkeypatch):
    """Without a GPU the check runs the batching comparison (small architectures) and the toy
    world's POPE and CHAIR commands on the CPU: both finish and report their figures."""
    module = _real_driver()
    keep = ("hallucination_batching", "hallucination_toy_run")
    monkeypatch.setattr(module, "BENCHMARKS", {k: module.BENCHMARKS[k] for k in keep})
    # the CPU check's default budget: each entry's share of it is its time cap
    report = module.run_check(budget_seconds=1500, cpu=True)
    for name in keep:
        entry = report["benchmarks"][name]
        assert entry["status"] == "ok", entry
    batching = report["benchmarks"]["hallucination_batching"]["result"]
    assert batching["answers_differing"] == 0 and batching["answers_compared"] > 0
    # the speed-up is a figure to report, not a CPU test to pass: on two loaded cores batching
    # may be slower (CI measured 0.89); the GPU run and its benchmark hold the 3x target
    speedup = batching["speedup_wall"]
    assert report["summary"]["hallucination_batching_speedup"] == speedup["mean"]
    assert speedup["mean"] > 0 and len(batching["batch1"]["seconds"]) == speedup["n"]
    assert report["summary"]["toy_pope_mean_f1"] is not None
    assert report["summary"]["toy_chair_s"] is not None


def test_the_check_covers_every_family_within_its_budget():
    module = _real_driver()
    script, gpu_args, cpu_args, share = module.BENCHMARKS["families"]
    assert script == "family_check.py"
    # the families' own budget fits inside their share of the default 450 s
    assert float(gpu_args[gpu_args.index("--budget-seconds") + 1]) <= share * 450
    assert "--arch-scale" in cpu_args and "small" in cpu_args


@pytest.mark.slow
def test_family_check_runs_its_cpu_code_path(tmp_path, tiny_joint_paths):
    """``family_check.py`` in its small CPU mode: every figure of every family, real code."""
    spec = importlib.util.spec_from_file_location("family_check", DRIVER.parent / "family_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "families.json"
    args = ["--device", "cpu", "--arch-scale", "small", "--new-tokens", "3"]
    args += ["--cache", str(tiny_joint_paths.root), "--json-out", str(out)]
    assert module.main(args) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-small"
    assert set(report["families"]) == {
        "llava",
        "llava_next",
        "llava_onevision",
        "qwen2_vl",
        "qwen2_5_vl",
    }
    for figures in report["families"].values():
        assert figures["status"] == "ok" and figures["ga"]["answer_tokens"] >= 1
        assert figures["joint"]["prefill_seconds"] > 0 and figures["stock"]["new_tokens"] >= 1
        assert figures["peak_memory_gb"] > 0
    skipped = module.main([*args, "--families", "qwen2_vl", "--budget-seconds", "0"])
    assert skipped == 3
    assert json.loads(out.read_text())["families"]["qwen2_vl"]["status"] == "skipped"
