"""The toy world's recipe: train OWL-ViT, LLaVA and W on scenes, assemble J, score it, ship it.

:func:`train_toy_world` runs the whole recipe (``jmllm-joint toy train --out DIR``):

1. render the training scenes (split ``train`` of the world seed);
2. train the toy OWL-ViT (:mod:`jmllm.joint.toy.detector`) and save it with its processor;
3. train the toy LLaVA (:mod:`jmllm.joint.toy.captioner`) and save it with its processor;
4. write the scenes as a parquet ``datasets`` folder and train W with ``jmllm-align train``
   (its ``main()``, preset ``toy``: the paper's token-wise MSE and deep MLP) from the toy
   OWL-ViT's ``t`` to the toy LLaVA's image tokens;
5. load J with :meth:`JointModel.from_pretrained` from the three files and score it, and stock
   toy LLaVA, on held-out scenes (:mod:`jmllm.joint.toy.evaluate`);
6. write ``manifest.json``: the recipe, seeds, library versions, the held-out scores, the
   training time (wall and CPU seconds / 2) and the sha256 of every file.

Everything is built in a staging folder inside ``DIR`` and moved into place at the end, the
manifest last: an interrupted run leaves ``DIR`` without a partial model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jmllm.align.files import ForeignOutputError, foreign_entries, output_folder
from jmllm.joint.chat.templates import LLAVA_TEMPLATES
from jmllm.joint.toy.captioner import CaptionerRecipe, train_captioner
from jmllm.joint.toy.detector import DetectorRecipe, train_detector
from jmllm.joint.toy.models import (
    ToyDims,
    new_llava,
    new_owl,
    save_llava,
    save_owl,
    toy_llava_tokenizer,
    toy_owl_tokenizer,
)
from jmllm.joint.toy.pool import ScenePool
from jmllm.joint.toy.qwen import (
    QWEN_DIR,
    QWEN_TEMPLATE,
    QwenDims,
    new_qwen,
    save_qwen,
    toy_qwen_tokenizer,
)
from jmllm.joint.toy.scenes import YES_NO

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
OWL_DIR, LLAVA_DIR, ALIGNMENT_FILE = "owlvit", "llava", "alignment.safetensors"
MANIFEST_FORMAT = "jmllm-toy-world"
MANIFEST_VERSION = 1


# the toy Qwen2-VL's tower steps: at the toy LLaVA's 2500 its shape features stay weak (a linear
# probe reads an object patch's shape 0.87 of the time; captions 0.72 through J); at 5000, 0.87
QWEN_VISION_STEPS = 5000
# and noise on its image tokens while its language model learns (relative to their RMS): J's
# captions 0.873 -> 0.900 on the same tower, nothing else worse (docs/toy.md)
QWEN_TOKEN_NOISE = 0.15
# its conversation steps and yes/no spelling: those its documented figures were measured with
# (the toy LLaVA's before it moved to 3000 steps and LLaVA-1.5's "Yes"/"No")
QWEN_STEPS = 2500
QWEN_YES_NO = YES_NO


@dataclass
class ToyRecipe:
    """Everything the toy world depends on (stored in the manifest).

    ``seed`` seeds the scenes (train and held-out splits of that world), every initialisation
    and every data order.
    """

    seed: int = 0
    train_scenes: int = 12000  # rendered once, shared by the three trainings
    w_scenes: int = 4000  # of those, written for W's trainer (held-out subset included)
    eval_scenes: int = 300  # held-out scenes scored for the manifest
    threads: int = 2
    dims: ToyDims = field(default_factory=ToyDims)
    detector: DetectorRecipe = field(default_factory=DetectorRecipe)
    captioner: CaptionerRecipe = field(default_factory=CaptionerRecipe)
    # jmllm-align train: the preset and options changed on its command line
    alignment_preset: str = "toy"
    alignment_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def for_family(cls, family: str = "llava", seed: int = 0) -> ToyRecipe:
        """The recipe ``toy train --family`` runs: the shipped one for ``llava``; for
        ``qwen2_vl`` the same with :data:`QWEN_VISION_STEPS` tower steps (docs/toy.md: its
        RoPE-only tower learns shapes more slowly) and :data:`QWEN_TOKEN_NOISE` on its image
        tokens (J's captions reach 0.90 with it).

        Example:
            >>> recipe = ToyRecipe.for_family("qwen2_vl").captioner
            >>> recipe.vision_steps, recipe.token_noise
            (5000, 0.15)
        """
        if family == "qwen2_vl":
            captioner = CaptionerRecipe(
                steps=QWEN_STEPS,
                vision_steps=QWEN_VISION_STEPS,
                token_noise=QWEN_TOKEN_NOISE,
                yes_no=QWEN_YES_NO,
            )
            return cls(seed=seed, captioner=captioner)
        return cls(seed=seed)

    @classmethod
    def quick(cls, seed: int = 0) -> ToyRecipe:
        """A brief run of the same recipe (for checking that it still learns, not for use)."""
        return cls(
            seed=seed,
            train_scenes=1500,
            w_scenes=1000,
            eval_scenes=60,
            detector=DetectorRecipe(steps=250, warmup_steps=25),
            captioner=CaptionerRecipe(steps=250, vision_steps=250, warmup_steps=25),
            alignment_options={"epochs": 2, "eval_images": 64},
        )


@dataclass
class StageTime:
    """Seconds one stage took: wall clock and process CPU time (all threads)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    def to_dict(self, cores: int = 2) -> dict[str, float]:
        return {
            "wall_s": round(self.wall_s, 2),
            "cpu_s": round(self.cpu_s, 2),
            f"cpu_s_per_{cores}_cores": round(self.cpu_s / cores, 2),
        }


@contextlib.contextmanager
def _timed(times: dict[str, StageTime], name: str) -> Iterator[None]:
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        times[name] = StageTime(time.perf_counter() - wall, time.process_time() - cpu)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(
    root: Path, names: tuple[str, ...] = (OWL_DIR, LLAVA_DIR, ALIGNMENT_FILE)
) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file under the named entries of ``root``."""
    out = {}
    for name in names:
        entry = root / name
        files = sorted(p for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else [entry]
        for f in files:
            out[f.relative_to(root).as_posix()] = {
                "sha256": sha256_of(f),
                "bytes": f.stat().st_size,
            }
    return out


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries the recipe's results depend on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in (
        "jmllm-joint",
        "jmllm-align",
        "torch",
        "transformers",
        "tokenizers",
        "datasets",
        "numpy",
        "scipy",
        "pillow",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def _ordinary_mode(path: Path) -> None:
    """Give a file or folder (and everything in it) the permissions ``open``/``mkdir`` give:
    mkstemp/mkdtemp, which the writers use for atomicity, make them private (0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """Without progress bars, the libraries' own bars (datasets, transformers) stay off too."""
    if not quiet:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_bars, hf_bars = (
        datasets.is_progress_bar_enabled(),
        hf_logging.is_progress_bar_enabled(),
    )
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()


def _train_alignment(
    staging: Path, pool: ScenePool, recipe: ToyRecipe, progress: bool, mllm_dir: str = "llava"
) -> dict[str, Any]:
    """Train W with ``jmllm-align train`` on the scenes (a parquet ``datasets`` folder)."""
    from jmllm.align.cli import main as align_main
    from jmllm.align.weights import load_alignment, save_alignment
    from jmllm.joint.toy.scenes import scenes_dataset

    data_dir = staging / "w-scenes"
    run_dir = staging / "w-run"
    count = min(recipe.w_scenes, len(pool))
    # the same scenes the models were trained on (W is trained on the same images as well)
    with _quiet_libraries(not progress):
        dataset = scenes_dataset("train", count, seed=recipe.seed)
        dataset.to_parquet(str(data_dir / "train.parquet"))
    argv = [
        "train",
        "--dataset",
        str(data_dir),
        "--out",
        str(run_dir),
        "--preset",
        recipe.alignment_preset,
        "--owl",
        str(staging / OWL_DIR),
        "--mllm",
        str(staging / mllm_dir),
        "--seed",
        str(recipe.seed),
        "--device",
        "cpu",
    ]
    for key, value in recipe.alignment_options.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    if not progress:
        argv.append("--no-progress")
    with _quiet_libraries(not progress):
        code = align_main(argv)
    if code != 0:
        raise RuntimeError(
            f"jmllm-align train exited with code {code} (arguments: {' '.join(argv)})"
        )
    # The trainer records the models' staging paths; J finds them beside the file, by name.
    layer = load_alignment(run_dir / ALIGNMENT_FILE)
    provenance = dict(getattr(layer, "provenance", {}) or {})
    layer.config.source_model, layer.config.target_model = OWL_DIR, mllm_dir
    provenance.update(source_model=OWL_DIR, target_model=mllm_dir, argv=["jmllm-align", *argv[:1]])
    save_alignment(layer, staging / ALIGNMENT_FILE, provenance)
    _ordinary_mode(staging / ALIGNMENT_FILE)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "eval_mse": provenance.get("eval_mse"),
        "eval_mse_initial": provenance.get("eval_mse_initial"),
        "eval_cosine": provenance.get("eval_cosine"),
        "eval_images": provenance.get("eval_images"),
        "steps": provenance.get("steps"),
        "final_loss": provenance.get("final_loss"),
        "metrics_rows": len(metrics),
    }


TRAIN_COMMAND = "jmllm-joint toy train"
# what it writes in ``out`` (``qwen2_vl/`` in place of ``llava/`` with ``--family qwen2_vl``)
TRAIN_OUTPUTS = (OWL_DIR, LLAVA_DIR, QWEN_DIR, ALIGNMENT_FILE, MANIFEST_NAME)
FAMILIES = ("llava", "qwen2_vl")  # the MLLM families the recipe trains (--family)
# the templates the held-out scores use: LLaVA-1.5's two (as the shipped manifest was scored);
# the toy Qwen2-VL knows its own chat format only
FAMILY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "llava": LLAVA_TEMPLATES,
    "qwen2_vl": (QWEN_TEMPLATE,),
}
MLLM_DIRS = {"llava": LLAVA_DIR, "qwen2_vl": QWEN_DIR}  # each family's folder in a toy world


def train_toy_world(
    out: str | os.PathLike[str],
    recipe: ToyRecipe | None = None,
    progress: bool = True,
    *,
    force: bool = False,
    family: str = "llava",
) -> dict[str, Any]:
    """Train the toy world into ``out`` and return its manifest (also written to
    ``out/manifest.json``).

    ``out`` must be new, empty or hold a toy world this command trained; anything else in it is
    refused unless ``force``, and even then an ``owlvit/``, ``llava/``, ``alignment.safetensors``
    or ``manifest.json`` it did not write is never replaced or deleted
    (:func:`jmllm.align.files.claim_output_folder`).

    Args:
        out: folder to hold ``owlvit/``, ``llava/``, ``alignment.safetensors`` and the manifest.
        recipe: :class:`ToyRecipe` (default: :meth:`ToyRecipe.for_family`, the shipped recipe
            for ``llava``).
        progress: tqdm bars for every stage.
        force: train into a folder that holds other files too (left untouched).
        family: ``"llava"`` (the shipped recipe) or ``"qwen2_vl"``: a toy
            ``Qwen2VLForConditionalGeneration`` (:mod:`jmllm.joint.toy.qwen`) trained by the
            same captioner recipe into ``qwen2_vl/``, beside the shipped toy OWL-ViT (copied,
            not retrained) and a W trained for it.

    Returns:
        The manifest as a dict.

    Example:
        >>> manifest = train_toy_world("toy-out", ToyRecipe(seed=1))  # doctest: +SKIP
        >>> manifest["metrics"]["caption_accuracy"]["joint"]["llava-1.5"]  # doctest: +SKIP
        0.97
    """
    recipe = recipe or ToyRecipe.for_family(family)
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: the toy recipe trains {', '.join(FAMILIES)}")
    with output_folder(
        out, command=TRAIN_COMMAND, outputs=TRAIN_OUTPUTS, force=force, what="--out"
    ) as root:
        return _train_toy_world(root, recipe, progress, family)


def _shipped_owl(staging: Path) -> dict[str, Any]:
    """Copy the shipped toy OWL-ViT into ``staging`` (the qwen2_vl recipe reuses it).

    Read from the package's data folder (``jmllm/joint/toy/weights``, what
    :func:`jmllm.joint.toy.toy_paths` returns by default), not through ``toy_paths``, which
    imports this module's names."""
    from importlib import resources

    with resources.as_file(resources.files("jmllm.joint.toy") / "weights") as shipped:
        shutil.copytree(shipped / OWL_DIR, staging / OWL_DIR)
        manifest = json.loads((shipped / MANIFEST_NAME).read_text(encoding="utf-8"))
    return {"reused": "the shipped toy OWL-ViT", **manifest["training"]["owlvit"]}


def _train_toy_world(
    out: Path, recipe: ToyRecipe, progress: bool, family: str = "llava"
) -> dict[str, Any]:
    from jmllm.joint.model.joint import JointModel
    from jmllm.joint.render.report import atomic_write_text
    from jmllm.joint.toy.evaluate import evaluate_joint

    threads_before = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    # ".tmp": a killed run's staging folder is still this command's (not a foreign entry)
    staging = Path(tempfile.mkdtemp(prefix=".toy-staging-", suffix=".tmp", dir=out))
    times: dict[str, StageTime] = {}
    try:
        with _timed(times, "scenes"):
            pool = ScenePool.render(
                "train", recipe.train_scenes, seed=recipe.seed, progress=progress
            )
        mllm_dir = MLLM_DIRS[family]
        qwen_dims = QwenDims()
        if family == "llava":
            with _timed(times, "owlvit"):
                owl_tokenizer = toy_owl_tokenizer()
                owl = new_owl(recipe.dims, owl_tokenizer, recipe.seed)
                owl_stats = train_detector(
                    owl, owl_tokenizer, pool, recipe.detector, recipe.seed, progress
                )
                with _quiet_libraries(not progress):
                    save_owl(owl, owl_tokenizer, staging / OWL_DIR)
            with _timed(times, "llava"):
                tokenizer = toy_llava_tokenizer(recipe.captioner.yes_no)
                llava = new_llava(recipe.dims, tokenizer, recipe.seed + 1)
                llava_stats = train_captioner(
                    llava, tokenizer, pool, recipe.captioner, recipe.seed, progress
                )
                with _quiet_libraries(not progress):
                    save_llava(llava, tokenizer, staging / LLAVA_DIR)
            del owl, llava
        else:
            with _timed(times, "owlvit"):
                owl_stats = _shipped_owl(staging)
            with _timed(times, "qwen2_vl"):
                tokenizer = toy_qwen_tokenizer(recipe.captioner.yes_no)
                qwen = new_qwen(qwen_dims, tokenizer, recipe.seed + 1)
                llava_stats = train_captioner(
                    qwen, tokenizer, pool, recipe.captioner, recipe.seed, progress
                )
                with _quiet_libraries(not progress):
                    save_qwen(qwen, tokenizer, staging / QWEN_DIR)
            del qwen
        with _timed(times, "alignment"):
            w_stats = _train_alignment(staging, pool, recipe, progress, mllm_dir)
        del pool
        train_time = StageTime(
            sum(t.wall_s for t in times.values()), sum(t.cpu_s for t in times.values())
        )
        with _timed(times, "evaluation"):
            model = JointModel.from_pretrained(
                staging / OWL_DIR, staging / mllm_dir, staging / ALIGNMENT_FILE, device="cpu"
            )
            metrics = evaluate_joint(
                model,
                scenes=recipe.eval_scenes,
                seed=recipe.seed,
                templates=FAMILY_TEMPLATES[family],
            )
        for entry in (OWL_DIR, mllm_dir):
            _ordinary_mode(staging / entry)
        digests = file_digests(staging, (OWL_DIR, mllm_dir, ALIGNMENT_FILE))
        command = ["jmllm-joint", "toy", "train", "--out", "DIR", "--seed", str(recipe.seed)]
        # the llava manifest is the shipped recipe's, key for key; another family says which
        family_keys: dict[str, Any] = {}
        if family != "llava":
            command += ["--family", family]
            family_keys = {"family": family, "mllm_dir": mllm_dir, "dims": qwen_dims.to_dict()}
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "what": "toy world: OWL-ViT, LLaVA and W trained on synthetic shapes; a testbed, "
            "not a substitute for the real checkpoints",
            "seed": recipe.seed,
            "recipe": recipe.to_dict(),
            **family_keys,
            "command": " ".join(command),
            "versions": versions(),
            "training": {
                "owlvit": owl_stats,
                mllm_dir: llava_stats,
                "alignment": w_stats,
            },
            "metrics": {"heldout_scenes": recipe.eval_scenes, **metrics},
            "seconds": {
                "total_training": train_time.to_dict(),
                **{name: t.to_dict() for name, t in times.items()},
                "threads": recipe.threads,
            },
            "files": digests,
            "total_bytes": sum(d["bytes"] for d in digests.values()),
        }
        # training took minutes: whatever appeared meanwhile under these names is not ours
        taken = set(foreign_entries(out, TRAIN_COMMAND)) & set(TRAIN_OUTPUTS)
        if taken:
            raise ForeignOutputError(
                f"--out {out}: {', '.join(sorted(taken))} appeared while training and "
                f"{TRAIN_COMMAND} did not write it; nothing was replaced"
            )
        for entry in (OWL_DIR, mllm_dir, ALIGNMENT_FILE):
            target = out / entry
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # the previous toy world this command wrote
            os.replace(staging / entry, target)
        atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        torch.set_num_threads(threads_before)


if __name__ == "__main__":  # pragma: no cover - the CLI is jmllm-joint toy train
    sys.exit("use: jmllm-joint toy train --out DIR")
