"""Reading a file: regular files only, and no larger than what the file can sensibly be.

Every file the project reads goes through :func:`open_regular` (images, configs, corpus and
vocabulary files, model directories, feature stores, dataset sources): the file is opened
non-blocking and checked with ``fstat`` on the open descriptor (no check-then-open race), so a
named pipe, a device such as /dev/zero, a socket or a folder is refused at once, instead of
blocking forever or streaming until memory runs out; its size is checked before anything is read.
Files that a library opens by name (memory-mapped arrays, safetensors) are checked with
:func:`check_regular` first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, TypeVar

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
CONFIG_BYTES = 1 * MIB  # a YAML training config
METADATA_BYTES = 64 * MIB  # config.json, vocab.json, a store's meta.json, report and record files
DATA_BYTES = 2 * GIB  # corpus.json, dataset caption files, a store's index.json
WEIGHTS_BYTES = 64 * GIB  # model.safetensors, last.pt (memory-mapped or read by torch)

P = TypeVar("P", str, os.PathLike)

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


class NotRegularFileError(ValueError):
    """A path that is not a regular file (``kind`` says what it is)."""

    def __init__(self, path: str | os.PathLike, what: str, kind: str) -> None:
        self.path, self.what, self.kind = str(path), what, kind
        super().__init__(f"{path}: {what} is {kind}, not a regular file; give the path of a regular file")


class FileTooLargeError(ValueError):
    """A regular file larger than a file of its kind can sensibly be."""

    def __init__(self, path: str | os.PathLike, what: str, size: int, limit: int) -> None:
        self.path, self.size, self.limit = str(path), size, limit
        super().__init__(f"{path}: {what} is {size_text(size)}, more than the {size_text(limit)} such a file "
                         "may be; is it the right file?")


def size_text(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def open_regular(path: str | os.PathLike, what: str = "the file", max_bytes: int | None = None) -> BinaryIO:
    """``path`` opened for reading in binary mode, if it is a regular file of at most ``max_bytes``.

    Raises :class:`NotRegularFileError` or :class:`FileTooLargeError` (ValueErrors naming the file), or
    the OSError of ``os.open`` (a missing file, no permission) for the caller to word."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, what, next((k for test, k in _KINDS if test(st.st_mode)),
                                                       "a special file"))
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileTooLargeError(path, what, st.st_size, max_bytes)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: P, what: str = "the file", max_bytes: int | None = None) -> P:
    """:func:`open_regular`'s checks, for a file a library then opens by name (np.load, safetensors);
    returns ``path``."""
    open_regular(path, what, max_bytes).close()
    return path


def read_bytes(path: str | os.PathLike, what: str = "the file", max_bytes: int = DATA_BYTES) -> bytes:
    """The content of a regular file of at most ``max_bytes`` (also when it grows while being read, or
    reports no size, as /proc files do). OSErrors are left to the caller."""
    with open_regular(path, what, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLargeError(path, what, len(data), max_bytes)
    return data


def read_text(path: str | os.PathLike, what: str = "the file", max_bytes: int = DATA_BYTES) -> str:
    """:func:`read_bytes` decoded as UTF-8, every error a ValueError naming the file and ``what``."""
    p = Path(path)
    try:
        data = read_bytes(p, what, max_bytes)
    except FileNotFoundError:
        raise ValueError(f"{p}: {what} not found") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read {what} ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
