"""The demo world's attribute vocabulary, its images' attributes and the queries people type.

Every image has one value of each attribute kind (shape, colour, size, pattern,
background).  A text query names some attribute kinds ("red circle" names
colour and shape); an image is relevant to it iff it has every attribute the
query names.  Query words exist in English and Chinese, with a few synonyms,
so the same intent reaches the logs under several surface forms.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import numpy as np

# Attribute kinds, in the order English and Chinese queries name them
# ("large blue striped square on dark background", "大 蓝色 条纹 正方形 深色背景").
KINDS: Tuple[str, ...] = ("size", "color", "pattern", "shape", "background")

# kind -> value -> (English words, Chinese words); the first word is the usual one.
VOCABULARY: Dict[str, Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]]] = {
    "shape": {
        "circle": (("circle", "round"), ("圆形", "圆")),
        "square": (("square",), ("正方形", "方形")),
        "triangle": (("triangle",), ("三角形",)),
        "star": (("star",), ("星形", "五角星")),
        "cross": (("cross", "plus sign"), ("十字", "十字形")),
        "diamond": (("diamond", "rhombus"), ("菱形",)),
        "hexagon": (("hexagon",), ("六边形",)),
        "ring": (("ring", "donut"), ("圆环", "环形")),
    },
    "color": {
        "red": (("red",), ("红色", "红")),
        "green": (("green",), ("绿色",)),
        "blue": (("blue",), ("蓝色",)),
        "yellow": (("yellow",), ("黄色",)),
        "purple": (("purple", "violet"), ("紫色",)),
        "orange": (("orange",), ("橙色", "橘色")),
        "pink": (("pink",), ("粉色", "粉红色")),
        "brown": (("brown",), ("棕色", "咖啡色")),
    },
    "size": {
        "small": (("small", "tiny"), ("小",)),
        "large": (("large", "big"), ("大",)),
    },
    "pattern": {
        "solid": (("solid", "plain"), ("纯色",)),
        "striped": (("striped", "stripy"), ("条纹",)),
        "dotted": (("dotted", "polka dot"), ("波点", "圆点")),
    },
    "background": {
        "light": (("on light background", "on white"), ("浅色背景", "白底")),
        "dark": (("on dark background", "on black"), ("深色背景", "黑底")),
    },
}

# Which attribute kinds a text query names; the category recorded in the log
# is these kinds joined by "_" (e.g. "color_shape").
QUERY_KINDS: Tuple[Tuple[str, ...], ...] = (
    ("shape",),
    ("color",),
    ("pattern",),
    ("color", "shape"),
    ("size", "shape"),
    ("pattern", "shape"),
    ("color", "pattern"),
    ("size", "color", "shape"),
    ("color", "pattern", "shape"),
    ("color", "shape", "background"),
    ("size", "color", "pattern", "shape"),
)

# How much each shared attribute makes two images look alike (sums to 1).
SIMILARITY_WEIGHTS: Dict[str, float] = {"shape": 0.35, "color": 0.35, "pattern": 0.14, "size": 0.08, "background": 0.08}
# Images at least this similar are "similar images" in the evaluation ground truth
# (same shape and colour, plus anything else).
SIMILAR_THRESHOLD = 0.7

IMAGE_QUERY_CATEGORY = "image"


def values(kind: str) -> List[str]:
    """The values of one attribute kind, in vocabulary order."""
    return list(VOCABULARY[kind])


def category_of(kinds: Sequence[str]) -> str:
    """The query category for a set of named attribute kinds, e.g. "color_shape"."""
    return "_".join(k for k in KINDS if k in kinds)


@dataclasses.dataclass(frozen=True)
class Catalog:
    """The images' attributes as an [images, kinds] array of value indices."""

    image_ids: Tuple[str, ...]
    codes: np.ndarray  # int [num_images, len(KINDS)], codes[i, k] indexes values(KINDS[k])

    def attributes(self, index: int) -> Dict[str, str]:
        """An image's attributes as kind -> value name."""
        return {kind: values(kind)[self.codes[index, k]] for k, kind in enumerate(KINDS)}

    def similarity_to(self, indices: np.ndarray) -> np.ndarray:
        """Weighted share of attributes each image in `indices` has in common with every image: [len, N]."""
        weights = np.array([SIMILARITY_WEIGHTS[k] for k in KINDS], dtype=np.float32)
        same = self.codes[indices][:, None, :] == self.codes[None, :, :]
        return same.astype(np.float32) @ weights


def make_catalog(num_images: int, rng: np.random.Generator) -> Catalog:
    """Draws attributes for `num_images` images, every combination about equally often."""
    sizes = [len(VOCABULARY[k]) for k in KINDS]
    combos = np.stack(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij"), -1).reshape(-1, len(KINDS))
    # Whole shuffled passes over all combinations, then a random part of one more,
    # so attribute values are balanced and each combination has near-duplicates.
    repeats = -(-num_images // len(combos))
    codes = np.concatenate([combos[rng.permutation(len(combos))] for _ in range(repeats)])[:num_images]
    codes = codes[rng.permutation(num_images)]
    width = max(5, len(str(num_images - 1)))
    image_ids = tuple(f"img_{i:0{width}d}" for i in range(num_images))
    return Catalog(image_ids=image_ids, codes=codes.astype(np.int16))


@dataclasses.dataclass(frozen=True)
class Intent:
    """What a text query asks for: attribute kind -> value."""

    attributes: Tuple[Tuple[str, str], ...]  # in KINDS order

    @property
    def category(self) -> str:
        return category_of([k for k, _ in self.attributes])

    def match_fraction(self, catalog: Catalog) -> np.ndarray:
        """Share of the named attributes each image has, float32 [N]; 1.0 means relevant."""
        hits = np.zeros(len(catalog.image_ids), dtype=np.float32)
        for kind, value in self.attributes:
            k = KINDS.index(kind)
            hits += catalog.codes[:, k] == values(kind).index(value)
        return hits / len(self.attributes)


def all_intents() -> List[Intent]:
    """Every intent of every query category."""
    intents = []
    for kinds in QUERY_KINDS:
        ordered = [k for k in KINDS if k in kinds]
        grids = np.meshgrid(*[np.arange(len(VOCABULARY[k])) for k in ordered], indexing="ij")
        for combo in np.stack(grids, -1).reshape(-1, len(ordered)):
            intents.append(Intent(tuple((k, values(k)[int(v)]) for k, v in zip(ordered, combo))))
    return intents


# ---------------------------------------------------------------------------
# Query text: words, order, and the surface noise real users add.

_FULL_WIDTH_OFFSET = 0xFF01 - 0x21


def _full_width(text: str) -> str:
    """Full-width forms of ASCII letters, as Chinese input methods often type them."""
    return "".join(chr(ord(c) + _FULL_WIDTH_OFFSET) if "!" <= c <= "~" else "\u3000" if c == " " else c for c in text)


def _mixed_case(text: str, rng: np.random.Generator) -> str:
    style = rng.integers(3)
    if style == 0:
        return text.upper()
    if style == 1:
        return text.title()
    return "".join(c.upper() if rng.random() < 0.3 else c for c in text)


def _spaces(rng: np.random.Generator, ideographic: bool) -> str:
    space = "\u3000" if ideographic and rng.random() < 0.5 else " "
    return space * int(rng.integers(1, 4))


def query_text(intent: Intent, locale: str, rng: np.random.Generator) -> str:
    """A text a user might type for `intent` in `locale` ("en" or "zh"), with surface noise.

    `normalize_query` folds the noise (case, extra or ideographic spaces,
    full-width Latin); synonyms and unspaced Chinese stay distinct queries.
    """
    lang = 0 if locale == "en" else 1
    words = []
    for kind, value in intent.attributes:
        choices = VOCABULARY[kind][value][lang]
        words.append(choices[0] if len(choices) == 1 or rng.random() < 0.8 else choices[int(rng.integers(1, len(choices)))])
    if lang == 1:
        joined = "".join(words) if len(words) > 1 and rng.random() < 0.3 else " ".join(words)
        if rng.random() < 0.15:
            joined = _spaces(rng, True).join(joined.split(" "))
        if rng.random() < 0.1:
            joined = joined + _spaces(rng, True)
        return joined
    text = " ".join(words)
    r = rng.random()
    if r < 0.2:
        text = _mixed_case(text, rng)
    elif r < 0.25:
        text = _full_width(text)
    if rng.random() < 0.15:
        text = _spaces(rng, False).join(text.split(" "))
    if rng.random() < 0.1:
        text = " " + text + " "
    return text
