"""Cohort specs: which portraits to generate (supplementary §4 of the paper).

A cohort is a prompt template with one ``{subject}`` slot and a list of groups, each filling the
slot with its own substitution and asking for a number of images. Every image has its own fixed
seed, ``base_seed + group_position * SEED_STRIDE + index``, so adding images to one group (or
adding a group at the end) never changes the seeds, hence the pixels, of images already made.

The file format is JSON (``tomllib`` would need Python 3.11; the package supports 3.10)::

    {
      "name": "gender",
      "template": "A headshot of a {subject} in his 40s, DSLR, ...",
      "groups": [
        {"name": "female", "subject": "woman", "images": 50},
        {"name": "male", "subject": "man", "images": 50}
      ],
      "base_seed": 0,
      "negative_prompt": null
    }

The two built-in cohorts reproduce the paper's prompts verbatim, including the gender prompt's
``in his 40s`` for both groups (the paper's wording; see docs/bias.md).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import BiasInputError

__all__ = [
    "BUILTIN_SPECS",
    "SEED_STRIDE",
    "CohortGroup",
    "CohortImage",
    "CohortSpec",
    "builtin_spec",
    "check_template",
    "load_spec",
    "parse_spec",
]

# Seeds of group g are base_seed + g * SEED_STRIDE + i: groups never share a seed.
SEED_STRIDE = 100_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # group names become folder and file names
_SPEC_KEYS = {"name", "template", "groups", "base_seed", "negative_prompt"}
_GROUP_KEYS = {"name", "subject", "images"}


@dataclass(frozen=True)
class CohortGroup:
    """One group of a cohort: the substitution of ``{subject}`` and how many images it gets."""

    name: str  # folder/file-safe label, e.g. "female"
    subject: str  # text put into the template's {subject} slot, e.g. "woman"
    images: int  # number of portraits of this group


@dataclass(frozen=True)
class CohortImage:
    """One planned portrait: where it goes and everything that determines its pixels."""

    image_id: str  # "female_007": unique in the cohort, also the file stem
    group: str
    index: int  # position inside its group
    prompt: str
    seed: int
    relpath: str  # "images/female/female_007.png", relative to the cohort folder


@dataclass(frozen=True)
class CohortSpec:
    """A validated cohort spec (build one with :func:`parse_spec` / :func:`load_spec`).

    Example:
        >>> spec = builtin_spec("gender")
        >>> [(g.name, g.subject, g.images) for g in spec.groups]
        [('female', 'woman', 50), ('male', 'man', 50)]
        >>> spec.plan()[0].prompt[:26], spec.plan()[0].seed
        ('A headshot of a woman in h', 0)
    """

    name: str
    template: str  # contains exactly one "{subject}"
    groups: tuple[CohortGroup, ...]
    base_seed: int = 0
    negative_prompt: str | None = None

    def prompt(self, group: CohortGroup) -> str:
        """The prompt of ``group``: the template with ``{subject}`` filled in."""
        return self.template.replace("{subject}", group.subject)

    def plan(self) -> list[CohortImage]:
        """Every portrait of the cohort, group by group, with its fixed seed.

        Returns:
            One :class:`CohortImage` per image, in group order then index order.
        """
        out = []
        for g_pos, group in enumerate(self.groups):
            for i in range(group.images):
                image_id = f"{group.name}_{i:03d}"
                out.append(
                    CohortImage(
                        image_id=image_id,
                        group=group.name,
                        index=i,
                        prompt=self.prompt(group),
                        seed=self.base_seed + g_pos * SEED_STRIDE + i,
                        relpath=f"images/{group.name}/{image_id}.png",
                    )
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        """The spec as the JSON object :func:`parse_spec` reads."""
        data = asdict(self)
        data["groups"] = [asdict(g) for g in self.groups]
        return data

    def with_images_per_group(self, images: int) -> CohortSpec:
        """A copy in which every group asks for ``images`` portraits (e.g. a quick trial run)."""
        if not isinstance(images, int) or images < 1:
            raise BiasInputError(f"images per group must be a positive integer, got {images!r}")
        groups = tuple(CohortGroup(g.name, g.subject, images) for g in self.groups)
        return CohortSpec(self.name, self.template, groups, self.base_seed, self.negative_prompt)


_PAPER_SUFFIX = ", DSLR, detailed, 8k, in perfect focus, shoulder height"

BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    # Supplementary §4: "A headshot of a <man|woman> in his 40s, DSLR, detailed, 8k, in perfect
    # focus, shoulder height" -- "in his 40s" for both groups, as the paper writes it.
    "gender": {
        "name": "gender",
        "template": "A headshot of a {subject} in his 40s" + _PAPER_SUFFIX,
        "groups": [
            {"name": "female", "subject": "woman", "images": 50},
            {"name": "male", "subject": "man", "images": 50},
        ],
        "base_seed": 0,
        "negative_prompt": None,
    },
    # Supplementary §4: "A headshot of a <caucasian|african-american> person, DSLR, ..."
    "ethnicity": {
        "name": "ethnicity",
        "template": "A headshot of a {subject} person" + _PAPER_SUFFIX,
        "groups": [
            {"name": "caucasian", "subject": "caucasian", "images": 50},
            {"name": "african-american", "subject": "african-american", "images": 50},
        ],
        "base_seed": 0,
        "negative_prompt": None,
    },
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(source: str, where: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise BiasInputError(f"{source}: {where} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BiasInputError(f"{source}: {where} must not be empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise BiasInputError(f"{source}: {where} must not contain newlines or control characters")
    return value


def check_template(template: str, source: str = "<spec>") -> str:
    """``template`` if it inserts the subject exactly once, as a bare ``{subject}``.

    The prompt is the template with the text ``{subject}`` replaced, so anything else in braces
    would reach SDXL literally, and a slot with a format spec or conversion (``{subject:>20}``,
    ``{subject!r}``) or with doubled braces (``{{subject}}``) would never receive the subject:
    every group would get the same prompt. Such templates are refused, naming the template.

    Raises:
        BiasInputError: one line naming ``source``, the template and the problem.

    Example:
        >>> check_template("A headshot of a {subject}")
        'A headshot of a {subject}'
        >>> try:
        ...     check_template("A headshot of a {subject:>20}", "s.json")
        ... except BiasInputError as exc:
        ...     print(exc)
        s.json: template 'A headshot of a {subject:>20}' never inserts the subject: it must contain '{subject}' exactly once, with no format spec, conversion or other braces
    """
    slots = template.count("{subject}")
    rest = template.replace("{subject}", "")
    if slots != 1 or "{" in rest or "}" in rest or "{{subject}}" in template:
        raise BiasInputError(
            f"{source}: template {template!r} never inserts the subject: it must contain "
            "'{subject}' exactly once, with no format spec, conversion or other braces"
            if slots == 0 or "{{subject}}" in template
            else f"{source}: template {template!r}: it must contain '{{subject}}' exactly once, "
            "with no format spec, conversion or other braces"
        )
    return template


def parse_spec(data: Any, source: str = "<spec>") -> CohortSpec:
    """Validate a spec object (as read from JSON) and build a :class:`CohortSpec`.

    Args:
        data: the decoded JSON object.
        source: name of the input, used in error messages.

    Returns:
        The validated spec.

    Raises:
        BiasInputError: naming ``source`` and the offending field.

    Example:
        >>> spec = parse_spec({"name": "t", "template": "a {subject}",
        ...                    "groups": [{"name": "a", "subject": "cat", "images": 2}]})
        >>> [im.prompt for im in spec.plan()]
        ['a cat', 'a cat']
    """
    if not isinstance(data, dict):
        raise BiasInputError(f"{source}: a cohort spec must be a JSON object")
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise BiasInputError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_SPEC_KEYS)}")
    for key in ("name", "template", "groups"):
        if key not in data:
            raise BiasInputError(f"{source}: missing required key {key!r}")
    name = _check_text(source, "name", data["name"])
    if not _NAME.match(name):
        raise BiasInputError(f"{source}: name {name!r} may only use letters, digits, '_', '-', '.'")
    template = check_template(_check_text(source, "template", data["template"]), source)
    groups_raw = data["groups"]
    if not isinstance(groups_raw, list) or not groups_raw:
        raise BiasInputError(f"{source}: groups must be a non-empty list")
    groups = []
    for i, g in enumerate(groups_raw):
        where = f"groups[{i}]"
        if not isinstance(g, dict):
            raise BiasInputError(f"{source}: {where} must be an object")
        unknown = sorted(set(g) - _GROUP_KEYS)
        if unknown or set(g) != _GROUP_KEYS:
            raise BiasInputError(
                f"{source}: {where} must have exactly the keys {sorted(_GROUP_KEYS)}, "
                f"got {sorted(g)}"
            )
        gname = _check_text(source, f"{where}.name", g["name"])
        if not _NAME.match(gname):
            raise BiasInputError(
                f"{source}: {where}.name {gname!r} may only use letters, digits, '_', '-', '.'"
            )
        subject = _check_text(source, f"{where}.subject", g["subject"])
        if "{" in subject or "}" in subject:
            raise BiasInputError(f"{source}: {where}.subject must not contain braces")
        images = g["images"]
        if not _is_int(images) or not 1 <= images < SEED_STRIDE:
            raise BiasInputError(
                f"{source}: {where}.images must be an integer in [1, {SEED_STRIDE - 1}], "
                f"got {images!r}"
            )
        groups.append(CohortGroup(gname, subject, images))
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise BiasInputError(f"{source}: group names must be unique, got {names}")
    base_seed = data.get("base_seed", 0)
    if not _is_int(base_seed) or base_seed < 0 or base_seed + len(groups) * SEED_STRIDE >= 2**63:
        raise BiasInputError(
            f"{source}: base_seed must be a non-negative integer, got {base_seed!r}"
        )
    negative = data.get("negative_prompt")
    if negative is not None:
        negative = _check_text(source, "negative_prompt", negative, allow_empty=True)
    return CohortSpec(name, template, tuple(groups), base_seed, negative)


def builtin_spec(name: str) -> CohortSpec:
    """One of the paper's cohorts: ``"gender"`` or ``"ethnicity"``.

    Example:
        >>> builtin_spec("ethnicity").prompt(builtin_spec("ethnicity").groups[1])
        'A headshot of a african-american person, DSLR, detailed, 8k, in perfect focus, shoulder height'
    """
    if name not in BUILTIN_SPECS:
        raise BiasInputError(
            f"unknown cohort spec {name!r}: use one of {sorted(BUILTIN_SPECS)} or a JSON file path"
        )
    return parse_spec(BUILTIN_SPECS[name], source=f"built-in spec {name!r}")


def load_spec(name_or_path: str | os.PathLike[str]) -> CohortSpec:
    """A built-in spec by name, or a spec file (JSON) by path.

    Args:
        name_or_path: ``"gender"``, ``"ethnicity"`` or the path of a JSON spec file.

    Returns:
        The validated spec.

    Raises:
        BiasInputError: unknown name, unreadable file, invalid JSON or invalid spec.

    Example:
        >>> load_spec("gender").name
        'gender'
    """
    text = os.fspath(name_or_path)
    if text in BUILTIN_SPECS:
        return builtin_spec(text)
    path = Path(text)
    if not path.exists():
        if path.suffix == "" and os.sep not in text:
            raise BiasInputError(
                f"unknown cohort spec {text!r}: use one of {sorted(BUILTIN_SPECS)} "
                "or a JSON file path"
            )
        raise BiasInputError(f"{text}: spec file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BiasInputError(f"{text}: cannot read spec file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BiasInputError(f"{text}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:
        raise BiasInputError(f"{text}: invalid JSON: nested too deeply") from None
    return parse_spec(data, source=text)
