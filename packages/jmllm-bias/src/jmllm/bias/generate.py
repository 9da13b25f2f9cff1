"""Portrait cohorts with SDXL base 1.0 + refiner 1.0 as an ensemble of experts (paper §4.4).

The base model denoises the first ``high_noise_frac`` of the schedule (40 of 50 steps with the
paper's 0.8) and hands its latents to the refiner, which runs the remaining steps
(``denoising_start``), as in the diffusers SDXL documentation; the refiner shares the base's second
text encoder and VAE. Every image has a fixed seed (see :mod:`jmllm.bias.cohorts`) and its own
``torch.Generator`` on the CPU, so its pixels do not depend on batch composition, on which GPU made
it, or on how many GPUs shared the work (up to the numerics of the card and dtype).

Output folder::

    cohort.json           the spec and generation settings (written once)
    manifest.jsonl        one record per finished image: prompt, group, seed, models, steps, sha256
    images/<group>/<group>_<i>.png
    contact_sheet.png

Resuming: an image whose file exists, whose manifest record has the same generation settings and
whose bytes still hash to the recorded SHA-256 is kept; anything else is (re)generated. Several
processes launched with ``accelerate launch`` split the remaining images between them
(``PartialState().split_between_processes``); each appends its records to the manifest with one
``O_APPEND`` write per line, and the main process compacts the manifest and draws the contact
sheet once everybody is done.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jmllm.align.options import check_finite

from .cohorts import CohortImage, CohortSpec
from .errors import BiasInputError
from .files import append_jsonl, atomic_write_bytes, atomic_write_text, read_jsonl, sha256_file

__all__ = [
    "SDXL_BASE",
    "SDXL_REFINER",
    "CohortRun",
    "GenerationConfig",
    "ManifestEntry",
    "generate_cohort",
    "read_manifest",
]

log = logging.getLogger(__name__)

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
MANIFEST = "manifest.jsonl"
COHORT_FILE = "cohort.json"
CONTACT_SHEET = "contact_sheet.png"
MAX_GUIDANCE_SCALE = 100.0
SDXL_HUB_HINT = (
    "use --tiny for a tiny SDXL built offline, or set HF_HUB_OFFLINE=1 and pass local folders "
    "(--base DIR --refiner DIR)"
)  # classifier-free guidance; SDXL is used at 5-10


@dataclass(frozen=True)
class GenerationConfig:
    """How to turn a cohort spec into pixels. Defaults are the paper's setting.

    Example:
        >>> cfg = GenerationConfig()
        >>> cfg.base_steps, cfg.steps - cfg.base_steps
        (40, 10)
    """

    base: str = SDXL_BASE  # Hub id or local folder of the SDXL base pipeline
    refiner: str = SDXL_REFINER  # Hub id or local folder of the SDXL refiner pipeline
    steps: int = 50  # total denoising steps shared by base and refiner
    high_noise_frac: float = 0.8  # base runs the first 80 % (denoising_end), refiner the rest
    guidance_scale: float = 5.0  # diffusers' SDXL default, which the authors' notebook used
    height: int | None = None  # None: the model's native size (1024 for SDXL)
    width: int | None = None
    dtype: str = "auto"  # "auto": float16 on CUDA, float32 on CPU; or float16/bfloat16/float32
    variant: str | None = None  # e.g. "fp16" to download the half-size weight files
    batch_size: int = 1  # images per pipeline call (each keeps its own generator)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 2:
            raise BiasInputError(f"steps must be an integer >= 2, got {self.steps!r}")
        if not 0.0 < self.high_noise_frac < 1.0:
            raise BiasInputError(f"high-noise-frac must be in (0, 1), got {self.high_noise_frac}")
        # NaN would be stored in the manifest and never equal itself: every rerun would find no
        # finished image and generate the whole cohort again.
        try:
            check_finite(self.guidance_scale, "guidance-scale", 0.0, MAX_GUIDANCE_SCALE)
        except ValueError as exc:
            raise BiasInputError(str(exc)) from None
        if not 1 <= self.base_steps < self.steps:
            raise BiasInputError(
                f"steps={self.steps} with high-noise-frac={self.high_noise_frac} leaves the base "
                "or the refiner no step"
            )
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise BiasInputError(f"{name} must be a positive multiple of 8, got {v}")
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise BiasInputError(f"dtype must be auto, float16, bfloat16 or float32: {self.dtype}")
        if self.batch_size < 1:
            raise BiasInputError(f"batch size must be >= 1, got {self.batch_size}")

    @property
    def base_steps(self) -> int:
        """Steps the base model runs (diffusers rounds the cut-off timestep the same way)."""
        return round(self.steps * self.high_noise_frac)


@dataclass(frozen=True)
class ManifestEntry:
    """One finished portrait, as a line of ``manifest.jsonl``."""

    image_id: str
    group: str
    index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    base_model: str
    refiner_model: str
    steps: int
    high_noise_frac: float
    guidance_scale: float
    width: int
    height: int
    dtype: str
    file: str  # path relative to the cohort folder
    sha256: str
    diffusers_version: str = ""
    seconds: float = 0.0  # wall time of the batch that made it, divided by the batch size

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ManifestEntry | None:
        """Parse a manifest line; ``None`` when a field is missing or mistyped."""
        try:
            names = cls.__dataclass_fields__
            entry = cls(**{k: record[k] for k in names if k in record})
        except TypeError:
            return None
        if not isinstance(entry.file, str) or not isinstance(entry.sha256, str):
            return None
        return entry


@dataclass
class CohortRun:
    """What :func:`generate_cohort` did."""

    out: Path
    planned: int
    generated: int
    kept: int  # already present with a matching manifest record and hash
    manifest: Path
    contact_sheet: Path | None
    generated_ids: list[str] = field(default_factory=list)


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, ManifestEntry]:
    """The latest manifest record per image id of a cohort folder (later lines win).

    Example:
        >>> read_manifest("/nonexistent")
        {}
    """
    out: dict[str, ManifestEntry] = {}
    for record in read_jsonl(Path(folder) / MANIFEST):
        entry = ManifestEntry.from_record(record)
        if entry is not None:
            out[entry.image_id] = entry
    return out


def _matches(entry: ManifestEntry, image: CohortImage, spec: CohortSpec, cfg: GenerationConfig):
    return (
        entry.prompt == image.prompt
        and entry.negative_prompt == spec.negative_prompt
        and entry.seed == image.seed
        and entry.group == image.group
        and entry.file == image.relpath
        and entry.base_model == cfg.base
        and entry.refiner_model == cfg.refiner
        and entry.steps == cfg.steps
        and abs(entry.high_noise_frac - cfg.high_noise_frac) < 1e-9
        and abs(entry.guidance_scale - cfg.guidance_scale) < 1e-9
        and (cfg.height is None or entry.height == cfg.height)
        and (cfg.width is None or entry.width == cfg.width)
    )


def _finished(folder: Path, spec: CohortSpec, cfg: GenerationConfig) -> set[str]:
    """Ids of planned images already on disk with a matching record and hash."""
    manifest = read_manifest(folder)
    done = set()
    for image in spec.plan():
        entry = manifest.get(image.image_id)
        path = folder / image.relpath
        if entry is None or not path.is_file() or not _matches(entry, image, spec, cfg):
            continue
        if sha256_file(path) == entry.sha256:
            done.add(image.image_id)
        else:
            log.warning("%s: file changed since generation (hash mismatch); regenerating", path)
    return done


def _use_cpu() -> bool:
    """CPU processes (``accelerate launch --cpu``, or no GPU): accelerate then splits over gloo."""
    import torch

    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def _torch_device(device: str) -> Any:
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise BiasInputError(f"--device {device}: not a device (cpu, cuda, cuda:1, …)") from None


def _torch_dtype(cfg: GenerationConfig, device: Any) -> Any:
    import torch

    if cfg.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def _load_pipelines(cfg: GenerationConfig, device: Any) -> tuple[Any, Any, Any]:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from jmllm.align.hub import prepare_hub

    # an unreachable Hub: one line, no retries
    prepare_hub([cfg.base, cfg.refiner], hint=SDXL_HUB_HINT)
    dtype = _torch_dtype(cfg, device)
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": True}
    if cfg.variant:
        kwargs["variant"] = cfg.variant
    try:
        base = StableDiffusionXLPipeline.from_pretrained(cfg.base, **kwargs)
    except (OSError, ValueError) as exc:
        raise BiasInputError(f"{cfg.base}: cannot load the SDXL base pipeline ({exc})") from None
    try:
        # The refiner reuses the base's second text encoder and VAE (diffusers SDXL docs).
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            cfg.refiner, text_encoder_2=base.text_encoder_2, vae=base.vae, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise BiasInputError(f"{cfg.refiner}: cannot load the SDXL refiner ({exc})") from None
    base.to(device)
    refiner.to(device)
    base.set_progress_bar_config(disable=True)
    refiner.set_progress_bar_config(disable=True)
    return base, refiner, dtype


def _png_bytes(image: Any, info: dict[str, str]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in info.items():
        meta.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def _batches(items: list[CohortImage], size: int) -> Iterable[list[CohortImage]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _generate_share(
    folder: Path,
    share: list[CohortImage],
    spec: CohortSpec,
    cfg: GenerationConfig,
    device: Any,
    rank: int,
) -> list[str]:
    import diffusers
    import torch
    from tqdm.auto import tqdm

    if not share:
        return []
    base, refiner, dtype = _load_pipelines(cfg, device)
    made = []
    bar = tqdm(total=len(share), desc=f"{spec.name} [process {rank}]", unit="img", position=rank)
    for batch in _batches(share, cfg.batch_size):
        start = time.perf_counter()
        prompts = [im.prompt for im in batch]
        negatives = [spec.negative_prompt] * len(batch) if spec.negative_prompt else None
        # one generator per image, on the CPU: its noise is the same whatever GPU or batch
        generators = [torch.Generator("cpu").manual_seed(im.seed) for im in batch]
        with torch.inference_mode():
            latents = base(
                prompt=prompts,
                negative_prompt=negatives,
                num_inference_steps=cfg.steps,
                denoising_end=cfg.high_noise_frac,
                guidance_scale=cfg.guidance_scale,
                height=cfg.height,
                width=cfg.width,
                generator=generators,
                output_type="latent",
            ).images
            images = refiner(
                prompt=prompts,
                negative_prompt=negatives,
                num_inference_steps=cfg.steps,
                denoising_start=cfg.high_noise_frac,
                guidance_scale=cfg.guidance_scale,
                image=latents,
                generator=generators,
            ).images
        seconds = (time.perf_counter() - start) / len(batch)
        for im, pil in zip(batch, images, strict=True):
            data = _png_bytes(pil, {"prompt": im.prompt, "seed": str(im.seed)})
            path = atomic_write_bytes(folder / im.relpath, data)
            entry = ManifestEntry(
                image_id=im.image_id,
                group=im.group,
                index=im.index,
                prompt=im.prompt,
                negative_prompt=spec.negative_prompt,
                seed=im.seed,
                base_model=cfg.base,
                refiner_model=cfg.refiner,
                steps=cfg.steps,
                high_noise_frac=cfg.high_noise_frac,
                guidance_scale=cfg.guidance_scale,
                width=pil.width,
                height=pil.height,
                dtype=str(dtype).replace("torch.", ""),
                file=im.relpath,
                sha256=hashlib.sha256(data).hexdigest(),
                diffusers_version=diffusers.__version__,
                seconds=round(seconds, 3),
            )
            # append right after the file lands: an interruption loses at most this batch
            append_jsonl(folder / MANIFEST, asdict(entry))
            made.append(im.image_id)
            log.debug("wrote %s", path)
        bar.update(len(batch))
    bar.close()
    return made


def _compact_manifest(folder: Path, spec: CohortSpec) -> None:
    """Rewrite the manifest with one record per planned image that exists, in plan order."""
    manifest = read_manifest(folder)
    lines = []
    for image in spec.plan():
        entry = manifest.get(image.image_id)
        if entry is not None and (folder / entry.file).is_file():
            lines.append(json.dumps(asdict(entry), ensure_ascii=False, sort_keys=True))
    atomic_write_text(folder / MANIFEST, "".join(line + "\n" for line in lines))


def generate_cohort(
    spec: CohortSpec,
    out: str | os.PathLike[str],
    config: GenerationConfig | None = None,
    contact_sheet: bool = True,
    device: str | None = None,
) -> CohortRun:
    """Generate (or finish) a portrait cohort; safe to rerun, and to launch on several GPUs.

    Run it plainly for one device, or under ``accelerate launch --num_processes N`` to split the
    remaining images over N GPUs.

    Args:
        spec: which portraits (see :func:`jmllm.bias.cohorts.load_spec`).
        out: the cohort folder (created; reused to resume).
        config: models and sampler settings; default: the paper's SDXL base + refiner, 50 steps.
        contact_sheet: also draw ``contact_sheet.png``.
        device: where the pipelines run in a single process (default: accelerate's choice, the
            first GPU if there is one, else the CPU); under ``accelerate launch`` each process
            takes its own.

    Returns:
        A :class:`CohortRun` with the counts (on every process; the contact sheet is drawn by the
        main process).

    Example:
        >>> from jmllm.bias.cohorts import load_spec
        >>> run = generate_cohort(load_spec("gender"), "cohorts/gender")  # doctest: +SKIP
        >>> run.generated + run.kept  # doctest: +SKIP
        100
    """
    from accelerate import PartialState

    cfg = config or GenerationConfig()
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise BiasInputError(f"{folder}: cohort output exists and is not a folder")
    state = PartialState(cpu=_use_cpu())
    if device == "auto":
        device = None
    if device is not None and state.num_processes > 1:
        raise BiasInputError(
            f"--device {device}: not under accelerate launch, where each process takes its own"
        )
    plan = spec.plan()
    cohort_doc = {"spec": spec.to_dict(), "generation": asdict(cfg)}
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / COHORT_FILE, json.dumps(cohort_doc, indent=2) + "\n")
    state.wait_for_everyone()
    done = _finished(folder, spec, cfg)  # same answer on every process: same files, same plan
    todo = [im for im in plan if im.image_id not in done]
    if done:
        log.info("%s: keeping %d finished image(s), generating %d", folder, len(done), len(todo))
    with state.split_between_processes(todo) as share:
        where = state.device if device is None else _torch_device(device)
        made = _generate_share(folder, list(share), spec, cfg, where, state.process_index)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        made = list(gather_object(made))  # every process reports the whole cohort's work
    state.wait_for_everyone()
    sheet = None
    if state.is_main_process:
        _compact_manifest(folder, spec)
        if contact_sheet:
            from .contact_sheet import write_contact_sheet

            groups = [
                (g.name, [folder / im.relpath for im in plan if im.group == g.name])
                for g in spec.groups
            ]
            sheet = write_contact_sheet(groups, folder / CONTACT_SHEET, title=spec.name)
    state.wait_for_everyone()
    return CohortRun(
        out=folder,
        planned=len(plan),
        generated=len(made),
        kept=len(done),
        manifest=folder / MANIFEST,
        contact_sheet=sheet,
        generated_ids=made,
    )
