"""The attribution interface every method shares: the explained request, the result (a map over
``t``'s patch grid, painted at image size), the baselines that replace a removed patch, and the
target's probability under a batch of perturbed embeddings."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from jmllm.joint.chat.templates import (
    INTERACTIVE_TEMPLATE,
    ConversationTemplate,
    JointAnswer,
    get_template,
)
from jmllm.joint.detection.heads import pads_to_square
from jmllm.joint.model.internals import run_language_model
from jmllm.joint.saliency import (
    AnswerToken,
    GAError,
    GradientAlignment,
    answer_tokens,
    patch_grid_map,
    resolve_target,
)

# What replaces a removed patch (deletion, insertion, integrated gradients' path start), named the
# same in t-space and in pixel space: ``blank`` is the image of CLIP's mean colour (its t, or its
# pixels), ``blur`` the image blurred, ``zero`` zeros in t and black pixels.
BASELINES: tuple[str, ...] = ("blank", "blur", "zero")
BLUR_SIGMA_PATCHES = 0.5  # the ``blur`` baseline's Gaussian sigma, in patches of the grid


class AttributionError(ValueError):
    """An attribution request cannot be served; the message names the input and the problem."""


@dataclass
class Request:
    """One explained target of J's answer, prepared once for any number of methods.

    Attributes:
        t: (1, 1 + N, D) the embedding (CLS first).
        image_size: (width, height) the maps are painted at.
        emb: the :class:`~jmllm.joint.JointEmbedding` (None when explained from ``t``).
        prompt: the question; template: its conversation template's name.
        answer: the explained :class:`~jmllm.joint.JointAnswer` (prompt ids, answer ids).
        target: the target as asked (a word, a position or positions); occurrence: which
            occurrence of a repeated word.
        positions: the explained answer positions; label: the target's text.
        tokens: the explained tokens; answer_text: the decoded answer.
        queries: OWL-ViT queries (GA's class channels; other methods ignore them).
        cache: intermediate results methods share (keyed by the model they came from).
    """

    t: torch.Tensor
    image_size: tuple[int, int]
    emb: Any
    prompt: str
    template: str
    answer: JointAnswer
    target: Any
    occurrence: int
    positions: list[int]
    label: str
    tokens: list[AnswerToken]
    answer_text: str
    queries: list[str]
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def input_ids(self) -> torch.Tensor:
        """(1, P + A) prompt and answer ids: the teacher-forced input."""
        return self.answer.full_ids.unsqueeze(0)

    @property
    def scored_ids(self) -> torch.Tensor:
        """(1, R) the input up to the last row the target is read at: the language model is
        causal, so later tokens cannot change the target's logits and are not run."""
        return self.input_ids[:, : max(self.rows) + 1]

    @property
    def rows(self) -> list[int]:
        """The sequence rows whose logits predict the explained tokens (answer token ``i`` is
        predicted at ``P + i − 1``)."""
        P = int(self.answer.prompt_ids.numel())
        return [P + i - 1 for i in self.positions]

    @property
    def target_ids(self) -> torch.Tensor:
        """(T,) the explained tokens' ids, in the order of :attr:`rows`."""
        return self.answer.token_ids[self.positions].long()

    @property
    def num_patches(self) -> int:
        return int(self.t.shape[1]) - 1

    @property
    def grid_side(self) -> int:
        return round(self.num_patches**0.5)

    def digest(self) -> str:
        """A short hash of ``t`` and the target (seeds the random method per request)."""
        h = hashlib.sha256(self.t.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(repr((self.positions, self.answer.full_ids.tolist())).encode())
        return h.hexdigest()[:16]


def prepare_request(
    model: Any,
    image_or_t: Any,
    prompt: str,
    target: int | str | Sequence[int],
    answer: Any = None,
    *,
    queries: Sequence[str] | None = None,
    template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
    occurrence: int = 0,
    max_new_tokens: int = 64,
) -> Request:
    """A :class:`Request`: the embedding, the answer (given or generated greedily) and the
    target's positions, as :meth:`GradientAlignment.attribute` reads them.

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        image_or_t: an image, a one-image ``JointEmbedding`` or ``t`` itself (1, 1 + N, D).
        prompt: the question.
        target: an answer position, a word of the answer, or a list of positions.
        answer: text (teacher-forced), a ``JointAnswer``, or None to generate one.
        queries: OWL-ViT queries (default: the target's text).
        template: the conversation template of the prompt.
        occurrence: which occurrence of a repeated word.
        max_new_tokens: generation limit when ``answer`` is None.

    Raises:
        AttributionError: an empty answer, or a target not in it (the message lists its words).

    Example:
        >>> from jmllm.joint.toy import load_toy_joint
        >>> from jmllm.joint.toy.scenes import make_scene
        >>> request = prepare_request(load_toy_joint(), make_scene("heldout", 0).image,
        ...                           "What's in the image?", -1, "The image shows a red circle")
        >>> request.label, request.grid_side
        ('#5', 8)
    """
    name = get_template(template).name
    helper = GradientAlignment(model)  # its input handling: image, t or embedding; answer ids
    try:
        t, size, emb = helper.embedding(image_or_t)
        prompt_ids, answer_ids = helper.answer(emb, t, prompt, answer, max_new_tokens, name)
        text, tokens = answer_tokens(model.tokenizer, answer_ids)
        if not tokens:
            raise GAError("answer: is empty; there is no token to explain")
        positions, label = resolve_target(target, text, tokens, occurrence)
    except GAError as exc:
        raise AttributionError(str(exc)) from None
    if hasattr(answer, "token_ids") and isinstance(getattr(answer, "template", None), str):
        name = str(answer.template)
    joint = JointAnswer(
        text=text,
        token_ids=answer_ids.cpu(),
        prompt_ids=prompt_ids.cpu(),
        prompt=prompt,
        finished=True,
        template=name,
    )
    return Request(
        t=t.detach(),
        image_size=(int(size[0]), int(size[1])),
        emb=emb,
        prompt=prompt,
        template=name,
        answer=joint,
        target=list(target) if isinstance(target, (list, tuple)) else target,
        occurrence=occurrence,
        positions=positions,
        label=label,
        tokens=[tokens[i] for i in positions],
        answer_text=text,
        queries=list(queries) if queries else [label],
    )


@dataclass
class Attribution:
    """One method's map of one request: a score per patch of ``t``'s grid, painted at image size.

    Attributes:
        method: the method's name (``ga``, ``gradient``, …).
        scores: (N,) float32, one per patch of ``t`` (CLS excluded), row-major over the
            G × G grid; higher means more important. Signed for ``gradient_x_input`` and
            ``integrated_gradients`` (a negative score lowers the target's logit).
        image_size: (width, height) of :meth:`map`.
        label: the explained target's text; tokens: its answer tokens.
        painter: paints the map at a size (GA paints OWL-ViT's boxes); None paints each patch's
            cell of the squashed image (nearest neighbour).
        detail: the method's own result (GA: its :class:`~jmllm.joint.GAResult`).
    """

    method: str
    scores: torch.Tensor
    image_size: tuple[int, int]
    label: str = ""
    tokens: list[AnswerToken] = field(default_factory=list)
    painter: Callable[[tuple[int, int]], np.ndarray] | None = field(default=None, repr=False)
    detail: Any = field(default=None, repr=False)
    pads_to_square: bool = False  # OWLv2: the grid covers the image padded to a square

    @property
    def grid(self) -> np.ndarray:
        """(G, G) the scores on ``t``'s patch grid (row-major), float32."""
        side = round(self.scores.numel() ** 0.5)
        return self.scores.detach().float().cpu().numpy().reshape(side, side)

    def map(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The (H, W) map at ``size`` (default the image's), float32 in [0, 1] (min–max
        normalised; a constant map is all zeros)."""
        size = size or self.image_size
        if self.painter is not None:
            return self.painter(size)
        return patch_grid_map(self.scores, size, self.pads_to_square)

    def ranking(self, seed: int = 0) -> np.ndarray:
        """Patch indices (N,) from the most to the least important; ties (GA's patches under
        one box, a constant map) are broken by a seeded random order, never by position."""
        scores = self.scores.detach().double().cpu().numpy()
        rng = np.random.default_rng(seed)
        tiebreak = rng.permutation(scores.size)
        return np.lexsort((tiebreak, -scores))


class AttributionMethod:
    """An attribution method on J, captum-style: the model in the constructor, then
    :meth:`attribute`.

    Subclasses set :attr:`name`, :attr:`source` (the citation) and implement
    :meth:`attribute_request`; :meth:`bound_to` gives the same method on another J (the
    randomisation cascade's models), sharing what depends only on the OWL-ViT side.

    Example:
        >>> from jmllm.joint.saliency.attribution import get_method
        >>> method = get_method("gradient", model)  # doctest: +SKIP
        >>> method.attribute(image, "What's in the image?", "circle",
        ...                  answer="The image shows a red circle").map().shape  # doctest: +SKIP
        (128, 128)
    """

    name: ClassVar[str] = ""
    source: ClassVar[str] = ""
    signed: ClassVar[bool] = False

    def __init__(self, model: Any) -> None:
        self.model = model

    def bound_to(self, model: Any) -> AttributionMethod:
        """The same method, with the same options, on another J."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.model = model
        return clone

    def attribute(
        self,
        image_or_t: Any,
        prompt: str,
        target: int | str | Sequence[int],
        answer: Any = None,
        *,
        queries: Sequence[str] | None = None,
        template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
        occurrence: int = 0,
        max_new_tokens: int = 64,
    ) -> Attribution:
        """The map of one target of J's answer (arguments as :func:`prepare_request`)."""
        request = prepare_request(
            self.model,
            image_or_t,
            prompt,
            target,
            answer,
            queries=queries,
            template=template,
            occurrence=occurrence,
            max_new_tokens=max_new_tokens,
        )
        return self.attribute_request(request)

    def attribute_request(self, request: Request) -> Attribution:
        """The map of a prepared request."""
        raise NotImplementedError

    def _result(self, request: Request, scores: torch.Tensor, **kwargs: Any) -> Attribution:
        return Attribution(
            method=self.name,
            scores=scores.detach().float().cpu().reshape(-1),
            image_size=request.image_size,
            label=request.label,
            tokens=list(request.tokens),
            # scores on t's own grid (OWLv2's covers the padded square; the MLLM's tokens, which
            # attention and the logit lens score, cover the squashed image)
            pads_to_square=pads_to_square(self.model.owl)
            and scores.numel() == self.model.owl_grid[0] * self.model.owl_grid[1],
            **kwargs,
        )


# ---------------------------------------------------------------------------------------------
# The target's probability, and the baselines
# ---------------------------------------------------------------------------------------------


def target_log_probs(
    model: Any, request: Request, t: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """log P(explained tokens | t) for every row of a batch of embeddings, teacher-forced: the
    sum over the target's tokens of their log-softmax at their rows (a word of several tokens
    is the probability of all of them).

    One forward per ``batch_size`` rows (None: the whole batch at once); the LM head runs on the
    target's rows only.

    Args:
        t: (B, 1 + N, D) embeddings (e.g. the steps of a deletion curve).

    Returns:
        (B,) float64 log-probabilities.
    """
    rows = request.rows
    ids = request.target_ids.to(model.llava_device)
    out = []
    step = batch_size or t.shape[0]
    with torch.inference_mode():
        for start in range(0, t.shape[0], step):
            chunk = t[start : start + step].to(model.device)
            logits = run_language_model(model, chunk, request.scored_ids, rows=rows).logits
            logp = torch.log_softmax(logits.double(), dim=-1)  # (b, T, V)
            picked = logp.gather(-1, ids.view(1, -1, 1).expand(logp.shape[0], -1, 1))
            out.append(picked.squeeze(-1).sum(-1).cpu())
    return torch.cat(out)


def target_logit(model: Any, request: Request, t: torch.Tensor) -> torch.Tensor:
    """The explained tokens' summed raw logits (B,) for a batch of ``t``, differentiable in
    ``t``: the quantity every gradient method explains (GA's ``g_L`` is its gradient)."""
    logits = run_language_model(model, t, request.scored_ids, rows=request.rows).logits
    ids = request.target_ids.to(logits.device)
    return logits.gather(-1, ids.view(1, -1, 1).expand(logits.shape[0], -1, 1)).sum((-1, -2))


def model_input(model: Any, request: Request) -> torch.Tensor:
    """The image as OWL-ViT sees it: squashed to its input size and normalised, (1, 3, S, S)
    float32 (J's own preprocessing, :attr:`~jmllm.joint.JointModel.owl_norm`); cached."""
    key = ("model_input", id(model.owl))
    cached = request.cache.get(key)
    if cached is None:
        if request.emb is None or not request.emb.images:
            raise AttributionError("image: the pixel-space steps need the image, not t alone")
        cached = model.owl_norm([request.emb.images[0]], model.device).float()
        request.cache[key] = cached
    return cached


def baseline_input(model: Any, request: Request, baseline: str) -> torch.Tensor:
    """The input a removed patch's pixels are taken from, (1, 3, S, S) normalised like
    :func:`model_input`: ``blank`` CLIP's mean colour (0 after normalisation), ``zero`` black,
    ``blur`` the image blurred with a Gaussian of sigma :data:`BLUR_SIGMA_PATCHES` patches."""
    if baseline not in BASELINES:
        raise AttributionError(f"baseline: {baseline!r} is not one of {', '.join(BASELINES)}")
    key = ("baseline_input", id(model.owl), baseline)
    cached = request.cache.get(key)
    if cached is not None:
        return cached
    side = int(model.owl.config.vision_config.image_size)
    if baseline == "blank":
        base = torch.zeros(1, 3, side, side, device=model.device)
    elif baseline == "zero":
        norm = model.owl_norm
        mean = torch.tensor(norm.mean, device=model.device).view(1, 3, 1, 1)
        std = torch.tensor(norm.std, device=model.device).view(1, 3, 1, 1)
        base = (torch.zeros(1, 3, side, side, device=model.device) - mean) / std
    else:
        from scipy.ndimage import gaussian_filter

        x = model_input(model, request)
        sigma = BLUR_SIGMA_PATCHES * side / request.grid_side
        blurred = gaussian_filter(x.cpu().numpy(), (0, 0, sigma, sigma), mode="nearest")
        base = torch.from_numpy(blurred).to(model.device)
    request.cache[key] = base
    return base


def baseline_t(model: Any, request: Request, baseline: str) -> torch.Tensor:
    """The embedding a removed patch of ``t`` is taken from: (1, 1 + N, D), cached on the request.

    ``blank``: ``t`` of the blank image (CLIP's mean colour; an image without objects);
    ``blur``: ``t`` of the image blurred (needs the image); ``zero``: zeros.
    """
    from jmllm.align import owl_penultimate

    if baseline not in BASELINES:
        raise AttributionError(f"baseline: {baseline!r} is not one of {', '.join(BASELINES)}")
    key = ("baseline_t", id(model.owl), baseline)
    cached = request.cache.get(key)
    if cached is None:
        if baseline == "zero":
            cached = torch.zeros_like(request.t)
        else:
            with torch.no_grad():
                pixels = baseline_input(model, request, baseline)
                cached = owl_penultimate(model.owl, pixels).to(request.t.dtype)
        request.cache[key] = cached
    return cached
