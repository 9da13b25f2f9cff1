"""The faithfulness metrics of one explained target: deletion and insertion curves (on ``t`` and
in pixels, every step of every method in one batched forward), the pointing game, MaxBoxAccV2's
per-threshold IoUs, and the similarity of two maps (Spearman, SSIM).

Deletion and insertion (Petsiuk, Das and Saenko, *RISE*, BMVC 2018): the patches of ``t``'s
grid are ranked by a method's scores (ties broken by a seeded random order); at step ``s`` of
``K`` the top ``round(s · N / K)`` patches are **removed** (deletion: replaced by the
baseline's) or **inserted** (insertion: everything else is the baseline's), and the explained
tokens' probability, teacher-forced, is read. The area under that curve, over the removed
fraction in [0, 1] (trapezoids), is the score: low for deletion, high for insertion, when the
ranking is faithful. Two spaces:

``t``
    rows of the embedding ``t`` replaced by the baseline embedding's rows (the CLS row is kept;
    W never reads it);
``pixels``
    each patch's cell of the image as OWL-ViT sees it (squashed to its input size and
    normalised: exactly the patch's pixels) replaced by the baseline image's, and ``t``
    computed again from the pixels.

The baseline (:data:`~jmllm.joint.saliency.attribution.base.BASELINES`) is the same image seen in both
spaces: ``blank`` (default; CLIP's mean colour — an image without objects), ``blur`` or ``zero``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jmllm.joint.saliency.attribution.base import (
    Attribution,
    Request,
    baseline_input,
    baseline_t,
    model_input,
    target_log_probs,
)
from jmllm.joint.toy.localisation import peak_in_box, spearman

SPACES: tuple[str, ...] = ("t", "pixels")
CURVES: tuple[str, ...] = ("deletion", "insertion")
DEFAULT_STEPS = 16
SSIM_WINDOW = 7  # scikit-image's default window (uniform filter), as Adebayo et al. used


def step_counts(num_patches: int, steps: int) -> np.ndarray:
    """How many patches are removed (or inserted) at each of the ``steps + 1`` points:
    ``round(s · N / K)`` for s = 0 … K.

    Example:
        >>> step_counts(64, 4).tolist()
        [0, 16, 32, 48, 64]
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: must be a positive integer, got {steps!r}")
    return np.rint(np.arange(steps + 1) * num_patches / steps).astype(np.int64)


def step_masks(ranking: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(S, N) bool: at point ``s`` the ``counts[s]`` first patches of ``ranking`` are set."""
    masks = np.zeros((len(counts), ranking.size), dtype=bool)
    for s, count in enumerate(counts):
        masks[s, ranking[:count]] = True
    return masks


def mixed_t(t: torch.Tensor, base: torch.Tensor, taken: np.ndarray) -> torch.Tensor:
    """(S, 1 + N, D): ``t`` with the patch rows of each mask row taken from ``base`` (CLS kept).

    Args:
        t, base: (1, 1 + N, D). taken: (S, N) bool, True where the row comes from ``base``.
    """
    mask = torch.from_numpy(taken).to(t.device)  # (S, N)
    mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1).unsqueeze(-1)  # (S, 1 + N, 1)
    return torch.where(mask, base.to(t.dtype), t)


def mixed_input(x: torch.Tensor, base: torch.Tensor, taken: np.ndarray) -> torch.Tensor:
    """(S, 3, H, W): OWL-ViT's input ``x`` with the patch cells of each mask row taken from
    ``base``.

    Args:
        x, base: (1, 3, H, W), H and W multiples of the grid side.
        taken: (S, G·G) bool over the patch grid, row-major.
    """
    G = round(taken.shape[1] ** 0.5)
    height, width = x.shape[-2:]
    mask = torch.from_numpy(taken.reshape(-1, 1, G, G)).to(x.device)  # (S, 1, G, G)
    mask = mask.repeat_interleave(height // G, dim=2).repeat_interleave(width // G, dim=3)
    return torch.where(mask, base, x)  # (S, 3, H, W)


def auc(fractions: np.ndarray, values: np.ndarray) -> float:
    """Area under ``values`` over ``fractions`` (trapezoids).

    Example:
        >>> auc(np.array([0.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.0]))
        0.5
    """
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


@dataclass
class Curves:
    """The deletion and insertion curves of several maps of one request.

    Attributes:
        fractions: (S,) share of the patches removed (deletion) or inserted (insertion).
        probabilities: (space, curve) → map key → (S,) the explained tokens' probability.
        clean: the probability on the untouched input; empty: with every patch the baseline's,
            per space.
    """

    fractions: np.ndarray
    probabilities: dict[tuple[str, str], dict[Any, np.ndarray]]
    clean: float
    empty: dict[str, float]

    def auc(self, space: str, curve: str, key: Any) -> float:
        return auc(self.fractions, self.probabilities[(space, curve)][key])


class CurveScorer:
    """Deletion and insertion curves of many maps of one request in one batched forward per
    space: every step of every map and curve becomes a row, identical rows are run once (every
    curve of a space shares its first and last points), then the rows go through J in batches of
    ``batch_size`` (None: all at once).

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        steps: K, the curve's steps (K + 1 points).
        baseline: ``blank``, ``blur`` or ``zero``.
        spaces: ``t`` and/or ``pixels``.
        batch_size: rows per forward (memory bound); None: one forward per space.
        seed: seed of the ranking's tie-break.

    Example:
        >>> scorer = CurveScorer(model, steps=8)  # doctest: +SKIP
        >>> curves = scorer.curves(request, {"ga": ga_map, "random": random_map})  # doctest: +SKIP
        >>> curves.auc("t", "deletion", "ga")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        steps: int = DEFAULT_STEPS,
        baseline: str = "blank",
        spaces: Sequence[str] = SPACES,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        unknown = [s for s in spaces if s not in SPACES]
        if unknown:
            raise ValueError(f"spaces: {unknown} not among {', '.join(SPACES)}")
        step_counts(1, steps)  # checks steps
        self.model = model
        self.steps = steps
        self.baseline = baseline
        self.spaces = tuple(spaces)
        self.batch_size = batch_size
        self.seed = seed

    def masks(self, request: Request, attribution: Attribution) -> tuple[np.ndarray, np.ndarray]:
        """(S,) fractions and (S, N) masks of the patches removed at each point."""
        counts = step_counts(request.num_patches, self.steps)
        ranking = attribution.ranking(self.seed)
        return counts / request.num_patches, step_masks(ranking, counts)

    def curves(self, request: Request, maps: Mapping[Any, Attribution]) -> Curves:
        """The curves of every map (keys are the caller's, e.g. method names)."""
        fractions = np.zeros(0)
        rows: dict[bytes, int] = {}  # a mask of taken-from-baseline patches → its row
        takes: list[np.ndarray] = []
        index: dict[tuple[str, Any], list[int]] = {}
        for key, attribution in maps.items():
            fractions, removed = self.masks(request, attribution)
            for curve in CURVES:
                # deletion takes the removed patches from the baseline; insertion the others
                taken = removed if curve == "deletion" else ~removed
                positions = []
                for mask in taken:
                    code = np.packbits(mask).tobytes()
                    if code not in rows:
                        rows[code] = len(takes)
                        takes.append(mask)
                    positions.append(rows[code])
                index[(curve, key)] = positions
        N = request.num_patches
        for mask in (np.zeros(N, dtype=bool), np.ones(N, dtype=bool)):  # clean and empty
            code = np.packbits(mask).tobytes()
            if code not in rows:
                rows[code] = len(takes)
                takes.append(mask)
        taken_all = np.stack(takes)  # (R, N)
        clean_row = rows[np.packbits(np.zeros(N, dtype=bool)).tobytes()]
        empty_row = rows[np.packbits(np.ones(N, dtype=bool)).tobytes()]
        probabilities: dict[tuple[str, str], dict[Any, np.ndarray]] = {}
        empty: dict[str, float] = {}
        clean = float("nan")
        for space in self.spaces:
            logp = self.log_probs(request, space, taken_all)  # (R,)
            p = np.exp(logp)
            clean = float(p[clean_row])
            empty[space] = float(p[empty_row])
            for (curve, key), positions in index.items():
                probabilities.setdefault((space, curve), {})[key] = p[positions]
        return Curves(fractions, probabilities, clean, empty)

    def log_probs(self, request: Request, space: str, taken: np.ndarray) -> np.ndarray:
        """log P(target) (R,) for the R masks of ``taken`` (R, N) in ``space``, batched."""
        model = self.model
        if space == "t":
            base = baseline_t(model, request, self.baseline)
            t = mixed_t(request.t, base, taken)
            return target_log_probs(model, request, t, self.batch_size).numpy()
        from jmllm.align import owl_penultimate

        x = model_input(model, request)
        base_input = baseline_input(model, request, self.baseline)
        logps = []
        step = self.batch_size or taken.shape[0]
        for start in range(0, taken.shape[0], step):
            with torch.inference_mode():
                pixels = mixed_input(x, base_input, taken[start : start + step])
                t = owl_penultimate(model.owl, pixels)
            logps.append(target_log_probs(model, request, t, self.batch_size).numpy())
        return np.concatenate(logps)


def unbatched_log_probs(
    model: Any, request: Request, space: str, taken: np.ndarray, baseline: str = "blank"
) -> np.ndarray:
    """The straightforward way, one point at a time: for each mask, build the input, run J's
    full forward (:meth:`~jmllm.joint.JointModel.language_logits`, every row's logits) and read
    the target's log-probability. The reference that :class:`CurveScorer` is checked and timed
    against."""
    from jmllm.align import owl_penultimate

    out = []
    for mask in taken:
        with torch.no_grad():
            if space == "t":
                t = mixed_t(request.t, baseline_t(model, request, baseline), mask[None])
            else:
                x = model_input(model, request)
                pixels = mixed_input(x, baseline_input(model, request, baseline), mask[None])
                t = owl_penultimate(model.owl, pixels)
            logits = model.language_logits(t, request.input_ids)[0].double()  # (L, V)
        logp = torch.log_softmax(logits[request.rows], dim=-1)
        out.append(float(logp.gather(-1, request.target_ids.view(-1, 1)).sum()))
    return np.array(out)


# ---------------------------------------------------------------------------------------------
# Localisation and similarity
# ---------------------------------------------------------------------------------------------


def pointing(saliency: np.ndarray, boxes: np.ndarray) -> bool:
    """The pointing game (Zhang et al., ECCV 2016): whether the map's peak lies in any of the
    (G, 4) boxes ``x0, y0, x1, y1`` (continuous extent, in the map's pixels)."""
    return any(peak_in_box(saliency, tuple(box)) for box in np.asarray(boxes).reshape(-1, 4))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Structural similarity of two maps, as scikit-image's ``structural_similarity`` computes it
    with its defaults (a 7 × 7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03, mirror
    boundaries, the border of half a window left out of the mean) — the measure Adebayo et al.
    (NeurIPS 2018) report beside Spearman's.

    Example:
        >>> m = np.random.default_rng(0).random((16, 16))
        >>> round(ssim(m, m), 6), ssim(m, 1 - m) < 0
        (1.0, True)
    """
    from scipy.ndimage import uniform_filter

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or min(x.shape) < SSIM_WINDOW:
        raise ValueError(
            f"maps: need two equal 2-D maps of at least 7 px, got {x.shape}, {y.shape}"
        )
    n = SSIM_WINDOW**2
    mean_x, mean_y = uniform_filter(x, SSIM_WINDOW), uniform_filter(y, SSIM_WINDOW)
    xx = uniform_filter(x * x, SSIM_WINDOW)
    yy = uniform_filter(y * y, SSIM_WINDOW)
    xy = uniform_filter(x * y, SSIM_WINDOW)
    scale = n / (n - 1)  # the sample covariance
    var_x = scale * (xx - mean_x * mean_x)
    var_y = scale * (yy - mean_y * mean_y)
    cov = scale * (xy - mean_x * mean_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    )
    pad = (SSIM_WINDOW - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())


__all__ = [
    "CURVES",
    "DEFAULT_STEPS",
    "SPACES",
    "CurveScorer",
    "Curves",
    "auc",
    "mixed_input",
    "mixed_t",
    "pointing",
    "spearman",
    "ssim",
    "step_counts",
    "step_masks",
    "unbatched_log_probs",
]
