"""Readers of the Flickr8k releases: the official text files (``Flickr8k_text``) and the
Karpathy-split JSON (``dataset_flickr8k/30k/coco.json``), which give the same corpus for Flickr8k."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from captioner.data.corpus import Corpus, CorpusError, PathLike
from captioner.data.readers.builder import Builder, check_image_dir, image_name_problem, load_json, read_text_lines

FLICKR8K_TOKEN_FILE = "Flickr8k.token.txt"
FLICKR8K_SPLIT_FILES: tuple[tuple[str, str], ...] = (
    ("train", "Flickr_8k.trainImages.txt"),
    ("val", "Flickr_8k.devImages.txt"),
    ("test", "Flickr_8k.testImages.txt"),
)

# Flickr8k quirk: "2258277193_586949ec62.jpg.1#0" is a caption of "...jpg".
_NUMBERED_IMAGE_KEY = re.compile(r"^(.+\.(?:jpe?g|png))\.\d+$", re.IGNORECASE)


def read_flickr8k_text(
    text_dir: PathLike,
    image_dir: PathLike,
    *,
    strict: bool = False,
    check_images: bool = True,
    dedupe: bool = False,
    name: str = "flickr8k",
) -> Corpus:
    """Read the official Flickr8k release (``Flickr8k_text`` folder).

    Uses ``Flickr8k.token.txt`` and the train/dev/test image lists (dev -> "val").
    Items follow the split files' order (train, val, test), which is the order
    of the Karpathy JSON. Images in no split file are dropped and counted.
    ``text_dir`` may also be the token file itself or the dataset root.
    """
    text_dir = Path(text_dir).expanduser()
    if text_dir.is_file():
        text_dir = text_dir.parent
    elif (text_dir / "Flickr8k_text" / FLICKR8K_TOKEN_FILE).is_file():
        text_dir = text_dir / "Flickr8k_text"
    hint = "point text_dir at the Flickr8k_text folder of the official release"
    token_path = text_dir / FLICKR8K_TOKEN_FILE
    lines = read_text_lines(token_path, "Flickr8k caption file", hint)
    root = check_image_dir(Path(image_dir), check_images, token_path)
    b = Builder()
    captions = _read_token_lines(b, token_path, lines)
    _read_split_files(b, text_dir, hint, captions)
    return b.finish(
        name=name,
        image_root=root,
        source=token_path,
        strict=strict,
        check_images=check_images,
        dedupe=dedupe,
    )


def _read_token_lines(b: Builder, token_path: Path, lines: list[str]) -> dict[str, list[tuple[int, str, str]]]:
    """The captions of ``Flickr8k.token.txt``: image -> [(caption index, raw, where)]."""
    captions: dict[str, list[tuple[int, str, str]]] = {}
    first_line: dict[tuple[str, int], int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{token_path}:{lineno}"
        key, tab, text = line.partition("\t")
        if not tab:
            b.malformed(where, "no tab between the caption id and the caption")
            continue
        key = key.strip()
        image, hash_mark, index = key.rpartition("#")
        if not hash_mark:
            b.malformed(where, f"caption id {key!r} has no '#' (expected IMAGE.jpg#N)")
            continue
        if not (index.isascii() and index.isdigit()):
            b.malformed(where, f"bad caption index {index!r} in {key!r} (expected a number)")
            continue
        match = _NUMBERED_IMAGE_KEY.match(image)
        if match:
            image = match.group(1)
        problem = image_name_problem(image)
        if problem:
            b.malformed(where, problem)
            continue
        n = int(index)
        if (image, n) in first_line:
            b.malformed(where, f"caption {image}#{n} already given on line {first_line[image, n]}")
            continue
        first_line[image, n] = lineno
        captions.setdefault(image, []).append((n, text, where))
    return captions


def _read_split_files(
    b: Builder, text_dir: Path, hint: str, captions: dict[str, list[tuple[int, str, str]]]
) -> None:
    """Records in the split files' order, then the captioned images that are in no split file."""
    for split, file_name in FLICKR8K_SPLIT_FILES:
        split_path = text_dir / file_name
        for lineno, line in enumerate(read_text_lines(split_path, "split file", hint), 1):
            image = line.strip()
            if not image:
                continue
            where = f"{split_path}:{lineno}"
            problem = image_name_problem(image)
            if problem:
                b.malformed(where, problem)
                continue
            if image in b.records:
                b.malformed(where, f"{image} is already in split {b.records[image].split!r}")
                continue
            rec = b.image(image, split)
            rec.captions = [(raw, w) for _, raw, w in sorted(captions.get(image, []))]
    for image, caps in captions.items():
        if image not in b.records:
            b.image(image, None).captions = [(raw, w) for _, raw, w in sorted(caps)]


def read_karpathy(
    json_path: PathLike,
    image_dir: PathLike,
    *,
    strict: bool = False,
    check_images: bool = True,
    dedupe: bool = False,
    restval: str = "train",
    name: str | None = None,
) -> Corpus:
    """Read a Karpathy-split JSON (``dataset_flickr8k/30k/coco.json``).

    Uses the ``raw`` captions (re-tokenised). The image path is
    ``filepath/filename`` when ``filepath`` is given (COCO), else ``filename``.
    ``restval="train"`` (default) merges "restval" into train; ``"keep"`` keeps it.
    """
    if restval not in ("train", "keep"):
        raise ValueError(f"restval must be 'train' or 'keep', got {restval!r}")
    path = Path(json_path).expanduser()
    data = load_json(path, "Karpathy split JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CorpusError(
            f"{path}: not a Karpathy-split file (expected {{\"images\": [...]}}); "
            "check the file or choose another format"
        )
    root = check_image_dir(Path(image_dir), check_images, path)
    split_map = {"train": "train", "val": "val", "test": "test"}
    split_map["restval"] = "train" if restval == "train" else "restval"
    b = Builder()
    first_index: dict[str, int] = {}
    for i, entry in enumerate(data["images"]):
        _add_karpathy_entry(b, f"{path}: images[{i}]", i, entry, split_map, first_index)

    default_name = data.get("dataset") if isinstance(data.get("dataset"), str) else None
    return b.finish(
        name=name or default_name or path.stem.removeprefix("dataset_"),
        image_root=root,
        source=path,
        strict=strict,
        check_images=check_images,
        dedupe=dedupe,
    )


def _add_karpathy_entry(
    b: Builder, where: str, i: int, entry: Any, split_map: dict[str, str], first_index: dict[str, int]
) -> None:
    """Validate one ``images[i]`` entry of a Karpathy JSON and add its image and captions."""
    if not isinstance(entry, dict):
        b.malformed(where, "expected an object")
        return
    filename, filepath = entry.get("filename"), entry.get("filepath")
    if not isinstance(filename, str) or not filename:
        b.malformed(where, "no 'filename'")
        return
    if filepath is not None and not isinstance(filepath, str):
        b.malformed(where, "'filepath' must be a string")
        return
    image = f"{filepath.strip('/')}/{filename}" if filepath else filename
    where = f"{where} ({image})"
    problem = image_name_problem(image)
    if problem:
        b.malformed(where, problem)
        return
    raw_split = entry.get("split")
    split = split_map.get(raw_split) if isinstance(raw_split, str) else None
    if split is None:
        b.malformed(
            where, f"unknown split {raw_split!r} (expected train, val, test, restval)"
        )
        return
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        b.malformed(where, "'sentences' must be a list")
        return
    if image in first_index:
        b.malformed(where, f"{image} is already listed at images[{first_index[image]}]")
        return
    first_index[image] = i
    rec = b.image(image, split)
    for j, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str):
            b.malformed(f"{where}: sentences[{j}]", "no 'raw' caption text")
            continue
        rec.captions.append((raw, f"{image}#{j}"))
