"""Asking J the audit's yes/no questions about one image: the fast path and the reference loop.

Efficient by construction (the authors re-embed the image for every class):

1. ``t`` once per image; OWL-ViT's scores for all of the image's classes from one call of the
   detection heads (a query's class logit does not depend on the other queries);
2. the prompts of all the image's questions share their beginning — BOS, the 576 image tokens,
   the template's opening and ``Is there a`` — up to the class name: that prefix runs through
   LLaVA once, and its KV cache (``transformers.DynamicCache``) is copied to every question;
3. the questions' remaining tokens (padded between prefix and suffix, positions counted over
   real tokens only) and their greedy answers run as one batch through ``generate``.

:func:`ask_one_by_one` is the straightforward loop with the authors' semantics (re-embed per
question, full prompt, greedy ``generate``): the tests prove the fast path equal to it, and the
benchmark (``benchmarks/hallucination_audit.py``) times both in the same run.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from jmllm.joint.audit.dataset import AuditError
from jmllm.joint.audit.questions import question_text
from jmllm.joint.audit.settings import AuditSettings
from jmllm.joint.chat.templates import (
    ConversationTemplate,
    PromptError,
    format_prompt,
    get_template,
)

DEFAULT_KV_CACHE_GIB = 8.0  # the KV cache a batch of questions may hold (its own prefix copies)


@dataclass
class AnsweredQuestion:
    """One question J answered, with OWL-ViT's score on the same ``t``.

    Attributes:
        class_name: the class asked about.
        answer: J's :class:`~jmllm.joint.JointAnswer` (prompt ids, answer ids, text).
        owl_score: OWL-ViT's maximum sigmoid score over the patches for the class (float32).
        first_token_logits: (V,) float32 logits of the first answer token, when asked for.
    """

    class_name: str
    answer: Any
    owl_score: float
    first_token_logits: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# The fast path
# ---------------------------------------------------------------------------------------------


def _cache_argument(llava: Any) -> str:
    """The KV-cache keyword of LLaVA's forward: ``cache`` (transformers ≥ 5.2x) or
    ``past_key_values`` (earlier 5.x, still accepted, deprecated)."""
    return "cache" if "cache" in inspect.signature(llava.forward).parameters else "past_key_values"


class YesNoAuditor:
    """Asks J the audit's yes/no questions about one embedding at a time, fast and exactly.

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        settings: the question, template, query template and token limit.
        classes: the vocabulary (its OWL-ViT query embeddings are computed once).
        batch_size: questions per batch of the language model; None (default): as many as
            ``kv_cache_gib`` of KV cache hold (every question of the batch holds a copy of the
            prefix's cache: about 0.33 GiB each for LLaVA-1.5-7b in bfloat16), the image's
            questions split into equal batches.
        kv_cache_gib: the KV-cache budget of one batch when ``batch_size`` is None.

    Example:
        >>> auditor = YesNoAuditor(model, AuditSettings(), ["cat", "dog"])  # doctest: +SKIP
        >>> emb = model.embed(["cat.jpg"])  # doctest: +SKIP
        >>> [(a.class_name, a.answer.text, round(a.owl_score, 2))
        ...  for a in auditor.ask(emb.t, ["cat", "dog"])]  # doctest: +SKIP
        [('cat', 'Yes', 0.41), ('dog', 'No', 0.02)]
    """

    def __init__(
        self,
        model: Any,
        settings: AuditSettings,
        classes: Sequence[str],
        batch_size: int | None = None,
        kv_cache_gib: float = DEFAULT_KV_CACHE_GIB,
    ) -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise AuditError(f"batch_size: must be a positive integer, got {batch_size!r}")
        if not math.isfinite(kv_cache_gib) or kv_cache_gib <= 0:
            raise AuditError(f"kv_cache_gib: must be a positive number, got {kv_cache_gib!r}")
        self.kv_cache_gib = kv_cache_gib
        self.model = model
        self.settings = settings
        self.batch_size = batch_size
        self.classes = list(dict.fromkeys(classes))
        self._index = {c: i for i, c in enumerate(self.classes)}
        try:
            self._queries = model.encode_queries(self.classes, settings.query_template)
        except PromptError as exc:
            raise AuditError(f"class vocabulary: {exc}") from None
        self._prompts: dict[str, tuple[torch.Tensor, str, str]] = {}
        self._prefix_length: int | None = None
        self._cache_key = _cache_argument(model.mllm)
        # the template J prompts with (another family than LLaVA-1.5 uses its own chat format)
        self._template: str | ConversationTemplate = model.conversation_template(settings.template)
        self._template_name = get_template(self._template).name

    # -- prompts ----------------------------------------------------------------------------

    def prompt(self, class_name: str) -> tuple[torch.Tensor, str]:
        """(ids (L,), question) of the question about ``class_name`` (cached)."""
        ids, question, _ = self._prompt(class_name)
        return ids, question

    def _prompt(self, class_name: str) -> tuple[torch.Tensor, str, str]:
        cached = self._prompts.get(class_name)
        if cached is None:
            s = self.settings
            question = question_text(class_name, s.question, s.articles)
            ids = self.model.prompt_inputs(question, self._template, tokenization=s.tokenization)[
                "input_ids"
            ][0].cpu()
            limit = self.model.max_positions
            if ids.numel() + s.max_new_tokens > limit:
                raise AuditError(
                    f"class {class_name!r}: {ids.numel()} prompt tokens + {s.max_new_tokens} new "
                    f"tokens exceed the MLLM's {limit} positions"
                )
            cached = (ids, question, format_prompt(question, self._template))
            self._prompts[class_name] = cached
        return cached

    def prefix_length(self) -> int:
        """Tokens every question of the vocabulary shares from the start (computed once): the
        prefix run once per image. Any subset of the vocabulary shares at least these."""
        if self._prefix_length is None:
            self._prefix_length = _shared_prefix_length([self.prompt(c)[0] for c in self.classes])
        return self._prefix_length

    def owl_scores(self, t: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
        """(Q,) float32: OWL-ViT's maximum score over the patches of ``t`` for each class."""
        rows = torch.tensor([self._class_index(c) for c in classes], device=self._queries.device)
        with torch.no_grad():
            logits, _ = self.model.detection_heads(t.to(self.model.device), self._queries[rows])
        return torch.sigmoid(logits[0].float()).amax(dim=0).cpu()  # (N, Q) → (Q,)

    def _class_index(self, class_name: str) -> int:
        if class_name not in self._index:
            raise AuditError(f"class {class_name!r}: not in the audit's vocabulary")
        return self._index[class_name]

    # -- asking -----------------------------------------------------------------------------

    @torch.no_grad()
    def ask(
        self, t: torch.Tensor, classes: Sequence[str], return_logits: bool = False
    ) -> list[AnsweredQuestion]:
        """J's answers to the questions about ``classes`` from one embedding.

        Args:
            t: (1, 1 + N, D) the image's embedding.
            classes: the classes to ask about (each once).
            return_logits: also keep each answer's first-token logits (for checks).

        Returns:
            One :class:`AnsweredQuestion` per class, in order.
        """
        if t.dim() != 3 or t.shape[0] != 1:
            raise AuditError(f"t: expected one embedding (1, 1 + N, D), got {tuple(t.shape)}")
        classes = list(classes)
        if not classes:
            return []
        if len(set(classes)) != len(classes):
            raise AuditError("classes: each class may be asked once per image")
        scores = self.owl_scores(t, classes)
        prompts = [self._prompt(c) for c in classes]
        rows = [ids for ids, _, _ in prompts]
        P = self.prefix_length()
        model = self.model
        image_token = model.family.image_token_id
        prefix = rows[0][:P]
        if int((prefix == image_token).sum()) != model.num_image_tokens:
            raise AuditError(
                "template: the image must come before the question (the shared prefix of the "
                "questions must hold every image token)"
            )
        device = model.mllm_device
        # the prefix once: BOS, image tokens W(t), the template's opening, "Is there a"
        prefix_ids = prefix.unsqueeze(0).to(device)
        embeds = model.merge_image_tokens(prefix_ids, model.image_tokens(t))
        from transformers import DynamicCache

        prefix_cache = DynamicCache(config=model.mllm.config)
        # the family's extra inputs (Qwen: M-RoPE of the image, kept for the cached steps)
        extra = model.family.prefill_inputs(prefix_ids, model.placeholders(prefix_ids))
        model.mllm(
            inputs_embeds=embeds,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_key: prefix_cache},
            **extra,
        )
        answered: list[AnsweredQuestion] = []
        size = self.rows_per_batch(len(classes), max(int(r.numel()) for r in rows))
        for start in range(0, len(classes), size):
            chunk = range(start, min(start + size, len(classes)))
            answers, logits = self._generate(prefix_cache, [rows[i] for i in chunk], P)
            for j, i in enumerate(chunk):
                answered.append(
                    AnsweredQuestion(
                        class_name=classes[i],
                        answer=model.decode_answer(
                            answers[j],
                            rows[i],
                            prompts[i][2],
                            template=self._template_name,
                            tokenization=self.settings.tokenization,
                        ),
                        owl_score=float(scores[i]),
                        first_token_logits=logits[j].float().cpu() if return_logits else None,
                    )
                )
        return answered

    def kv_bytes_per_question(self, prompt_tokens: int) -> int:
        """Bytes of KV cache one question holds at its longest (prompt + answer limit)."""
        tokens = prompt_tokens + self.settings.max_new_tokens
        return kv_cache_bytes(self.model.mllm.config.text_config, self.model.mllm.dtype, tokens)

    def rows_per_batch(self, questions: int, prompt_tokens: int) -> int:
        """Questions per batch: ``batch_size``, or the KV budget's share split evenly."""
        if self.batch_size is not None:
            return self.batch_size
        fit = int(self.kv_cache_gib * 2**30 // self.kv_bytes_per_question(prompt_tokens))
        batches = math.ceil(questions / max(1, fit))
        return math.ceil(questions / batches)

    def _generate(
        self, prefix_cache: Any, rows: list[torch.Tensor], P: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy answers of one batch of questions after a shared, cached prefix of P tokens.

        The batch is laid out ``[prefix | padding | suffix]``: the padding sits between the
        cached prefix and each question's own tokens, so every row ends at the same column and
        ``generate`` appends the answers there. The attention mask hides the padding and
        ``generate`` counts positions over the unmasked tokens (``cumsum(mask) - 1``), so each
        row sees exactly the positions and keys of its unpadded prompt.
        """
        model = self.model
        tokenizer = model.tokenizer
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        B = len(rows)
        S = max(int(r.numel()) - P for r in rows)
        input_ids = torch.full((B, P + S), pad, dtype=torch.long)  # (B, P + S)
        mask = torch.zeros((B, P + S), dtype=torch.long)
        for b, r in enumerate(rows):
            s = int(r.numel()) - P
            input_ids[b, :P], mask[b, :P] = r[:P], 1
            input_ids[b, P + S - s :], mask[b, P + S - s :] = r[P:], 1
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(B)  # (1, h, P, d) → (B, h, P, d) per layer
        device = model.mllm_device
        out = model.mllm.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=self.settings.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            **{self._cache_key: cache},
        )
        return out.sequences[:, P + S :].cpu(), out.logits[0]


def kv_cache_bytes(text_config: Any, dtype: torch.dtype, tokens: int) -> int:
    """Bytes of the keys and values a decoder caches for ``tokens`` tokens of one sequence.

    Example:
        >>> from jmllm.align.testing import llava_1_5_7b_config
        >>> text = llava_1_5_7b_config().text_config
        >>> kv_cache_bytes(text, torch.bfloat16, 640) / 2**30  # LLaVA-1.5-7b, 576 image tokens
        0.3125
    """
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads
    )
    element = torch.finfo(dtype).bits // 8
    return 2 * text_config.num_hidden_layers * heads * head_dim * tokens * element  # K and V


def _shared_prefix_length(rows: Sequence[torch.Tensor]) -> int:
    """Tokens shared by every row from the start, leaving each row at least one of its own
    (the last prompt token must run with the question to give the first answer logits)."""
    shortest = min(int(r.numel()) for r in rows)
    stacked = torch.stack([r[:shortest] for r in rows])  # (Q, shortest)
    same = (stacked == stacked[:1]).all(dim=0)  # (shortest,)
    differ = (~same).nonzero()
    P = int(differ[0]) if differ.numel() else shortest
    return min(P, shortest - 1)


def ask_one_by_one(
    model: Any,
    image: Any,
    classes: Sequence[str],
    settings: AuditSettings | None = None,
    return_logits: bool = False,
) -> list[AnsweredQuestion]:
    """The straightforward loop with the authors' semantics: for every class, embed the image
    again, generate the answer to the full prompt greedily, query OWL-ViT with that class
    alone. The reference the fast :class:`YesNoAuditor` is checked and timed against.

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        image: the image (anything :meth:`JointModel.embed` takes).
        classes: the classes to ask about.
        settings: the question and templates (default the authors').
        return_logits: also compute each answer's first-token logits (one plain forward).

    Returns:
        One :class:`AnsweredQuestion` per class.

    Example:
        >>> ask_one_by_one(model, "cat.jpg", ["cat"])[0].answer.text  # doctest: +SKIP
        'Yes'
    """
    s = settings or AuditSettings()
    out = []
    for class_name in classes:
        emb = model.embed([image], preprocessing=s.preprocessing)
        text = question_text(class_name, s.question, s.articles)
        answer = model.generate(
            emb,
            text,
            max_new_tokens=s.max_new_tokens,
            template=s.template,
            tokenization=s.tokenization,
        )[0]
        with torch.no_grad():
            logits, _ = model.detection_heads(
                emb.t, model.encode_queries([class_name], s.query_template)
            )
            score = float(torch.sigmoid(logits[0, :, 0].float()).max())
            first = None
            if return_logits:
                ids = model.prompt_inputs(text, s.template, tokenization=s.tokenization)
                ids = ids["input_ids"]
                first = model.language_logits(emb.t, ids)[0, -1].float().cpu()
        out.append(AnsweredQuestion(class_name, answer, score, first))
    return out


__all__ = [
    "DEFAULT_KV_CACHE_GIB",
    "AnsweredQuestion",
    "YesNoAuditor",
    "ask_one_by_one",
    "kv_cache_bytes",
]
