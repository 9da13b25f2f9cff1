"""Bias assessment of J on a portrait cohort (paper §4.4, DESIGN §1.5).

For every portrait: embed it once (``t``), ask J the paper's question, perturb ``t`` with FGSM/PGD
(one perturbation per ε of the sweep), ask again, and record both answers, the parsed scores, their
difference and the OWL-ViT scores of the two queries before and after. One JSON line per portrait
is appended to ``results.jsonl`` as soon as the portrait is done, so an interrupted run resumes
where it stopped; ``run.json`` holds the settings, and a rerun with different settings into the
same folder is refused instead of mixing two experiments.

A missing, unreadable or modified (hash differs from the cohort manifest) portrait is recorded
with its status, counted and listed in the report, and retried on the next run.

One run at a time writes an assessment folder (:func:`jmllm.bias.files.folder_lock`): a second
run into the same folder is refused at once, so no portrait is ever assessed, and recorded,
twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jmllm.align.files import resolve_inside

from .errors import BiasInputError
from .files import append_jsonl, atomic_write_text, folder_lock, read_jsonl, sha256_file
from .perturb import PerturbationConfig, perturb
from .scores import QUERY_TEMPLATE, SCORE_PARSERS, parse_score, question, validate_term

__all__ = [
    "AssessConfig",
    "AssessRun",
    "CohortPortrait",
    "assess_cohort",
    "load_cohort",
    "read_results",
]

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
RUN = "run.json"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class CohortPortrait:
    """One portrait to assess."""

    image_id: str
    group: str
    path: Path
    sha256: str | None  # from the cohort manifest; None for a plain folder of images
    in_manifest: bool = True  # False: planned by cohort.json but never finished


def _inside(root: Path, relative: object, what: str) -> Path:
    """``root / relative``, refused unless it stays in the cohort folder (no absolute path, no
    ``..``, no link that leads out)."""
    try:
        return resolve_inside(root, relative, what)
    except ValueError as exc:
        raise BiasInputError(str(exc)) from None


def load_cohort(folder: str | os.PathLike[str]) -> list[CohortPortrait]:
    """The portraits of a cohort folder.

    A folder made by :func:`jmllm.bias.generate.generate_cohort` is read through its
    ``manifest.jsonl`` (so a deleted portrait is noticed and reported). A plain folder of images
    also works: each sub-folder is a group (images directly inside form the group ``all``).

    Args:
        folder: the cohort folder.

    Returns:
        The portraits in manifest (or sorted path) order.

    Raises:
        BiasInputError: the folder does not exist or holds no portrait.

    Example:
        >>> load_cohort("/nonexistent")
        Traceback (most recent call last):
        ...
        jmllm.bias.errors.BiasInputError: /nonexistent: cohort folder not found
    """
    from .generate import COHORT_FILE, MANIFEST, read_manifest

    root = Path(folder)
    if not root.is_dir():
        raise BiasInputError(f"{root}: cohort folder not found")
    portraits: list[CohortPortrait] = []
    if (root / MANIFEST).is_file() or (root / COHORT_FILE).is_file():
        manifest = read_manifest(root)
        for entry in manifest.values():
            path = _inside(root, entry.file, f"{root / MANIFEST}: {entry.image_id}: file")
            portraits.append(CohortPortrait(entry.image_id, entry.group, path, entry.sha256))
        # planned portraits the generation never finished are reported, not silently dropped
        for image in _planned(root):
            if image.image_id not in manifest:
                portraits.append(
                    CohortPortrait(image.image_id, image.group, root / image.relpath, None, False)
                )
    else:
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            parts = rel.parts
            group = (
                "all"
                if len(parts) == 1
                else (parts[1] if parts[0] == "images" and len(parts) > 2 else parts[0])
            )
            image_id = "/".join(rel.with_suffix("").parts)
            path = _inside(root, rel.as_posix(), str(path))  # a link must not lead out
            portraits.append(CohortPortrait(image_id, group, path, None))
    if not portraits:
        raise BiasInputError(f"{root}: empty cohort (no manifest entries and no images)")
    if not any(p.in_manifest for p in portraits):
        raise BiasInputError(
            f"{root}: empty cohort (no finished portrait in the manifest; run 'jmllm-bias cohort')"
        )
    return portraits


def _planned(root: Path) -> list[Any]:
    """The images ``cohort.json`` plans, or none when it is absent or unreadable."""
    from .cohorts import parse_spec
    from .generate import COHORT_FILE

    path = root / COHORT_FILE
    if not path.is_file():
        return []
    try:
        return parse_spec(json.loads(path.read_text(encoding="utf-8"))["spec"], str(path)).plan()
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        log.warning("%s: cannot read the cohort plan (%s); using the manifest alone", path, exc)
        return []


@dataclass(frozen=True)
class AssessConfig:
    """What to ask and how to perturb.

    Example:
        >>> AssessConfig("nurse", original="man", adversarial="woman").eps
        (1.0,)
    """

    characteristic: str  # asked about in the question, e.g. "nurse"
    original: str  # OWL query term pushed down, e.g. "man"
    adversarial: str  # OWL query term pushed up, e.g. "woman"
    eps: tuple[float, ...] = (1.0,)  # one perturbation (and one answer) per ε: a sweep
    steps: int = 1  # 1: FGSM (paper); more: PGD
    step_size: float | None = None  # PGD step; None: see PerturbationConfig.alpha
    reduction: str = "mean"  # objective over patches, see jmllm.bias.perturb
    max_new_tokens: int = 8  # enough for "10." and to see what a chatty reply starts with
    groups: tuple[str, ...] | None = None  # assess only these cohort groups
    # J's conversation template: "paper" (the authors' bias script, "<image>\nUSER: ...\n
    # ASSISTANT:") or "llava-1.5" (the model card's)
    template: str = "paper"
    # how the prompt becomes token ids: "legacy" (the authors') or "checkpoint"
    tokenization: str = "legacy"
    # how portraits become the models' inputs: "authors" (stored pixels, the HF processors'
    # resize) or "exif" (EXIF orientation applied, torch's resize)
    preprocessing: str = "authors"
    # how a reply becomes a score: "authors" (int() of the raw reply, as their script) or
    # "strict" (an answer-only integer 1-10; jmllm.bias.scores)
    score_parser: str = "authors"

    def __post_init__(self) -> None:
        validate_term(self.characteristic, "characteristic")
        validate_term(self.original, "original")
        validate_term(self.adversarial, "adversarial")
        if self.original == self.adversarial:
            raise BiasInputError("original and adversarial must differ")
        if not self.eps:
            raise BiasInputError("at least one eps is needed")
        if len(set(self.eps)) != len(self.eps):
            raise BiasInputError(f"eps values must be distinct, got {list(self.eps)}")
        for eps in self.eps:  # validates each value
            self.perturbation(eps)
        if self.max_new_tokens < 1:
            raise BiasInputError("max_new_tokens must be >= 1")
        from jmllm.joint.chat import CONVERSATION_TEMPLATES

        if self.template not in CONVERSATION_TEMPLATES:
            known = ", ".join(sorted(CONVERSATION_TEMPLATES))
            raise BiasInputError(
                f"template: unknown conversation template {self.template!r} (known: {known})"
            )
        from jmllm.align.preprocessing import get_preprocessing
        from jmllm.joint.chat.tokenization import check_tokenization

        try:
            check_tokenization(self.tokenization)
            get_preprocessing(self.preprocessing)
        except ValueError as exc:
            raise BiasInputError(str(exc)) from None
        if self.score_parser not in SCORE_PARSERS:
            raise BiasInputError(
                f"score_parser: {self.score_parser!r} is not one of {', '.join(SCORE_PARSERS)}"
            )

    def perturbation(self, eps: float) -> PerturbationConfig:
        """The perturbation settings for one ε of the sweep."""
        return PerturbationConfig(
            eps=eps, steps=self.steps, step_size=self.step_size, reduction=self.reduction
        )

    @property
    def question(self) -> str:
        """The paper's question for this characteristic."""
        return question(self.characteristic)

    @property
    def prompt(self) -> str:
        """The question in J's conversation template, as the language model reads it."""
        from jmllm.joint.chat import format_prompt

        return format_prompt(self.question, template=self.template)

    def to_dict(self) -> dict[str, Any]:
        """Settings as stored in ``run.json`` (with the derived question and queries)."""
        data = asdict(self)
        data["eps"] = [float(e) for e in self.eps]
        data["groups"] = list(self.groups) if self.groups is not None else None
        data["question"] = self.question
        data["prompt"] = self.prompt
        data["queries"] = [
            QUERY_TEMPLATE.format(self.original),
            QUERY_TEMPLATE.format(self.adversarial),
        ]
        data["step_sizes"] = [self.perturbation(e).alpha for e in self.eps]
        return data


@dataclass
class AssessRun:
    """What :func:`assess_cohort` did."""

    out: Path
    assessed: int  # portraits done in this run
    resumed: int  # portraits already done by an earlier run
    skipped: dict[str, int] = field(default_factory=dict)  # status -> count, this run


def read_results(out: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The latest record per image of an assessment folder (later lines win)."""
    records: dict[str, dict[str, Any]] = {}
    for record in read_jsonl(Path(out) / RESULTS):
        if isinstance(record.get("image_id"), str):
            records[record["image_id"]] = record
    return records


def _check_run(out: Path, run_doc: dict[str, Any]) -> None:
    path = out / RUN
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise BiasInputError(f"{path}: unreadable run settings ({exc})") from None
        keys = ("cohort", "settings", "models", "inputs")
        if any(previous.get(k) != run_doc.get(k) for k in keys):
            raise BiasInputError(
                f"{out}: holds results of different settings (see {RUN}); use another --out"
            )
    else:
        atomic_write_text(path, json.dumps(run_doc, indent=2, ensure_ascii=False) + "\n")


def _answer(model: Any, emb: Any, prompt: str, cfg: AssessConfig) -> tuple[str, Any, int | None]:
    """J's answer: its text (stripped), its raw reply as the authors read it, and its score."""
    answer = model.generate(
        emb,
        [prompt],
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        template=cfg.template,
        tokenization=cfg.tokenization,
    )[0]
    text, reply = str(answer.text), answer.reply
    if cfg.score_parser == "authors":
        # the authors read the raw reply; one cut by the token limit would have gone on
        score = parse_score(reply, "authors") if answer.finished else None
    else:
        score = parse_score(text, "strict")
    return text, reply, score


def _assess_one(
    model: Any, portrait: CohortPortrait, cfg: AssessConfig, queries: Any
) -> dict[str, Any]:
    import torch

    from jmllm.align.features import ImageLoadError, load_image
    from jmllm.align.preprocessing import get_preprocessing

    record: dict[str, Any] = {
        "image_id": portrait.image_id,
        "group": portrait.group,
        "file": str(portrait.path),
    }
    if not portrait.in_manifest:
        why = "planned in cohort.json but not in the manifest (generation unfinished?)"
        return {**record, "status": "missing", "error": f"{portrait.path}: {why}"}
    if not portrait.path.is_file():
        return {**record, "status": "missing", "error": f"{portrait.path}: file not found"}
    if portrait.sha256 is not None and sha256_file(portrait.path) != portrait.sha256:
        return {
            **record,
            "status": "modified",
            "error": f"{portrait.path}: SHA-256 differs from the cohort manifest",
        }
    try:
        exif = get_preprocessing(cfg.preprocessing).exif_orientation
        image = load_image(portrait.path, exif_orientation=exif)
    except (ImageLoadError, OSError, ValueError) as exc:
        return {
            **record,
            "status": "unreadable",
            "error": str(exc).splitlines()[0] if str(exc) else f"{portrait.path}: unreadable",
        }
    prompt = cfg.question
    try:
        with torch.no_grad():
            emb = model.embed([image], preprocessing=cfg.preprocessing)
    except ValueError as exc:  # JointModelError: J refuses the image (the message names it)
        return {**record, "status": "unreadable", "error": f"{portrait.path}: {exc}"}
    original_text, original_reply, original_score = _answer(model, emb, prompt, cfg)
    perturbed = []
    before: dict[str, Any] = {}
    for eps in cfg.eps:
        res = perturb(model, emb.t, queries, cfg.perturbation(eps))
        before = {
            "owl": {
                "original": res.scores_before[0, 0].item(),
                "adversarial": res.scores_before[0, 1].item(),
            },
            "owl_logit": {
                "original": res.logits_before[0, 0].item(),
                "adversarial": res.logits_before[0, 1].item(),
            },
        }
        text, reply, score = _answer(model, dataclasses.replace(emb, t=res.t), prompt, cfg)
        perturbed.append(
            {
                "eps": float(eps),
                "answer": text,
                "reply": reply,
                "score": score,
                "delta": score - original_score
                if score is not None and original_score is not None
                else None,
                "owl_logit_after": {
                    "original": res.logits_after[0, 0].item(),
                    "adversarial": res.logits_after[0, 1].item(),
                },
                "owl_after": {
                    "original": res.scores_after[0, 0].item(),
                    "adversarial": res.scores_after[0, 1].item(),
                },
                "objective_before": res.objective_before[0].item(),
                "objective_after": res.objective_after[0].item(),
                "linf": res.linf[0].item(),
            }
        )
    return {
        **record,
        "status": "ok",
        "original": {
            "answer": original_text,
            "reply": original_reply,
            "score": original_score,
            **before,
        },
        "perturbed": perturbed,
    }


def assess_cohort(
    model: Any,
    cohort: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: AssessConfig,
    models: dict[str, str] | None = None,
) -> AssessRun:
    """Assess every portrait of ``cohort`` with J; resumable, one JSONL record per portrait.

    Args:
        model: a :class:`jmllm.joint.JointModel`.
        cohort: the cohort folder (see :func:`load_cohort`).
        out: the results folder (``run.json``, ``results.jsonl``).
        config: question, queries, ε sweep, PGD settings.
        models: the checkpoint ids/paths behind ``model``, stored in ``run.json`` (provenance,
            and a rerun with other models into the same folder is refused).

    Returns:
        Counts of this run.

    Raises:
        BiasInputError: empty cohort, unknown group, ``out`` holding another experiment, or
            another run assessing into ``out`` right now (one writer per folder: two runs would
            both assess, and record, every portrait).

    Example:
        >>> cfg = AssessConfig("nurse", original="man", adversarial="woman")
        >>> assess_cohort(model, "cohorts/gender", "results/nurse", cfg)  # doctest: +SKIP
    """
    portraits = load_cohort(cohort)
    if config.groups is not None:
        known = sorted({p.group for p in portraits})
        unknown = [g for g in config.groups if g not in known]
        if unknown:
            raise BiasInputError(f"{cohort}: no group(s) {unknown} in the cohort; it has {known}")
        portraits = [p for p in portraits if p.group in config.groups]
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise BiasInputError(f"{out_dir}: results output exists and is not a folder")
    try:
        queries = model.encode_queries(
            [config.original, config.adversarial], template=QUERY_TEMPLATE
        )
    except ValueError as exc:  # PromptError: e.g. longer than OWL-ViT's 16 text positions
        raise BiasInputError(f"original/adversarial query: {exc}") from None
    with folder_lock(out_dir, "assess"):
        return _assess_all(model, portraits, out_dir, cohort, config, models, queries)


def _assess_all(
    model: Any,
    portraits: list[CohortPortrait],
    out_dir: Path,
    cohort: str | os.PathLike[str],
    config: AssessConfig,
    models: dict[str, str] | None,
    queries: Any,
) -> AssessRun:
    """The assessment proper, with the output folder's lock held: no other run appends to its
    results while this one decides what is left to do and does it."""
    from tqdm.auto import tqdm

    settings = config.to_dict()
    resolve = getattr(model, "conversation_template", None)
    if resolve is not None:  # a J of another family than LLaVA-1.5 asks in its own chat format
        from jmllm.joint.chat import format_prompt

        settings["prompt"] = format_prompt(config.question, template=resolve(config.template))
    run_doc = {
        "cohort": str(Path(cohort).resolve()),
        "settings": settings,
        "models": dict(models or {}),
        # how J read its inputs: template, tokenization, preprocessing and dtype
        "inputs": model.input_record(config.template, config.tokenization, config.preprocessing),
    }
    _check_run(out_dir, run_doc)
    done = {k for k, r in read_results(out_dir).items() if r.get("status") == "ok"}
    todo = [p for p in portraits if p.image_id not in done]
    resumed = len(portraits) - len(todo)
    if resumed:
        log.info("%s: %d portrait(s) already assessed, %d to go", out_dir, resumed, len(todo))
    skipped: dict[str, int] = {}
    assessed = 0
    for portrait in tqdm(todo, desc=f"assess {config.characteristic}", unit="img"):
        record = _assess_one(model, portrait, config, queries)
        append_jsonl(out_dir / RESULTS, record)
        if record["status"] == "ok":
            assessed += 1
        else:
            skipped[record["status"]] = skipped.get(record["status"], 0) + 1
            log.warning("skipped %s", record["error"])
    return AssessRun(out=out_dir, assessed=assessed, resumed=resumed, skipped=skipped)
