"""Tests for captioner.data.synthetic."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from captioner.data.images import load_image
from captioner.data.synthetic import COLORS, SHAPES, make_shapes_dataset
from captioner.data.text import tokenize

VOCAB = {"a", "is", "above", "below", "left", "right", "of", "to", "the"}
VOCAB |= set(COLORS) | set(SHAPES)
SIZE = 96


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(out, 60, size=SIZE, seed=3)


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["image", "caption", "split"]
        return list(reader)


def _by_image(csv_path: Path) -> dict[str, list[dict[str, str]]]:
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in _rows(csv_path):
        groups[row["image"]].append(row)
    return groups


def _parse(caption: str) -> tuple[str, str, str]:
    """Canonical (first, relation, second) with relation in {"above", "left of"}."""
    w = caption.split()
    assert w[0] == "a" and w[1] in COLORS and w[2] in SHAPES, caption
    first = f"{w[1]} {w[2]}"
    rest = [x for x in w[3:] if x not in ("is", "to", "the")]
    if rest[0] in ("above", "below"):
        rel, tail = rest[0], rest[1:]
    else:
        assert rest[1] == "of", caption
        rel, tail = f"{rest[0]} of", rest[2:]
    assert len(tail) == 3 and tail[0] == "a" and tail[1] in COLORS and tail[2] in SHAPES, caption
    second = f"{tail[1]} {tail[2]}"
    if rel == "below":
        return second, "above", first
    if rel == "right of":
        return second, "left of", first
    return first, rel, second


def test_returns_csv_path_and_layout(dataset):
    assert dataset.name == "captions.csv"
    files = sorted(p.name for p in (dataset.parent / "images").iterdir())
    assert files == [f"{i:06d}.png" for i in range(60)]


def test_rows_and_splits(dataset):
    rows = _rows(dataset)
    groups = _by_image(dataset)
    assert len(groups) == 60
    assert all(2 <= len(g) <= 3 for g in groups.values())
    assert len(rows) == sum(len(g) for g in groups.values())
    for g in groups.values():  # split is per image
        assert len({r["split"] for r in g}) == 1
    per_image = Counter(g[0]["split"] for g in groups.values())
    assert per_image == {"train": 48, "val": 6, "test": 6}


def test_custom_and_invalid_splits(tmp_path):
    csv_path = make_shapes_dataset(tmp_path, 10, size=32, splits=(0.5, 0.5, 0.0))
    splits = Counter(g[0]["split"] for g in _by_image(csv_path).values())
    assert splits == {"train": 5, "val": 5}
    with pytest.raises(ValueError):
        make_shapes_dataset(tmp_path, 10, splits=(0.5, 0.5))
    with pytest.raises(ValueError):
        make_shapes_dataset(tmp_path, 10, splits=(1.0, -0.5, 0.5))


def test_deterministic(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", 12, size=48, seed=7)
    b = make_shapes_dataset(tmp_path / "b", 12, size=48, seed=7)
    c = make_shapes_dataset(tmp_path / "c", 12, size=48, seed=8)
    assert a.read_bytes() == b.read_bytes()
    for i in range(12):
        name = f"images/{i:06d}.png"
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_images_are_not_identical(dataset):
    images = {(dataset.parent / "images" / f"{i:06d}.png").read_bytes() for i in range(60)}
    assert len(images) == 60


def test_vocabulary_is_small(dataset):
    words = {w for row in _rows(dataset) for w in row["caption"].split()}
    assert words <= VOCAB
    assert {"above", "below", "left", "right"} <= words  # both relations occur


def test_paraphrases_agree(dataset):
    for group in _by_image(dataset).values():
        captions = [r["caption"] for r in group]
        assert len(set(captions)) == len(captions)
        assert len({_parse(c) for c in captions}) == 1, captions


def _shape_kind(mask: np.ndarray) -> str:
    """Guess the shape from how much of its bounding box it fills."""
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    if fill > 0.92:
        return "square"
    if fill > 0.68:
        return "circle"
    return "triangle"


def test_shapes_drawn_where_caption_says(dataset):
    for name, group in _by_image(dataset).items():
        first, relation, second = _parse(group[0]["caption"])
        img = load_image(dataset.parent / "images" / name)
        assert img.size == (SIZE, SIZE)
        pixels = np.asarray(img)
        known = np.zeros(pixels.shape[:2], dtype=bool)
        centres = []
        for phrase in (first, second):
            color, kind = phrase.split()
            mask = np.all(pixels == COLORS[color], axis=-1)
            known |= mask
            assert mask.sum() > 0.03 * SIZE * SIZE, (name, phrase)
            assert _shape_kind(mask) == kind, (name, phrase)
            ys, xs = np.nonzero(mask)
            cy, cx = ys.mean(), xs.mean()
            # the pixel at the shape's centre has the shape's colour
            assert tuple(pixels[int(round(cy)), int(round(cx))]) == COLORS[color]
            centres.append((cy, cx))
        # nothing else but white background
        assert np.all(pixels[~known] == 255), name
        (y1, x1), (y2, x2) = centres
        if relation == "above":
            assert y2 - y1 > SIZE * 0.3, name
        else:
            assert x2 - x1 > SIZE * 0.3, name


def test_every_colour_shape_and_relation_used(dataset):
    parsed = [_parse(g[0]["caption"]) for g in _by_image(dataset).values()]
    phrases = {p for first, _, second in parsed for p in (first, second)}
    assert {p.split()[0] for p in phrases} == set(COLORS)
    assert {p.split()[1] for p in phrases} == set(SHAPES)
    assert {rel for _, rel, _ in parsed} == {"above", "left of"}


# --------------------------------------------------------------------------- languages (issue 21)


@pytest.mark.parametrize("language", ["fr", "de", "ja", "zh"])
def test_captions_in_another_language_describe_the_same_images(language, dataset, tmp_path):
    other = make_shapes_dataset(tmp_path, 60, size=SIZE, seed=3, language=language)
    for i in range(60):  # the images are the English dataset's, byte for byte
        name = f"images/{i:06d}.png"
        assert (other.parent / name).read_bytes() == (dataset.parent / name).read_bytes()
    english, translated = _by_image(dataset), _by_image(other)
    assert {k: [r["split"] for r in v] for k, v in english.items()} == \
           {k: [r["split"] for r in v] for k, v in translated.items()}
    captions = [r["caption"] for r in _rows(other)]
    assert not set(captions) & {r["caption"] for r in _rows(dataset)}
    tokens = [tokenize(c) for c in captions]
    words = {t for ts in tokens for t in ts}
    if language in ("ja", "zh"):  # one token per character, a small vocabulary of characters
        assert all(len(w) == 1 for w in words) and 15 <= len(words) <= 40, sorted(words)
        assert min(len(ts) for ts in tokens) >= 7
    else:
        assert 15 <= len(words) <= 30 and all(len(ts) >= 5 for ts in tokens), sorted(words)
    # paraphrases of one image are different sentences; two images with different captions differ in them
    for group in translated.values():
        assert len({r["caption"] for r in group}) == len(group)
    by_meaning = {_parse(english[k][0]["caption"]): translated[k][0]["caption"] for k in english}
    assert len(set(by_meaning.values())) == len(by_meaning)


def test_french_and_german_captions_read_as_such(tmp_path):
    fr = [r["caption"] for r in _rows(make_shapes_dataset(tmp_path / "fr", 30, size=32, language="fr"))]
    de = [r["caption"] for r in _rows(make_shapes_dataset(tmp_path / "de", 30, size=32, language="de"))]
    assert any("d'un " in c for c in fr) and all(c.startswith("un ") for c in fr)
    assert any(" über " in c or " grünes " in c or "grüner" in c for c in de)
    assert all(c.startswith("ein") for c in de)


def test_english_is_the_default_and_unknown_languages_are_refused(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", 8, size=32)
    b = make_shapes_dataset(tmp_path / "b", 8, size=32, language="en")
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match=r"language 'xx' .*en, fr, de, ja, zh"):
        make_shapes_dataset(tmp_path / "c", 8, size=32, language="xx")
    assert not (tmp_path / "c").exists()
