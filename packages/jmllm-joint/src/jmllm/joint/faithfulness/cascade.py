"""The model-randomisation cascade on one J, in place: W, then the language model's head, then
its decoder layers from the top, cumulatively (Adebayo et al., *Sanity Checks for Saliency
Maps*, NeurIPS 2018).

The stages and their weights are exactly those of
:func:`jmllm.joint.toy.localisation.randomisation_cascade` for the same seed (stage ``k``
re-initialises every block up to its own with seed ``seed + k``), but instead of a copy of the
language model per stage, :meth:`RandomisationCascade.stages` changes J's own language model
stage by stage and puts its trained weights back afterwards (from a copy in CPU memory): a real
LLaVA-1.5-7b cannot be copied 34 times. OWL-ViT and the token embeddings are never touched, so
GA's OWL side stays comparable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from jmllm.joint.model.internals import cascade_blocks, initializer_std, language_container
from jmllm.joint.toy.localisation import reinitialise_, reinitialised

CASCADES: tuple[str, ...] = ("full", "final", "none")


class RandomisationCascade:
    """Stage-by-stage randomisations of one J's language side.

    Args:
        model: a :class:`~jmllm.joint.JointModel` (its language model is changed inside
            :meth:`stages` and restored when the loop ends, also on an error).
        seed: the re-initialisations' seed (stage ``k`` uses ``seed + k``).
        cascade: ``full`` (every stage: ``w``, ``head``, ``layer_<L-1>`` … ``layer_0``),
            ``final`` (only the last: everything re-initialised) or ``none``.

    Example:
        >>> cascade = RandomisationCascade(model)  # doctest: +SKIP
        >>> for name, randomised in cascade.stages():  # doctest: +SKIP
        ...     maps[name] = method.bound_to(randomised).attribute_request(request)
    """

    def __init__(self, model: Any, seed: int = 12345, cascade: str = "full") -> None:
        if cascade not in CASCADES:
            raise ValueError(f"cascade: {cascade!r} is not one of {', '.join(CASCADES)}")
        from jmllm.joint.model.joint import JointModel

        self.model = model
        self.seed = seed
        self.cascade = cascade
        self.blocks = cascade_blocks(model)
        self.std = initializer_std(model)
        self.random_w = reinitialised(model, seed)
        self.container = language_container(model)
        # one J per stage, each its own object (methods cache per model), all sharing OWL-ViT,
        # the random W and the language model that :meth:`stages` changes in place
        self._joints = [self.random_w] + [
            JointModel(
                model.owl,
                self.container,
                self.random_w.alignment,
                tokenizer=model.tokenizer,
                owl_tokenizer=model.owl_tokenizer,
                owl_norm=model.owl_norm,
                llava_norm=model.llava_norm,
            )
            for _ in self.blocks
        ]
        names = ["w", *(name for name, _ in self.blocks)]
        self.names = {"full": names, "final": names[-1:], "none": []}[cascade]
        self._trained: dict[str, torch.Tensor] | None = None

    def _save(self) -> dict[str, torch.Tensor]:
        if self._trained is None:
            paths = [p for _, block in self.blocks for p in block]
            self._trained = {
                f"{path}.{name}": tensor.detach().to("cpu", copy=True)
                for path in paths
                for name, tensor in self.container.get_submodule(path).state_dict().items()
            }
        return self._trained

    def _restore(self) -> None:
        trained = self._save()
        with torch.no_grad():
            for key, tensor in self.container.state_dict(keep_vars=True).items():
                if key in trained:
                    tensor.copy_(trained[key])

    def _randomise(self, k: int) -> None:
        """Re-initialise blocks 1 … k (cascade order) with seed ``seed + k``, as the copying
        cascade does."""
        done = [p for _, block in self.blocks[:k] for p in block]
        devices = sorted(
            {p.device.index for p in self.container.parameters() if p.device.type == "cuda"}
        )
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + k)
            for path in done:
                reinitialise_(self.container.get_submodule(path), self.std)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        self._save()
        try:
            yield
        finally:
            self._restore()

    def stages(self) -> Iterator[tuple[str, Any]]:
        """``(stage name, randomised J)`` in cascade order; the trained weights are back when the
        loop ends (or is left early)."""
        if not self.names:
            return
        with self._changing():
            all_names = ["w", *(name for name, _ in self.blocks)]
            for name in self.names:
                k = all_names.index(name)
                if k > 0:
                    self._randomise(k)
                yield name, self._joints[k]
