"""Readers of the caption dataset formats, each returning a :class:`~captioner.data.corpus.Corpus`.

Every reader returns a corpus whose items keep the order of the source file, whose captions
are stripped raw text and whose tokens are always recomputed with
:func:`captioner.data.text.tokenize` (so all readers agree). Problems are collected in a
:class:`~captioner.data.corpus.ValidationReport`; by default the bad entries are skipped, with
``strict=True`` a :class:`~captioner.data.corpus.CorpusError` lists them all.

Formats (``captioner prepare FORMAT``): ``flickr8k-text`` (the official Flickr8k text files),
``karpathy`` (``dataset_flickr8k/30k/coco.json``), ``kaggle`` (``captions.txt``), ``coco``
(MS-COCO ``captions_*.json``) and ``folder`` (your own CSV or JSONL).
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from captioner.data.corpus import (
    SPLITS,
    Corpus,
    CorpusError,
    Item,
    PathLike,
    ValidationReport,
    hash_split,
)
from captioner.data.text import read_json_file, tokenize

FORMATS: tuple[str, ...] = ("flickr8k-text", "karpathy", "kaggle", "coco", "folder")

FLICKR8K_TOKEN_FILE = "Flickr8k.token.txt"
FLICKR8K_SPLIT_FILES: tuple[tuple[str, str], ...] = (
    ("train", "Flickr_8k.trainImages.txt"),
    ("val", "Flickr_8k.devImages.txt"),
    ("test", "Flickr_8k.testImages.txt"),
)

# Split names accepted in user caption files (folder / Kaggle CSV, JSONL).
_SPLIT_ALIASES = {
    "train": "train",
    "restval": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}
# Flickr8k quirk: "2258277193_586949ec62.jpg.1#0" is a caption of "...jpg".
_NUMBERED_IMAGE_KEY = re.compile(r"^(.+\.(?:jpe?g|png))\.\d+$", re.IGNORECASE)

Ratios = tuple[float, float, float]


# --------------------------------------------------------------------------- building


@dataclass
class _Record:
    split: str | None  # None: in no split (dropped)
    captions: list[tuple[str, str]] = field(default_factory=list)  # (raw, where)


class _Builder:
    """Collects raw records and turns them into a validated Corpus."""

    def __init__(self) -> None:
        self.records: dict[str, _Record] = {}
        self.report = ValidationReport()

    def malformed(self, where: str, what: str) -> None:
        self.report.malformed_lines.append(f"{where}: {what}")

    def image(self, image: str, split: str | None) -> _Record:
        """Record for ``image``, created with ``split`` if new."""
        rec = self.records.get(image)
        if rec is None:
            rec = self.records[image] = _Record(split)
        return rec

    def caption(self, where: str, image: str, split: str | None, raw: str) -> None:
        """Add a caption; an image put in two different splits is malformed."""
        rec = self.image(image, split)
        if rec.split != split:
            self.malformed(
                where, f"{image} is in split {rec.split!r} earlier but {split!r} here (skipped)"
            )
            return
        rec.captions.append((raw, where))

    def finish(
        self,
        *,
        name: str,
        image_root: Path,
        source: Path | str,
        strict: bool,
        check_images: bool,
        dedupe: bool,
    ) -> Corpus:
        report = self.report
        items: list[Item] = []
        for image, rec in self.records.items():
            captions, tokens = _clean_captions(image, rec.captions, report, dedupe=dedupe)
            if check_images:
                state = _image_state(image_root / image)
                if state == "missing":
                    report.missing_images.append(image)
                    continue
                if state == "unreadable":
                    report.unreadable_images.append(image)
                    continue
            if rec.split is None:
                report.unsplit_images.append(image)
            elif not captions:
                report.uncaptioned_images.append(image)
            else:
                items.append(Item(image, rec.split, captions, tokens))

        per_split = Counter(item.split for item in items)
        report.images_per_split = {s: per_split.get(s, 0) for s in SPLITS}
        report.images_per_split.update({s: n for s, n in per_split.items() if s not in SPLITS})
        hist = Counter(len(item.captions) for item in items)
        report.captions_per_image = {str(k): hist[k] for k in sorted(hist)}

        problems = report.problems()
        if not items:  # an empty corpus is never what was asked for, strict or not
            listing = "".join(f"\n  - {p}" for p in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            unsplit = (f" ({len(report.unsplit_images)} image(s) are in no split)"
                       if report.unsplit_images else "")
            found = unsplit + (f"; {len(problems)} problem(s):{listing}{more}" if problems
                               else "" if unsplit else " (the source holds no captions)")
            raise CorpusError(
                f"{source}: no image with a usable caption found{found}\n"
                "Check that this is the right caption file and format, and that the image folder holds its images.",
                problems,
            )
        if strict and problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise CorpusError(
                f"{source}: {len(problems)} problem(s) found (strict mode):\n{listing}\n"
                "Fix these entries, or run without strict mode to skip them.",
                problems,
            )
        return Corpus(name=name, image_root=image_root, items=items, report=report)


def _clean_captions(
    image: str, raw_captions: list[tuple[str, str]], report: ValidationReport, *, dedupe: bool
) -> tuple[list[str], list[list[str]]]:
    """Strip and tokenise captions; report (and skip) empty ones and duplicates."""
    captions: list[str] = []
    tokens: list[list[str]] = []
    first_seen: dict[tuple[str, ...], str] = {}
    for raw, where in raw_captions:
        text = raw.strip()
        toks = tokenize(text)
        if not toks:
            what = "empty caption" if not text else f"caption has no words ({text!r})"
            report.empty_captions.append(f"{where}: {what}")
            continue
        key = tuple(toks)
        if key in first_seen:
            kept = "kept the first" if dedupe else "kept both"
            report.duplicate_captions.append(
                f"{where}: duplicate caption for {image} "
                f"(same words as {_short_ref(first_seen[key], where)}); {kept}"
            )
            if dedupe:
                continue
        else:
            first_seen[key] = where
        captions.append(text)
        tokens.append(toks)
    return captions, tokens


def _short_ref(ref: str, where: str) -> str:
    """``ref`` as "line N" when it is another line of the same file as ``where``."""
    ref_file, _, ref_line = ref.rpartition(":")
    where_file, _, _ = where.rpartition(":")
    if ref_file and ref_file == where_file and ref_line.isdigit():
        return f"line {ref_line}"
    return ref


def _image_state(path: Path) -> str:
    """Return "ok", "missing" or "unreadable" (empty, not a regular file, or no image header).

    Only the header is read, to keep prepare fast; a file damaged after its header is caught by
    ``captioner features``, which decodes every image and lists failures in errors.jsonl."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError:
        return "unreadable"
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return "unreadable"
    try:  # the header only (no pixel decoding): catches text files, unknown formats, cut-off headers
        from PIL import Image, UnidentifiedImageError

        with Image.open(path) as im:
            im.size  # noqa: B018
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "unreadable"
    return "ok"


def _image_name_problem(image: str) -> str | None:
    """Why ``image`` is not usable as a relative image path, or None."""
    if not image.strip():
        return "empty image name"
    if "\0" in image:
        return f"image name {image!r} contains a NUL byte"
    posix = PurePosixPath(image.replace("\\", "/"))
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", image):
        return f"image path {image!r} must be relative to the image folder"
    if ".." in posix.parts:
        return f"image path {image!r} must not contain '..'"
    return None


def _check_image_dir(image_dir: Path, check_images: bool, source: Path | str) -> Path:
    image_dir = Path(image_dir).expanduser().absolute()
    if check_images and not image_dir.is_dir():
        raise CorpusError(
            f"{image_dir}: image folder not found (captions from {source}); "
            "point image_dir at the folder that holds the images"
        )
    return image_dir


def _read_text_lines(path: Path, what: str, hint: str) -> list[str]:
    try:
        with path.open("r", encoding="utf-8-sig", newline=None) as f:
            return f.read().split("\n")
    except FileNotFoundError:
        raise CorpusError(f"{path}: {what} not found; {hint}") from None
    except IsADirectoryError:
        raise CorpusError(f"{path}: is a folder, expected the {what}; {hint}") from None
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: {what} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot read the {what}: {e.strerror or e}") from None


def _load_json(path: Path, what: str) -> Any:
    try:
        return read_json_file(path, what=what)
    except ValueError as e:
        raise CorpusError(str(e)) from None


def _check_ratios(ratios: Sequence[float]) -> None:
    hash_split("", ratios)  # raises ValueError on bad ratios


# --------------------------------------------------------------------------- readers


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
    lines = _read_text_lines(token_path, "Flickr8k caption file", hint)
    root = _check_image_dir(Path(image_dir), check_images, token_path)
    b = _Builder()

    # image -> [(caption index, raw, where)]
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
        problem = _image_name_problem(image)
        if problem:
            b.malformed(where, problem)
            continue
        n = int(index)
        if (image, n) in first_line:
            b.malformed(where, f"caption {image}#{n} already given on line {first_line[image, n]}")
            continue
        first_line[image, n] = lineno
        captions.setdefault(image, []).append((n, text, where))

    for split, file_name in FLICKR8K_SPLIT_FILES:
        split_path = text_dir / file_name
        for lineno, line in enumerate(_read_text_lines(split_path, "split file", hint), 1):
            image = line.strip()
            if not image:
                continue
            where = f"{split_path}:{lineno}"
            problem = _image_name_problem(image)
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

    return b.finish(
        name=name,
        image_root=root,
        source=token_path,
        strict=strict,
        check_images=check_images,
        dedupe=dedupe,
    )


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
    data = _load_json(path, "Karpathy split JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CorpusError(
            f"{path}: not a Karpathy-split file (expected {{\"images\": [...]}}); "
            "check the file or choose another format"
        )
    root = _check_image_dir(Path(image_dir), check_images, path)
    split_map = {"train": "train", "val": "val", "test": "test"}
    split_map["restval"] = "train" if restval == "train" else "restval"
    b = _Builder()
    first_index: dict[str, int] = {}
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict):
            b.malformed(where, "expected an object")
            continue
        filename, filepath = entry.get("filename"), entry.get("filepath")
        if not isinstance(filename, str) or not filename:
            b.malformed(where, "no 'filename'")
            continue
        if filepath is not None and not isinstance(filepath, str):
            b.malformed(where, "'filepath' must be a string")
            continue
        image = f"{filepath.strip('/')}/{filename}" if filepath else filename
        where = f"{where} ({image})"
        problem = _image_name_problem(image)
        if problem:
            b.malformed(where, problem)
            continue
        raw_split = entry.get("split")
        split = split_map.get(raw_split) if isinstance(raw_split, str) else None
        if split is None:
            b.malformed(
                where, f"unknown split {raw_split!r} (expected train, val, test, restval)"
            )
            continue
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            b.malformed(where, "'sentences' must be a list")
            continue
        if image in first_index:
            b.malformed(where, f"{image} is already listed at images[{first_index[image]}]")
            continue
        first_index[image] = i
        rec = b.image(image, split)
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                b.malformed(f"{where}: sentences[{j}]", "no 'raw' caption text")
                continue
            rec.captions.append((raw, f"{image}#{j}"))

    default_name = data.get("dataset") if isinstance(data.get("dataset"), str) else None
    return b.finish(
        name=name or default_name or path.stem.removeprefix("dataset_"),
        image_root=root,
        source=path,
        strict=strict,
        check_images=check_images,
        dedupe=dedupe,
    )


def read_kaggle_csv(
    csv_path: PathLike,
    image_dir: PathLike,
    *,
    strict: bool = False,
    check_images: bool = True,
    dedupe: bool = False,
    ratios: Ratios = (0.9, 0.05, 0.05),
    seed: int = 0,
    name: str = "kaggle",
) -> Corpus:
    """Read a Kaggle-style ``captions.txt``: CSV with header ``image,caption``.

    There is no split column, so splits come from :func:`hash_split`
    (an optional ``split`` column is honoured, as in :func:`read_folder`).
    """
    path = Path(csv_path).expanduser()
    _check_ratios(ratios)
    b = _Builder()
    _read_caption_csv(path, b, ratios, seed)
    root = _check_image_dir(Path(image_dir), check_images, path)
    return b.finish(
        name=name,
        image_root=root,
        source=path,
        strict=strict,
        check_images=check_images,
        dedupe=dedupe,
    )


def read_folder(
    image_dir: PathLike,
    captions_file: PathLike,
    *,
    strict: bool = False,
    check_images: bool = True,
    dedupe: bool = False,
    ratios: Ratios = (0.9, 0.05, 0.05),
    seed: int = 0,
    name: str | None = None,
) -> Corpus:
    """Read your own images plus a caption file, one caption per row.

    ``captions_file`` is CSV with header ``image,caption[,split]`` or JSONL
    (``{"image": ..., "caption": ..., "split": ...}`` per line; chosen by the
    ``.jsonl``/``.ndjson`` suffix or a leading ``{``). Image names are relative
    to ``image_dir``. Rows without a split get :func:`hash_split`.
    """
    path = Path(captions_file).expanduser()
    _check_ratios(ratios)
    b = _Builder()
    if _looks_like_jsonl(path):
        _read_caption_jsonl(path, b, ratios, seed)
    else:
        _read_caption_csv(path, b, ratios, seed)
    root = _check_image_dir(Path(image_dir), check_images, path)
    return b.finish(
        name=name or root.name or "folder",
        image_root=root,
        source=path,
        strict=strict,
        check_images=check_images,
        dedupe=dedupe,
    )


def read_coco(
    annotation_files: PathLike | Sequence[PathLike],
    image_dir: PathLike,
    *,
    strict: bool = False,
    check_images: bool = True,
    dedupe: bool = False,
    ratios: Ratios = (0.9, 0.05, 0.05),
    seed: int = 0,
    name: str = "coco",
) -> Corpus:
    """Read MS-COCO caption annotations (``captions_train2014.json`` ...).

    Split from the file name: "train" in it -> train, "val" -> val, "test" ->
    test, otherwise :func:`hash_split` per image. Images live in
    ``image_dir/<suffix>/`` (e.g. ``train2014/`` for ``captions_train2014.json``)
    when that folder exists, else directly in ``image_dir``.
    For the Karpathy split of COCO use :func:`read_karpathy` instead.
    """
    files = (
        [annotation_files]
        if isinstance(annotation_files, (str, os.PathLike))
        else list(annotation_files)
    )
    if not files:
        raise CorpusError("no COCO annotation file given")
    _check_ratios(ratios)
    image_root = Path(image_dir).expanduser().absolute()
    b = _Builder()
    first_where: dict[str, str] = {}
    for file in files:
        path = Path(file).expanduser()
        data = _load_json(path, "COCO annotation file")
        if not (
            isinstance(data, dict)
            and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)
        ):
            raise CorpusError(
                f"{path}: not a COCO captions file (expected 'images' and 'annotations' lists)"
            )
        stem = path.stem.lower()
        file_split = next((s for s in ("train", "val", "test") if s in stem), None)
        subdir = path.stem.rsplit("_", 1)[-1]
        prefix = f"{subdir}/" if "_" in path.stem and (image_root / subdir).is_dir() else ""

        by_id: dict[Any, str] = {}
        for i, img in enumerate(data["images"]):
            where = f"{path}: images[{i}]"
            if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
                b.malformed(where, "expected an object with 'id' and 'file_name'")
                continue
            image = prefix + img["file_name"]
            problem = _image_name_problem(img["file_name"])
            if problem:
                b.malformed(where, problem)
                continue
            if image in first_where:
                b.malformed(where, f"{image} is already listed at {first_where[image]}")
                continue
            if not isinstance(img.get("id"), (int, str)) or img["id"] in by_id:
                b.malformed(where, f"missing or repeated image id {img.get('id')!r}")
                continue
            first_where[image] = where
            by_id[img["id"]] = image
            b.image(image, file_split or hash_split(image, ratios, seed))

        for k, ann in enumerate(data["annotations"]):
            where = f"{path}: annotations[{k}]"
            if not isinstance(ann, dict):
                b.malformed(where, "expected an object")
                continue
            image_id = ann.get("image_id")
            image = None if isinstance(image_id, (list, dict)) else by_id.get(image_id)
            if image is None:
                b.malformed(where, f"unknown image_id {ann.get('image_id')!r}")
                continue
            if not isinstance(ann.get("caption"), str):
                b.malformed(where, "no 'caption' text")
                continue
            b.records[image].captions.append((ann["caption"], where))

    root = _check_image_dir(image_root, check_images, Path(files[0]))
    return b.finish(
        name=name,
        image_root=root,
        source=", ".join(str(f) for f in files),
        strict=strict,
        check_images=check_images,
        dedupe=dedupe,
    )


def _looks_like_jsonl(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return True
    if suffix in (".csv", ".txt", ".tsv"):
        return False
    try:
        with path.open("r", encoding="utf-8-sig") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False  # the CSV reader reports the problem
    return head.lstrip().startswith("{")


def _split_value(value: object, image: str, ratios: Ratios, seed: int) -> str | None:
    """Normalised split of a row; hash split when empty; None when unknown."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return hash_split(image, ratios, seed)
    if not isinstance(value, str):
        return None
    return _SPLIT_ALIASES.get(value.strip().lower())


def _add_row(
    b: _Builder,
    where: str,
    image: object,
    caption: object,
    split_value: object,
    ratios: Ratios,
    seed: int,
) -> None:
    """Validate one caption row (CSV or JSONL) and add it."""
    if not isinstance(image, str):
        b.malformed(where, "no 'image'")
        return
    image = image.strip()
    problem = _image_name_problem(image)
    if problem:
        b.malformed(where, problem)
        return
    if not isinstance(caption, str):
        b.malformed(where, "no 'caption' text")
        return
    split = _split_value(split_value, image, ratios, seed)
    if split is None:
        b.malformed(where, f"unknown split {split_value!r} (expected train, val or test)")
        return
    b.caption(where, image, split, caption)


def _parse_csv_line(line: str) -> list[str]:
    """Fields of one CSV line; csv.Error for an unterminated quote (strict parsing).

    Captions are one per line: a quote left open is reported on its own line instead of
    swallowing the following rows into one caption. Other quirks strict parsing rejects
    (text after a closing quote) are read leniently, as before."""
    try:
        return next(csv.reader([line], strict=True), [])
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise csv.Error("unterminated quote: a quoted field is not closed on this line "
                            "(captions are one per line; close the quote or double it as \"\")") from None
        return next(csv.reader([line]), [])


def _read_caption_csv(path: Path, b: _Builder, ratios: Ratios, seed: int) -> None:
    """CSV with a header naming ``image`` and ``caption`` (and optionally ``split``), one row per line."""
    lines = _read_text_lines(path, "caption file", "check the path")
    try:
        header = [h.strip().lower() for h in _parse_csv_line(lines[0])]
    except csv.Error as e:
        raise CorpusError(f"{path}:1: cannot parse the CSV header: {e}") from None
    if "image" not in header or "caption" not in header:
        raise CorpusError(
            f"{path}:1: expected a CSV header with 'image' and 'caption' columns "
            f"(e.g. 'image,caption'), got {','.join(header)!r}"
        )
    col_image, col_caption = header.index("image"), header.index("caption")
    col_split = header.index("split") if "split" in header else None
    caption_last = col_caption == len(header) - 1
    for lineno, line in enumerate(lines[1:], 2):
        where = f"{path}:{lineno}"
        try:
            row = _parse_csv_line(line)
        except csv.Error as e:
            b.malformed(where, str(e))
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) > len(header) and caption_last:
            # an unquoted comma inside the caption
            row = [*row[:col_caption], ",".join(row[col_caption:])]
        if len(row) != len(header):
            b.malformed(
                where,
                f"expected {len(header)} fields ({','.join(header)}), got {len(row)}",
            )
            continue
        split_value = row[col_split] if col_split is not None else None
        _add_row(b, where, row[col_image], row[col_caption], split_value, ratios, seed)


def _read_caption_jsonl(path: Path, b: _Builder, ratios: Ratios, seed: int) -> None:
    """One JSON object per line: ``image``, ``caption``, optional ``split``."""
    for lineno, line in enumerate(_read_text_lines(path, "caption file", "check the path"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            b.malformed(where, f"not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            b.malformed(where, "expected a JSON object")
            continue
        _add_row(b, where, obj.get("image"), obj.get("caption"), obj.get("split"), ratios, seed)


# --------------------------------------------------------------------------- dispatch

_READERS: dict[str, tuple[Callable[..., Corpus], str]] = {
    "flickr8k-text": (read_flickr8k_text, "text_dir"),
    "karpathy": (read_karpathy, "json_path"),
    "kaggle": (read_kaggle_csv, "csv_path"),
    "coco": (read_coco, "annotation_files"),
    "folder": (read_folder, "captions_file"),
}


def detect_format(path: PathLike) -> str:
    """Guess the format name of a caption source (file or Flickr8k text folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / FLICKR8K_TOKEN_FILE, p / "Flickr8k_text" / FLICKR8K_TOKEN_FILE):
            if candidate.is_file():
                return "flickr8k-text"
        raise CorpusError(
            f"{p}: cannot tell the caption format of this folder; "
            f"give the caption file or a format ({', '.join(FORMATS)})"
        )
    if p.name == FLICKR8K_TOKEN_FILE:
        return "flickr8k-text"
    try:
        with p.open("r", encoding="utf-8-sig") as f:
            head = f.read(1 << 16)
    except FileNotFoundError:
        raise CorpusError(f"{p}: caption file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"{p}: cannot read caption file: {e}") from None
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "folder"
    if suffix == ".json":
        if '"sentences"' in head:
            return "karpathy"
        if '"annotations"' in head or '"file_name"' in head:
            return "coco"
    elif head.lstrip().startswith("{"):
        return "folder"
    else:
        first = head.split("\n", 1)[0]
        header = [h.strip().lower() for h in first.split(",")]
        if header == ["image", "caption"]:
            return "kaggle"
        if "image" in header and "caption" in header:
            return "folder"
    raise CorpusError(
        f"{p}: cannot tell the caption format; give a format ({', '.join(FORMATS)})"
    )


def read_corpus(
    fmt: str,
    source: PathLike | Sequence[PathLike] | None = None,
    image_dir: PathLike | None = None,
    **kwargs: Any,
) -> Corpus:
    """Read a corpus with the reader for ``fmt`` (one of FORMATS, or "auto").

    ``source`` is the reader's caption argument (text folder, JSON, CSV,
    annotation file list, caption file); readers' own keyword names also work.
    """
    if fmt == "auto":
        if source is None or not isinstance(source, (str, os.PathLike)):
            raise ValueError("format 'auto' needs a single source path")
        fmt = detect_format(source)
    if fmt not in _READERS:
        raise ValueError(f"unknown corpus format {fmt!r}; choose one of {', '.join(FORMATS)}")
    reader, source_arg = _READERS[fmt]
    if source is not None:
        kwargs[source_arg] = source
    if image_dir is not None:
        kwargs["image_dir"] = image_dir
    return reader(**kwargs)
