"""``captioner features`` without torch: with ONNX Runtime, once a run has exported the encoder and named it.

Importing torch and building the encoder take about a second and a half of CPU at every start; ONNX Runtime needs
neither once the encoder is exported (:mod:`captioner.encoders.onnx_cache`). So every run that encodes with ONNX
Runtime in float32, in one process, leaves a hint (:func:`remember_features`): ``features-KEY.json`` in the cache
folder names the exported file, the encoder as the store records it (``spec.to_dict()``), the size and time of the
ImageNet weights file and a digest of the code that builds and exports the network (as the running process has it).
KEY hashes the command's encoder options (``--encoder --resize --image-size --grid``) and the versions installed
(captioner, torch, ONNX Runtime, the EfficientNet package). The next run with the same options finds the hint before
importing anything heavy and, when the weights and the code are as the hint says and the exported file matches its
hash, fills the
store here (:func:`features_without_torch`): the same rows as the torch-side path writes, the same meta.json,
resumable the same way (:mod:`captioner.encoders.store_fill` does both). Anything else (no hint, a file changed,
another device, precision, runtime or ``--cut``, torchrun) takes the usual path, which leaves a new hint.

``CAPTIONER_HINTS=0`` turns hints off (this and ``caption``'s head start, :mod:`captioner.encoders.head_start`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from captioner.data.features import stored_dims
from captioner.data.images import RESIZE_POLICIES
from captioner.data.text import write_json_atomic
from captioner.encoders.head_start import enabled, file_stamp, hint_key
from captioner.encoders.sessions import cache_dir, cached_is_valid, package_version, session_options
from captioner.encoders.store_fill import DecodeDataset, fill_rows, fill_store, threaded_batches
from captioner.runtime.distributed import Group

# the modules whose code makes the exported network (a change there is another network)
CODE = ("captioner.encoders.network", "captioner.encoders.tail", "captioner.encoders.onnx_cache")


def features_key(encoder: str, resize: str | None, image_size: int | None, grid: int | None, runtime: str) -> str:
    """The hint's key for ``captioner features`` with these options (``auto`` and ``onnx`` alike)."""
    return hint_key("features", [encoder, resize, image_size, grid, "onnx" if runtime == "auto" else runtime,
                                 package_version("efficientnet-lite-pytorch")])


def _hint_path(key: str) -> Path:
    return cache_dir() / f"features-{key}.json"


def _code_digest() -> str:
    """A digest of the contents of the code that makes the exported network, as this process would run it (another
    checkout or install of the same version with other code has another digest)."""
    h = hashlib.sha256()
    for name in CODE:
        h.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return h.hexdigest()[:24]


def remember_features(key: str, encoder, described: dict) -> None:
    """Leave the hint for ``encoder`` (an OnnxImageEncoder in float32 of a Lite network) whose store records the
    encoder as ``described``. A hint that cannot be written costs the next run its quick start only."""
    name = str(described.get("name", ""))
    if not enabled() or getattr(encoder, "precision", None) != "fp32" or not name.startswith("efficientnet-lite"):
        return
    try:
        from captioner.encoders.network import _lite_weights_path

        weights = _lite_weights_path(int(name.rsplit("lite", 1)[1]))
        hint = {"path": str(Path(encoder.path).resolve()), "encoder": described, "code": _code_digest(),
                "stamps": [file_stamp(Path(weights))]}
        target = _hint_path(key)
        if not (target.is_file() and json.loads(target.read_text()) == hint):
            write_json_atomic(target, hint)
    except (OSError, ValueError, RuntimeError):
        return


def read_features_hint(key: str) -> dict | None:
    """The hint ``key`` names when every file it was made from is as it says and its exported file is whole; else
    None."""
    if not enabled():
        return None
    try:
        hint = json.loads(_hint_path(key).read_text())
        path, encoder, stamps = Path(hint["path"]), hint["encoder"], hint["stamps"]
        size, resize = int(encoder["image_size"]), encoder["resize"]
        stored_dims(encoder)  # the grid and channels a store needs, as a store checks them
        if not (16 <= size <= 4096 and resize in RESIZE_POLICIES and isinstance(stamps, list) and stamps):
            return None
        if any(not isinstance(s, list) or not s or file_stamp(Path(s[0])) != s for s in stamps):
            return None
        if hint.get("code") != _code_digest():
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return hint if cached_is_valid(path) else None


def _threads() -> int:
    """The threads that decode and encode: OMP_NUM_THREADS when set (its first number), else the cores this process
    may run on (on a machine with SMT, torch's default, the physical cores, can be fewer)."""
    try:
        asked = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        asked = 0
    if asked > 0:
        return asked
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _Input:
    """The image input a hint records (what image_to_array reads of an encoder's spec)."""

    def __init__(self, encoder: dict):
        self.image_size, self.resize = int(encoder["image_size"]), str(encoder["resize"])


def features_without_torch(root: Path, names: list[str], out: Path, *, key: str, batch_size: int,
                           max_pixels: int, overwrite: bool, progress: bool) -> dict | None:
    """Fill the store ``out`` of ``names`` under ``root`` with the encoder the hint ``key`` names, through ONNX
    Runtime, torch never imported; the summary, or None (before any file is touched) when there is no usable hint
    or ONNX Runtime is not installed or cannot load the file."""
    hint = read_features_hint(key)
    if hint is None or importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(hint["path"], session_options(1), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - ONNX Runtime's own errors: the usual path exports the file again
        return None
    inp = session.get_inputs()[0].name
    encoder = hint["encoder"]
    threads = _threads()

    def grids(arrays):
        return session.run(None, {inp: arrays})[0]

    group = Group()

    def encode(todo, status, feats):
        ds = DecodeDataset(root, names, todo, _Input(encoder), max_pixels)
        return fill_rows(encoder["name"], ds, out, status, feats, threaded_batches(grids, ds, batch_size, threads),
                         group=group, progress=progress, limit_batches=None)

    return fill_store(group, root, names, out, encoder, "fp32", overwrite, encode)
