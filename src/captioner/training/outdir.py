"""A training run's ``out_dir``: a folder of the run's own files only, written by one run at a time.

A new run refuses a folder that holds anything but a training run's files (``out_dir=/`` or the home
folder among them: training would write beside, and on --resume over, what is there). While a run
trains, rank 0 holds an exclusive ``flock`` on ``out_dir/.lock``: a second run into the same folder
(a second ``train``, or a ``--resume`` of it) stops at once, naming the folder. The lock goes with the
process, however it ends (a kill -9 included), so it never has to be removed by hand.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from captioner.checks import shown
from captioner.training.config import TrainError

LOCK = ".lock"
RUN_FILES = {"config.yaml", "last.pt", "best", "metrics.jsonl", "curves.png", "started_from.json", LOCK}


def _run_file(name: str) -> bool:
    """A file that training writes (or leaves while writing: a temporary file)."""
    return name in RUN_FILES or name.endswith(".tmp")


def check_out_dir(out: Path) -> None:
    """A new run's out_dir: not a filesystem root, not the home folder, and a folder that is new or holds
    only a training run's files (before --resume, or a run stopped before its first checkpoint)."""
    try:
        where = out.expanduser().resolve()
        home = Path.home().resolve()
    except (OSError, RuntimeError):  # no home folder known, a symlink loop: left to the writes to report
        where, home = out, None
    if where == Path(where.anchor) or where == home:
        raise TrainError(f"out_dir={out}: is {'the home folder' if where == home else 'a filesystem root'}; "
                         "training writes its files there: give a folder of its own, e.g. runs/sat")
    if out.is_dir():
        others = sorted(name for name in os.listdir(out) if not _run_file(name))
        if others:
            raise TrainError(f"out_dir={out}: holds other things than a training run ({shown(others[:3])[1:-1]}"
                             f"{', ...' if len(others) > 3 else ''}); training writes config.yaml, last.pt, best/, "
                             "metrics.jsonl and curves.png there and replaces them: give a new or empty folder")


class OutDirLock:
    """Rank 0's exclusive hold on ``out_dir`` (an flock on out_dir/.lock) for the length of a run."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = out, out / LOCK
        self.created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)  # a file in the way: `error: OUT: File exists`
        self.fd = self._take()

    def _take(self) -> int:
        for _ in range(10):  # the file may be replaced between the open and the lock: take the one there
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    raise TrainError(f"{self.path}: cannot lock the run's folder ({e.strerror or e})") from None
                raise TrainError(f"out_dir={self.out}: another training run is writing there "
                                 f"({'process ' + holder if holder.isdigit() else 'it holds ' + str(self.path)}); "
                                 "wait for it to end, or give another out_dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                return fd
            os.close(fd)
        raise TrainError(f"{self.path}: cannot lock the run's folder (the lock file keeps changing)")

    def release(self) -> None:
        """Let go; a folder this run created and left empty (it failed before writing) is removed."""
        if self.fd < 0:
            return
        try:
            if self.created and os.listdir(self.out) == [LOCK]:
                self.path.unlink()
                self.out.rmdir()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
