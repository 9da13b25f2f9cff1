"""J's embedding path: images → ``t`` (:class:`JointEmbedding`), then W(t) as the MLLM's image
tokens and OWL-ViT's detection heads on the same ``t``.

:class:`EmbeddingMixin` gives :class:`~jmllm.joint.model.joint.JointModel`
:meth:`~EmbeddingMixin.embed`, the query encoding and detection (:meth:`~EmbeddingMixin.detect`),
and the image tokens of either vision (:meth:`~EmbeddingMixin.image_tokens` from ``t``,
:meth:`~EmbeddingMixin.stock_image_tokens` from the MLLM's own vision tower).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from jmllm.align import ImageLoadError, image_to_tensor, owl_penultimate
from jmllm.align.families import resample_patches
from jmllm.align.features import owl_base_model
from jmllm.align.images import LoadedImage, check_pixels, open_image, working_size
from jmllm.align.options import check_template
from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING, get_preprocessing
from jmllm.joint.chat.templates import PromptError
from jmllm.joint.detection.heads import (
    Detections,
    HeadOutputs,
    decode_detections,
    owl_detection_heads,
    owl_head_outputs,
    pads_to_square,
)
from jmllm.joint.model.base import (
    DEFAULT_QUERY_TEMPLATE,
    QUERY_CACHE_SIZE,
    JointBase,
    JointModelError,
)

logger = logging.getLogger(__name__)


@dataclass
class JointEmbedding:
    """The shared vision embedding of a batch of images.

    Attributes:
        t: (B, 1 + N, D_owl) OWL-ViT penultimate hidden state, CLS first (577 × 768 for B/32).
        image_sizes: original (width, height) of every image: boxes are in these pixels.
        images: the decoded (3, H, W) uint8 working copies (at most 4096 px on the longest side,
            aspect kept; the stock MLLM's path and rendering); may be empty for an embedding made
            from ``t`` alone.
        preprocessing: the named preprocessing the images were embedded with (``"authors"``,
            ``"exif"``; :mod:`jmllm.align.preprocessing`); stock LLaVA resizes with the same.
            None for an embedding made from ``t`` alone.
        input_problems: per image, why it does not suit the models (the model's
            ``input_check``, e.g. the toy world's "not a toy scene"), or None; empty when
            nothing was checked. Reports show them (``docs/toy.md``).
    """

    t: torch.Tensor
    image_sizes: list[tuple[int, int]]
    images: list[torch.Tensor] = dataclasses.field(default_factory=list)
    preprocessing: str | None = None
    input_problems: list[str | None] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def with_t(self, t: torch.Tensor) -> JointEmbedding:
        """The same images with another ``t`` (e.g. adversarially perturbed)."""
        if t.shape != self.t.shape:
            raise JointModelError(f"t: shape {tuple(t.shape)} != {tuple(self.t.shape)}")
        return dataclasses.replace(self, t=t)

    def select(self, index: int | Sequence[int]) -> JointEmbedding:
        """A sub-batch (keeps the batch dimension)."""
        indices = [index] if isinstance(index, int) else list(index)
        return JointEmbedding(
            t=self.t[indices],
            image_sizes=[self.image_sizes[i] for i in indices],
            images=[self.images[i] for i in indices] if self.images else [],
            preprocessing=self.preprocessing,
            input_problems=(
                [self.input_problems[i] for i in indices] if self.input_problems else []
            ),
        )

    def pil_image(self, index: int = 0) -> Image.Image:
        """The decoded working copy of image ``index`` as RGB PIL (for rendering; it may be
        smaller than ``image_sizes[index]``: scale boxes with
        :func:`jmllm.align.images.box_scale`)."""
        if not self.images:
            raise JointModelError("embedding: holds no images (made from t alone)")
        return Image.fromarray(self.images[index].permute(1, 2, 0).cpu().numpy(), "RGB")


class EmbeddingMixin(JointBase):
    """The embedding path of J: :meth:`embed` (images → ``t``), detection from ``t`` and the
    image tokens the MLLM is given."""

    # ------------------------------------------------------------------ embedding
    def _decode_images(
        self, images: Any, preprocessing: str = INTERACTIVE_PREPROCESSING
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        exif = get_preprocessing(preprocessing).exif_orientation
        if isinstance(images, (str, os.PathLike, Image.Image, LoadedImage)) or (
            isinstance(images, torch.Tensor) and images.dim() == 3
        ):
            images = [images]
        if not isinstance(images, (list, tuple)) or not images:
            raise JointModelError(
                "images: expected a non-empty list of paths, PIL images, LoadedImage or tensors"
            )
        tensors, sizes = [], []
        for i, image in enumerate(images):
            if isinstance(image, torch.Tensor):
                if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                    raise JointModelError(
                        f"image {i}: tensor must be (3, H, W) uint8, got {tuple(image.shape)} {image.dtype}"
                    )
                size = (int(image.shape[2]), int(image.shape[1]))
                try:
                    check_pixels(size, f"image {i}")
                except ImageLoadError as exc:
                    raise JointModelError(str(exc)) from None
                tensor = image.cpu()
                if working_size(size) != size:  # shrunk once, like a decoded file
                    pil = Image.fromarray(tensor.permute(1, 2, 0).numpy(), "RGB")
                    tensor = image_to_tensor(open_image(pil, exif_orientation=exif).image)
            elif isinstance(image, LoadedImage):  # already decoded under the policy
                size, tensor = image.original_size, image_to_tensor(image.image)
            elif isinstance(image, (str, os.PathLike, Image.Image)):
                try:
                    loaded = open_image(image, exif_orientation=exif)
                except ImageLoadError as exc:
                    raise JointModelError(str(exc)) from None
                size, tensor = loaded.original_size, image_to_tensor(loaded.image)
            else:
                raise JointModelError(f"image {i}: unsupported type {type(image).__name__}")
            sizes.append(size)
            tensors.append(tensor)
        return tensors, sizes

    @torch.no_grad()
    def embed(
        self,
        images: Any,
        batch_size: int = 32,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
    ) -> JointEmbedding:
        """The shared embedding ``t`` of a batch of images.

        Each image is decoded under the image policy (:func:`jmllm.align.images.open_image`:
        more than 20 000 × 20 000 pixels refused from the header, large JPEGs decoded reduced,
        RGB conversions — alpha on white, 16-bit scaled, CMYK/palette converted), shrunk once to
        at most 4096 px on its longest side, squashed to OWL-ViT's square input (OWLv2: padded
        to a square and resized by OWLv2's own image processor, exactly its pixels) and run to
        the penultimate encoder layer. ``image_sizes`` keep the original sizes, so boxes are in
        original pixels; ``images`` hold the working copies.

        Args:
            images: one or a list of paths, PIL images, (3, H, W) uint8 tensors or
                :class:`~jmllm.align.images.LoadedImage` (decoded already, e.g. with a stricter
                pixel limit; its original size and orientation are kept).
            batch_size: images per OWL-ViT forward (bounds memory for long lists).
            preprocessing: ``"exif"`` (default: EXIF orientation applied, torch's resize) or
                ``"authors"`` (the stored pixels and the HF processors' PIL resize, as the
                paper's authors; :mod:`jmllm.align.preprocessing`).

        Returns:
            :class:`JointEmbedding` with ``t`` (B, 1 + N, D_owl) and the original sizes.

        Raises:
            JointModelError: an image cannot be read (the message names it).

        Example:
            >>> emb = model.embed(["cat.jpg", "dog.png"])  # doctest: +SKIP
            >>> emb.t.shape  # doctest: +SKIP
            torch.Size([2, 577, 768])
        """
        if batch_size < 1:
            raise JointModelError(f"batch_size: must be positive, got {batch_size}")
        try:
            preprocessing = get_preprocessing(preprocessing).name
        except ValueError as exc:
            raise JointModelError(str(exc)) from None
        tensors, sizes = self._decode_images(images, preprocessing)
        problems: list[str | None] = []
        if self.input_check is not None:
            for i, (tensor, size) in enumerate(zip(tensors, sizes, strict=True)):
                problems.append(self.input_check(tensor, size) or None)
                if problems[-1]:
                    logger.warning("image %d: %s", i, problems[-1])
        chunks = []
        for start in range(0, len(tensors), batch_size):
            batch = tensors[start : start + batch_size]
            pixel_values = self.owl_norm(batch, self.device, preprocessing)  # (b, 3, S, S)
            chunks.append(owl_penultimate(self.owl, pixel_values.to(self.dtype)))  # (b, 1+N, D)
        return JointEmbedding(
            t=torch.cat(chunks),
            image_sizes=sizes,
            images=tensors,
            preprocessing=preprocessing,
            input_problems=problems,
        )

    def _as_embedding(
        self, emb_or_images: Any, preprocessing: str = INTERACTIVE_PREPROCESSING
    ) -> JointEmbedding:
        if isinstance(emb_or_images, JointEmbedding):
            return emb_or_images
        return self.embed(emb_or_images, preprocessing=preprocessing)

    # ------------------------------------------------------------------ detection
    def encode_queries(
        self, queries: str | Sequence[str], template: str = DEFAULT_QUERY_TEMPLATE
    ) -> torch.Tensor:
        """Text-query embeddings for the class head, cached per (query set, template).

        Each query is put in ``template``, tokenised with OWL-ViT's tokenizer (padded to its
        16 positions, as OWL-ViT's processor does), run through the text model and the text
        projection and L2-normalised, exactly as ``OwlViTModel.forward`` hands them to the
        detection head.

        Args:
            queries: object names, e.g. ``["cat", "dog"]``.
            template: format string with one ``{}``; ``"{}"`` uses the names as they are.

        Returns:
            (Q, D_q) tensor on :attr:`device`.

        Raises:
            PromptError: an empty query, or one longer than OWL-ViT's text positions.

        Example:
            >>> model.encode_queries(["cat", "dog"]).shape  # doctest: +SKIP
            torch.Size([2, 512])
        """
        names = self._check_queries(queries)
        try:
            check_template(template, "query template")
        except ValueError as exc:
            raise PromptError(str(exc)) from None
        key = (tuple(names), template, str(self.device), self.dtype)
        cached = self._query_cache.get(key)
        if cached is not None:
            return cached
        if self.owl_tokenizer is None:
            raise JointModelError("owl_tokenizer: J was built without OWL-ViT's tokenizer")
        texts = [template.format(name) for name in names]
        max_len = int(self.owl.config.text_config.max_position_embeddings)
        for name, text in zip(names, texts, strict=True):
            n = len(self.owl_tokenizer(text).input_ids)
            if n > max_len:
                raise PromptError(
                    f"query {name!r}: {n} tokens, OWL-ViT's text model takes at most {max_len}"
                )
        tokens = self.owl_tokenizer(
            texts, padding="max_length", max_length=max_len, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            out = owl_base_model(self.owl).get_text_features(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            )
            embeds = out.pooler_output if hasattr(out, "pooler_output") else out  # (Q, D_q)
            embeds = embeds / torch.linalg.norm(embeds, ord=2, dim=-1, keepdim=True)
        if len(self._query_cache) >= QUERY_CACHE_SIZE:  # drop the oldest query set
            self._query_cache.pop(next(iter(self._query_cache)))
        self._query_cache[key] = embeds
        return embeds

    @staticmethod
    def _check_queries(queries: str | Sequence[str]) -> list[str]:
        if isinstance(queries, str):
            queries = [queries]
        names = list(queries)
        if not names:
            raise PromptError("queries: empty list; give at least one object name")
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise PromptError(f"query {i}: empty query")
        return [name.strip() for name in names]

    def detection_heads(
        self, t: torch.Tensor, query_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """O^OWL from ``t``: class logits and boxes, a differentiable pure function of ``t``.

        Args:
            t: (B, 1 + N, D_owl) embedding (CLS first), possibly perturbed or requiring grad.
            query_embeds: (Q, D_q) from :meth:`encode_queries`.

        Returns:
            class_logits (B, N, Q) and boxes (B, N, 4) ``cx, cy, w, h`` in [0, 1] of the
            squashed square.

        Example:
            >>> logits, boxes = model.detection_heads(emb.t, model.encode_queries(["cat"]))  # doctest: +SKIP
        """
        return owl_detection_heads(self.owl, t, query_embeds)

    def detection_outputs(self, t: torch.Tensor, query_embeds: torch.Tensor) -> HeadOutputs:
        """Every head of O^OWL from ``t``, differentiable: class logits (B, N, Q), boxes
        (B, N, 4) and OWLv2's objectness logits (B, N) (None with OWL-ViT).

        Example:
            >>> out = model.detection_outputs(emb.t, model.encode_queries(["cat"]))  # doctest: +SKIP
            >>> out.objectness.shape  # OWLv2 base/16  # doctest: +SKIP
            torch.Size([1, 3600])
        """
        return owl_head_outputs(self.owl, t, query_embeds)

    @property
    def pads_to_square(self) -> bool:
        """Whether J's vision side pads images to a square (OWLv2) rather than squashing them
        (OWL-ViT): its boxes and patches then cover the padded square."""
        return pads_to_square(self.owl)

    def detect(
        self,
        emb_or_images: Any,
        queries: str | Sequence[str],
        threshold: float = 0.1,
        nms_iou: float | None = None,
        template: str = DEFAULT_QUERY_TEMPLATE,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
    ) -> list[Detections]:
        """Detections of every image for open-vocabulary ``queries``, in original pixels.

        Args:
            emb_or_images: a :class:`JointEmbedding` (reused) or images for :meth:`embed`.
            queries: object names; each is put in ``template``.
            threshold: minimum sigmoid score.
            nms_iou: per-class NMS IoU threshold; None keeps every box above the threshold.
            template: query template.
            preprocessing: how images (not an embedding) are embedded (see :meth:`embed`).

        Returns:
            One :class:`Detections` per image, highest score first.

        Example:
            >>> dets = model.detect(emb, ["cat", "dog"], threshold=0.2, nms_iou=0.5)  # doctest: +SKIP
            >>> dets[0].to_records()[0]  # doctest: +SKIP
            {'label': 'cat', 'score': 0.71, 'box': [1.5, 55.3, 315.6, 472.2], 'patch': 301}
        """
        emb = self._as_embedding(emb_or_images, preprocessing)
        names = self._check_queries(queries)
        query_embeds = self.encode_queries(names, template)
        with torch.no_grad():
            logits, boxes, objectness = self.detection_outputs(emb.t.to(self.device), query_embeds)
        return [
            decode_detections(
                logits[i],
                boxes[i],
                emb.image_sizes[i],
                names,
                threshold,
                nms_iou,
                objectness=objectness[i] if objectness is not None else None,
                pads_to_square=self.pads_to_square,
            )
            for i in range(len(emb))
        ]

    # ------------------------------------------------------------------ language side
    def image_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """W(t without CLS) on the family's grids: the image tokens J gives the MLLM's language
        model, (B, L, D_llm), packed as the family lays them out.

        ``t``'s patch grid (:attr:`owl_grid`) is resampled onto every grid of the family's
        layout first where they differ (:func:`jmllm.align.families.resample_patches`); for
        LLaVA-1.5 and Qwen with OWL-ViT B/32 they agree and W reads ``t``'s patches as they
        are. Differentiable in ``t``.

        Example:
            >>> model.image_tokens(emb.t).shape  # LLaVA-1.5  # doctest: +SKIP
            torch.Size([1, 576, 4096])
        """
        family = self._family()
        assert self.alignment is not None
        patches = resample_patches(t[:, 1:].to(self.device), self.owl_grid, family.layout)
        return family.pack(self.alignment(patches))  # (B, N, D) -> (B, L, D)

    @torch.no_grad()
    def stock_image_tokens(self, emb: JointEmbedding) -> torch.Tensor:
        """The MLLM's own image tokens (its vision tower and projector on the squashed image, on
        the same grids and packed the same way as :meth:`image_tokens`)."""
        family = self._family()
        if not emb.images:
            raise JointModelError("embedding: the stock MLLM needs the images, not t alone")
        tower_device = next(family.vision.tower(self.mllm).parameters()).device
        # the same resize as OWL-ViT's side of J got (the embedding's preprocessing)
        preprocessing = emb.preprocessing or INTERACTIVE_PREPROCESSING
        pixel_values = self.mllm_norm(emb.images, tower_device, preprocessing)  # (B, 3, S, S)
        return family.pack(family.stock_tokens(pixel_values))

    @torch.no_grad()
    def stock_inputs(self, emb: JointEmbedding) -> dict[str, torch.Tensor]:
        """The stock MLLM's own image inputs for the embedding's images (``pixel_values`` and
        ``image_sizes`` / ``image_grid_thw``, as its processor lays them out), to run the
        model's own forward beside J's (the exactness checks).

        Example:
            >>> ids = model.prompt_inputs("Hi?")["input_ids"]  # doctest: +SKIP
            >>> model.mllm(input_ids=ids, **model.stock_inputs(emb)).logits  # doctest: +SKIP
        """
        family = self._family()
        if not emb.images:
            raise JointModelError("embedding: the stock MLLM needs the images, not t alone")
        tower_device = next(family.vision.tower(self.mllm).parameters()).device
        preprocessing = emb.preprocessing or INTERACTIVE_PREPROCESSING
        return family.vision.model_inputs(self.mllm_norm(emb.images, tower_device, preprocessing))
