"""GA's public API: :class:`GradientAlignment`, which explains one token or a whole answer of J.

Its results, :class:`GAResult` and :class:`AnswerExplanation`, are
:mod:`jmllm.joint.saliency.results`; they are importable from here as well.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING
from jmllm.joint.chat.templates import INTERACTIVE_TEMPLATE, ConversationTemplate, get_template
from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION
from jmllm.joint.detection.heads import image_fraction_boxes, pads_to_square
from jmllm.joint.saliency.answers import (
    AnswerToken,
    GAError,
    QueryMatch,
    _template_name,
    answer_tokens,
    answer_words,
    matching_query,
    resolve_target,
)
from jmllm.joint.saliency.answers import AnswerWord as AnswerWord
from jmllm.joint.saliency.gradients import BOX_CHANNELS as BOX_CHANNELS
from jmllm.joint.saliency.gradients import (
    OBJECTNESS_CHANNEL,
    OwlHeadGradients,
    _f32,
    cosine_similarities,
    has_objectness,
    normalise_similarities,
)
from jmllm.joint.saliency.gradients import minmax as minmax
from jmllm.joint.saliency.maps import BOX_ROUNDINGS, CLASS_QUERY_MODES, _check_choice, box_pixels
from jmllm.joint.saliency.maps import WEIGHTINGS as WEIGHTINGS
from jmllm.joint.saliency.maps import paint_boxes as paint_boxes
from jmllm.joint.saliency.maps import patch_grid_map as patch_grid_map
from jmllm.joint.saliency.maps import patch_weights as patch_weights
from jmllm.joint.saliency.results import AnswerExplanation, GAResult

# ---------------------------------------------------------------------------------------------
# The attribution object
# ---------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """What one (image, queries) pair needs for any number of tokens."""

    t: torch.Tensor  # (1, 1 + N, D)
    image_size: tuple[int, int]
    queries: list[str]
    heads: OwlHeadGradients
    boxes: torch.Tensor
    boxes_xyxy: np.ndarray
    class_scores: torch.Tensor
    norms: torch.Tensor | None = None


class GradientAlignment:
    """GA saliency on a :class:`~jmllm.joint.JointModel` (captum-style: model in, then
    :meth:`attribute`).

    Args:
        model: a ``JointModel``.
        chunk_size: patches per batch of the norm computation (memory bound).
        progress: show a progress bar for the norm computation.
        box_rounding: box corners to pixels, ``"truncate"`` (the authors') or ``"outward"``.
        class_query: with several queries, the ``class`` map's channel: ``"matching"`` (the
            default: the query naming the object the explained word refers to, the head noun
            of its noun phrase, see :func:`matching_query`; the maximum over the queries when
            none does), ``"first"`` (the letter of the authors' scripts, written for one query:
            the object itself), ``"max"``, or ``"objectness"`` (OWLv2 only: its objectness
            channel, independent of the queries). With one query the first three are that
            query.
        cache_size: how many (image, queries) pairs keep their OWL side (gradient norms, boxes,
            scores), least recently used dropped first. 1 suits a script that explains one image
            at a time; an interactive session that goes back and forth between images or query
            sets keeps more.

    Example:
        >>> ga = GradientAlignment(model)  # doctest: +SKIP
        >>> res = ga.attribute("bird.jpg", "What's in the image?", target="bird",
        ...                    queries=["bird"], answer="The image shows a bird")  # doctest: +SKIP
        >>> res.maps["class"].shape  # (H, W) of the original image  # doctest: +SKIP
        (375, 500)
    """

    def __init__(
        self,
        model: Any,
        chunk_size: int | None = None,
        progress: bool = False,
        *,
        box_rounding: str = "truncate",
        class_query: str = "matching",
        cache_size: int = 1,
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size: must be at least 1, got {cache_size}")
        self.model = model
        self.chunk_size = chunk_size
        self.progress = progress
        self.box_rounding = _check_choice("box_rounding", box_rounding, BOX_ROUNDINGS)
        self.class_query = _check_choice("class_query", class_query, CLASS_QUERY_MODES)
        if class_query == OBJECTNESS_CHANNEL and not has_objectness(model.owl):
            raise GAError(
                "class_query: 'objectness' needs OWLv2's objectness head; J's OWL-ViT has none"
            )
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Any, ...], _Prepared] = OrderedDict()

    # -- inputs ---------------------------------------------------------------------------------

    def embedding(
        self, image_or_t: Any, preprocessing: str = INTERACTIVE_PREPROCESSING
    ) -> tuple[torch.Tensor, tuple[int, int], Any]:
        """``t`` (1, 1 + N, D), the map size and the JointEmbedding (None for a bare tensor).

        A bare float tensor is taken as ``t`` itself; its maps are drawn at OWL-ViT's input size.
        An image is embedded with the named ``preprocessing`` (:meth:`JointModel.embed`).
        """
        model = self.model
        if isinstance(image_or_t, torch.Tensor) and image_or_t.is_floating_point():
            t = image_or_t if image_or_t.dim() == 3 else image_or_t.unsqueeze(0)
            size = int(model.owl.config.vision_config.image_size)
            self._check_t(t)
            return t.detach().to(model.device), (size, size), None
        emb = (
            image_or_t
            if hasattr(image_or_t, "image_sizes")
            else model.embed(image_or_t, preprocessing=preprocessing)
        )
        if len(emb) != 1:
            raise GAError(f"image: GA explains one image at a time, got a batch of {len(emb)}")
        self._check_t(emb.t)
        return emb.t.detach(), tuple(emb.image_sizes[0]), emb

    def _check_t(self, t: torch.Tensor) -> None:
        vision = self.model.owl.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        expected = (1, 1 + n, vision.hidden_size)
        if tuple(t.shape) != expected:
            raise GAError(f"t: expected shape {expected}, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise GAError("t: contains NaN or infinite values")

    def prepare(
        self,
        t: torch.Tensor,
        image_size: tuple[int, int],
        queries: Sequence[str],
        query_template: str,
    ) -> _Prepared:
        """OWL side of one (image, queries): heads, boxes, scores; norms computed lazily, once.

        ``query_template`` is the OWL-ViT query template (``"a photo of a {}"``)."""
        key = self._cache_key(t, image_size, queries, query_template)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        names = list(key[2])
        query_embeds = self.model.encode_queries(names, query_template)
        heads = OwlHeadGradients(self.model.owl, t.to(self.model.device), query_embeds)
        outputs = heads.outputs()
        Q = heads.num_queries
        boxes = torch.sigmoid(outputs[:, Q : Q + 4])
        if pads_to_square(self.model.owl):  # OWLv2: fractions of the padded square
            boxes = image_fraction_boxes(boxes, image_size)
        prepared = _Prepared(
            t=heads.t.unsqueeze(0) if heads.t.dim() == 2 else heads.t,
            image_size=image_size,
            queries=names,
            heads=heads,
            boxes=boxes,
            boxes_xyxy=box_pixels(boxes, image_size, self.box_rounding),
            class_scores=torch.sigmoid(outputs[:, : heads.num_queries]),
        )
        self._cache[key] = prepared
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return prepared

    def _cache_key(
        self,
        t: torch.Tensor,
        image_size: tuple[int, int],
        queries: Sequence[str],
        query_template: str,
    ) -> tuple[Any, ...]:
        names = self.model._check_queries(queries)
        digest = hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        return (digest, tuple(t.shape), tuple(names), query_template, tuple(image_size))

    def has_norms(
        self,
        image_or_t: Any,
        queries: Sequence[str],
        query_template: str | None = None,
    ) -> bool:
        """Whether the gradient norms of this (image, queries) are already cached, so that
        explaining a token costs one LLM backward and one JVP only.

        Args:
            image_or_t: as in :meth:`attribute` (an embedding or ``t``; an image is embedded).
            queries: the OWL-ViT queries.
            query_template: OWL-ViT query template (default J's ``"a photo of a {}"``).

        Example:
            >>> ga = GradientAlignment(model, cache_size=8)  # doctest: +SKIP
            >>> ga.has_norms(emb, ["cat"])  # doctest: +SKIP
            False
        """
        from jmllm.joint.model.joint import DEFAULT_QUERY_TEMPLATE

        t, size, _ = self.embedding(image_or_t)
        key = self._cache_key(t, size, queries, query_template or DEFAULT_QUERY_TEMPLATE)
        cached = self._cache.get(key)
        return cached is not None and cached.norms is not None

    def clear_cache(self) -> None:
        """Forget every cached (image, queries) OWL side (its norms, boxes and scores)."""
        self._cache.clear()

    def norms(self, prepared: _Prepared) -> torch.Tensor:
        """``‖g_{k,c}‖`` of a prepared (image, queries), computed on first use only."""
        if prepared.norms is None:
            prepared.norms = prepared.heads.gradient_norms(self.chunk_size, self.progress)
        return prepared.norms

    def answer(
        self,
        emb_or_t: Any,
        t: torch.Tensor,
        prompt: str,
        answer: Any,
        max_new_tokens: int,
        template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
        tokenization: str = INTERACTIVE_TOKENIZATION,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt ids (P,), answer ids (A,)): ``answer`` given (text or JointAnswer) or generated.

        The prompt is put in the conversation ``template`` and tokenised by the named
        ``tokenization``; a ``JointAnswer`` brings its own prompt ids (the template and
        tokenization it was generated with)."""
        model = self.model
        if answer is None:
            source = emb_or_t if emb_or_t is not None else _bare_embedding(t)
            generated = model.generate(
                source,
                prompt,
                max_new_tokens=max_new_tokens,
                template=template,
                tokenization=tokenization,
            )[0]
            return generated.prompt_ids, generated.token_ids
        if hasattr(answer, "token_ids") and hasattr(answer, "prompt_ids"):
            return answer.prompt_ids, answer.token_ids
        if not isinstance(answer, str):
            raise GAError(f"answer: expected text or a JointAnswer, got {type(answer).__name__}")
        prompt_ids = model.prompt_inputs(prompt, template, tokenization=tokenization)
        prompt_ids = prompt_ids["input_ids"][0].cpu()
        ids = model.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
        return prompt_ids, torch.tensor(ids, dtype=torch.long)

    # -- the token side -------------------------------------------------------------------------

    def llm_gradients(
        self,
        t: torch.Tensor,
        prompt_ids: torch.Tensor,
        answer_ids: torch.Tensor,
        positions: Sequence[Sequence[int]],
    ) -> list[torch.Tensor]:
        """``g_L`` for each group of answer positions (sum of those tokens' logits), from ONE
        teacher-forced forward over prompt + answer and one backward per group.

        Returns:
            one (1, 1 + N, D) float32 gradient per group.
        """
        model = self.model
        ids = torch.cat([prompt_ids.cpu(), answer_ids.cpu()]).unsqueeze(0).to(model.mllm_device)
        P = int(prompt_ids.numel())
        t_var = t.detach().clone().requires_grad_(True)
        grads = []
        with torch.enable_grad():
            # W may run in another dtype (e.g. bf16 on GPU): the cast is part of the graph
            w_dtype = next(model.alignment.parameters()).dtype
            logits = model.language_logits(t_var.to(w_dtype), ids)  # (1, L, V)
            groups: Iterable[tuple[int, Any]] = enumerate(positions)
            if self.progress and len(positions) > 1:
                from tqdm.auto import tqdm

                # one backward per answer token: the long part of explaining a whole answer
                groups = tqdm(groups, total=len(positions), desc="GA per token", unit="token")
            for g, group in groups:
                # the logit of answer token i is predicted at sequence position P + i − 1
                rows = torch.tensor([P + i - 1 for i in group], device=logits.device)
                cols = answer_ids[list(group)].to(logits.device)
                score = logits[0, rows, cols].float().sum()
                (grad,) = torch.autograd.grad(score, t_var, retain_graph=g < len(positions) - 1)
                grads.append(grad.detach().float())
        return grads

    def _result(
        self,
        prepared: _Prepared,
        g_llm: torch.Tensor,
        numerators: torch.Tensor,
        tokens: list[AnswerToken],
        target: str,
        answer_text: str,
    ) -> GAResult:
        norms = self.norms(prepared)
        g_norm = float(torch.linalg.vector_norm(g_llm))
        sims = cosine_similarities(numerators, norms, g_norm)
        Q = len(prepared.queries)
        normalised = normalise_similarities(sims, Q)
        per_patch = torch.linalg.vector_norm(g_llm.reshape(g_llm.shape[-2:])[1:], dim=-1)
        # Results leave the model in float32 whatever its dtype (bf16 on a GPU): numpy, the
        # maps and the reports cannot take bfloat16.
        return GAResult(
            tokens=tokens,
            target=target,
            queries=list(prepared.queries),
            similarities=_f32(sims),
            normalised=_f32(normalised),
            numerators=_f32(numerators),
            norms=_f32(norms),
            g_llm_norm=g_norm,
            boxes=_f32(prepared.boxes),
            boxes_xyxy=prepared.boxes_xyxy,
            class_scores=_f32(prepared.class_scores),
            patch_gradient_norms=_f32(per_patch),
            image_size=prepared.image_size,
            answer_text=answer_text,
            class_query=self.class_query,
            box_rounding=self.box_rounding,
            pads_to_square=pads_to_square(self.model.owl),
            class_match=matching_query(
                answer_text, tokens[0].start, tokens[-1].end, prepared.queries
            )
            if tokens
            else QueryMatch(None if Q > 1 else 0, "no answer word"),
        )

    def attribute(
        self,
        image_or_t: Any,
        prompt: str,
        target: int | str | Sequence[int],
        queries: Sequence[str],
        answer: Any = None,
        max_new_tokens: int = 64,
        template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
        occurrence: int = 0,
        query_template: str | None = None,
        tokenization: str = INTERACTIVE_TOKENIZATION,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
    ) -> GAResult:
        """Explain one token (or word) of J's answer with Gradient Alignment.

        Args:
            image_or_t: an image (path, PIL, (3, H, W) uint8), a ``JointEmbedding``, or ``t``
                itself ((1, 1 + N, D) float; maps then drawn at OWL-ViT's input size).
            prompt: the question.
            target: an answer position (0-based, negative counts from the end) or a word of the
                answer (case-insensitive). A word of several tokens is explained through the
                **sum of the logits of all its tokens**, each at its own position.
                A list of positions is explained the same way (the sum of their logits), e.g.
                the tokens of a multi-word object name.
            queries: OWL-ViT text queries (class channels), e.g. ``["bird"]``.
            answer: the answer to explain: text (teacher-forced after the prompt), a
                ``JointAnswer``, or None to generate one greedily.
            max_new_tokens: generation limit when ``answer`` is None.
            template: the conversation template the prompt is put in, ``"llava-1.5"`` (default,
                as :meth:`JointModel.generate`) or ``"paper"`` (the authors' scripts); ignored
                for a ``JointAnswer``, which brings its prompt ids.
            occurrence: which occurrence of a repeated word (0 = first).
            query_template: OWL-ViT query template (default J's ``"a photo of a {}"``).
            tokenization: how the prompt is tokenised, ``"checkpoint"`` (default, as
                :meth:`JointModel.generate`) or ``"legacy"`` (the authors' ids); ignored for a
                ``JointAnswer``.
            preprocessing: how an image is embedded, ``"exif"`` (default) or ``"authors"``;
                ignored for a ``JointEmbedding`` or ``t``.

        Returns:
            :class:`GAResult`; its ``meta`` records the template, tokenization and
            preprocessing used.

        Raises:
            GAError: empty answer, or a target not in the answer (the message lists its words).

        Example:
            >>> res = GradientAlignment(model).attribute(img, "What's in the image?", "cat",
            ...                                          ["cat"])  # doctest: +SKIP
        """
        from jmllm.joint.model.joint import DEFAULT_QUERY_TEMPLATE

        get_template(template)  # an unknown name fails before any work
        query_template = query_template or DEFAULT_QUERY_TEMPLATE
        t, size, emb = self.embedding(image_or_t, preprocessing)
        prompt_ids, answer_ids = self.answer(
            emb, t, prompt, answer, max_new_tokens, template, tokenization
        )
        text, tokens = answer_tokens(self.model.tokenizer, answer_ids)
        if not tokens:
            raise GAError("answer: is empty; there is no token to explain")
        positions, label = resolve_target(target, text, tokens, occurrence)
        prepared = self.prepare(t, size, queries, query_template)
        (g_llm,) = self.llm_gradients(t, prompt_ids, answer_ids, [positions])
        numerators = prepared.heads.numerators(g_llm)
        result = self._result(
            prepared, g_llm, numerators, [tokens[i] for i in positions], label, text
        )
        result.meta.update(_inputs_meta(answer, template, tokenization, emb))
        return result

    def explain_answer(
        self,
        image_or_t: Any,
        prompt: str,
        queries: Sequence[str],
        answer: Any = None,
        max_new_tokens: int = 64,
        template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
        query_template: str | None = None,
        tokenization: str = INTERACTIVE_TOKENIZATION,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
    ) -> AnswerExplanation:
        """A GA result for every answer token and every word, norms computed once.

        Cost: one generation (unless ``answer`` is given), one norm computation for the
        (image, queries), one teacher-forced LLM forward, then per token one LLM backward and
        one JVP. A word's result sums its tokens' gradients and numerators (GA is linear in
        ``g_L``), so words cost nothing more.

        Args:
            image_or_t, prompt, queries, answer, max_new_tokens, template, query_template,
                tokenization, preprocessing: as in :meth:`attribute`.

        Returns:
            :class:`AnswerExplanation`.

        Example:
            >>> exp = GradientAlignment(model).explain_answer(img, "What's in the image?",
            ...                                               ["cat", "dog"])  # doctest: +SKIP
            >>> [w.text for w in exp.words]  # doctest: +SKIP
        """
        from jmllm.joint.model.joint import DEFAULT_QUERY_TEMPLATE

        get_template(template)
        query_template = query_template or DEFAULT_QUERY_TEMPLATE
        t, size, emb = self.embedding(image_or_t, preprocessing)
        prompt_ids, answer_ids = self.answer(
            emb, t, prompt, answer, max_new_tokens, template, tokenization
        )
        text, tokens = answer_tokens(self.model.tokenizer, answer_ids)
        if not tokens:
            raise GAError("answer: is empty; there is no token to explain")
        prepared = self.prepare(t, size, queries, query_template)
        grads = self.llm_gradients(t, prompt_ids, answer_ids, [[tok.position] for tok in tokens])
        numerators = [prepared.heads.numerators(g) for g in grads]
        token_results = [
            self._result(prepared, g, num, [tok], f"#{tok.position}", text)
            for g, num, tok in zip(grads, numerators, tokens, strict=True)
        ]
        words = answer_words(text, tokens)
        word_results = []
        for word in words:
            g = torch.stack([grads[i] for i in word.positions]).sum(0)
            num = torch.stack([numerators[i] for i in word.positions]).sum(0)
            word_results.append(
                self._result(prepared, g, num, [tokens[i] for i in word.positions], word.text, text)
            )
        image = emb.pil_image(0) if emb is not None and emb.images else None
        meta = _inputs_meta(answer, template, tokenization, emb)
        for result in (*token_results, *word_results):
            result.meta.update(meta)
        return AnswerExplanation(
            prompt=prompt,
            answer_text=text,
            tokens=tokens,
            words=words,
            token_results=token_results,
            word_results=word_results,
            queries=list(prepared.queries),
            image=image,
            image_size=size,
            template=str(meta["template"]),
            tokenization=str(meta["tokenization"]),
            preprocessing=meta["preprocessing"],
        )


def _inputs_meta(
    answer: Any, template: str | ConversationTemplate, tokenization: str, emb: Any
) -> dict[str, str | None]:
    """How an explanation's inputs were read: the template and tokenization of its prompt (a
    ``JointAnswer``'s own when one was explained) and the preprocessing of its image."""
    explained = hasattr(answer, "token_ids") and isinstance(getattr(answer, "template", None), str)
    return {
        "template": _template_name(answer, template),
        "tokenization": str(answer.tokenization) if explained else tokenization,
        "preprocessing": getattr(emb, "preprocessing", None),
    }


def _bare_embedding(t: torch.Tensor) -> Any:
    from jmllm.joint.model.joint import JointEmbedding

    side = round((t.shape[1] - 1) ** 0.5)
    return JointEmbedding(t=t, image_sizes=[(side, side)])
