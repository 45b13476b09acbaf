"""Readers of the caption dataset formats, each returning a :class:`~captioner.data.corpus.Corpus`,
and :func:`read_corpus`, which picks the reader for a format name (or guesses it: :func:`detect_format`).

Every reader returns a corpus whose items keep the order of the source file, whose captions
are stripped raw text and whose tokens are always recomputed with
:func:`captioner.data.text.tokenize` (so all readers agree). Problems are collected in a
:class:`~captioner.data.corpus.ValidationReport`; by default the bad entries are skipped, with
``strict=True`` a :class:`~captioner.data.corpus.CorpusError` lists them all.

Formats (``captioner prepare FORMAT``): ``flickr8k-text`` (the official Flickr8k text files),
``karpathy`` (``dataset_flickr8k/30k/coco.json``), ``kaggle`` (``captions.txt``), ``coco``
(MS-COCO ``captions_*.json``) and ``folder`` (your own CSV or JSONL).

Modules: :mod:`~captioner.data.readers.builder` (what every reader shares: building, cleaning, image
checks), :mod:`~captioner.data.readers.flickr` (Flickr8k text files, Karpathy JSON),
:mod:`~captioner.data.readers.coco` (COCO annotations), :mod:`~captioner.data.readers.rows` (Kaggle CSV,
your own CSV/JSONL); this module dispatches on the format.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from captioner.data.corpus import Corpus, CorpusError, PathLike
from captioner.data.readers.builder import read_head
from captioner.data.readers.coco import read_coco
from captioner.data.readers.flickr import FLICKR8K_SPLIT_FILES, FLICKR8K_TOKEN_FILE, read_flickr8k_text, read_karpathy
from captioner.data.readers.rows import read_folder, read_kaggle_csv

__all__ = [
    "FLICKR8K_SPLIT_FILES",
    "FLICKR8K_TOKEN_FILE",
    "FORMATS",
    "detect_format",
    "read_coco",
    "read_corpus",
    "read_flickr8k_text",
    "read_folder",
    "read_kaggle_csv",
    "read_karpathy",
]

FORMATS: tuple[str, ...] = ("flickr8k-text", "karpathy", "kaggle", "coco", "folder")

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
        head = read_head(p, 1 << 16)
    except FileNotFoundError:
        raise CorpusError(f"{p}: caption file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"{p}: cannot read caption file: {e}") from None
    except ValueError as e:  # not a regular file
        raise CorpusError(str(e)) from None
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
