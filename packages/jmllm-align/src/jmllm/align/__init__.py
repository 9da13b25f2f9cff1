"""jmllm-align: the alignment layer W between OWL-ViT and LLaVA (Giulivi and Boracchi, 2024).

W maps OWL-ViT's penultimate vision tokens (CLS dropped) into the image-token space of LLaVA's
language model. This package holds W's architectures, the shared ``.safetensors`` weight format,
feature extraction for both encoders, and the trainer; and the rules every jmllm package
follows: one image-decoding policy (:mod:`jmllm.align.images`), one output-file writer
(:mod:`jmllm.align.files`), one set of command-line checks and exit codes
(:mod:`jmllm.align.options`).

Example:
    >>> from jmllm.align import AlignmentConfig, AlignmentLayer
    >>> w = AlignmentLayer(AlignmentConfig("deep-mlp", in_dim=8, out_dim=16, hidden_dim=32))
    >>> sum(p.numel() for p in w.parameters())
    2928
"""

from jmllm.align.architectures import (
    ARCHITECTURES,
    AlignmentConfig,
    AlignmentLayer,
    EncoderDims,
    alignment_config_for,
    check_fits,
    encoder_dims,
)
from jmllm.align.features import (
    FeatureExtractor,
    FeaturePair,
    ImageNormalization,
    image_to_tensor,
    llava_image_tokens,
    owl_penultimate,
)
from jmllm.align.images import ImageLoadError, LoadedImage, load_image, open_image
from jmllm.align.weights import (
    AlignmentWeightsError,
    import_authors_state_dict,
    load_alignment,
    read_metadata,
    save_alignment,
)

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "AlignmentConfig",
    "AlignmentLayer",
    "AlignmentWeightsError",
    "EncoderDims",
    "FeatureExtractor",
    "FeaturePair",
    "ImageLoadError",
    "ImageNormalization",
    "LoadedImage",
    "alignment_config_for",
    "check_fits",
    "encoder_dims",
    "image_to_tensor",
    "import_authors_state_dict",
    "llava_image_tokens",
    "load_alignment",
    "load_image",
    "open_image",
    "owl_penultimate",
    "read_metadata",
    "save_alignment",
]
