"""The hallucination audit at scale: a process killed mid-run loses at most the image in progress,
and two processes under ``accelerate launch`` give exactly what one process gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jmllm.align.files import read_jsonl
from jmllm.joint.audit import RESULTS_FILE, AuditSettings, run_audit
from jmllm.joint.audit.data import load_coco
from jmllm.joint.testing import write_coco_folder

pytestmark = pytest.mark.slow


def _tiny_sources(base) -> list[str]:
    """The session's tiny random-weight J as explicit sources (``--tiny`` is the toy world, whose
    small tokenizer does not know the COCO fixture's class names)."""
    root = Path(base) / "tiny"
    return ["--owl", str(root / "owlvit-joint"), "--mllm", str(root / "llava"),
            "--alignment", str(root / "alignment.safetensors"), "--device", "cpu"]  # fmt: skip


IMAGES = 30


def _env(cli_env: Path) -> dict[str, str]:
    env = {**os.environ, "JMLLM_CACHE": str(cli_env), "HF_HUB_OFFLINE": "1"}
    env.update({"TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update({"MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"})
    return env


def _audit_args(ann: Path, images: Path, out: Path, cli_env: Path) -> list[str]:
    return ["hallucination-audit", *_tiny_sources(cli_env), "--annotations", str(ann), "--images", str(images),
            "--out", str(out), "--max-new-tokens", "3", "--resamples", "50", "--top-k", "0"]  # fmt: skip


def _answers(records) -> dict[tuple[str, str], tuple]:
    return {(r.image_id, r.class_name): (r.present, r.answer, r.tokens) for r in records}


def _scores(records) -> dict[tuple[str, str], float]:
    return {(r.image_id, r.class_name): r.owl_score for r in records}


def _file_records(out: Path) -> dict[str, list]:
    lines: dict[str, list] = {}
    for line in read_jsonl(out / RESULTS_FILE):
        assert line["image_id"] not in lines, "an image was audited twice"
        lines[line["image_id"]] = line["questions"]
    return lines


def test_a_killed_run_resumes_and_loses_at_most_the_image_in_progress(
    cli_env, tiny_joint, tmp_path
) -> None:
    ann, images = write_coco_folder(tmp_path / "coco", count=IMAGES, seed=4)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jmllm.joint", *_audit_args(ann, images, out, cli_env)]
    proc = subprocess.Popen(cmd, env=_env(cli_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = out / RESULTS_FILE
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.is_file() and results.read_bytes().count(b"\n") >= 2:
                proc.send_signal(signal.SIGKILL)  # no clean-up of any kind
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the audit finished before it could be killed"
    done = _file_records(out)
    assert 2 <= len(done) < IMAGES
    rerun = subprocess.run(cmd, env=_env(cli_env), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    kept = len(done)
    assert f"{IMAGES} images ({IMAGES - kept} audited now, {kept} kept" in rerun.stdout
    final = _file_records(out)
    assert set(final) == {str(100 + i) for i in range(IMAGES)}
    assert all(final[k] == v for k, v in done.items())  # finished images were not redone
    # the same answers as one uninterrupted run
    settings = AuditSettings(max_new_tokens=3)
    whole = run_audit(tiny_joint, load_coco(ann, images), None, settings, progress=False)
    resumed = run_audit(tiny_joint, load_coco(ann, images), out, settings, progress=False)
    assert resumed.processed == 0 and resumed.kept == IMAGES
    assert _answers(resumed.records) == _answers(whole.records)
    assert _scores(resumed.records) == pytest.approx(_scores(whole.records), abs=1e-5)
    assert json.loads((out / "report.json").read_text())["questions"] == len(whole.records)


@pytest.mark.xdist_group("torch-distributed-port")  # accelerate's default port
def test_two_processes_under_accelerate_launch_equal_one(cli_env, tmp_path) -> None:
    pytest.importorskip("accelerate")
    ann, images = write_coco_folder(tmp_path / "coco", count=9, seed=6)
    split, single = tmp_path / "split", tmp_path / "single"
    # accelerate's --cpu mode expects MPI for several processes; --multi_gpu spawns them
    # through torch's elastic launcher, and the audit's processes use gloo on the CPU
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "jmllm.joint"]  # fmt: skip
    env = {**_env(cli_env), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launch, *_audit_args(ann, images, split, cli_env)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[process 0]" in done.stderr and "[process 1]" in done.stderr  # both worked
    assert "9 images (9 audited now, 0 kept" in done.stdout
    one = subprocess.run(
        [sys.executable, "-m", "jmllm.joint", *_audit_args(ann, images, single, cli_env)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two_records, one_records = _file_records(split), _file_records(single)
    assert two_records == one_records  # every answer, token and score, image by image
    two_report = json.loads((split / "report.json").read_text())
    one_report = json.loads((single / "report.json").read_text())
    assert two_report["questions"] == one_report["questions"] == 9 * 6
    assert two_report["per_class"] == one_report["per_class"]
