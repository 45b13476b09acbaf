"""A tiny captioned dataset drawn in code: two coloured shapes and their relation.

Used by end-to-end tests to check that a model can actually learn: captions
such as "a red circle above a blue square" are fully determined by the pixels.
The captions can be written in English, French, German, Japanese or Chinese.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "RELATIONS", "LANGUAGES", "Shape", "make_shapes_dataset"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "left of")
BACKGROUND = (255, 255, 255)
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its colour, kind, centre and side length in pixels."""

    color: str
    kind: str
    cx: float
    cy: float
    side: float

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.kind}"


# The captions in each language: three paraphrases of "{a} is above {b}" and of "{a} is left of {b}",
# where {a} and {b} are phrases such as "red circle" ({a_dat}, {b_dat}: the German dative).
_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "en": (("a {a} above a {b}", "a {b} below a {a}", "a {a} is above a {b}"),
           ("a {a} left of a {b}", "a {b} right of a {a}", "a {a} is to the left of a {b}")),
    "fr": (("un {a} au-dessus d'un {b}", "un {b} au-dessous d'un {a}", "un {a} est au-dessus d'un {b}"),
           ("un {a} à gauche d'un {b}", "un {b} à droite d'un {a}", "un {a} est à gauche d'un {b}")),
    "de": (("{a} über {b_dat}", "{b} unter {a_dat}", "{a} ist über {b_dat}"),
           ("{a} links neben {b_dat}", "{b} rechts neben {a_dat}", "{a} ist links neben {b_dat}")),
    "ja": (("{a}が{b}の上にある", "{b}が{a}の下にある", "{b}の上に{a}がある"),
           ("{a}が{b}の左にある", "{b}が{a}の右にある", "{b}の左に{a}がある")),
    "zh": (("{a}在{b}上面", "{b}在{a}下面", "{a}位于{b}的上方"),
           ("{a}在{b}左边", "{b}在{a}右边", "{a}位于{b}的左侧")),
}
LANGUAGES = tuple(_TEMPLATES)
# colour and shape names: French puts the colour after the shape, Japanese and Chinese write no spaces
_NAMES = {
    "fr": {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune",
           "circle": "cercle", "square": "carré", "triangle": "triangle"},
    "ja": {"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "circle": "円", "square": "四角",
           "triangle": "三角"},
    "zh": {"red": "红色的", "green": "绿色的", "blue": "蓝色的", "yellow": "黄色的", "circle": "圆形",
           "square": "正方形", "triangle": "三角形"},
}
_GERMAN_COLORS = {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb"}
_GERMAN_SHAPES = {"circle": ("Kreis", "er"), "square": ("Quadrat", "es"), "triangle": ("Dreieck", "es")}


def _phrases(shape: Shape, language: str) -> dict[str, str]:
    """The phrase naming ``shape`` ("red circle"), and in German its nominative with article and dative."""
    if language == "de":
        noun, ending = _GERMAN_SHAPES[shape.kind]
        stem = _GERMAN_COLORS[shape.color]
        return {"": f"ein {stem}{ending} {noun}", "_dat": f"einem {stem}en {noun}"}
    if language == "en":
        return {"": shape.phrase}
    color, kind = _NAMES[language][shape.color], _NAMES[language][shape.kind]
    return {"": f"{kind} {color}" if language == "fr" else f"{color}{kind}"}


def _captions(first: Shape, second: Shape, relation: str, language: str = "en") -> list[str]:
    """Three paraphrases of "``first`` is ``relation`` ``second``" in ``language``."""
    slots = {f"a{k}": v for k, v in _phrases(first, language).items()}
    slots.update({f"b{k}": v for k, v in _phrases(second, language).items()})
    above, left = _TEMPLATES[language]
    return [t.format(**slots) for t in (above if relation == "above" else left)]


def _draw(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    h = shape.side / 2
    x0, y0, x1, y1 = shape.cx - h, shape.cy - h, shape.cx + h, shape.cy + h
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # triangle, apex up
        draw.polygon([(shape.cx, y0), (x1, y1), (x0, y1)], fill=fill)


def _layout(rng: random.Random, size: int) -> tuple[Shape, Shape, str]:
    """Pick two shapes (different colours) and where they go.

    The first shape sits in the top (or left) half, the second in the other
    half; side ~ a third of the image, so they never overlap or leave the image.
    """
    color_a, color_b = rng.sample(sorted(COLORS), 2)
    kind_a, kind_b = rng.choice(SHAPES), rng.choice(SHAPES)
    relation = rng.choice(RELATIONS)
    shapes = []
    for color, kind, main in ((color_a, kind_a, 0.27), (color_b, kind_b, 0.73)):
        along = (main + rng.uniform(-0.04, 0.04)) * size  # across the split
        across = (0.5 + rng.uniform(-0.12, 0.12)) * size  # free axis
        side = rng.uniform(0.28, 0.36) * size
        cx, cy = (across, along) if relation == "above" else (along, across)
        shapes.append(Shape(color, kind, round(cx, 1), round(cy, 1), round(side, 1)))
    return shapes[0], shapes[1], relation


def _split_counts(n: int, splits: Sequence[float]) -> list[int]:
    if len(splits) != 3 or any(p < 0 for p in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be 3 non-negative ratios (train, val, test), got {splits}")
    total = float(sum(splits))
    end_train = round(n * splits[0] / total)
    end_val = round(n * (splits[0] + splits[1]) / total)
    return [end_train, end_val - end_train, n - end_val]


def make_shapes_dataset(
    out_dir: str | Path,
    n_images: int = 300,
    *,
    size: int = 96,
    seed: int = 0,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    language: str = "en",
) -> Path:
    """Write ``n_images`` shape images and ``captions.csv`` under ``out_dir``.

    Layout: ``out_dir/images/000000.png ...`` and ``out_dir/captions.csv`` with
    columns ``image,caption,split`` (three paraphrased captions per image).
    Same arguments give byte-identical output; image ``i`` depends only on
    ``seed``, ``size`` and ``i``. ``language`` (one of :data:`LANGUAGES`: en, fr, de,
    ja, zh) is the captions' language; the images and splits do not depend on it.
    Returns the path of ``captions.csv``.
    """
    if language not in _TEMPLATES:
        raise ValueError(f"language {language!r} is not one of {', '.join(LANGUAGES)}")
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if size < 24:
        raise ValueError(f"size must be >= 24 pixels, got {size}")
    counts = _split_counts(n_images, splits)

    split_of = [name for name, count in zip(SPLIT_NAMES, counts) for _ in range(count)]
    random.Random(f"splits:{seed}").shuffle(split_of)

    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "captions.csv"

    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "caption", "split"])
        for i in range(n_images):
            rng = random.Random(f"shapes:{seed}:{i}")
            first, second, relation = _layout(rng, size)
            image = Image.new("RGB", (size, size), BACKGROUND)
            draw = ImageDraw.Draw(image)
            _draw(draw, first)
            _draw(draw, second)
            file_name = f"{i:06d}.png"
            image.save(image_dir / file_name, format="PNG")
            for caption in _captions(first, second, relation, language):
                writer.writerow([file_name, caption, split_of[i]])
    return csv_path
