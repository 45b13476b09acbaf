"""The image encoder exported to ONNX, cached on disk so that a process starts fast after the first.

:func:`exported_encoder` turns an :class:`~captioner.encoders.network.ImageEncoder`'s network (whatever
module it holds: the folded Lite trunk, a fine-tuned tail, grid pooling) and its input normalisation into
one ONNX graph: uint8 ``(B, S, S, 3)`` in, float32 ``(B, H*W, C)`` out. The file is kept under
:func:`~captioner.encoders.sessions.cache_dir` as ``encoder-KEY.onnx`` where KEY hashes the network's code and
weights, the input size and normalisation and the versions of torch and onnxruntime: any change is a new file. Beside it,
``encoder-KEY.sha256`` holds the file's hash; a file that does not match it (cut short, damaged) is
exported again. Both are written atomically (a temporary file renamed), under a lock file, so that
processes starting together export once and never read a half-written file. An encoder that can say what it is
without building its network (:meth:`~captioner.encoders.network.ImageEncoder.identity`: the weights file, cut,
tuned digest, code) also gets ``encoder-QUICK.alias``, naming KEY: a later start finds its file through it and
never builds the network (about 0.3-0.5 s of a command's start-up).

torch.onnx's TorchScript exporter (``dynamo=False``) needs the ``onnx`` package; both ``onnx`` and
``onnxruntime`` come with the ``fast`` extra and are imported only here and in
:mod:`captioner.encoders.runtime`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from captioner.encoders.sessions import cache_dir, cached_is_valid, file_sha256

CACHE_FORMAT = 1  # bump when the exported graph's contract changes
ONNX_OPSET = 17


class _Normalised(torch.nn.Module):
    """What the exported graph computes: the encoder's own normalisation, its network, the grid as cells
    (``features``; a net that also gives the concept head's input: ``pooled`` too, as ``encode_all``)."""

    def __init__(self, net: torch.nn.Module, mean: torch.Tensor, inv_std: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.detach().float().cpu().reshape(1, 3, 1, 1))
        self.register_buffer("inv_std", inv_std.detach().float().cpu().reshape(1, 3, 1, 1))

    def forward(self, images: torch.Tensor):  # uint8 (B, S, S, 3)
        x = (images.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std
        out = self.net(x)  # (B, C, H, W), or with a tuned net the pretrained units' pooled map too
        if isinstance(out, tuple):  # as ImageEncoder.encode_all: (grid cells, the concept head's input)
            return out[0].flatten(2).transpose(1, 2), out[1].flatten(2).transpose(1, 2)
        return out.flatten(2).transpose(1, 2)  # (B, H*W, C)


def normalisation(encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's (mean, 1/std) as it applies them (from its spec when it keeps none of its own)."""
    mean = getattr(encoder, "_mean", None)
    inv_std = getattr(encoder, "_inv_std", None)
    if mean is None or inv_std is None:
        mean = torch.tensor(encoder.spec.mean)
        inv_std = 1.0 / torch.tensor(encoder.spec.std)
    return mean.detach().float().cpu(), inv_std.detach().float().cpu()


def encoder_key(encoder, runtime_version: str) -> str:
    """A hash of everything the exported graph depends on (network code and weights, input, versions)."""
    net = encoder.net
    h = hashlib.sha256()
    mean, inv_std = normalisation(encoder)
    size = encoder.spec.image_size
    h.update(f"captioner-encoder/{CACHE_FORMAT}/{ONNX_OPSET}/torch {torch.__version__}/{runtime_version}/"
             f"{size}/{mean.tolist()}/{inv_std.tolist()}\n".encode())
    h.update(f"{type(net).__module__}.{type(net).__qualname__}\n{net!r}\n".encode())
    code = getattr(net, "code", None)  # a torch.fx GraphModule (the folded trunk): its generated forward
    if isinstance(code, str):
        h.update(code.encode())
    for name, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's file is private; the cache is readable as any cache is
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_with_hash(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` and then its ``.sha256`` beside it, each atomically."""
    write_atomic(path, write)
    digest = file_sha256(path)
    write_atomic(path.with_suffix(".sha256"), lambda tmp: tmp.write_text(digest + "\n"))


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock while ``path`` is checked and built (processes starting together build it once)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, the atomic renames still keep files whole
        yield
        return
    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _exportable_pooling() -> Iterator[None]:
    """Adaptive average pooling (grid pooling) as a plain average pool while exporting: torch's TorchScript
    exporter needs the input's size for it, which it loses through the Lite nets' padding. Where the sizes
    divide (448 px pooled to 7x7: windows of 2x2) both compute the same averages; other sizes stay adaptive
    (and fail to export, with the exporter's message)."""
    real = F.adaptive_avg_pool2d

    def pool(x: torch.Tensor, output_size):
        h, w = int(x.shape[-2]), int(x.shape[-1])  # concrete while tracing
        oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        oh, ow = oh or h, ow or w
        if h % oh or w % ow:
            return real(x, output_size)
        return F.avg_pool2d(x, (h // oh, w // ow))

    F.adaptive_avg_pool2d = pool
    try:
        yield
    finally:
        F.adaptive_avg_pool2d = real


def export_onnx(encoder, target: Path) -> None:
    """Export the encoder (normalisation + network, on the CPU) to ``target``: uint8 images in, grid cells out."""
    mean, inv_std = normalisation(encoder)
    model = _Normalised(encoder.net, mean, inv_std).eval()
    size = encoder.spec.image_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), _exportable_pooling():
        warnings.simplefilter("ignore")  # the exporter's notes on tracing and shape inference
        outputs = ["features", "pooled"] if isinstance(model(example), tuple) else ["features"]
        torch.onnx.export(model, (example,), str(target), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["images"], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]})


def exported_encoder(encoder, runtime_version: str, directory: Path | None = None) -> tuple[Path, str]:
    """(path of the encoder's ONNX file, its key): from the cache, or exported now and cached."""
    directory = Path(directory) if directory is not None else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    # an encoder that can say what it is without building its network (ImageEncoder.identity) finds its file
    # through a small alias file named by that: a start with a cached export then builds no network at all
    identity = encoder.identity() if hasattr(encoder, "identity") else None
    alias = None
    if identity is not None:
        quick = hashlib.sha256(f"{CACHE_FORMAT}/{ONNX_OPSET}/torch {torch.__version__}/{runtime_version}/"
                               f"{identity}".encode()).hexdigest()[:24]
        alias = directory / f"encoder-{quick}.alias"
        try:
            key = alias.read_text().strip()
        except OSError:
            key = ""
        if len(key) == 24 and key.isalnum() and cached_is_valid(directory / f"encoder-{key}.onnx"):
            return directory / f"encoder-{key}.onnx", key
    key = encoder_key(encoder, runtime_version)
    path = directory / f"encoder-{key}.onnx"
    if not cached_is_valid(path):
        with build_lock(path):
            if not cached_is_valid(path):  # another process may have built it while this one waited
                save_with_hash(path, lambda tmp: export_onnx(encoder, tmp))
    if alias is not None:
        write_atomic(alias, lambda tmp: tmp.write_text(key + "\n"))
    return path, key
