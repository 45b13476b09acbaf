"""The image encoder through an inference runtime: ``--runtime auto|torch|onnx|onnx-int8``.

:func:`with_runtime` takes an :class:`~captioner.encoders.network.ImageEncoder` (torch) and returns an
encoder with the same interface (``spec``, ``preprocess``, ``encode_all``, ``encode_arrays``, ``encode``, ``device``,
``precision``) that runs on the runtime named:

- ``torch``: the ImageEncoder itself, unchanged (the exact features of the torch path).
- ``onnx``: its network exported to ONNX (:mod:`captioner.encoders.onnx_cache`, cached) and run by ONNX
  Runtime's CPU provider in float32. The features equal torch's within :data:`FP32_TOLERANCE`; on a
  2-core AVX-512 CPU it is 4-5x faster than torch (bench/README.md).
- ``onnx-int8``: the same graph statically quantized to int8 (:mod:`captioner.encoders.quantize`),
  calibrated once on a folder of the user's images (``calibration``) and cached. Its features differ
  from fp32's (a feature store records ``int8`` and is never finished with another runtime).
- ``auto`` (the default): ``onnx`` when ONNX Runtime is installed (the ``fast`` extra), the encoder runs
  on the CPU and in fp32; else ``torch``. A CUDA device or bf16 stays on torch: ONNX Runtime's CUDA
  provider is another package (onnxruntime-gpu) and is not used. A network that cannot be exported (grid
  pooling whose windows overlap) or a cache folder that cannot be written: torch too, with a note on stderr
  (an error when ``onnx`` was asked for by name).

Idle threads of the runtime sleep when OpenMP's do (``OMP_WAIT_POLICY=PASSIVE``, which every command but
``train`` sets: the decoder shares the cores); ``OMP_WAIT_POLICY=ACTIVE`` makes both spin.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch

from captioner.encoders.onnx_cache import exported_encoder
from captioner.encoders.quantize import quantized_encoder
from captioner.encoders.sessions import cache_dir, session_options
from captioner.encoders.store_fill import precision_flags  # noqa: F401 - its name here before it moved

RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
INT8_RUNTIMES = ("onnx-int8",)
FP32_TOLERANCE = 1e-3  # max |onnx - torch| over the features of Lite0 (measured: about 2.5e-5)
INSTALL_HINT = "pip install 'captioner[fast]' (onnxruntime and onnx)"


class RuntimeChoiceError(ValueError):
    """A runtime that is unknown, not installed, or not usable with the device or precision asked for."""


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def check_runtime_name(name: str) -> str:
    if name not in RUNTIMES:
        raise RuntimeChoiceError(f"runtime {name!r}: unknown; use one of {', '.join(RUNTIMES)} (auto: the fastest "
                                 "installed for the CPU)")
    return name


def resolve_runtime(name: str, device: torch.device | str = "cpu", precision: str = "fp32",
                    calibration: str | Path | None = None) -> str:
    """The runtime that ``name`` means for an encoder on ``device`` in ``precision`` (``auto`` decided),
    or a :class:`RuntimeChoiceError` saying what to use instead (``calibration`` is for onnx-int8 only)."""
    check_runtime_name(name)
    if calibration is not None and name not in INT8_RUNTIMES:
        raise RuntimeChoiceError(f"--calibration is for --runtime onnx-int8 (the runtime here is {name})")
    cpu = torch.device(device).type == "cpu"
    if name == "auto":
        return "onnx" if cpu and precision == "fp32" and onnxruntime_installed() else "torch"
    if name == "torch":
        return name
    if not cpu:
        raise RuntimeChoiceError(f"--runtime {name} runs the encoder on the CPU, but the device is {device}; use "
                                 "--runtime torch (or auto) on a GPU, or --device cpu")
    if precision != "fp32":
        raise RuntimeChoiceError(f"--runtime {name} computes in {'int8' if name in INT8_RUNTIMES else 'fp32'}, "
                                 f"not {precision}; leave out --precision {precision}, or use --runtime torch")
    if not onnxruntime_installed():
        raise RuntimeChoiceError(f"--runtime {name} needs ONNX Runtime, which is not installed: {INSTALL_HINT}; "
                                 "or use --runtime torch")
    return name


def store_precision(runtime: str, precision: str) -> str:
    """What a feature store records as its precision: ``int8`` for a quantized runtime (its features
    differ from fp32's, so such a store is finished only with it), else ``precision``."""
    return "int8" if runtime in INT8_RUNTIMES else precision


def default_threads() -> int:
    """The runtime's threads: the cores torch would use."""
    return max(1, torch.get_num_threads())


def with_runtime(encoder, runtime: str = "auto", *, threads: int | None = None, calibration: str | Path | None = None,
                 cache: str | Path | None = None):
    """``encoder`` (an ImageEncoder) running on ``runtime`` (see the module's doc). ``threads``: the
    runtime's threads (default: torch's); ``calibration``: a folder of images for ``onnx-int8`` (needed
    the first time; later runs reuse the last calibration of the same network); ``cache``: where exported
    files are kept (default :func:`captioner.encoders.sessions.cache_dir`)."""
    name = resolve_runtime(runtime, encoder.device, encoder.precision, calibration)
    if name == "torch":
        return encoder
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise RuntimeChoiceError(f"runtime threads {threads!r}: must be a whole number >= 1")
    import onnxruntime as ort

    directory = Path(cache) if cache is not None else cache_dir()
    try:
        path, key = exported_encoder(encoder, f"onnxruntime {ort.__version__}", directory)
    except OSError as e:  # the cache folder cannot be written (read-only home, full disk)
        return _cannot(encoder, runtime, name, f"the cache folder {directory} cannot be written: {e.strerror or e} "
                       "(set XDG_CACHE_HOME to a writable folder)")
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:  # torch.onnx's errors derive from these
        return _cannot(encoder, runtime, name, f"it cannot be exported to ONNX ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''})")
    if name in INT8_RUNTIMES:
        path = quantized_encoder(path, key, encoder.spec, calibration, directory)
    return OnnxImageEncoder(encoder, path, runtime=name, threads=threads or default_threads())


def _cannot(encoder, asked: str, name: str, why: str):
    """``auto``: the torch encoder, with a note saying why; a runtime asked by name: a RuntimeChoiceError."""
    if asked != "auto":
        raise RuntimeChoiceError(f"--runtime {name}: {why}; use --runtime torch")
    print(f"captioner: the encoder runs with torch: {why}", file=sys.stderr, flush=True)
    return encoder


class OnnxImageEncoder:
    """An ImageEncoder's network run by ONNX Runtime on the CPU: uint8 images in, ``(B, H*W, C)`` float32
    torch features out (on the CPU). ``precision`` is ``fp32`` or ``int8``; ``runtime`` its name."""

    def __init__(self, torch_encoder, path: str | Path, *, runtime: str = "onnx", threads: int | None = None):
        import onnxruntime as ort

        self.torch_encoder = torch_encoder
        self.spec = torch_encoder.spec
        self.device = torch.device("cpu")
        self.runtime = runtime
        self.precision = "int8" if runtime in INT8_RUNTIMES else "fp32"
        self.path = Path(path)
        self.threads = threads or default_threads()
        self.session = ort.InferenceSession(str(self.path), session_options(self.threads),
                                            providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def preprocess(self, images) -> np.ndarray:
        return self.torch_encoder.preprocess(images)

    def encode_all(self, batch: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 ``(B, S, S, 3)`` -> (float32 ``(B, H*W, C)`` features, the concept head's input ``(B, 1, C)``
        when the network gives it apart (a tuned encoder), else None), on the CPU; as ImageEncoder's."""
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().numpy()
        arr = np.ascontiguousarray(batch, dtype=np.uint8)
        s = self.spec.image_size
        if arr.ndim != 4 or arr.shape[1:] != (s, s, 3) or len(arr) == 0:
            raise ValueError(f"the encoder takes uint8 images of shape (B >= 1, {s}, {s}, 3), got {tuple(arr.shape)}")
        out = self.session.run(None, {self._input: arr})
        return torch.from_numpy(out[0]), torch.from_numpy(out[1]) if len(out) > 1 else None

    def encode_arrays(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, S, S, 3)`` -> float32 ``(B, H*W, C)`` on the CPU."""
        return self.encode_all(batch)[0]

    def encode(self, images) -> torch.Tensor:
        return self.encode_arrays(self.preprocess(images))

    def __repr__(self) -> str:
        return f"OnnxImageEncoder({self.spec.name}, runtime={self.runtime}, threads={self.threads}, path={self.path})"
