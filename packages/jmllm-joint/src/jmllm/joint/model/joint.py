"""The joint model J: OWL-ViT + alignment W + a multi-modal LLM fed by one vision embedding ``t``.

Giulivi and Boracchi, *Explaining Multi-modal Large Language Models by Analyzing their Vision
Perception* (BMVC 2024, arXiv 2405.14612), §3 and DESIGN §1.2::

    image ─► OWL-ViT vision encoder ─► t (B, 1 + N, D_owl), penultimate hidden state, CLS first
                                        ├─► drop CLS ─► W ─► the MLLM's language model ─► O^MLLM
                                        └─► last layer + heads H ─► O^OWL (boxes, class logits)

The MLLM is LLaVA-1.5 (the paper's) or any family of :mod:`jmllm.joint.model.families` (LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL), picked from its config: the family says how many image
tokens W(t) fills, on which grids (``t``'s patch grid resampled onto them where they differ),
and what extra inputs the language model needs.

Embed once (:meth:`JointModel.embed`), then generate, chat, detect and explain from the same ``t``
— or from a perturbed copy of it. The MLLM's image tokens are replaced through its public
``inputs_embeds`` argument; transformers is neither patched nor vendored.

:class:`JointModel` is assembled the way transformers assembles its models, from mixins that
each hold one concern: loading (:mod:`jmllm.joint.model.loading`), the embedding path — images to
``t``, ``t`` to the MLLM's image tokens and to OWL-ViT's detections
(:mod:`jmllm.joint.model.embedding`) — and prompts, logits and generation
(:mod:`jmllm.joint.model.generation`), on the constructor and defaults they share
(:mod:`jmllm.joint.model.base`). Every name of J is importable from here as before.
"""

from __future__ import annotations

from jmllm.align import (
    AlignmentLayer,
    ImageLoadError,
    ImageNormalization,
    check_fits,
    image_to_tensor,
    load_alignment,
    owl_penultimate,
)
from jmllm.align.families import UnsupportedFamilyError, resample_patches, vision_family
from jmllm.align.hub import prepare_hub
from jmllm.align.images import (
    WORKING_SIDE,
    LoadedImage,
    check_pixels,
    open_image,
    working_size,
)
from jmllm.align.options import check_template
from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING, get_preprocessing
from jmllm.align.weights import looks_like_repo_id, resolve_alignment_path
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
from jmllm.joint.detection.heads import Detections, decode_detections, owl_detection_heads
from jmllm.joint.model.base import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_LLAVA,
    DEFAULT_MLLM,
    DEFAULT_OWL,
    DEFAULT_QUERY_TEMPLATE,
    MAX_IMAGE_SIDE,
    QUERY_CACHE_SIZE,
    ImageInput,
    JointModelError,
    Vision,
    check_compatible,
)
from jmllm.joint.model.embedding import EmbeddingMixin, JointEmbedding, logger
from jmllm.joint.model.families import FamilyAdapter, adapter_for
from jmllm.joint.model.generation import GenerationMixin
from jmllm.joint.model.generation import _FirstScores as _FirstScores
from jmllm.joint.model.loading import (
    DTYPES,
    LoadingMixin,
    as_dtype,
    check_local_source,
)
from jmllm.joint.model.loading import _first_line as _first_line
from jmllm.joint.model.loading import _load as _load

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_LLAVA",
    "DEFAULT_MLLM",
    "DEFAULT_OWL",
    "DEFAULT_QUERY_TEMPLATE",
    "DTYPES",
    "INTERACTIVE_PREPROCESSING",
    "INTERACTIVE_TEMPLATE",
    "INTERACTIVE_TOKENIZATION",
    "LLAVA_TEMPLATES",
    "MAX_IMAGE_SIDE",
    "QUERY_CACHE_SIZE",
    "WORKING_SIDE",
    "AlignmentLayer",
    "Conversation",
    "ConversationTemplate",
    "Detections",
    "FamilyAdapter",
    "ImageInput",
    "ImageLoadError",
    "ImageNormalization",
    "JointAnswer",
    "JointEmbedding",
    "JointModel",
    "JointModelError",
    "LoadedImage",
    "PromptError",
    "TokenizationError",
    "UnsupportedFamilyError",
    "Vision",
    "adapter_for",
    "as_dtype",
    "authors_reply",
    "check_compatible",
    "check_fits",
    "check_local_source",
    "check_pixels",
    "check_question",
    "check_template",
    "check_tokenization",
    "decode_detections",
    "format_conversation",
    "get_preprocessing",
    "get_template",
    "image_to_tensor",
    "llava_tokenizer",
    "load_alignment",
    "logger",
    "looks_like_repo_id",
    "open_image",
    "owl_detection_heads",
    "owl_penultimate",
    "prepare_hub",
    "resample_patches",
    "resolve_alignment_path",
    "vision_family",
    "working_size",
]


class JointModel(LoadingMixin, GenerationMixin, EmbeddingMixin):
    """J: one OWL-ViT embedding ``t`` feeds an MLLM (through W) and OWL-ViT's detection heads.

    Build it with :meth:`from_pretrained`; the constructor takes already loaded modules.

    Args:
        owl: ``OwlViTForObjectDetection``.
        mllm: the multi-modal LLM: ``LlavaForConditionalGeneration`` or a model of any family
            of :mod:`jmllm.joint.model.families` (:attr:`family` is its adapter).
        alignment: the alignment layer W (trained for the MLLM's family).
        tokenizer: the MLLM's tokenizer. owl_tokenizer: OWL-ViT's (CLIP) tokenizer.
        owl_norm, mllm_norm: each model's pixel normalisation (whole image squashed; the
            MLLM's at its family's square side). ``llava_norm``: the old name of ``mllm_norm``.

    Example:
        >>> model = JointModel.from_pretrained(alignment="w.safetensors")  # doctest: +SKIP
        >>> emb = model.embed(["cat.jpg"])  # doctest: +SKIP
        >>> model.generate(emb, "What's in the image?")[0].text  # doctest: +SKIP
        'The image shows a cat sitting on a couch.'
        >>> model.detect(emb, ["cat", "couch"])[0].names  # doctest: +SKIP
        ['cat', 'couch']
    """
