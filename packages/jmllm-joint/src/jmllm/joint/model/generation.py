"""J's language side: prompts in a conversation template, the MLLM's logits with W(t) as its
image tokens, generation and chat.

:class:`GenerationMixin` gives :class:`~jmllm.joint.model.joint.JointModel` its prompts
(:meth:`~GenerationMixin.prompt_inputs`, the template and tokenization it uses), the
differentiable :meth:`~GenerationMixin.language_logits`, and :meth:`~GenerationMixin.generate`
and :meth:`~GenerationMixin.chat`; the image tokens come from the embedding path
(:class:`~jmllm.joint.model.embedding.EmbeddingMixin`), which it builds on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING, get_preprocessing
from jmllm.joint.chat.templates import (
    INTERACTIVE_TEMPLATE,
    LLAVA_TEMPLATES,
    Conversation,
    ConversationTemplate,
    JointAnswer,
    PromptError,
    authors_reply,
    check_question,
    format_conversation,
    get_template,
)
from jmllm.joint.chat.tokenization import (
    INTERACTIVE_TOKENIZATION,
    TokenizationError,
    check_tokenization,
    llava_tokenizer,
)
from jmllm.joint.model.base import JointModelError, Vision
from jmllm.joint.model.embedding import EmbeddingMixin


class _FirstScores:
    """A logits processor that keeps the scores of the first generated token (B, V) and
    changes nothing: ``generate``'s own first-step logits, without keeping every step's."""

    def __init__(self) -> None:
        self.scores: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.scores is None:
            self.scores = scores.detach().float().cpu()  # (B, V)
        return scores


class GenerationMixin(EmbeddingMixin):
    """Prompts, the MLLM's logits and generation for J, on image tokens from the embedding
    path."""

    # ------------------------------------------------------------------ prompts
    def conversation_template(
        self, template: str | ConversationTemplate = INTERACTIVE_TEMPLATE
    ) -> ConversationTemplate:
        """The conversation template J prompts with for ``template``: itself, except that a J
        of another family than LLaVA-1.5 asked for one of LLaVA-1.5's formats (``llava-1.5``,
        ``paper``, the defaults) uses its family's chat format.

        Raises:
            PromptError: an unknown template name (the message lists the known ones).

        Example:
            >>> model.conversation_template("paper").name  # a Qwen2-VL J  # doctest: +SKIP
            'qwen2-vl'
        """
        form = get_template(template)
        family = self.family
        if family is not None and family.model_type != "llava" and form.name in LLAVA_TEMPLATES:
            return get_template(family.template)
        return form

    def input_record(
        self,
        template: str | ConversationTemplate | None = None,
        tokenization: str | None = None,
        preprocessing: str | None = None,
    ) -> dict[str, str | None]:
        """How J read its inputs, for a report: the conversation template, the tokenization,
        the preprocessing and the weights' dtype (None for what the run did not use).

        Example:
            >>> model.input_record("paper", "legacy", "authors")  # doctest: +SKIP
            {'template': 'paper', 'tokenization': 'legacy', 'preprocessing': 'authors', 'dtype': 'float32'}
        """
        return {
            "template": self.conversation_template(template).name if template is not None else None,
            "tokenization": self.effective_tokenization(tokenization) if tokenization else None,
            "preprocessing": get_preprocessing(preprocessing).name if preprocessing else None,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def effective_tokenization(self, tokenization: str = INTERACTIVE_TOKENIZATION) -> str:
        """The tokenization J prompts with for ``tokenization``: itself, except that ``legacy``
        (LLaVA-1.5's ids as the authors had them) is ``checkpoint`` for a J of another family,
        as :meth:`conversation_template` gives such a J its own chat format.

        Example:
            >>> model.effective_tokenization("legacy")  # a Qwen2-VL J  # doctest: +SKIP
            'checkpoint'
        """
        name = check_tokenization(tokenization)
        family = self.family
        if name == "legacy" and family is not None and family.model_type != "llava":
            return "checkpoint"
        return name

    def llava_tokenizer(self, tokenization: str = INTERACTIVE_TOKENIZATION) -> Any:
        """LLaVA's tokenizer under a named tokenization (:mod:`jmllm.joint.chat.tokenization`):
        ``"checkpoint"`` (as loaded) or ``"legacy"`` (the authors' ids; a copy, made once).

        Raises:
            JointModelError: an unknown name, or ``legacy`` for a tokenizer that has none.
        """
        if self.tokenizer is None:
            raise JointModelError("tokenizer: J was built without the MLLM's tokenizer")
        try:
            tokenization = self.effective_tokenization(tokenization)
        except TokenizationError as exc:
            raise JointModelError(str(exc)) from None
        cached = self._tokenizers.get(tokenization)
        if cached is None:
            try:
                cached = llava_tokenizer(self.tokenizer, tokenization)
            except TokenizationError as exc:
                raise JointModelError(str(exc)) from None
            cached.padding_side = "left"
            self._tokenizers[tokenization] = cached
        return cached

    @property
    def max_positions(self) -> int:
        """The MLLM's language model positions (prompt + answer limit)."""
        return int(self._language().config.text_config.max_position_embeddings)

    def prompt_inputs(
        self,
        prompts: str | Conversation | Sequence[str | Conversation],
        template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
        tokenization: str = INTERACTIVE_TOKENIZATION,
    ) -> dict[str, torch.Tensor]:
        """Token ids of prompts in a conversation template, left-padded, ``<image>`` expanded.

        A string is one question (``USER: <image>\\n{question} ASSISTANT:`` with the default
        ``llava-1.5`` template, ``<image>\\nUSER: {question}\\nASSISTANT:`` with ``paper``); a
        :class:`~jmllm.joint.chat.Conversation` gives the multi-turn form. Another family than
        LLaVA-1.5 uses its own chat format (:meth:`conversation_template`) and its own image
        text (Qwen: ``<|vision_start|>``, the image pads, ``<|vision_end|>``).

        Args:
            prompts: one prompt or conversation, or a list of them.
            template: ``"llava-1.5"`` (default) or ``"paper"`` (see :mod:`jmllm.joint.chat`),
                or a family's chat format by name.
            tokenization: ``"checkpoint"`` (default: the tokenizer as loaded) or ``"legacy"``
                (the authors' ids: ``▁`` after ``<image>``; :mod:`jmllm.joint.chat.tokenization`).

        Returns:
            ``{"input_ids": (B, L), "attention_mask": (B, L)}`` on the MLLM's input device.

        Raises:
            PromptError: an empty prompt, or one containing ``<image>`` itself.

        Example:
            >>> model.prompt_inputs(["What's in the image?"])["input_ids"].shape  # doctest: +SKIP
            torch.Size([1, 593])
        """
        family = self._family()
        texts = self._prompt_texts(prompts, template)
        tokenizer = self.llava_tokenizer(tokenization)
        image_text = family.image_text(tokenizer)
        expanded = [text.replace("<image>", image_text, 1) for text in texts]
        tokenizer.padding_side = "left"
        batch = tokenizer(expanded, padding=True, return_tensors="pt")
        return {
            "input_ids": batch["input_ids"].to(self.mllm_device),
            "attention_mask": batch["attention_mask"].to(self.mllm_device),
        }

    def _prompt_texts(
        self, prompts: Any, template: str | ConversationTemplate = INTERACTIVE_TEMPLATE
    ) -> list[str]:
        template = self.conversation_template(template)  # an unknown name fails here
        if isinstance(prompts, (str, Conversation)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise PromptError("prompts: expected a non-empty list of prompts or conversations")
        texts = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, Conversation):
                if not prompt.pending:
                    raise PromptError(f"conversation {i}: has no pending question")
                texts.append(format_conversation(prompt, template=template))
            else:
                question = check_question(prompt, f"prompt {i}")
                texts.append(format_conversation(Conversation().ask(question), template=template))
        return texts

    def merge_image_tokens(
        self, input_ids: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """The MLLM's input embeddings with the image placeholders replaced by ``image_tokens``.

        The placeholders are the first N image-token ids of each row (the prompt's). An
        image-token id after them — one the model generated in an answer, which ``generate``
        fed back through the token embedding — keeps its token embedding, so a teacher-forced
        forward over prompt + answer reproduces the generation's logits.

        Args:
            input_ids: (B, L) with at least N image-token ids per row, the prompt's N first.
            image_tokens: (B, N, D_llm), e.g. :meth:`image_tokens` of ``t``.

        Returns:
            (B, L, D_llm) ``inputs_embeds`` for the MLLM's forward or ``generate``;
            differentiable in ``image_tokens``.

        Example:
            >>> ids = model.prompt_inputs("Hi?")["input_ids"]  # doctest: +SKIP
            >>> model.merge_image_tokens(ids, model.image_tokens(emb.t)).shape  # doctest: +SKIP
            torch.Size([1, 590, 4096])
        """
        embed = self._language().get_input_embeddings()
        inputs_embeds = embed(input_ids)  # (B, L, D_llm)
        B, N = image_tokens.shape[:2]
        if input_ids.shape[0] != B:
            raise JointModelError(f"prompts: {input_ids.shape[0]} rows for {B} images")
        mask = self.placeholders(input_ids, N)
        image_tokens = image_tokens.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_tokens)

    def placeholders(self, input_ids: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """(B, L) bool: the image placeholders of ``input_ids``, the first ``num_tokens``
        (default :attr:`num_image_tokens`) image-token ids of each row.

        Raises:
            JointModelError: a row holds fewer image-token ids.
        """
        N = self.num_image_tokens if num_tokens is None else num_tokens
        mask = input_ids == self._family().image_token_id  # (B, L)
        counts = mask.sum(-1)
        checkable = input_ids.device.type != "meta"  # meta tensors (size checks) hold no ids
        if checkable and bool((counts < N).any()):
            raise JointModelError(
                f"prompts: {counts.tolist()} image tokens per row for images of {N} tokens"
            )
        return mask & (mask.cumsum(-1) <= N)  # the placeholders: the first N per row

    def logits_from_image_tokens(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The MLLM's logits (B, L, V) for ``input_ids`` with its image tokens replaced; the
        family adds its extra inputs (positions under left padding; Qwen's M-RoPE)."""
        inputs_embeds = self.merge_image_tokens(input_ids, image_tokens)
        placeholders = self.placeholders(input_ids, image_tokens.shape[1])
        extra = self._family().forward_inputs(input_ids, attention_mask, placeholders)
        out = self.mllm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **extra
        )
        return out.logits

    def language_logits(
        self,
        t: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """J's language-model logits (B, L, V) for ``input_ids``, differentiable in ``t``.

        Args:
            t: (B, 1 + N, D_owl) embedding.
            input_ids: (B, L) ids from :meth:`prompt_inputs` (optionally with answer tokens
                appended), with N image tokens per row.
            attention_mask: (B, L), 0 on left padding.

        Example:
            >>> ids = model.prompt_inputs(["What's in the image?"])  # doctest: +SKIP
            >>> model.language_logits(emb.t, **ids).shape  # doctest: +SKIP
            torch.Size([1, 593, 32064])
        """
        return self.logits_from_image_tokens(self.image_tokens(t), input_ids, attention_mask)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        emb_or_images: Any,
        prompts: str | Conversation | Sequence[str | Conversation],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        vision: Vision = "joint",
        template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
        tokenization: str = INTERACTIVE_TOKENIZATION,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
        first_token_logits: bool = False,
    ) -> list[JointAnswer]:
        """Answers for a batch of (image, prompt) pairs, with the KV cache.

        The pairs run as one batch: prompts left-padded, positions counted over real tokens,
        one ``generate``; greedy answers are those of the pairs asked one at a time (tested).

        Args:
            emb_or_images: a :class:`JointEmbedding` or images for :meth:`embed`.
            prompts: one per image (a single prompt is used for every image; a single image is
                used for every prompt); strings or :class:`~jmllm.joint.chat.Conversation`.
            max_new_tokens: answer length limit.
            do_sample: sample (with ``temperature`` and ``top_p``) instead of greedy decoding.
            seed: seeds sampling without touching the global random state.
            vision: ``"joint"`` feeds W(t); ``"llava"`` (or ``"stock"``) feeds the MLLM's own
                vision tower and projector on the same (squashed) images, for side-by-side
                comparison.
            template: conversation template, ``"llava-1.5"`` (default) or ``"paper"``; another
                family than LLaVA-1.5 uses its own chat format for these
                (:meth:`conversation_template`).
            tokenization: how the prompts are tokenised, ``"checkpoint"`` (default) or
                ``"legacy"`` (the authors' ids; see :meth:`prompt_inputs`).
            preprocessing: how images (not an embedding) are embedded, ``"exif"`` (default) or
                ``"authors"`` (see :meth:`embed`).
            first_token_logits: also keep each answer's first-token logits, (V,) float32 on the
                CPU, in :attr:`JointAnswer.first_logits` (as ``generate`` scores them: after
                the generation config's logits processors, before sampling).

        Returns:
            One :class:`JointAnswer` per pair.

        Example:
            >>> answers = model.generate(emb, "What's the content of the image?")  # doctest: +SKIP
            >>> stock = model.generate(emb, "What's the content of the image?", vision="llava")  # doctest: +SKIP
        """
        family = self._family()
        if vision not in ("joint", "llava", "stock"):
            raise JointModelError(f"vision: {vision!r} is not 'joint', 'llava' or 'stock'")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise JointModelError(
                f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}"
            )
        emb = self._as_embedding(emb_or_images, preprocessing)
        texts_in = [prompts] if isinstance(prompts, (str, Conversation)) else list(prompts)
        if len(texts_in) == 1 and len(emb) > 1:
            texts_in = texts_in * len(emb)
        if len(emb) == 1 and len(texts_in) > 1:
            emb = emb.select([0] * len(texts_in))
        if len(texts_in) != len(emb):
            raise JointModelError(f"prompts: {len(texts_in)} prompts for {len(emb)} images")
        inputs = self.prompt_inputs(texts_in, template, tokenization)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        limit = self.max_positions
        if input_ids.shape[1] + max_new_tokens > limit:
            raise PromptError(
                f"prompts: {input_ids.shape[1]} prompt tokens + {max_new_tokens} new tokens exceed "
                f"the MLLM's {limit} positions"
            )
        with torch.no_grad():
            if vision == "joint":
                image_tokens = self.image_tokens(emb.t)
            else:
                image_tokens = self.stock_image_tokens(emb)
            inputs_embeds = self.merge_image_tokens(input_ids, image_tokens)
            eos = self.tokenizer.eos_token_id
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
            kwargs: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "do_sample": do_sample,
                "eos_token_id": eos,
                "pad_token_id": pad,
                "use_cache": True,
            }
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            placeholders = self.placeholders(input_ids, image_tokens.shape[1])
            kwargs.update(family.generate_inputs(input_ids, attention_mask, placeholders))
            first = _FirstScores()
            if first_token_logits:
                from transformers import LogitsProcessorList

                kwargs["logits_processor"] = LogitsProcessorList([first])
            with torch.random.fork_rng(devices=self._cuda_devices(), enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                sequences = self.mllm.generate(
                    inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
                )
            if family.generate_with_ids:  # the prompt's ids come back first
                sequences = sequences[:, input_ids.shape[1] :]
        texts = self._prompt_texts(texts_in, template)
        answers = [
            self.decode_answer(
                sequences[row],
                input_ids[row][attention_mask[row].bool()],
                texts[row],
                vision,
                self.conversation_template(template).name,
                self.effective_tokenization(tokenization),
            )
            for row in range(sequences.shape[0])
        ]
        if first.scores is not None:
            for row, answer in enumerate(answers):
                answer.first_logits = first.scores[row]
        return answers

    def decode_answer(
        self,
        new_ids: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt: str,
        vision: str = "joint",
        template: str = INTERACTIVE_TEMPLATE,
        tokenization: str = INTERACTIVE_TOKENIZATION,
    ) -> JointAnswer:
        """The :class:`JointAnswer` of generated ids: cut at the first end-of-sequence token
        (anything after it is padding), decoded without special tokens and stripped; its
        ``reply`` is the answer as the authors' scripts read it (decoded with the prompt,
        :func:`~jmllm.joint.chat.authors_reply`).

        Args:
            new_ids: (T,) the generated ids, answer only.
            prompt_ids: (P,) the prompt's ids, image tokens expanded, no padding.
            prompt: the prompt text.
            vision: ``"joint"``, ``"llava"`` or ``"stock"``.
            template: the name of the conversation template the prompt was put in.
            tokenization: the name of the tokenization the prompt was tokenised with.

        Example:
            >>> model.decode_answer(torch.tensor([7, 2, 0]), ids, "Hi?").token_ids  # doctest: +SKIP
            tensor([7])
        """
        new = new_ids.cpu()
        finished = False
        stop = (new == self.tokenizer.eos_token_id).nonzero()
        if stop.numel():
            new, finished = new[: int(stop[0])], True
        prompt_ids = prompt_ids.cpu()
        # as the authors' scripts decode: special tokens skipped, spaces not cleaned up; the
        # image placeholders (special, skipped anyway) are dropped first: 576 fewer to decode
        raw = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        text_ids = prompt_ids[prompt_ids != self.llava.config.image_token_id]
        reply = authors_reply(
            self.tokenizer.decode(text_ids, **raw),
            self.tokenizer.decode(torch.cat([text_ids, new]), **raw),
        )
        return JointAnswer(
            text=self.tokenizer.decode(new, skip_special_tokens=True).strip(),
            token_ids=new,
            prompt_ids=prompt_ids,
            prompt=prompt,
            finished=finished,
            vision=vision,
            template=template,
            tokenization=tokenization,
            reply=reply,
        )

    def _cuda_devices(self) -> list[int]:
        devices = {p.device.index for p in self.mllm.parameters() if p.device.type == "cuda"}
        return sorted(d for d in devices if d is not None)

    def chat(
        self,
        emb_or_image: Any,
        questions: str | Sequence[str],
        history: Conversation | None = None,
        **generate_kwargs: Any,
    ) -> Conversation:
        """Multi-turn chat about one image: answer ``questions`` in order, each with the history.

        Args:
            emb_or_image: one image or a one-image :class:`JointEmbedding`.
            questions: the next question, or several scripted turns.
            history: a previous :class:`~jmllm.joint.chat.Conversation` to continue.
            **generate_kwargs: passed to :meth:`generate` (``max_new_tokens``, ``vision``, …).

        Returns:
            The conversation with the new turns answered; each turn's ``result`` holds its
            :class:`JointAnswer`.

        Example:
            >>> conv = model.chat(emb, ["What's in the image?", "What colour is it?"])  # doctest: +SKIP
            >>> [turn.answer for turn in conv.turns]  # doctest: +SKIP
        """
        preprocessing = generate_kwargs.get("preprocessing", INTERACTIVE_PREPROCESSING)
        emb = self._as_embedding(emb_or_image, preprocessing)
        if len(emb) != 1:
            raise JointModelError(f"chat: one image at a time, got {len(emb)}")
        conversation = history or Conversation()
        for question in [questions] if isinstance(questions, str) else list(questions):
            conversation = conversation.ask(question)
            answer = self.generate(emb, [conversation], **generate_kwargs)[0]
            conversation = conversation.answered(answer.text, answer)
        return conversation
