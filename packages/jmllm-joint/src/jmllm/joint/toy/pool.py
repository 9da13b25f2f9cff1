"""Scenes rendered once into a tensor, for training loops that draw many batches from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from jmllm.joint.toy.scenes import IMAGE_SIZE, QA, ToyObject, make_scene

COVERED = 0.1  # a patch shows an object when the object's pixels cover this much of it


@dataclass
class ScenePool:
    """``count`` scenes of a split as (N, 3, S, S) uint8 pixels plus their truth (no PIL images).

    Example:
        >>> pool = ScenePool.render("heldout", 4)
        >>> pool.pixels.shape, len(pool.objects)
        (torch.Size([4, 3, 128, 128]), 4)
    """

    split: str
    seed: int
    pixels: torch.Tensor  # (N, 3, S, S) uint8
    objects: list[tuple[ToyObject, ...]]
    captions: list[str]
    questions: list[tuple[QA, ...]]

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    @classmethod
    def render(
        cls,
        split: str,
        count: int,
        seed: int = 0,
        start: int = 0,
        size: int = IMAGE_SIZE,
        progress: bool = False,
    ) -> ScenePool:
        """Render scenes ``start … start + count - 1`` of ``split``."""
        from tqdm.auto import tqdm

        pixels = torch.empty(count, 3, size, size, dtype=torch.uint8)
        objects, captions, questions = [], [], []
        for i in tqdm(
            range(count), desc=f"rendering {split} scenes", disable=not progress, leave=False
        ):
            scene = make_scene(split, start + i, seed, size)
            pixels[i] = torch.from_numpy(np.array(scene.image)).permute(2, 0, 1)
            objects.append(scene.objects)
            captions.append(scene.caption)
            questions.append(scene.questions)
        return cls(split, seed, pixels, objects, captions, questions)

    def coverage(self, grid: int, saturation: int = 60) -> torch.Tensor:
        """(N, K, grid²) fraction of each grid cell covered by each object's pixels (K = the most
        objects in a scene; absent objects cover nothing), cells row-major like ViT tokens.

        Object pixels are found from the pixels themselves: saturated (channels more than
        ``saturation`` apart, backgrounds are neutral), inside the object's box.
        """
        n, _, size, _ = self.pixels.shape
        k = max(len(objs) for objs in self.objects)
        cell = size // grid
        out = torch.zeros(n, k, grid * grid)
        for start in range(0, n, 512):
            rgb = self.pixels[start : start + 512].to(torch.int16)
            saturated = (rgb.amax(1) - rgb.amin(1)) > saturation  # (b, S, S)
            for b in range(saturated.shape[0]):
                for j, o in enumerate(self.objects[start + b]):
                    x0, y0, x1, y1 = o.box
                    mask = torch.zeros(size, size)
                    mask[y0:y1, x0:x1] = saturated[b, y0:y1, x0:x1].float()
                    pooled = torch.nn.functional.avg_pool2d(mask[None, None], cell)  # (1,1,g,g)
                    out[start + b, j] = pooled.flatten()
        return out

    def images(self, indices: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """The (3, S, S) uint8 images at ``indices``, as the project's normalisers take them."""
        return [self.pixels[int(i)] for i in indices]
