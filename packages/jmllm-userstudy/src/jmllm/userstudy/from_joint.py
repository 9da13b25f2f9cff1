"""Produce the explanation images of a question from a model (optional extra ``joint``).

The questionnaire only needs image files. To make them with the joint model J of
``jmllm-joint`` (GA saliency of each object), install the extra and call
:func:`write_explanations` with :func:`joint_explainer`, then point the spec at the files::

    pip install "jmllm-userstudy[joint]"

    from jmllm.userstudy.from_joint import joint_explainer, write_explanations
    e1, e2 = write_explanations("images/q1.png", ("cat", "TV/monitor"), "images", joint_explainer())
    # spec: explanations: [images/q1_cat.png, images/q1_TV_monitor.png], correct: A1

Any callable ``explain(image, object_name) -> image`` works in place of :func:`joint_explainer`
(for example your own GA code), so this hook does not depend on the joint package's API beyond
the one function named below. ``jmllm.joint`` is imported here, lazily, and nowhere else.

The pictures are shown to participants, so they must not name their object: :func:`joint_explainer`
draws them untitled (and refuses a ``title``). The file names written here do name the objects, for
the researcher; they never reach the questionnaire, which embeds the pixels alone, in an order
that does not follow the spec's (:attr:`jmllm.userstudy.spec.Question.page_flipped`).
"""

from __future__ import annotations

import importlib
import inspect
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from .atomic import atomic_write_bytes
from .conventions import open_image

__all__ = [
    "JOINT_ENTRY_POINT",
    "ExplainFn",
    "MissingExtraError",
    "joint_explainer",
    "write_explanations",
]

ExplainFn = Callable[[Image.Image, str], Image.Image]
# The function of jmllm.joint this hook calls: explain_object(image, object_name, *, model, view,
# ...) -> PIL image of J's GA explanation of that object (the paper's box view by default).
JOINT_ENTRY_POINT = "explain_object"


class MissingExtraError(ImportError):
    """The optional ``joint`` extra (``jmllm-joint``) is not installed or lacks the hook."""


def joint_explainer(**options: Any) -> ExplainFn:
    """An :data:`ExplainFn` backed by ``jmllm.joint`` (imported only now), drawing untitled
    pictures: a title would name the object the explanation is for, the study's answer.

    Args:
        **options: Passed through to ``jmllm.joint.explain_object``: ``model`` (a
            ``JointModel``, required), ``view`` (``"box"``, the paper's figures, or
            ``"overlay"``), ``weighting``, ``queries``, ``question``, ``template`` (J's
            conversation template: ``"paper"`` by default, the authors' prompt, or
            ``"llava-1.5"``), ``tokenization`` (``"legacy"`` by default, the authors' token
            ids, or ``"checkpoint"``) and ``preprocessing`` (``"authors"`` by default, the
            stored pixels resized as the HF processors do, or ``"exif"``).

    Returns:
        ``explain(image, object_name) -> PIL.Image``.

    Raises:
        MissingExtraError: ``jmllm-joint`` is missing, has no ``explain_object``, or one that
            cannot draw untitled pictures.
        ValueError: ``title`` among the options.

    >>> from jmllm.joint import JointModel  # doctest: +SKIP
    >>> my_joint_model = JointModel.from_pretrained(alignment="w.safetensors")  # doctest: +SKIP
    >>> explain = joint_explainer(model=my_joint_model)  # doctest: +SKIP
    >>> explain(Image.open("images/q1.png"), "cat").save("q1_cat.png")  # doctest: +SKIP
    """
    try:
        joint = importlib.import_module("jmllm.joint")
    except ImportError:
        raise MissingExtraError(
            "producing explanations from a model needs the optional extra: "
            "pip install 'jmllm-userstudy[joint]' (or pass your own explain function)"
        ) from None
    if "title" in options:
        raise ValueError(
            "joint_explainer: no title: participants would read the object's name on the picture"
        )
    entry = getattr(joint, JOINT_ENTRY_POINT, None)
    if not callable(entry):
        raise MissingExtraError(
            f"the installed jmllm-joint has no {JOINT_ENTRY_POINT}(image, object_name, **options); "
            "pass your own explain function to write_explanations"
        )
    if "title" not in inspect.signature(entry).parameters:
        raise MissingExtraError(
            f"the installed jmllm-joint's {JOINT_ENTRY_POINT} titles its pictures with the object "
            "name, which would give the answer away; upgrade jmllm-joint"
        )

    def explain(image: Image.Image, object_name: str) -> Image.Image:
        return entry(image, object_name, title=None, **options)

    return explain


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40] or "object"


def write_explanations(
    image: str | Path, objects: tuple[str, str], out_dir: str | Path, explain: ExplainFn
) -> tuple[Path, Path]:
    """Explain ``image`` for each of the two objects and write the maps as PNG files.

    Args:
        image: The question's image.
        objects: Object 1 and object 2 of the question.
        out_dir: Folder for the PNGs, named ``<image stem>_<object>.png``.
        explain: ``explain(image, object_name) -> PIL.Image``, e.g. :func:`joint_explainer`.

    Returns:
        The explanation files for object 1 and object 2: list them in this order in the spec's
        ``explanations`` with ``correct: A1`` (the questionnaire randomises the shown order).

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (4, 4)).save(root / "q.png")
    >>> paths = write_explanations(root / "q.png", ("cat", "TV/monitor"), root, lambda im, o: im)
    >>> [p.name for p in paths]
    ['q_cat.png', 'q_TV_monitor.png']
    """
    source = Path(image)
    out = Path(out_dir)
    with open_image(source) as im:  # the pixel limit, checked before decoding
        picture = im.convert("RGB")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for number, name in enumerate(objects, start=1):
        result = explain(picture, name)
        if not isinstance(result, Image.Image):
            raise TypeError(
                f"explain({source.name}, {name!r}) returned {type(result).__name__}, not a PIL image"
            )
        buffer = io.BytesIO()
        result.save(buffer, format="PNG")
        path = out / f"{source.stem}_{_slug(name)}.png"
        if number == 2 and path == written[0]:
            path = out / f"{source.stem}_{_slug(name)}_2.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written[0], written[1]
