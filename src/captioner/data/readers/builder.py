"""What every reader shares: the builder that turns raw records into a validated corpus, caption
cleaning, the image checks, and reading a caption source's text or JSON with clear errors.

A reader adds ``(image, split, raw caption, where)`` records to a :class:`Builder`, reporting
malformed entries on it; :meth:`Builder.finish` strips and tokenises the captions, checks the
images and returns the :class:`~captioner.data.corpus.Corpus` (or raises a
:class:`~captioner.data.corpus.CorpusError`).
"""

from __future__ import annotations

import io
import re
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from captioner.data.corpus import SPLITS, Corpus, CorpusError, Item, ValidationReport, hash_split
from captioner.data.text import read_json_file, tokenize
from captioner.files import DATA_BYTES, NotRegularFileError, open_regular, read_bytes


@dataclass
class _Record:
    split: str | None  # None: in no split (dropped)
    captions: list[tuple[str, str]] = field(default_factory=list)  # (raw, where)


class Builder:
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
            raise _empty_corpus_error(source, report, problems)
        if strict and problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise CorpusError(
                f"{source}: {len(problems)} problem(s) found (strict mode):\n{listing}\n"
                "Fix these entries, or run without strict mode to skip them.",
                problems,
            )
        return Corpus(name=name, image_root=image_root, items=items, report=report)


def _empty_corpus_error(source: Path | str, report: ValidationReport, problems: list[str]) -> CorpusError:
    """The error for a source that left no image with a usable caption: why, with the first problems."""
    listing = "".join(f"\n  - {p}" for p in problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    unsplit = (f" ({len(report.unsplit_images)} image(s) are in no split)"
               if report.unsplit_images else "")
    found = unsplit + (f"; {len(problems)} problem(s):{listing}{more}" if problems
                       else "" if unsplit else " (the source holds no captions)")
    return CorpusError(
        f"{source}: no image with a usable caption found{found}\n"
        "Check that this is the right caption file and format, and that the image folder holds its images.",
        problems,
    )


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
        with Image.open(path) as im:
            im.size  # noqa: B018
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "unreadable"
    return "ok"


def image_name_problem(image: str) -> str | None:
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


def check_image_dir(image_dir: Path, check_images: bool, source: Path | str) -> Path:
    """The absolute image folder; when images are checked, a CorpusError if it is not a folder."""
    image_dir = Path(image_dir).expanduser().absolute()
    if check_images and not image_dir.is_dir():
        raise CorpusError(
            f"{image_dir}: image folder not found (captions from {source}); "
            "point image_dir at the folder that holds the images"
        )
    return image_dir


def read_text_lines(path: Path, what: str, hint: str) -> list[str]:
    """The lines of a UTF-8 text file (a BOM is dropped, any line ending read); a CorpusError naming
    ``what`` if it is not a regular file of at most DATA_BYTES, or unreadable."""
    try:
        data = read_bytes(path, f"the {what}", DATA_BYTES)
    except FileNotFoundError:
        raise CorpusError(f"{path}: {what} not found; {hint}") from None
    except NotRegularFileError as e:
        if e.kind == "a folder":
            raise CorpusError(f"{path}: is a folder, expected the {what}; {hint}") from None
        raise CorpusError(str(e)) from None
    except ValueError as e:  # too large
        raise CorpusError(str(e)) from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: {what} is not UTF-8 text ({e.reason})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_head(path: Path, chars: int) -> str:
    """The first ``chars`` characters of a UTF-8 text file (to tell its format), opened as every file is
    (:func:`captioner.files.open_regular`: a FIFO or a device is a ValueError naming it, never a hang)."""
    with io.TextIOWrapper(open_regular(path, "the caption file"), encoding="utf-8-sig") as f:
        return f.read(chars)


def load_json(path: Path, what: str) -> Any:
    """A JSON file's content; a CorpusError naming the file if it cannot be read or parsed."""
    try:
        return read_json_file(path, what=what)
    except ValueError as e:
        raise CorpusError(str(e)) from None


def check_ratios(ratios: Sequence[float]) -> None:
    hash_split("", ratios)  # raises ValueError on bad ratios
