"""Render a study spec into one self-contained HTML questionnaire.

The file embeds every image as a ``data:`` URL, the stylesheet and the script inline, and loads
nothing from the network, so it works opened from disk (``file://``), from any static host, or
from ``jmllm-userstudy serve``. A Content-Security-Policy allows only the page's own script and
style (by hash) and ``data:`` images, so injected markup could not run even if it slipped through
(all spec text is escaped by the page's Jinja2 template, ``templates/questionnaire.html``, whose
autoescaping is on, and set with ``textContent`` in the browser anyway).

Nothing a participant can see or read in the page tells which explanation is for which object:
the explanation images are re-encoded from their pixels (no file name, title or other metadata
travels with them), every image is refused above the pixel limit before it is decoded, and each
pair is embedded in an order that depends on the files' bytes only (:attr:`Question.page_flipped`),
never on the spec's order.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import logging
from importlib import resources
from pathlib import Path

import jinja2
from PIL import Image, ImageOps

from .atomic import atomic_write_text
from .conventions import check_image_header, open_image
from .spec import StudySpec, answer_text, question_text

__all__ = [
    "QUESTIONNAIRE_NAME",
    "explanation_data_url",
    "image_data_url",
    "render_questionnaire",
    "write_questionnaire",
]

log = logging.getLogger(__name__)

QUESTIONNAIRE_NAME = "questionnaire.html"
_LARGE_PAGE_CHARS = 25_000_000
# Formats every browser shows natively are embedded byte for byte; anything else becomes PNG.
_NATIVE = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


def image_data_url(path: Path) -> str:
    """A ``data:`` URL of the image at ``path`` (re-encoded as PNG if browsers cannot show it).

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bmp"
    >>> Image.new("RGB", (2, 2)).save(p)
    >>> image_data_url(p)[:22]
    'data:image/png;base64,'
    """
    fmt, _ = check_image_header(path)  # the pixel limit, before anything is decoded
    data = path.read_bytes()
    mime = _NATIVE.get(fmt)
    if mime == "image/jpeg":
        with Image.open(io.BytesIO(data)) as im:  # the header only (size already checked)
            if im.mode == "CMYK":  # browsers show CMYK JPEGs wrongly or not at all
                mime = None
    if mime is None:
        return _png_data_url(path)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png_data_url(path: Path) -> str:
    """The image's pixels as a PNG ``data:`` URL: EXIF orientation applied, no metadata kept."""
    with open_image(path, name=str(path)) as im:
        oriented = ImageOps.exif_transpose(im) or im
        converted = oriented.convert("RGBA" if "A" in oriented.getbands() else "RGB")
    buffer = io.BytesIO()
    converted.save(buffer, format="PNG")  # no pnginfo: text chunks and EXIF are not written
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def explanation_data_url(path: Path) -> str:
    """An explanation image as the questionnaire embeds it: its pixels alone, re-encoded as PNG,
    so that no title, description, file name or other metadata of the file can reach the page.

    >>> import tempfile, pathlib
    >>> from PIL import Image, PngImagePlugin
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "q1_cat.png"
    >>> info = PngImagePlugin.PngInfo(); info.add_text("Title", "GA: cat")
    >>> Image.new("RGB", (2, 2)).save(p, pnginfo=info)
    >>> import base64
    >>> b"GA: cat" in base64.b64decode(explanation_data_url(p).split(",", 1)[1])
    False
    """
    return _png_data_url(path)


def _json_for_script(value: object) -> str:
    """JSON that cannot end the ``<script>`` element it sits in."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


@functools.cache
def _template(name: str) -> jinja2.Template:
    """A page template of ``templates/``, with autoescaping on: every value is escaped unless the
    template marks it ``|safe``."""
    source = resources.files("jmllm.userstudy").joinpath("templates", name).read_text("utf-8")
    environment = jinja2.Environment(
        autoescape=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    return environment.from_string(source)


def render_questionnaire(spec: StudySpec) -> str:
    """The questionnaire of ``spec`` as one HTML document.

    Args:
        spec: A validated study spec.

    Returns:
        The HTML text (UTF-8), self-contained.

    >>> from jmllm.userstudy.example import write_example
    >>> from jmllm.userstudy.spec import load_spec
    >>> import tempfile
    >>> page = render_questionnaire(load_spec(write_example(tempfile.mkdtemp())))
    >>> page.startswith("<!doctype html>") and "://" not in page
    True
    """
    study = {
        "title": spec.title,
        "seed": spec.seed,
        "fingerprint": spec.fingerprint(),
        "questions": [
            {
                "id": q.id,
                "text": question_text(q.objects),
                "answers": {a: answer_text(a, q.objects) for a in ("A1", "A2")},
                "image": image_data_url(q.image),
                # page order, not spec order: see Question.page_flipped
                "explanations": [explanation_data_url(p) for p in q.page_explanations()],
            }
            for q in spec.questions
        ],
    }
    package = resources.files("jmllm.userstudy")
    script = package.joinpath("questionnaire.js").read_text(encoding="utf-8")
    style = package.joinpath("questionnaire.css").read_text(encoding="utf-8")
    csp = (
        "default-src 'none'; img-src data:; "
        f"style-src {_csp_hash(style)}; script-src {_csp_hash(script)}; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'"
    )
    paragraphs = [p.strip() for p in spec.instructions.split("\n\n") if p.strip()]
    return _template("questionnaire.html").render(
        title=spec.title,
        csp=csp,
        paragraphs=paragraphs,
        n=len(spec.questions),
        # the page's own files and the study data: trusted, inserted as they are (the CSP hashes
        # are of these exact bytes; the JSON is escaped for a <script> element by _json_for_script)
        style=style,
        script=script,
        study_json=_json_for_script(study),
    )


def write_questionnaire(spec: StudySpec, out_dir: str | Path) -> Path:
    """Render ``spec`` and write ``questionnaire.html`` into ``out_dir`` atomically.

    Args:
        spec: A validated study spec.
        out_dir: Output folder (created if missing).

    Returns:
        The path of the written questionnaire.
    """
    out = Path(out_dir)
    target = out / QUESTIONNAIRE_NAME
    page = render_questionnaire(spec)  # before the folder exists: a failure leaves none
    out.mkdir(parents=True, exist_ok=True)
    if len(page) > _LARGE_PAGE_CHARS:
        log.warning(
            "%s is %.0f MB: participants on slow connections or phones may struggle; "
            "consider downscaling the images",
            target,
            len(page) / 1e6,
        )
    atomic_write_text(target, page)
    return target
