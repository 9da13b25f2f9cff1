"""CHAIR (Rohrbach et al., EMNLP 2018): object hallucination in captions, CHAIR_s, CHAIR_i and
recall, with the standard synonym list and its rules.

A caption *mentions* an object when one of its words (or two-word phrases) is a synonym of an
object category; the mention is *hallucinated* when the category is not in the image's truth.

- CHAIR_s = captions with at least one hallucinated mention / captions;
- CHAIR_i = hallucinated mentions / mentions (every mention counts, a repeated word each time);
- recall = truth categories a caption mentions / truth categories, summed over the captions
  (the recall that OPERA's and later versions of ``chair.py`` add).

The truth of an image is the categories of its instance annotations **and** those its reference
captions mention (``chair.py`` reads both COCO files; :func:`image_truth`).

The words of a caption (:meth:`ChairVocabulary.mentions`), as ``chair.py`` reads them:

1. lower case, split into words, each word made singular (``dogs`` → ``dog``, ``women`` →
   ``woman``, ``knives`` → ``knive``; only a word whose singular is a word of the vocabulary
   changes: :meth:`ChairVocabulary.singular`);
2. two consecutive words that form a known two-word phrase become one (``hot dog``,
   ``teddy bear``), and the standard list's special cases: ``baby``/``adult`` before an animal
   and ``passenger`` before a jet or train keep only the animal or vehicle (so they never fire
   *person*), ``bow tie`` is a tie, ``toilet seat`` a toilet, and ``seat`` is dropped from a
   caption that also says ``toilet``;
3. every word or phrase in the synonym list is a mention of its line's category.

The list (:func:`coco_vocabulary`) is ``chair.py``'s ``data/synonyms.txt``, shipped byte for byte
in ``jmllm/joint/data/chair_synonyms.txt`` with its source, citation and licence; a list of your
own (``--synonyms``) has the same format, one category a line, its name first. Singular forms
come from our rules, not from ``pattern.en.singularize`` (Rohrbach et al.) or NLTK's WordNet
lemmatiser (OPERA's ``chair.py``), which need packages and corpora we do not ship;
``docs/hallucination-audit.md`` lists where the three differ.

Example:
    >>> vocab = coco_vocabulary()
    >>> [(m.word, m.category) for m in vocab.mentions("Two women eat hot dogs near a baby bird.")]
    [('woman', 'person'), ('hot dog', 'hot dog'), ('bird', 'bird')]
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from jmllm.joint.audit.data import AuditError

SYNONYMS_FILE = "chair_synonyms.txt"  # in jmllm/joint/data/
DEFAULT_SAMPLE = 500  # images, the widely quoted CHAIR setting (OPERA, SID …)
DEFAULT_SEED = 0
# chair.py's hard-coded two-word phrases of MSCOCO captions, each treated as one word
COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)  # fmt: skip
# "baby bird" is a bird, not a person; "passenger jet" a jet
COCO_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                     "giraffe", "animal", "cub")  # fmt: skip
COCO_VEHICLE_WORDS = ("jet", "train")
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_IRREGULAR = {"mice": "mouse", "geese": "goose", "teeth": "tooth", "feet": "foot", "oxen": "ox"}


@dataclass(frozen=True)
class Mention:
    """One object mention of a caption.

    Attributes:
        word: the word or phrase as the vocabulary has it (singular); category: its category.
        start, end: its characters in the caption (for highlighting and GA).
        text: the caption's own spelling (``dogs``).
    """

    word: str
    category: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class ChairVocabulary:
    """A synonym list and the rules that read captions with it.

    Attributes:
        categories: the category names (each line's first entry), in file order.
        synonyms: word or phrase → category (a word on several lines: the last line wins, as in
            ``chair.py``).
        entries: every entry as written, irregular ones included (what counts as a mention).
        double_words: two-word phrase → the word it is read as.
        coco_rules: the standard list's special case ``toilet``/``seat``.
        name: where the list came from.
    """

    categories: tuple[str, ...]
    synonyms: dict[str, str]
    entries: frozenset[str]
    double_words: dict[str, str]
    coco_rules: bool
    name: str
    _tokens: frozenset[str] = field(default=frozenset(), repr=False)

    @classmethod
    def parse(cls, text: str, name: str = "synonyms", coco_rules: bool | None = None) -> Any:
        """A vocabulary from a synonym list's text (``#`` lines and blank lines skipped).

        Args:
            text: one category a line, entries separated by ``", "``, the category first.
            name: shown in reports.
            coco_rules: apply the standard list's rules (COCO's two-word phrases, the
                animal/vehicle/toilet cases); None: when the lines are the standard list's.

        Raises:
            AuditError: no category, or an empty category name.
        """
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        # chair.py: line.strip().split(', ') — entries keep any other spacing as written
        rows = [line.strip().split(", ") for line in lines]
        if not rows:
            raise AuditError(f"{name}: no category in the synonym list")
        for number, row in enumerate(rows, 1):
            if not row[0].strip():
                raise AuditError(f"{name}: line {number} has an empty category name")
        if coco_rules is None:
            coco_rules = lines == _standard_lines()
        synonyms: dict[str, str] = {}
        entries: set[str] = set()
        for row in rows:
            entries.update(row)
            for entry in row:
                synonyms[entry] = row[0]
        double: dict[str, str] = {}
        if coco_rules:
            double.update({w: w for w in COCO_DOUBLE_WORDS})
            for animal in COCO_ANIMAL_WORDS:
                double[f"baby {animal}"] = animal
                double[f"adult {animal}"] = animal
            for vehicle in COCO_VEHICLE_WORDS:
                double[f"passenger {vehicle}"] = vehicle
            double["bow tie"] = "tie"
            double["toilet seat"] = "toilet"
            double["wine glas"] = "wine glass"  # pattern's singular of "glass" (chair.py)
        else:
            # a list of one's own: its two-word entries are its two-word phrases
            double.update({e: e for e in entries if len(e.split(" ")) == 2 and e == e.strip()})
        tokens = frozenset(t for phrase in (*entries, *double) for t in phrase.split())
        return cls(
            categories=tuple(dict.fromkeys(row[0] for row in rows)),
            synonyms=synonyms,
            entries=frozenset(entries),
            double_words=double,
            coco_rules=coco_rules,
            name=name,
            _tokens=tokens,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Any:
        """A vocabulary from a synonym file (see :meth:`parse`).

        Raises:
            AuditError: unreadable or empty file.
        """
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditError(f"{file}: cannot read the synonym list ({exc})") from None
        return cls.parse(text, name=str(file))

    def singular(self, word: str) -> str:
        """``word`` made singular when its singular is a word of the vocabulary (``dogs`` →
        ``dog``, ``ponies`` → ``pony``, ``knives`` → ``knive``, ``women`` → ``woman``);
        otherwise ``word`` itself (``bus``, ``glass``, ``skis`` stay).

        Example:
            >>> coco_vocabulary().singular("benches"), coco_vocabulary().singular("grass")
            ('bench', 'grass')
        """
        if word in self._tokens:
            return word
        candidates = []
        if word in _IRREGULAR:
            candidates.append(_IRREGULAR[word])
        if word.endswith("men"):
            candidates.append(word[:-3] + "man")
        if word.endswith("s"):
            candidates.append(word[:-1])
        if word.endswith("es"):
            candidates.append(word[:-2])
        if word.endswith("ies"):
            candidates.append(word[:-3] + "y")
        if word.endswith("ves"):
            candidates += [word[:-3] + "f", word[:-3] + "fe"]
        return next((c for c in candidates if c in self._tokens), word)

    def mentions(self, caption: str) -> list[Mention]:
        """The object mentions of a caption, in order (see the module docstring).

        Example:
            >>> [m.category for m in coco_vocabulary().mentions("A man sits on a toilet seat.")]
            ['person', 'toilet']
        """
        text = caption.lower()
        spans = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
        words = [(self.singular(w), s, e) for w, s, e in spans]
        merged: list[tuple[str, int, int]] = []
        i = 0
        while i < len(words):
            if i + 1 < len(words):
                pair = f"{words[i][0]} {words[i + 1][0]}"
                if pair in self.double_words:
                    merged.append((self.double_words[pair], words[i][1], words[i + 1][2]))
                    i += 2
                    continue
            merged.append(words[i])
            i += 1
        if self.coco_rules and any(w == "toilet" for w, _, _ in merged):
            merged = [m for m in merged if m[0] != "seat"]  # "the seat of the toilet" is no chair
        return [
            Mention(word, self.synonyms[word], start, end, caption[start:end])
            for word, start, end in merged
            if word in self.entries
        ]

    def category_of(self, name: str) -> str:
        """The category an annotation's class name belongs to.

        Raises:
            AuditError: a name the synonym list does not have.
        """
        key = " ".join(name.split()).lower()
        if key not in self.synonyms:
            raise AuditError(
                f"{self.name}: the annotations' category {name!r} is not in the synonym list"
            )
        return self.synonyms[key]


def _standard_text() -> str:
    return resources.files("jmllm.joint").joinpath("data", SYNONYMS_FILE).read_text("utf-8")


def _standard_lines() -> list[str]:
    return [
        line for line in _standard_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def coco_vocabulary() -> ChairVocabulary:
    """The standard CHAIR vocabulary: ``chair.py``'s synonym list of the 80 MSCOCO categories
    (shipped) with its two-word phrases and special cases.

    Example:
        >>> len(coco_vocabulary().categories)
        80
    """
    vocabulary: ChairVocabulary = ChairVocabulary.parse(
        _standard_text(), name="CHAIR synonyms (Rohrbach et al., 2018)", coco_rules=True
    )
    return vocabulary


# ---------------------------------------------------------------------------------------------
# Truth and images
# ---------------------------------------------------------------------------------------------


def image_truth(
    vocabulary: ChairVocabulary,
    instances: Mapping[str, Iterable[str]],
    captions: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, set[str]]:
    """Every image's truth: the categories of its instance annotations (class names mapped
    through the synonym list) and those its reference captions mention.

    Args:
        instances: image id → class names of its annotations.
        captions: image id → its reference captions (None: annotations only).

    Example:
        >>> truth = image_truth(coco_vocabulary(), {"1": ["dog"]}, {"1": ["A man walks his dog."]})
        >>> sorted(truth["1"])
        ['dog', 'person']
    """
    truth = {
        image: {vocabulary.category_of(name) for name in names}
        for image, names in instances.items()
    }
    for image, texts in (captions or {}).items():
        if image in truth:
            for text in texts:
                truth[image].update(m.category for m in vocabulary.mentions(text))
    return truth


def sample_images(
    image_ids: Sequence[str], count: int = DEFAULT_SAMPLE, seed: int = DEFAULT_SEED
) -> list[str]:
    """``count`` image ids drawn without replacement, reproducibly: the ids sorted (numerically
    when all are numbers), then ``numpy.random.default_rng(seed).permutation`` and the first
    ``count``, returned in sorted order. Every id when there are no more than ``count``.

    Example:
        >>> sample_images([str(i) for i in range(10)], 3, seed=0)
        ['2', '4', '6']
    """
    ids = list(dict.fromkeys(image_ids))
    numeric = all(i.isdigit() for i in ids)
    ordered = sorted(ids, key=(lambda i: (int(i), i)) if numeric else None)
    if count >= len(ordered):
        return ordered
    order = np.random.default_rng(seed).permutation(len(ordered))[:count]
    return [ordered[i] for i in sorted(int(k) for k in order)]


def load_reference_captions(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """image id → its reference captions, from a COCO captions file (``annotations`` with
    ``image_id`` and ``caption``; ids as text).

    Raises:
        AuditError: unreadable or malformed file.

    Example:
        >>> load_reference_captions("annotations/captions_val2014.json")["42"][0]  # doctest: +SKIP
        'A man riding a wave on top of a surfboard.'
    """
    import json

    file = Path(path)
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"{file}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise AuditError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise AuditError(f"{file}: not valid JSON (nested too deeply)") from None
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(annotations, list):
        raise AuditError(f"{file}: expected a COCO captions file with a list of 'annotations'")
    out: dict[str, list[str]] = {}
    for i, ann in enumerate(annotations):
        if (
            not isinstance(ann, dict)
            or "image_id" not in ann
            or not isinstance(ann.get("caption"), str)
        ):
            raise AuditError(f"{file}: annotations[{i}] needs an 'image_id' and a 'caption'")
        out.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    return out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


@dataclass
class CaptionScore:
    """One caption's CHAIR reading."""

    image_id: str
    caption: str
    mentions: list[Mention]
    hallucinated: list[bool]
    truth: set[str]

    @property
    def recalled(self) -> set[str]:
        return {m.category for m, h in zip(self.mentions, self.hallucinated, strict=True) if not h}


def score_caption(
    vocabulary: ChairVocabulary, image_id: str, caption: str, truth: set[str]
) -> CaptionScore:
    """The mentions of one caption and which are hallucinated (category not in ``truth``)."""
    mentions = vocabulary.mentions(caption)
    return CaptionScore(
        image_id, caption, mentions, [m.category not in truth for m in mentions], set(truth)
    )


def chair_metrics(scores: Sequence[CaptionScore]) -> dict[str, Any]:
    """CHAIR_s, CHAIR_i and recall over captions (see the module docstring), with the counts.

    Returns:
        ``chair_s``, ``chair_i``, ``recall`` (None where the denominator is 0), ``captions``,
        ``hallucinated_captions``, ``mentions``, ``hallucinated_mentions``, ``truth_objects``,
        ``recalled_objects``, ``words_per_caption``.

    Example:
        >>> v = coco_vocabulary()
        >>> s = [score_caption(v, "1", "A dog and a cat.", {"dog"})]
        >>> chair_metrics(s)["chair_i"], chair_metrics(s)["recall"]
        (0.5, 1.0)
    """
    captions = len(scores)
    hallucinated_captions = sum(any(s.hallucinated) for s in scores)
    mentions = sum(len(s.mentions) for s in scores)
    hallucinated = sum(sum(s.hallucinated) for s in scores)
    truth = sum(len(s.truth) for s in scores)
    recalled = sum(len(s.recalled) for s in scores)
    words = sum(len(_WORD.findall(s.caption.lower())) for s in scores)
    return {
        "chair_s": hallucinated_captions / captions if captions else None,
        "chair_i": hallucinated / mentions if mentions else None,
        "recall": recalled / truth if truth else None,
        "captions": captions,
        "hallucinated_captions": hallucinated_captions,
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "truth_objects": truth,
        "recalled_objects": recalled,
        "words_per_caption": words / captions if captions else None,
    }


def chair_intervals(
    scores: Sequence[CaptionScore],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of CHAIR_s, CHAIR_i and recall, resampling captions
    (images); None with fewer than two captions or no resample where the ratio is defined.

    Example:
        >>> chair_intervals(scores)["chair_i"]  # doctest: +SKIP
        [0.11, 0.16]
    """
    out: dict[str, list[float] | None] = dict.fromkeys(("chair_s", "chair_i", "recall"))
    if len(scores) < 2:
        return out
    # per caption: hallucinated caption, caption, hallucinated mentions, mentions, recalled, truth
    counts = np.array(
        [
            [any(s.hallucinated), 1, sum(s.hallucinated), len(s.mentions), len(s.recalled),
             len(s.truth)]
            for s in scores
        ],
        dtype=float,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(scores), size=(n_resamples, len(scores)))  # (R, C)
    sums = np.stack([np.bincount(d, minlength=len(scores)) for d in draws]) @ counts  # (R, 6)
    alpha = (1 - confidence) / 2
    for name, (num, den) in {"chair_s": (0, 1), "chair_i": (2, 3), "recall": (4, 5)}.items():
        defined = sums[:, den] > 0
        if defined.any():
            ratio = sums[defined, num] / sums[defined, den]
            low, high = np.quantile(ratio, [alpha, 1 - alpha])
            out[name] = [float(low), float(high)]
    return out


__all__ = [
    "COCO_DOUBLE_WORDS",
    "DEFAULT_SAMPLE",
    "DEFAULT_SEED",
    "CaptionScore",
    "ChairVocabulary",
    "Mention",
    "chair_intervals",
    "chair_metrics",
    "coco_vocabulary",
    "image_truth",
    "load_reference_captions",
    "sample_images",
    "score_caption",
]
