"""The one safe image loader: any file, bytes or stream -> a loaded RGB image.

Every code path that reads images (datasets, CLI, inference) goes through
:func:`load_image`, so that all of them agree on orientation, colour handling
and error messages, and none of them can be taken down by a hostile file.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import glob
import io
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.files import NotRegularFileError, open_regular

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "ImageSource",
    "expand_image_args",
    "glob_files",
    "list_images",
    "load_image",
    "try_load_image",
    "display_name",
    "name_fields",
]

DEFAULT_MAX_PIXELS = 64_000_000
"""Decompression-bomb guard: images with more pixels are refused unless asked."""
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def display_name(name: str) -> str:
    """``name`` as readable text: a file name that is not valid UTF-8 (held by Python with lone surrogates,
    which cannot be written as UTF-8) with U+FFFD in place of each undecodable byte."""
    return _name_bytes(name).decode("utf-8", "replace")


def _name_bytes(name: str) -> bytes:
    """The bytes of the file name ``name`` (a lone surrogate that is no undecodable byte: its UTF-8 form)."""
    try:
        return os.fsencode(name)
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogatepass")


def name_fields(key: str, name: str) -> dict[str, str]:
    """How JSON output names the file ``name``: ``{key: name}``; for a name that is not valid UTF-8,
    ``{key: display_name(name), key + "_b64": base64 of its bytes}`` (``os.fsdecode(base64.b64decode(...))``
    gives the name back exactly)."""
    shown = display_name(name)
    if shown == name:
        return {key: name}
    return {key: shown, f"{key}_b64": base64.b64encode(_name_bytes(name)).decode("ascii")}


def _real_folders(top: str, max_depth: int | None = None) -> Iterator[tuple[str, list[str]]]:
    """``(folder, names of the files in it)`` for ``top`` and the folders under it, depth first, in name
    order, to ``max_depth`` levels below ``top`` (None: all).

    The one rule for walking the user's folders (folder arguments, feature stores' ``--images``, globs):
    ``top`` is entered even when it is a link (the user named it), but a link to a folder found on the
    way is neither entered nor listed, and a real folder reached twice (a bind mount) is visited once.
    So ``a/up -> ..`` cannot loop or list a file twice. Unreadable folders are skipped."""
    seen: set[tuple[int, int]] = set()
    stack = [(top, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            st = os.stat(folder)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        yield folder, [e.name for e in entries if not _is_dir(e, follow=True)]
        if max_depth is None or depth < max_depth:
            stack += [(os.path.join(folder, e.name), depth + 1) for e in reversed(entries)
                      if _is_dir(e, follow=False)]


def _is_dir(entry: os.DirEntry, *, follow: bool) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow)
    except OSError:
        return False


def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, by extension, case-insensitive), sorted; links to
    folders inside it are not followed (see :func:`_real_folders`)."""
    return sorted(Path(d, name) for d, names in _real_folders(os.fspath(folder)) for name in names
                  if Path(name).suffix.lower() in IMAGE_EXTENSIONS)


def glob_files(pattern: str) -> list[str]:
    """The files matching ``pattern`` (``*``, ``?``, ``[...]`` within a name; ``**``: any folders), sorted.

    As Python's ``glob.glob(pattern, recursive=True)`` (names starting with a dot only when the pattern
    part does), but the folders are walked by :func:`_real_folders`: the pattern's fixed leading part
    may go through links, its wildcard part does not follow links to folders, so it cannot loop."""
    if pattern.endswith(os.sep):  # names folders only
        return []
    parts = pattern.split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    top = os.sep.join(parts[:fixed]) or (os.sep if fixed else "")
    wild = [part for part in parts[fixed:] if part]
    depth = None if "**" in wild else len(wild) - 1
    out = []
    for folder, names in _real_folders(top or os.curdir, depth):
        rel = os.path.relpath(folder, top or os.curdir).split(os.sep) if folder != (top or os.curdir) else []
        out += [os.path.join(folder, name) if top else os.path.join(*rel, name)
                for name in names if _matches(tuple(rel + [name]), tuple(wild))]
    return sorted(out)


def _matches(names: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether the relative path ``names`` matches the pattern parts ``parts`` (``**``: zero or more folders,
    hidden ones only when named)."""
    @functools.lru_cache(maxsize=None)
    def match(i: int, j: int) -> bool:
        if j == len(parts):
            return i == len(names)
        if parts[j] == "**":
            last = j == len(parts) - 1  # a final ** matches the files too
            return match(i, j + 1) or (i < len(names) - (0 if last else 1) and not names[i].startswith(".")
                                       and match(i + 1, j))
        return (i < len(names) and (not names[i].startswith(".") or parts[j].startswith("."))
                and fnmatch.fnmatchcase(names[i], parts[j]) and match(i + 1, j + 1))

    return match(0, 0)


def _stdin_paths(stdin) -> list[str]:
    """The paths listed one per line on ``stdin`` (bytes decoded as file names are, so a name that is not
    UTF-8 is read as the file system holds it); blank lines skipped, a NUL refused with its line."""
    lines = stdin.buffer if hasattr(stdin, "buffer") else stdin
    out = []
    for n, line in enumerate(lines, 1):
        path = (os.fsdecode(line) if isinstance(line, bytes) else line).rstrip("\r\n")
        if "\0" in path:
            raise ValueError(f"stdin, line {n}: the path contains a NUL byte ({display_name(path)!r}); give one "
                             "path per line (for `find`, use -print, not -print0)")
        if path.strip():
            out.append(path)
    return out


def expand_image_args(args: list[str], stdin=None) -> list[str]:
    """What `captioner caption` captions: each argument is a file, a folder (its images,
    recursively, sorted), a quoted glob pattern such as 'photos/**/*.jpg' (expanded here, so any
    number of files passes the shell's argument limit), or ``-`` for one path per line on stdin.
    A name that is none of these is kept as it is, so it is reported as missing with the others.
    Folders and globs are walked by one rule (:func:`_real_folders`): no link loops, no file twice."""
    out: list[str] = []
    for arg in args:
        if arg == "-":
            out += _stdin_paths(stdin or sys.stdin)
        elif Path(arg).is_dir():
            out += [str(p) for p in list_images(Path(arg))]
        elif not Path(arg).exists() and glob.has_magic(arg):
            out += glob_files(arg)
        else:
            out.append(arg)
    return out


ImageSource = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class ImageError(ValueError):
    """Bad image input. ``str(e) == f"{source}: {reason}"``."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self):  # keep it picklable (DataLoader workers)
        return (type(self), (self.source, self.reason))


# --------------------------------------------------------------------------
# PIL's own decompression-bomb check
# --------------------------------------------------------------------------
# We enforce ``max_pixels`` ourselves from the header, so PIL's global check
# (which warns, or raises without telling the size) is switched off while one
# of our loads runs, and restored when the last concurrent load finishes.

_pil_guard_lock = threading.Lock()
_pil_guard_depth = 0
_pil_guard_saved: int | None = None


@contextmanager
def _pil_bomb_check_off() -> Iterator[None]:
    global _pil_guard_depth, _pil_guard_saved
    with _pil_guard_lock:
        if _pil_guard_depth == 0:
            _pil_guard_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pil_guard_depth += 1
    try:
        yield
    finally:
        with _pil_guard_lock:
            _pil_guard_depth -= 1
            if _pil_guard_depth == 0:
                Image.MAX_IMAGE_PIXELS = _pil_guard_saved


# --------------------------------------------------------------------------
# Mode conversion
# --------------------------------------------------------------------------


def _to_uint8_gray(im: Image.Image) -> Image.Image:
    """Scale a high-bit-depth grey image (I;16*, I, F) to mode L.

    I;16*: full 16-bit range (65535 -> 255). I: treated as 16-bit when its
    values fit in 0..65535, else stretched min..max. F: 0..1 -> 0..255 when it
    fits, else stretched min..max.
    """
    arr = np.asarray(im).astype(np.float64)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        out = arr / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        out = arr * 255.0
    elif hi > lo:
        out = (arr - lo) * (255.0 / (hi - lo))
    else:
        out = np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def _on_white(im: Image.Image) -> Image.Image:
    """Composite an image with alpha (or a transparent colour) onto white."""
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_uint8_gray(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return _on_white(im)
    if im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA":
        return _on_white(im)
    if im.mode == "RGB":
        return im
    return im.convert("RGB")


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def _decode(fp: BinaryIO, source: str, max_pixels: int | None) -> Image.Image:
    """Open ``fp``, check its size from the header, then decode to RGB."""
    with _pil_bomb_check_off():
        try:
            im = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageError(source, "not an image file (cannot identify format)") from None
        except Exception as e:  # PIL plugins raise many types on bad headers
            raise ImageError(source, f"truncated or corrupt image data: {e}") from e
        # Leaving the ``with`` closes files PIL opened itself, never the caller's.
        with im:
            width, height = im.size
            pixels = width * height
            if max_pixels is not None and pixels > max_pixels:
                raise ImageError(
                    source,
                    f"image has {width} x {height} = {pixels} pixels, more than the "
                    f"limit of {max_pixels}; raise max_pixels if you trust this file",
                )
            try:
                im.load()  # Image.open left animated images on their first frame
            except Exception as e:
                raise ImageError(source, f"truncated or corrupt image data: {e}") from e
            try:
                # Always a new in-memory image, detached from the file.
                out = ImageOps.exif_transpose(im)
            except Exception:  # unreadable EXIF must not cost us a good image
                out = im.copy()
        try:
            return _to_rgb(out)
        except Exception as e:
            raise ImageError(source, f"cannot convert mode {out.mode} to RGB: {e}") from e


def _open_regular_file(path: Path, source: str) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file, as every file is read
    (:func:`captioner.files.open_regular`: non-blocking, checked with fstat on the open descriptor), so a
    named pipe or a device is refused at once instead of blocking or streaming forever."""
    try:
        return open_regular(path, "the image")
    except NotRegularFileError as e:
        raise ImageError(source, f"is {e.kind}, not a regular file; only regular files are read as images") from None


def load_image(
    src: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Load ``src`` (path, bytes or binary file object) as a fully loaded RGB image.

    EXIF orientation is applied, transparency is composited on white, and
    animated images give their first frame. Any problem raises
    :class:`ImageError`; images over ``max_pixels`` (``None``: no limit) are
    refused before decoding. File objects are read but not closed.
    """
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")

    if isinstance(src, Image.Image):  # already decoded (e.g. from the Python API): same mode rules
        source = name if name is not None else "<PIL image>"
        w, h = src.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageError(source, f"image has {w} x {h} = {w * h} pixels, more than the limit of "
                                     f"{max_pixels}; raise max_pixels if you trust this file")
        try:
            frame = src.copy()  # the frame the caller has selected
            return _to_rgb(ImageOps.exif_transpose(frame) or frame)
        except (OSError, ValueError) as e:
            raise ImageError(source, f"cannot convert mode {src.mode} to RGB: {e}") from e

    if isinstance(src, (bytes, bytearray, memoryview)):
        source = name if name is not None else "<bytes>"
        if len(src) == 0:
            raise ImageError(source, "empty data (0 bytes)")
        return _decode(io.BytesIO(bytes(src)), source, max_pixels)

    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        source = name if name is not None else os.fspath(src)
        if "\0" in os.fspath(src):  # os.open would raise a bare "embedded null byte"
            raise ImageError(source, "the path contains a NUL byte, which no file name can hold")
        if path.is_dir():
            raise ImageError(source, "is a directory, not an image file")
        try:
            with _open_regular_file(path, source) as fp:
                if os.fstat(fp.fileno()).st_size == 0:
                    raise ImageError(source, "empty file (0 bytes)")
                return _decode(fp, source, max_pixels)
        except FileNotFoundError:
            raise ImageError(source, "file not found") from None
        except PermissionError:
            raise ImageError(source, "permission denied") from None
        except IsADirectoryError:
            raise ImageError(source, "is a directory, not an image file") from None
        except OSError as e:
            raise ImageError(source, f"cannot read file: {e.strerror or e}") from e

    if hasattr(src, "read"):
        file_name = getattr(src, "name", None)
        if name is not None:
            source = name
        elif isinstance(file_name, (str, os.PathLike)):
            source = os.fspath(file_name)
        else:
            source = "<file object>"
        try:
            return _decode(src, source, max_pixels)
        except OSError as e:  # reading the stream itself failed
            raise ImageError(source, f"cannot read file: {e}") from e

    raise TypeError(
        f"load_image expects a path, bytes, a binary file object or a PIL image, got {type(src).__name__}"
    )


def try_load_image(
    src: ImageSource, **kw: Any
) -> tuple[Image.Image | None, str | None]:
    """Like :func:`load_image` but returns ``(image, None)`` or ``(None, message)``."""
    try:
        return load_image(src, **kw), None
    except ImageError as e:
        return None, str(e)


# ---------------------------------------------------------------------------------------
# The encoder's input (here, not beside the encoder, so that it needs no torch: the encoder's head start)

RESIZE_POLICIES = ("squash", "center-crop")


def resize_image(img: Image.Image, size: int, policy: str) -> Image.Image:
    """Resize an RGB PIL image to ``size x size`` following ``policy``."""
    if policy == "squash":
        return img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    if policy == "center-crop":
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    raise ValueError(f"unknown resize policy {policy!r}; use one of {RESIZE_POLICIES}")


def image_to_array(img: Image.Image, spec) -> np.ndarray:
    """RGB PIL image -> uint8 array (S, S, 3) ready to stack into a batch; ``spec`` (an EncoderSpec, or anything with
    ``image_size`` and ``resize``) says the size and the resize policy."""
    return np.asarray(resize_image(img.convert("RGB"), spec.image_size, spec.resize), dtype=np.uint8)
