"""What the encoder's ONNX Runtime sessions share and what needs no torch: the cache folder of exported encoders and
the sessions' options. (:mod:`captioner.encoders.head_start` runs the encoder before torch is imported.)"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path


def package_version(dist: str, missing: str = "-") -> str:
    """The installed version of the distribution ``dist``, or ``missing`` when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return missing


def cache_dir() -> Path:
    """Where exported encoders are kept: ``$XDG_CACHE_HOME/captioner``, else ``~/.cache/captioner``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "captioner"


def session_options(threads: int):
    """ONNX Runtime's options: ``threads`` intra-op threads; idle threads sleep when OpenMP's do
    (OMP_WAIT_POLICY=PASSIVE, what every captioner command but train sets), else they spin."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3  # errors only
    return so


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_is_valid(path: Path) -> bool:
    """True when ``path`` exists and matches the hash written beside it when it was made."""
    sha = path.with_suffix(".sha256")
    try:
        return path.is_file() and sha.read_text().strip() == file_sha256(path)
    except (OSError, UnicodeDecodeError):
        return False
