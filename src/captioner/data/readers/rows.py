"""Readers of caption files with one caption per row: Kaggle's ``captions.txt`` (CSV ``image,caption``)
and your own images with a CSV (``image,caption[,split]``) or JSONL caption file.

Rows without a split get :func:`~captioner.data.corpus.hash_split`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from captioner.data.corpus import DEFAULT_RATIOS, Corpus, CorpusError, PathLike, Ratios, hash_split
from captioner.data.readers.builder import (
    Builder,
    check_image_dir,
    check_ratios,
    image_name_problem,
    read_head,
    read_text_lines,
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


def read_kaggle_csv(
    csv_path: PathLike,
    image_dir: PathLike,
    *,
    strict: bool = False,
    check_images: bool = True,
    dedupe: bool = False,
    ratios: Ratios = DEFAULT_RATIOS,
    seed: int = 0,
    name: str = "kaggle",
) -> Corpus:
    """Read a Kaggle-style ``captions.txt``: CSV with header ``image,caption``.

    There is no split column, so splits come from :func:`hash_split`
    (an optional ``split`` column is honoured, as in :func:`read_folder`).
    """
    path = Path(csv_path).expanduser()
    check_ratios(ratios)
    b = Builder()
    _read_caption_csv(path, b, ratios, seed)
    root = check_image_dir(Path(image_dir), check_images, path)
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
    ratios: Ratios = DEFAULT_RATIOS,
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
    check_ratios(ratios)
    b = Builder()
    if _looks_like_jsonl(path):
        _read_caption_jsonl(path, b, ratios, seed)
    else:
        _read_caption_csv(path, b, ratios, seed)
    root = check_image_dir(Path(image_dir), check_images, path)
    return b.finish(
        name=name or root.name or "folder",
        image_root=root,
        source=path,
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
        head = read_head(path, 4096)
    except (OSError, ValueError):  # UnicodeDecodeError, not a regular file
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
    b: Builder,
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
    problem = image_name_problem(image)
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


def _read_caption_csv(path: Path, b: Builder, ratios: Ratios, seed: int) -> None:
    """CSV with a header naming ``image`` and ``caption`` (and optionally ``split``), one row per line."""
    lines = read_text_lines(path, "caption file", "check the path")
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


def _read_caption_jsonl(path: Path, b: Builder, ratios: Ratios, seed: int) -> None:
    """One JSON object per line: ``image``, ``caption``, optional ``split``."""
    for lineno, line in enumerate(read_text_lines(path, "caption file", "check the path"), 1):
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
