"""The image encoder's head start: the first images encoded while ``captioner caption`` is still importing torch.

``caption`` spends its first second or so importing torch and building its model, on one core; with ONNX Runtime
the encoder needs neither. So before that import, the command starts a :class:`HeadStart`: one thread that opens
the encoder's exported ONNX file (from the cache, one runtime thread) and decodes, resizes and encodes the first
images in order, on the other core. When the command's own encoder is built, :meth:`HeadStart.take` stops the
thread and hands over what it encoded, and the command goes on from the next image. This module imports neither
torch nor the modules that do.

Without torch the exported file cannot be found the usual way (its name hashes the network's weights), so each
run leaves a hint once its encoder is built (:meth:`HeadStart.remember`): ``hint-KEY.json`` in the cache
folder (:func:`~captioner.encoders.sessions.cache_dir`) names the file and the image input (size, resize
policy), where KEY hashes what the command knows before torch (the model's files, the installed versions). The
first run leaves the hint; later runs use it. The hint is
only a guess: :meth:`HeadStart.take` hands anything over only when the command's encoder runs that very file
with that input, else the thread's work is dropped and the hint written again. A head start therefore changes
no result: the features are the runtime's for the same images (ONNX Runtime's outputs do not depend on the
batch or the thread count; tests/test_head_start.py), and ``caption``'s batches are those of a run without one
(the images encoded past the last whole batch are the first of the next).

``CAPTIONER_HINTS=0`` turns it off (the benchmarks compare both), as it does ``features``' start without torch
(:mod:`captioner.encoders.quick_features`, which reads hints of its own through the helpers here).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from captioner.data.images import RESIZE_POLICIES, image_to_array, load_image
from captioner.data.text import write_json_atomic
from captioner.encoders.sessions import cache_dir, cached_is_valid, package_version, session_options

HINT_FORMAT = 1  # bump when a hint's contents change
CHUNK = 2  # images per encoder call, as caption's own (captioner.inference.captioner.ENCODER_BATCH)
SWITCH_INTERVAL = 0.0005  # s: while the thread runs, it gets the GIL back sooner from the import (5 ms by default)


def enabled() -> bool:
    """False when ``CAPTIONER_HINTS=0`` (or ``no``, ``off``, ``false``): no hint is read."""
    return os.environ.get("CAPTIONER_HINTS", "1").strip().lower() not in ("0", "no", "off", "false")


def file_stamp(path: Path) -> list:
    """A file's (name, size, modification time), or its name alone when it is not there."""
    try:
        st = path.stat()
    except OSError:
        return [str(path)]
    return [str(path), st.st_size, st.st_mtime_ns]


def hint_key(kind: str, parts: Any) -> str:
    """The hint's name for a command of ``kind`` with ``parts`` (what decides its encoder, as JSON-able values)
    and the versions installed."""
    from captioner import __version__

    text = json.dumps([HINT_FORMAT, kind, parts, __version__, package_version("torch"), package_version("onnxruntime")],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def caption_key(models: Sequence[str], runtime: str) -> str:
    """The hint's key for ``captioner caption`` with these model arguments (paths or bundled names)."""
    parts = []
    for m in models:
        path = Path(m)
        if path.is_dir():
            path = path.resolve()
            parts.append([str(path), file_stamp(path / "config.json"), file_stamp(path / "encoder.safetensors")])
        else:
            parts.append([str(m)])
    return hint_key("caption", [parts, "onnx" if runtime == "auto" else runtime])


@dataclass(frozen=True)
class Hint:
    """What a command's encoder ran the last time: the ONNX file and its image input."""

    path: str
    image_size: int
    resize: str

    @staticmethod
    def read(key: str) -> "Hint | None":
        """The hint ``key`` names, or None (none yet, unreadable, or naming a file that is gone)."""
        try:
            raw = json.loads((cache_dir() / f"hint-{key}.json").read_text())
            hint = Hint(str(raw["path"]), int(raw["image_size"]), str(raw["resize"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        ok = 16 <= hint.image_size <= 4096 and hint.resize in RESIZE_POLICIES and os.path.isfile(hint.path)
        return hint if ok else None


class HeadStart:
    """The thread that encodes ``sources`` (image paths, in order) before the command's encoder exists, with the
    hint ``key`` names; a HeadStart without a hint (or turned off) encodes nothing and only leaves the hint.
    Stops at the first image it cannot read (the command reads it again and reports it)."""

    def __init__(self, key: str, sources: Sequence[Any], *, max_pixels: int | None, hint: Hint | None = None):
        self.key = key
        self.hint = hint
        self.sources = list(sources)
        self.max_pixels = max_pixels
        self._done: list[tuple[list[tuple[np.ndarray, tuple[int, int]]], list[np.ndarray]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interval = sys.getswitchinterval()
        if hint is not None and self.sources:
            sys.setswitchinterval(min(self._interval, SWITCH_INTERVAL))
            self._thread = threading.Thread(target=self._run, name="captioner-head-start", daemon=True)
            self._thread.start()

    @classmethod
    def start(cls, key: str, sources: Sequence[Any], *, max_pixels: int | None) -> "HeadStart":
        """A head start for ``sources`` when the hint ``key`` is there and ONNX Runtime is installed."""
        hint = Hint.read(key) if enabled() else None
        if hint is not None and importlib.util.find_spec("onnxruntime") is None:
            hint = None
        return cls(key, sources, max_pixels=max_pixels, hint=hint)

    def _run(self) -> None:
        try:
            import onnxruntime as ort

            if not cached_is_valid(Path(self.hint.path)):  # damaged since: the command exports it again
                return
            session = ort.InferenceSession(self.hint.path, session_options(1),
                                           providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            for i in range(0, len(self.sources), CHUNK):
                if self._stop.is_set():
                    return
                images = []
                for src in self.sources[i:i + CHUNK]:
                    img = load_image(src, max_pixels=self.max_pixels)
                    images.append((image_to_array(img, self.hint), img.size))
                out = session.run(None, {name: np.stack([a for a, _ in images])})
                self._done.append((images, out))
        except Exception:  # noqa: BLE001 - an unreadable image (ImageError), ONNX Runtime's own errors: the command
            return  # reads and encodes the rest itself, and reports a real problem when it meets it

    def __enter__(self) -> "HeadStart":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the thread (after the call it is in) and wait for it (also on leaving a ``with`` block)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        sys.setswitchinterval(self._interval)

    def take(self, encoder) -> list[tuple[np.ndarray, tuple[int, int], list[np.ndarray]]]:
        """Stop, and hand over what was encoded when ``encoder`` (the command's, built) runs the hint's file with its
        image input: per image from the first, (its uint8 array, its size, the session's outputs for it); else
        nothing. Leaves the hint for the next run (:meth:`remember`)."""
        self.stop()
        self.remember(encoder)
        if self.hint is None or not self._matches(encoder):
            return []
        per_image = [(array, size, [o[j] for o in out])
                     for images, out in self._done for j, (array, size) in enumerate(images)]
        self._done = []
        return per_image

    def _matches(self, encoder) -> bool:
        hint = _hint_of(encoder)
        try:
            return hint is not None and os.path.samefile(hint.path, self.hint.path) and \
                (hint.image_size, hint.resize) == (self.hint.image_size, self.hint.resize)
        except OSError:
            return False

    def remember(self, encoder) -> None:
        """Leave the hint naming ``encoder``'s ONNX file and image input for the next run (nothing for an encoder
        that runs on torch or in int8). A hint that cannot be written costs the next run its head start only."""
        hint = _hint_of(encoder)
        if not enabled() or hint is None or hint == self.hint:
            return
        try:
            write_json_atomic(cache_dir() / f"hint-{self.key}.json",
                              {"path": hint.path, "image_size": hint.image_size, "resize": hint.resize})
        except OSError:
            pass


def _hint_of(encoder) -> Hint | None:
    """What ``encoder`` runs, as a hint: its ONNX file and image input; None for one on torch or in int8."""
    path, spec = getattr(encoder, "path", None), getattr(encoder, "spec", None)
    if path is None or spec is None or getattr(encoder, "precision", "fp32") != "fp32":
        return None
    return Hint(str(Path(path).resolve()), int(spec.image_size), str(spec.resize))

