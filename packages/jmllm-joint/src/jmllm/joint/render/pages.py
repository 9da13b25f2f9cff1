"""The HTML pages of jmllm-joint, rendered from Jinja2 templates with autoescaping.

Every page is one self-contained file: pictures are ``data:`` URLs, the stylesheet and the script
are inline, nothing is fetched from the network. The templates live beside this module in
``templates/`` so the pages can be read without reading Python. Autoescaping is on for every
``.html`` template: model text, queries, titles and file names are escaped by default; ``|safe``
appears only on fragments built and escaped by our own code (:func:`Markup` values).

Every page also carries a Content-Security-Policy that allows ``data:`` images, inline styles and
its own script (by hash) only, so the browser refuses any network request a page might make.

Example:
    >>> html = render("base.html", title="<b>t</b>")
    >>> "&lt;b&gt;t&lt;/b&gt;" in html and "<b>t</b>" not in html
    True
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

__all__ = ["Markup", "asset", "content_security_policy", "environment", "json_attribute", "render"]


def _escaped(value: Any) -> Any:
    """Every ``{{ value }}`` escaped with the standard library's entities (``&quot;``,
    ``&#x27;``), as the pages always were; trusted fragments (:class:`Markup`) pass as they are.
    Autoescaping then leaves the result alone."""
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value), quote=True))


@functools.lru_cache(maxsize=1)
def environment() -> Environment:
    """The package's Jinja2 environment (templates beside this module, autoescaped)."""
    return Environment(
        loader=PackageLoader("jmllm.joint.render", "templates"),
        autoescape=select_autoescape(),
        finalize=_escaped,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


@functools.lru_cache(maxsize=4)
def asset(name: str) -> Markup:
    """A static file of ``templates/`` (``page.css``, ``page.js``), as trusted text."""
    text = (
        resources.files("jmllm.joint.render")
        .joinpath("templates", name)
        .read_text(encoding="utf-8")
    )
    return Markup(text)


def content_security_policy(script: str | None) -> str:
    """The policy of a page: ``data:`` images, inline styles, the page's own script by hash."""
    scripts = "'none'"
    if script is not None:
        digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
        scripts = f"'sha256-{digest}'"
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src {scripts}; base-uri 'none'; form-action 'none'"
    )


def render(template: str, *, script: bool = False, **context: Any) -> str:
    """Render ``template`` (a file of ``templates/`` extending ``base.html``) with
    ``context``, the shared stylesheet and, with ``script``, the word-picking script.

    Args:
        template: the template's file name.
        script: include ``page.js`` (clickable words, the word picker).
        context: the template's variables (autoescaped unless :class:`Markup`).
    """
    code = asset("page.js") if script else None
    return (
        environment()
        .get_template(template)
        .render(css=asset("page.css"), script=code, csp=content_security_policy(code), **context)
    )


def json_attribute(value: Any) -> str:
    """``value`` as compact JSON for an HTML attribute (escaped by the template like any text).

    Example:
        >>> json_attribute([{"rect": [0, 1, 2, 3]}])
        '[{"rect":[0,1,2,3]}]'
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
