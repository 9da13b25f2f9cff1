"""The hallucination audit at dataset scale: the authors' yes/no protocol on J (DESIGN §1.4).

For every image of a COCO-format dataset and every class of its question plan
(:mod:`jmllm.joint.audit.data`: all present and all absent classes, or POPE's sampling), J is
asked ``Is there a {class} in the image? Only answer with 'yes' or 'no'.`` in the ``paper``
template with the authors' token ids (``legacy`` tokenization) on the authors' pixels
(``authors`` preprocessing), and OWL-ViT's maximum score for the bare class name is read from
the **same** embedding ``t``. A "yes" to an absent class whose OWL-ViT score is high started in perception;
one with a low score started in the language model.

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

Scale: :func:`run_audit` appends one JSON line per finished image to ``results.jsonl``; a rerun
skips finished images (a kill loses at most the image in progress); under ``accelerate launch``
the processes split the remaining images and append to the same file.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from jmllm.align.files import (
    append_jsonl,
    atomic_write_text,
    folder_lock,
    read_jsonl,
    refuse_link,
)
from jmllm.align.options import check_template
from jmllm.align.preprocessing import PAPER_PREPROCESSING, get_preprocessing
from jmllm.joint.audit.data import (
    ARTICLES,
    AUTHORS_QUESTION,
    SAMPLINGS,
    AuditDataset,
    AuditError,
    AuditImage,
    QuestionPlan,
    plan_questions,
    question_text,
)
from jmllm.joint.chat.templates import (
    PAPER_TEMPLATE,
    ConversationTemplate,
    PromptError,
    format_prompt,
    get_template,
)
from jmllm.joint.chat.tokenization import PAPER_TOKENIZATION, TokenizationError, check_tokenization

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SETTINGS_FILE = "audit.json"
LOCK_FILE = ".jmllm-audit.lock"  # held by the run writing the folder (jmllm.align.files)
LOCK_OWNER = "jmllm-joint hallucination-audit"
AUTHORS_QUERY_TEMPLATE = "{}"  # the authors query OWL-ViT with the bare class name
PARSE_RULES = ("authors", "strict", "pope")
DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_KV_CACHE_GIB = 8.0  # the KV cache a batch of questions may hold (its own prefix copies)


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------

_STRICT = re.compile(r"(yes|no)[.!]?", re.IGNORECASE)


def parse_answer(text: str | None, finished: bool = True, rule: str = "authors") -> str:
    """J's answer as ``"yes"``, ``"no"`` or ``"other"`` — counted, never guessed (except by
    the ``pope`` rule, which is POPE's own and never says ``"other"``).

    Rules:
        ``authors`` (default): ``text`` is exactly ``Yes`` or ``No``, nothing stripped — give
        it the raw reply (:attr:`AuditRecord.reply`, the text after ``ASSISTANT: `` as the
        authors' notebook splits it off and compares it with these two strings); so
        ``" Yes"`` and ``"No\\n"`` are ``"other"``, and so is None (no reply).
        ``strict``: the whole answer is yes or no in any case, optionally with a final ``.`` or
        ``!``.
        ``pope``: POPE's evaluation script: in the first sentence (up to the first ``.``, commas
        removed), a word ``no``, ``No`` or ``not`` means no, anything else yes.

    An answer cut by the token limit (``finished`` False) is ``"other"`` under ``authors`` and
    ``strict``: nobody knows how it would have gone on.

    Example:
        >>> parse_answer("Yes"), parse_answer("yes."), parse_answer("yes.", rule="strict")
        ('yes', 'other', 'yes')
        >>> parse_answer("No\\n"), parse_answer("No\\n", rule="strict")
        ('other', 'no')
        >>> parse_answer("There is no cat.", rule="pope")
        'no'
    """
    if rule not in PARSE_RULES:
        raise AuditError(f"parse rule: {rule!r} is not one of {', '.join(PARSE_RULES)}")
    if rule == "pope":
        if text is None:
            return "yes"  # POPE's rule: no "no" in it
        sentence = text.split(".")[0] if "." in text else text
        words = sentence.replace(",", "").split(" ")
        return "no" if {"No", "no", "not"} & set(words) else "yes"
    if text is None or not finished:
        return "other"
    if rule == "authors":
        return {"Yes": "yes", "No": "no"}.get(text, "other")
    match = _STRICT.fullmatch(text.strip())
    return match.group(1).lower() if match else "other"


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
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSettings:
    """How the audit asks (everything that changes an answer or a score).

    Defaults are the authors' protocol: every present and absent class, the ``paper``
    template with their token ids (``legacy``) on their pixels (``authors``), their question,
    OWL-ViT queried with the bare class name.
    """

    sampling: str = "all"  # all | random | popular | adversarial
    k: int = 3  # POPE: positives (and negatives) per image
    seed: int = 0  # POPE: seed of the random choices, one stream per image
    template: str = PAPER_TEMPLATE  # conversation template of the question
    question: str = AUTHORS_QUESTION  # with one {} for the class name
    articles: str = "a"  # a: as written (authors); a-an: "an" before vowels (POPE)
    query_template: str = AUTHORS_QUERY_TEMPLATE  # OWL-ViT query; "{}" is the bare name
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # a strict yes/no answer is a few tokens
    tokenization: str = (
        PAPER_TOKENIZATION  # legacy: the authors' ids (jmllm.joint.chat.tokenization)
    )
    preprocessing: str = PAPER_PREPROCESSING  # authors: their pixels (jmllm.align.preprocessing)

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise AuditError(f"sampling: {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise AuditError(f"k: must be a positive integer, got {self.k!r}")
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 4096:
            raise AuditError(f"max_new_tokens: must be in 1..4096, got {self.max_new_tokens!r}")
        try:  # one bare {} and nothing else to fill (the project's template rule)
            check_template(self.question, "question")
            check_template(self.query_template, "query template")
        except ValueError as exc:
            raise AuditError(str(exc)) from None
        if self.articles not in ARTICLES:
            raise AuditError(f"articles: {self.articles!r} is not one of {', '.join(ARTICLES)}")
        try:
            get_template(self.template)
            check_tokenization(self.tokenization)
            get_preprocessing(self.preprocessing)
        except (PromptError, TokenizationError, ValueError) as exc:
            raise AuditError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_identity(model: Any) -> dict[str, Any]:
    """What identifies J's weights in a run's settings: its sources and dtype."""
    return {"sources": dict(getattr(model, "sources", {}) or {}), "dtype": str(model.dtype)}


_model_identity = model_identity  # the former private name


def settings_digest(settings: AuditSettings, model: Any) -> str:
    """A short hash of the settings and the model identity: records made otherwise are not
    reused on resume."""
    doc = {"settings": settings.to_dict(), "model": _model_identity(model)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


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


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRecord:
    """One answered question of the audit (a row of the report's data).

    Attributes:
        image_id, file: the image.
        class_name: the class asked about; present: whether it is annotated in the image.
        answer: J's answer text (stripped); tokens: its token ids; finished: ended with
            end-of-sequence.
        owl_score: OWL-ViT's maximum score for the class on the same ``t``.
        reply: the raw answer as the authors' notebook splits it off after ``ASSISTANT: ``
            (:attr:`jmllm.joint.JointAnswer.reply`; None: their split finds none).
    """

    image_id: str
    file: str
    class_name: str
    present: bool
    answer: str
    tokens: tuple[int, ...]
    finished: bool
    owl_score: float
    reply: str | None = None

    def parsed(self, rule: str = "authors") -> str:
        """``"yes"``, ``"no"`` or ``"other"`` (see :func:`parse_answer`): the ``authors`` rule
        reads the raw :attr:`reply`, the others the answer text."""
        return parse_answer(self.reply if rule == "authors" else self.answer, self.finished, rule)


@dataclass
class AuditResult:
    """What :func:`run_audit` produced.

    Attributes:
        settings: how J was asked; plan: which classes, per image.
        records: every answered question, in dataset and plan order.
        failed: image id → why it could not be audited (unreadable image …); retried on rerun.
        processed: images answered by this run (all processes); kept: finished before.
        out: the output folder, if any.
        dataset: the audited dataset (for the report's pictures).
    """

    settings: AuditSettings
    plan: QuestionPlan
    records: list[AuditRecord]
    failed: dict[str, str] = field(default_factory=dict)
    processed: int = 0
    kept: int = 0
    out: Path | None = None
    dataset: AuditDataset | None = None
    seconds: float = 0.0

    @property
    def images(self) -> int:
        """Images with answers."""
        return len({r.image_id for r in self.records})


def _record_line(
    image: AuditImage,
    answered: list[AnsweredQuestion],
    planned: list[Any],
    digest: str,
    fingerprint: str,
) -> dict[str, Any]:
    return {
        "image_id": image.image_id,
        "file": image.file,
        "sha256": fingerprint,  # resume keeps these answers only for the same image
        "settings": digest,
        "questions": [
            {
                "class": a.class_name,
                "present": q.present,
                "answer": a.answer.text,
                "reply": a.answer.reply,
                "tokens": [int(v) for v in a.answer.token_ids],
                "finished": bool(a.answer.finished),
                "owl_score": round(a.owl_score, 7),
            }
            for a, q in zip(answered, planned, strict=True)
        ],
    }


def _records_from_line(line: dict[str, Any]) -> list[AuditRecord]:
    return [
        AuditRecord(
            image_id=str(line["image_id"]),
            file=str(line.get("file", "")),
            class_name=str(q["class"]),
            present=bool(q["present"]),
            answer=str(q["answer"]),
            tokens=tuple(int(v) for v in q.get("tokens", ())),
            finished=bool(q["finished"]),
            owl_score=float(q["owl_score"]),
            # lines written before replies were recorded: the stripped text stands in
            reply=q["reply"] if "reply" in q else str(q["answer"]),
        )
        for q in line["questions"]
    ]


def _finished_lines(
    path: Path, digest: str, plan: QuestionPlan, fingerprints: _Fingerprints
) -> dict[str, dict[str, Any]]:
    """Records of ``results.jsonl`` that match the settings, the image's planned questions and
    the image itself (its file's SHA-256: an id pointed at another file is asked again); a later
    line for the same image wins."""
    found: dict[str, dict[str, Any]] = {}
    for line in read_jsonl(path):
        image_id = line.get("image_id")
        if not isinstance(image_id, str):
            continue
        planned = plan.questions.get(image_id)
        if line.get("settings") != digest or planned is None:
            continue
        try:
            asked = [(q["class"], bool(q["present"])) for q in line["questions"]]
            _records_from_line(line)
        except (KeyError, TypeError, ValueError):
            continue
        if asked != [(q.class_name, q.present) for q in planned]:
            continue
        if line.get("sha256") is None or line.get("sha256") != fingerprints.of(image_id):
            continue
        found[image_id] = line
    return found


class _Fingerprints:
    """The images' SHA-256, computed once per image when a resume needs it (None: unreadable)."""

    def __init__(self, images: Sequence[AuditImage]) -> None:
        self._images = {image.image_id: image for image in images}
        self._known: dict[str, str | None] = {}

    def remember(self, image_id: str, fingerprint: str) -> None:
        self._known[image_id] = fingerprint

    def of(self, image_id: str) -> str | None:
        if image_id not in self._known:
            image = self._images.get(image_id)
            try:
                self._known[image_id] = image.fingerprint() if image is not None else None
            except (OSError, ValueError):
                self._known[image_id] = None
        return self._known[image_id]


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def _use_cpu() -> bool:
    """CPU processes (``accelerate launch --cpu``, or no GPU): accelerate then splits over gloo."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def process_state() -> Any:
    """accelerate's ``PartialState`` of this process (one process when not launched)."""
    from accelerate import PartialState

    return PartialState(cpu=_use_cpu())


def _prefetched(
    images: Sequence[AuditImage], ahead: int = 2, exif_orientation: bool = True
) -> Iterator[tuple[AuditImage, Any]]:
    """(image, (decoded PIL image, its SHA-256) or the exception) in order, decoding ``ahead``
    images in a background thread while the model works on the current one."""
    from jmllm.align import load_image

    def decode(item: AuditImage) -> Any:
        try:
            return load_image(item.load(), exif_orientation=exif_orientation), item.fingerprint()
        except Exception as exc:  # reported per image by the caller
            return exc

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-decode") as pool:
        queue: deque[tuple[AuditImage, Future[Any]]] = deque()
        upcoming = iter(images)
        for item in islice(upcoming, ahead + 1):
            queue.append((item, pool.submit(decode, item)))
        while queue:
            item, decoded = queue.popleft()
            following = next(upcoming, None)
            if following is not None:
                queue.append((following, pool.submit(decode, following)))
            yield item, decoded.result()


def run_audit(
    model: Any,
    dataset: AuditDataset,
    out: str | os.PathLike[str] | None = None,
    settings: AuditSettings | None = None,
    *,
    batch_size: int | None = None,
    kv_cache_gib: float = DEFAULT_KV_CACHE_GIB,
    progress: bool = True,
    on_image: Callable[[str], None] | None = None,
) -> AuditResult:
    """Run the hallucination audit of J on a dataset (resumable, splittable).

    With ``out``, each finished image is appended to ``out/results.jsonl`` at once (with the
    settings' digest and its questions), and images already there are skipped; launched with
    ``accelerate launch --num_processes N``, the N processes split the remaining images and
    every process returns the whole result. One run at a time writes a folder: another run
    into it is refused while this one holds its lock.

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        dataset: from :func:`~jmllm.joint.audit.data.load_coco` or
            :func:`~jmllm.joint.audit.data.load_objects_dataset`.
        out: folder for ``audit.json`` and ``results.jsonl`` (None: in memory, one process).
        settings: the protocol (default: the authors').
        batch_size, kv_cache_gib: questions per language-model batch (None: as many as
            ``kv_cache_gib`` of KV cache hold), see :class:`YesNoAuditor`.
        progress: show a progress bar.
        on_image: called with each image id once its answers are saved (tests, monitors).

    Returns:
        :class:`AuditResult`; write the report with
        :func:`jmllm.joint.audit.report.write_audit_report`.

    Raises:
        AuditError: bad settings, an output folder holding another audit or being written by
            another run, a vocabulary the models cannot take.

    Example:
        >>> from jmllm.joint.audit.data import load_coco
        >>> ds = load_coco("instances_val2017.json", "val2017", limit=1000)  # doctest: +SKIP
        >>> result = run_audit(model, ds, "audit-out")  # doctest: +SKIP
        >>> len(result.records)  # 80 questions per image  # doctest: +SKIP
        80000
    """
    settings = settings or AuditSettings()
    started = time.perf_counter()
    plan = plan_questions(dataset, settings.sampling, settings.k, settings.seed)
    auditor = YesNoAuditor(model, settings, dataset.classes, batch_size, kv_cache_gib)
    digest = settings_digest(settings, model)
    state = process_state()
    folder = Path(out) if out is not None else None
    if folder is None and state.num_processes > 1:
        raise AuditError("out: required when the audit is split between processes")
    with exclusive_folder(folder, state):
        return _audit_images(
            model,
            dataset,
            folder,
            settings,
            plan,
            auditor,
            digest,
            state,
            progress,
            on_image,
            started,
        )


@contextlib.contextmanager
def exclusive_folder(
    folder: str | os.PathLike[str] | None,
    state: Any = None,
    *,
    owner: str = LOCK_OWNER,
    lock_file: str = LOCK_FILE,
    error: type[Exception] = AuditError,
) -> Iterator[None]:
    """One run at a time writes an audit folder: the run's main process holds the folder's lock
    (:func:`jmllm.align.files.folder_lock`, re-entrant in one thread) while the body runs, and
    every process of the run learns whether it got it, so a refused run stops all its processes
    instead of leaving some waiting at a barrier.

    Args:
        folder: the output folder (None: nothing to hold).
        state: accelerate's state of this process (default :func:`process_state`).
        owner, lock_file, error: who holds the lock (named to a refused run), the lock's file
            name and the error raised; the defaults are the hallucination audit's (the
            faithfulness benchmark passes its own).

    Raises:
        AuditError: another run holds the folder (the message names its process).
    """
    state = state or process_state()
    folder = Path(folder) if folder is not None else None
    if folder is None:
        yield
        return
    if folder.exists() and not folder.is_dir():
        raise error(f"{folder}: exists and is not a folder")
    refused = None
    with contextlib.ExitStack() as stack:
        if state.is_main_process:
            try:
                stack.enter_context(folder_lock(folder, owner, lock_file, error))
            except error as exc:
                refused = str(exc)
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            box = broadcast_object_list([refused], from_process=0)
            refused = box[0]
        if refused is not None:
            raise error(refused)
        yield


def _audit_images(
    model: Any,
    dataset: AuditDataset,
    folder: Path | None,
    settings: AuditSettings,
    plan: QuestionPlan,
    auditor: YesNoAuditor,
    digest: str,
    state: Any,
    progress: bool,
    on_image: Callable[[str], None] | None,
    started: float,
) -> AuditResult:
    from tqdm.auto import tqdm

    results = folder / RESULTS_FILE if folder else None
    if folder is not None:
        # every process checks (a refused folder must stop all of them, not leave some waiting
        # at the barrier); audit.json is written once a first image has its answers
        _claim_folder(folder, settings, model, digest, write=False)
    state.wait_for_everyone()
    fingerprints = _Fingerprints(dataset.images)
    done = _finished_lines(results, digest, plan, fingerprints) if results else {}
    recorded = folder is None
    by_id = {image.image_id: image for image in dataset.images}
    todo = [by_id[i] for i in plan.questions if i not in done]
    if done:
        logger.info("keeping %d finished image(s), auditing %d", len(done), len(todo))
    lines: dict[str, dict[str, Any]] = dict(done)
    failed: dict[str, str] = {}
    with (
        state.split_between_processes(todo) as share,
        tqdm(  # closed on an error too: the error's line is not glued to the bar's
            total=len(share),
            desc=f"audit [process {state.process_index}]",
            unit="img",
            disable=not progress,
            position=state.process_index,
        ) as bar,
    ):
        exif = get_preprocessing(settings.preprocessing).exif_orientation
        for image, decoded in _prefetched(list(share), exif_orientation=exif):
            if isinstance(decoded, Exception):
                failed[image.image_id] = _one_line(decoded)
                logger.warning("%s: skipped (%s)", image.file, failed[image.image_id])
                bar.update(1)
                continue
            planned = plan.questions[image.image_id]
            pixels, fingerprint = decoded
            fingerprints.remember(image.image_id, fingerprint)
            try:
                emb = model.embed([pixels], preprocessing=settings.preprocessing)
            except ValueError as exc:  # JointModelError: an image J cannot take
                failed[image.image_id] = _one_line(exc)
                bar.update(1)
                continue
            answered = auditor.ask(emb.t, [q.class_name for q in planned])
            line = _record_line(image, answered, planned, digest, fingerprint)
            if not recorded:  # the settings are the folder's once a question has succeeded
                assert folder is not None
                _claim_folder(folder, settings, model, digest, write=True)
                recorded = True
            if results is not None:
                append_jsonl(results, line)  # at once: a kill loses at most the next image
            lines[image.image_id] = line
            if on_image is not None:
                on_image(image.image_id)
            bar.update(1)
    processed = len(todo) - len(failed)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([failed])
        failed = {k: v for part in gathered for k, v in part.items()}
        processed = len(todo) - len(failed)
        state.wait_for_everyone()
        assert results is not None
        lines = _finished_lines(results, digest, plan, fingerprints)  # every process's images
    records = [r for i in plan.questions if i in lines for r in _records_from_line(lines[i])]
    return AuditResult(
        settings=settings,
        plan=plan,
        records=records,
        failed=failed,
        processed=processed,
        kept=len(done),
        out=folder,
        dataset=dataset,
        seconds=time.perf_counter() - started,
    )


def _one_line(exc: BaseException) -> str:
    from jmllm.align.options import one_line

    return one_line(exc)


def _claim_folder(
    folder: Path, settings: AuditSettings, model: Any, digest: str, write: bool = True
) -> None:
    """Check that ``audit.json`` (if any) describes this same audit; write it if ``write``."""
    doc = {
        "settings": settings.to_dict(),
        "model": _model_identity(model),
        "digest": digest,
        "format": 1,
    }
    for name in (SETTINGS_FILE, RESULTS_FILE):  # refused now, not after the first image's work
        refuse_link(folder / name)
    claim_folder(folder, SETTINGS_FILE, doc, write=write, what="an audit")


def claim_folder(
    folder: Path,
    settings_file: str,
    doc: dict[str, Any],
    *,
    write: bool = True,
    what: str = "an audit",
    error: type[Exception] = AuditError,
) -> None:
    """Refuse a resumable run's folder whose settings file describes another run (another
    ``digest``), naming what differs; write ``doc`` there if ``write``.

    Args:
        folder: the output folder; settings_file: the settings file's name in it.
        doc: ``{"settings": ..., "model": ..., "digest": ..., ...}`` of this run.
        write: write the file (the main process does).
        what: the run's kind as the message names it; error: the error raised.
    """
    if folder.exists() and not folder.is_dir():
        raise error(f"{folder}: exists and is not a folder")
    path = folder / settings_file
    refuse_link(path)  # a planted link: refused, never followed
    if path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            before = None
        if isinstance(before, dict) and before.get("digest") not in (None, doc.get("digest")):
            changed = _differences(before, doc)
            raise error(
                f"{folder}: holds {what} made with other settings ({changed}); "
                "choose another output folder to keep both"
            )
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _differences(before: dict[str, Any], now: dict[str, Any]) -> str:
    diffs = []
    for part in ("settings", "model"):
        old, new = before.get(part) or {}, now.get(part) or {}
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                diffs.append(f"{key}: {old.get(key)!r} → {new.get(key)!r}")
    return "; ".join(diffs) or "digest differs"


__all__ = [
    "AUTHORS_QUERY_TEMPLATE",
    "PARSE_RULES",
    "AnsweredQuestion",
    "AuditRecord",
    "AuditResult",
    "AuditSettings",
    "YesNoAuditor",
    "ask_one_by_one",
    "claim_folder",
    "exclusive_folder",
    "kv_cache_bytes",
    "model_identity",
    "parse_answer",
    "process_state",
    "run_audit",
    "settings_digest",
]
