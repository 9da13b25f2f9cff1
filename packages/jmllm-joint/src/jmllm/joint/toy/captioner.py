"""Training the toy LLaVA to caption scenes and answer questions about them.

The model is the stock ``LlavaForConditionalGeneration``. Inputs are built the way J prompts
LLaVA (:meth:`jmllm.joint.JointModel.prompt_inputs`): a conversation formatted with a named
template (:mod:`jmllm.joint.chat`), ``<image>`` expanded to one image token per patch, the image
tokens being LLaVA's own (:func:`jmllm.align.llava_image_tokens`: vision feature layer −2, CLS
dropped, projector) put in place of the placeholders.

Two stages, as LLaVA-1.5 is built on a pre-trained CLIP tower that stays frozen:

1. :func:`pretrain_vision`: the vision tower and projector learn, densely, what each patch
   shows (the colour and shape of the object covering it, and where that object is);
2. :func:`train_captioner`: with the tower frozen (its features computed once per scene),
   projector and language model learn conversations about the scenes: one caption prompt, or
   1–``max_turns`` questions about distinct objects (:func:`sample_conversation`), half in the
   ``llava-1.5`` template and half in ``paper``, so J answers in both. The loss is the
   next-token cross-entropy on the answers and their end-of-sequence tokens only.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch

from jmllm.align import ImageNormalization, llava_image_tokens
from jmllm.joint.chat.templates import LLAVA_TEMPLATES, Conversation, format_conversation
from jmllm.joint.toy.models import CLIP_MEAN, CLIP_STD
from jmllm.joint.toy.pool import COVERED, ScenePool
from jmllm.joint.toy.scenes import COLOURS, LLAVA_YES_NO, QA, SHAPES, with_yes_no
from jmllm.joint.toy.schedule import warmup_cosine

TEMPLATES = LLAVA_TEMPLATES  # ("llava-1.5", "paper"): the toy LLaVA is a LLaVA-1.5


@dataclass
class CaptionerRecipe:
    """How the toy LLaVA is trained (the defaults are the shipped recipe's)."""

    steps: int = 3000  # 2500 learn everything but the authors' long yes/no question (docs/toy.md)
    batch_size: int = 32
    lr: float = 2e-3  # AdamW peak, linear warm-up then cosine decay to 0
    warmup_steps: int = 100
    weight_decay: float = 0.05
    vision_steps: int = 2500  # dense pre-training of the vision tower + projector (0: none)
    vision_lr: float = 2e-3
    freeze_vision: bool = True  # LLaVA-1.5 keeps its (pre-trained) vision tower frozen
    max_turns: int = 3  # question turns per training conversation (1..max_turns, uniform)
    # Gaussian noise added to the image tokens, relative to their RMS, so the language model
    # tolerates the small errors of W's tokens (J reads W(t), not LLaVA's own tokens); 0: none
    token_noise: float = 0.0
    caption_share: float = 0.5  # probability that a conversation is one caption prompt
    grad_clip: float = 1.0
    # how the yes/no questions are answered (the tokenizer's corpus too): LLaVA-1.5's ("Yes",
    # "No"), which the authors' parse rule reads, or lower case (scenes.YES_NO, the toy worlds
    # before 0.2 and the toy Qwen2-VL's recipe); docs/toy.md measures both
    yes_no: tuple[str, str] = LLAVA_YES_NO

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_qwen(model: Any) -> bool:
    """Whether ``model`` is the toy Qwen2-VL (:mod:`jmllm.joint.toy.qwen`), not the toy LLaVA."""
    return str(getattr(model.config, "model_type", "")) == "qwen2_vl"


def _qwen_vision(model: Any) -> Any:
    from jmllm.align.families import Qwen2VLVision

    return Qwen2VLVision(model.config)


def llava_norm(llava: Any) -> ImageNormalization:
    """The toy LLaVA's pixel normalisation (what its processor and J use); the toy Qwen2-VL's
    at the square J shows it."""
    if is_qwen(llava):
        return ImageNormalization(_qwen_vision(llava).layout.side, CLIP_MEAN, CLIP_STD)
    return ImageNormalization(int(llava.config.vision_config.image_size), CLIP_MEAN, CLIP_STD)


def num_image_tokens(llava: Any) -> int:
    if is_qwen(llava):
        return int(_qwen_vision(llava).layout.num_tokens)
    vision = llava.config.vision_config
    return int((vision.image_size // vision.patch_size) ** 2)


def image_tokens_of(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The MLLM's own image tokens (B, N, D_llm): LLaVA's, or the toy Qwen2-VL's merged ones."""
    if is_qwen(model):
        return _qwen_vision(model).tokens(model, pixel_values)  # type: ignore[no-any-return]
    return llava_image_tokens(model, pixel_values)


def _facts(qa: QA) -> set[str]:
    """The colour and shape words a question and its answer mention."""
    words = set(f"{qa.question} {qa.answer}".lower().replace("?", " ").replace(".", " ").split())
    return words & (set(COLOURS) | set(SHAPES))


def sample_conversation(
    questions: tuple[QA, ...], rng: random.Random, recipe: CaptionerRecipe
) -> list[QA]:
    """The turns of one training conversation about a scene.

    The conversation is one caption prompt with probability ``caption_share``: a caption
    answers every other question. Otherwise it has 1–``max_turns`` questions of different kinds
    (each kind equally likely) that share no colour or shape with an earlier turn, so no answer
    can be read off the conversation instead of the image (a model trained so fails on the same
    question asked alone, as J is evaluated).
    """
    captions = [q for q in questions if q.kind in ("content", "in_image")]
    if rng.random() < recipe.caption_share:
        return [rng.choice(captions)]
    by_kind: dict[str, list[QA]] = {}
    for q in questions:
        if q.kind not in ("content", "in_image"):
            by_kind.setdefault(q.kind, []).append(q)
    # every kind equally likely (a scene has four yes/no questions per form but at most three
    # colour questions), so the rarer, harder kinds are not drowned out
    kinds = sorted(by_kind)
    wanted = rng.randint(1, recipe.max_turns)
    turns: list[QA] = []
    seen: set[str] = set()
    for kind in rng.sample(kinds, len(kinds)):
        if len(turns) >= wanted:
            break
        candidates = [q for q in by_kind[kind] if not _facts(q) & seen]
        if candidates:
            qa = rng.choice(candidates)
            turns.append(qa)
            seen |= _facts(qa)
    return turns


def encode_conversation(
    tokenizer: Any,
    turns: list[QA],
    template: str,
    image_tokens: int,
    image_text: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of a finished conversation and its labels (-100 except on answer tokens and the
    end-of-sequence token closing each answer), tokenised as a whole string like J's prompts.

    ``image_text``: what ``<image>`` expands to (the family's, e.g. Qwen's
    ``<|vision_start|>`` + pads + ``<|vision_end|>``); None: ``image_tokens`` × ``<image>``.
    """
    from jmllm.joint.chat.templates import get_template

    conv = Conversation()
    for qa in turns:
        conv = conv.ask(qa.question).answered(qa.answer)
    text = format_conversation(conv, eos=tokenizer.eos_token, template=template)
    answer_form = get_template(template).answer.rstrip("\n")
    # the character spans of " answer</s>" (the template's answer part), in order
    spans, cursor = [], 0
    for qa in turns:
        piece = answer_form.format(answer=qa.answer, eos=tokenizer.eos_token)
        start = text.index(piece, cursor)
        spans.append((start, start + len(piece)))
        cursor = start + len(piece)
    if image_text is None:
        image_token = tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids("<image>"))
        image_text = image_token * image_tokens
    marker = text.index("<image>")
    shift = len(image_text) - len("<image>")
    expanded = text.replace("<image>", image_text, 1)
    spans = [(a + shift, b + shift) if a > marker else (a, b) for a, b in spans]
    enc = tokenizer(expanded, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for token_id, (a, b) in zip(ids, enc["offset_mapping"], strict=True):
        inside = b > a and any(s <= a and b <= e for s, e in spans)
        labels.append(token_id if inside else -100)
    return ids, labels


def _batch(
    tokenizer: Any, items: list[tuple[list[int], list[int]]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each (B, L)."""
    length = max(len(ids) for ids, _ in items)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(items), length), pad, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    for row, (i, lab) in enumerate(items):
        ids[row, : len(i)] = torch.tensor(i)
        mask[row, : len(i)] = 1
        labels[row, : len(lab)] = torch.tensor(lab)
    return ids, mask, labels


def patch_labels(
    objects: tuple[Any, ...], coverage: torch.Tensor, image_size: int, covered: float = COVERED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What each patch shows: the object covering most of it, when it covers at least
    ``covered`` of it (``coverage``: (K, N) from :meth:`ScenePool.coverage`).

    Returns:
        colour ids (N,) and shape ids (N,), 0 for background, 1.. in :data:`COLOURS` /
        :data:`SHAPES` order; and (N, 2) the object's centre ``x, y`` in [0, 1] (NaN on
        background patches).
    """
    n = coverage.shape[-1]
    colours = torch.zeros(n, dtype=torch.long)
    shapes = torch.zeros(n, dtype=torch.long)
    centres = torch.full((n, 2), float("nan"))
    if objects:
        best, owner = coverage[: len(objects)].max(0)  # (N,)
        for j, o in enumerate(objects):
            cells = (owner == j) & (best >= covered)
            colours[cells] = list(COLOURS).index(o.colour) + 1
            shapes[cells] = SHAPES.index(o.shape) + 1
            centres[cells] = torch.tensor(o.centre) / image_size
    return colours, shapes, centres


def relative_centres(centres: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, 2) object centres in [0, 1] (:func:`patch_labels`) as offsets from each patch's own
    centre, on a ``grid`` × ``grid`` row-major patch grid (NaN stays NaN).

    The toy Qwen2-VL's tower regresses these instead of :func:`patch_labels`' centres:
    Qwen2-VL's vision transformer has no absolute position embedding (2-D RoPE only), so where
    an object lies in the image cannot be told from its patches, while the offset from a patch
    to its object's centre can, and says as much about which object the patch belongs to (the
    toy LLaVA's CLIP tower, with absolute positions, keeps the absolute target).

    Example:
        >>> relative_centres(torch.full((4, 2), 0.5), 2).tolist()
        [[0.25, 0.25], [-0.25, 0.25], [0.25, -0.25], [-0.25, -0.25]]
    """
    cell = torch.arange(grid * grid)
    here = torch.stack([(cell % grid + 0.5) / grid, (cell // grid + 0.5) / grid], dim=-1)
    return centres - here


def tower_features(llava: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """LLaVA's selected vision features before the projector: (B, N, D_vision).

    The same selection as ``LlavaModel.get_image_features`` (hidden state of the configured
    feature layer, CLS dropped for the ``default`` strategy); ``projector(tower_features(x))``
    equals :func:`jmllm.align.llava_image_tokens` (tested), so a frozen tower's features can be
    computed once and reused.
    """
    config = llava.config
    out = llava.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    features = out.hidden_states[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    return features


def pretrain_vision(
    llava: Any, pool: ScenePool, recipe: CaptionerRecipe, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Dense pre-training of the vision tower and projector: from every image token, linear
    heads (discarded afterwards) classify the colour and the shape of the object whose pixels
    cover the patch (:func:`patch_labels`), or background, and regress that object's centre
    (so every patch of an object says which object it belongs to, and where it is).

    It stands in for the contrastive pre-training LLaVA's CLIP tower comes with: without it the
    language model would have to teach the tower what a triangle looks like through the
    captioning loss alone, which takes far longer on a CPU.
    """
    from tqdm.auto import tqdm

    llava.train()
    norm = llava_norm(llava)
    width = int(llava.config.text_config.hidden_size)
    tower = llava.model.visual if is_qwen(llava) else None  # Qwen's merger is in its tower
    # seeded here: the global generator's state is not the seed's (torch seeds it at random
    # on start-up, and the models' initialisers restore it), so unseeded heads made the tower,
    # and everything trained on it, differ from run to run
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = torch.nn.ModuleDict(
            {
                "colour": torch.nn.Linear(width, len(COLOURS) + 1),
                "shape": torch.nn.Linear(width, len(SHAPES) + 1),
                "centre": torch.nn.Linear(width, 2),
            }
        )
    params = (
        [*tower.parameters(), *heads.parameters()]
        if tower is not None
        else [
            *llava.model.vision_tower.parameters(),
            *llava.model.multi_modal_projector.parameters(),
            *heads.parameters(),
        ]
    )
    optimizer = torch.optim.AdamW(params, lr=recipe.vision_lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, recipe.warmup_steps, recipe.vision_steps)
    )
    coverage = pool.coverage(math.isqrt(num_image_tokens(llava)))
    size = int(pool.pixels.shape[-1])
    labels = [
        patch_labels(objs, cov, size) for objs, cov in zip(pool.objects, coverage, strict=True)
    ]
    if tower is not None:  # Qwen2-VL's tower regresses offsets (relative_centres says why)
        grid = math.isqrt(num_image_tokens(llava))
        labels = [(c, s, relative_centres(centre, grid)) for c, s, centre in labels]
    generator = torch.Generator().manual_seed(seed)
    name = "toy Qwen2-VL" if tower is not None else "toy LLaVA"
    bar = tqdm(range(recipe.vision_steps), desc=f"{name} vision", disable=not progress, unit="step")
    first: float | None = None
    last = float("nan")
    for step in bar:
        idx = torch.randint(len(pool), (recipe.batch_size,), generator=generator)
        tokens = image_tokens_of(llava, norm(pool.images(idx)))  # (B, N, D)
        colour = torch.stack([labels[int(i)][0] for i in idx])  # (B, N)
        shape = torch.stack([labels[int(i)][1] for i in idx])
        centre = torch.stack([labels[int(i)][2] for i in idx])  # (B, N, 2), NaN off objects
        on = shape > 0
        loss = (
            torch.nn.functional.cross_entropy(
                heads["colour"](tokens).flatten(0, 1), colour.flatten()
            )
            + torch.nn.functional.cross_entropy(
                heads["shape"](tokens).flatten(0, 1), shape.flatten()
            )
            + 10.0 * torch.nn.functional.mse_loss(heads["centre"](tokens)[on], centre[on])
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == recipe.vision_steps - 1:
            last = float(loss.detach())
            first = last if first is None else first
            bar.set_postfix(loss=f"{last:.4f}")
    llava.eval()
    return {"steps": recipe.vision_steps, "first_loss": first, "final_loss": last}


def caption_loss(
    llava: Any,
    image_tokens: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    extra: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy on the labelled tokens, the image tokens (B, N, D_llm)
    merged in place of the placeholders exactly as J merges W's (``extra``: the family's
    further forward inputs, e.g. Qwen's M-RoPE from :meth:`FamilyAdapter.forward_inputs`)."""
    embeds = llava.get_input_embeddings()(input_ids)  # (B, L, D_llm)
    mask = (input_ids == llava.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, image_tokens.to(embeds.dtype))
    logits = llava(
        inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, **(extra or {})
    ).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
    )


def train_captioner(
    llava: Any,
    tokenizer: Any,
    pool: ScenePool,
    recipe: CaptionerRecipe,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``llava`` in place on conversations about ``pool``'s scenes (seeded data order)."""
    from tqdm.auto import tqdm

    vision = pretrain_vision(llava, pool, recipe, seed, progress) if recipe.vision_steps else None
    llava.train()
    qwen = is_qwen(llava)
    adapter = None
    if qwen:  # the tower ends with the merger (its projector): frozen with it, tokens cached
        from jmllm.joint.model.families.qwen2_vl import Qwen2VLAdapter

        adapter = Qwen2VLAdapter(llava)
        tower = llava.model.visual
        projector: Any = torch.nn.Identity()
        features: Any = image_tokens_of
    else:
        tower = llava.model.vision_tower
        projector = llava.model.multi_modal_projector
        features = tower_features
    norm = llava_norm(llava)
    cached: torch.Tensor | None = None
    if recipe.freeze_vision:
        tower.requires_grad_(False).eval()
        with torch.no_grad():  # a frozen tower's features are computed once per scene
            cached = torch.cat(
                [
                    features(llava, norm(pool.images(range(s, min(s + 128, len(pool))))))
                    for s in range(0, len(pool), 128)
                ]
            )  # (N_pool, N, D_vision)
    params = [p for p in llava.parameters() if p.requires_grad]
    n_tokens = num_image_tokens(llava)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, recipe.warmup_steps, recipe.steps)
    )
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    image_text = adapter.image_text(tokenizer) if adapter is not None else None
    desc = "toy Qwen2-VL" if qwen else "toy LLaVA"
    bar = tqdm(range(recipe.steps), desc=desc, disable=not progress, unit="step")
    first: float | None = None
    last = float("nan")
    for step in bar:
        idx = [rng.randrange(len(pool)) for _ in range(recipe.batch_size)]
        items = [
            encode_conversation(
                tokenizer,
                [
                    with_yes_no(qa, recipe.yes_no)
                    for qa in sample_conversation(pool.questions[i], rng, recipe)
                ],
                rng.choice(TEMPLATES) if adapter is None else adapter.template,
                n_tokens,
                image_text,
            )
            for i in idx
        ]
        input_ids, attention_mask, labels = _batch(tokenizer, items)
        if cached is not None:
            image_tokens = projector(cached[idx])  # (B, N, D_llm)
        else:
            image_tokens = image_tokens_of(llava, norm(pool.images(idx)))
        if recipe.token_noise > 0:
            rms = image_tokens.detach().pow(2).mean(dim=(1, 2), keepdim=True).sqrt()  # (B, 1, 1)
            noise = torch.randn(image_tokens.shape, generator=generator)
            image_tokens = image_tokens + recipe.token_noise * rms * noise
        extra = None
        if adapter is not None:
            placeholders = input_ids == llava.config.image_token_id
            extra = adapter.forward_inputs(input_ids, attention_mask, placeholders)
        loss = caption_loss(llava, image_tokens, input_ids, attention_mask, labels, extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == recipe.steps - 1:
            last = float(loss.detach())
            first = last if first is None else first
            bar.set_postfix(loss=f"{last:.4f}")
    tower.requires_grad_(True)
    llava.eval()
    return {
        "steps": recipe.steps,
        "first_loss": first,
        "final_loss": last,
        "vision_pretraining": vision,
    }
