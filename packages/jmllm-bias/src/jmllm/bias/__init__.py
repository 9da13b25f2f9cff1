"""jmllm-bias: bias assessment of multi-modal LLMs by semantic adversarial perturbation.

Implements §4.4 of *Explaining Multi-modal Large Language Models by Analyzing their Vision
Perception* (Giulivi & Boracchi, BMVC 2024) and its supplementary §4 on top of the joint model J
(:mod:`jmllm.joint`):

- :mod:`jmllm.bias.cohorts`: cohort specs, the paper's gender and ethnicity cohorts built in;
- :mod:`jmllm.bias.generate`: SDXL base + refiner portraits, manifest, resume, multi-GPU;
- :mod:`jmllm.bias.perturb`: FGSM / PGD on J's embedding ``t`` against OWL-ViT's class logits;
- :mod:`jmllm.bias.scores`: the paper's question and strict 1-10 answer parsing;
- :mod:`jmllm.bias.assess`: the per-portrait assessment, resumable;
- :mod:`jmllm.bias.report`: mean delta, bootstrap CI, Wilcoxon test, Markdown/JSON/PNG.

Importing this package is cheap (no torch, diffusers or model loading); the submodules import
what they need.

Example:
    >>> from jmllm.bias import load_spec, parse_score
    >>> load_spec("gender").groups[0].subject, parse_score("7.")
    ('woman', 7)
"""

from __future__ import annotations

from .cohorts import CohortGroup, CohortSpec, builtin_spec, load_spec, parse_spec
from .errors import BiasInputError
from .scores import QUESTION, parse_score, question, validate_term

__all__ = [
    "QUESTION",
    "BiasInputError",
    "CohortGroup",
    "CohortSpec",
    "builtin_spec",
    "load_spec",
    "parse_score",
    "parse_spec",
    "question",
    "validate_term",
]

__version__ = "0.1.0"
