"""Where the networks run: ``--device cpu|cuda|auto`` and ``--precision auto|fp32|bf16``.

Everything defaults to the CPU. ``auto`` takes a CUDA GPU when PyTorch sees one, else the CPU. Under
``torchrun`` a bare ``cuda`` means this process's own GPU, ``cuda:$LOCAL_RANK``.

``bf16`` runs the matrix products in bfloat16 under ``torch.autocast`` (weights stay float32,
training needs no loss scaling); it saves memory and time on GPUs with bfloat16 units
(NVIDIA Ampere and later) and on CPUs with bfloat16 instructions (AVX512-BF16, AMX), where the
matrix products run at about twice the float32 rate. Training defaults to fp32. Captioning
(``caption``, ``serve``, ``evaluate``, :class:`~captioner.inference.captioner.Captioner`) defaults to
``auto`` (:func:`split_precision`): the image encoder in float32, the decoder in bfloat16 where the CPU
has those instructions (its captions measured against float32's in docs/experiments.md), else float32.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

PRECISIONS = ("fp32", "bf16")
INFERENCE_PRECISIONS = ("auto",) + PRECISIONS  # captioning's: auto splits it between encoder and decoder


class DeviceError(ValueError):
    """A device or precision that this machine cannot give (a user's mistake: exit status 2)."""


def resolve_device(name: str | torch.device = "cpu") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` -> a :class:`torch.device` this machine has.

    A CUDA device that is not there is a :class:`DeviceError` saying what to use instead."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise DeviceError(f"device {name!r}: expected one of cpu, cuda, cuda:N, auto")
    text = name.strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not m:
        raise DeviceError(f"device {name!r}: unknown; use cpu, cuda, cuda:N (a GPU's number) or auto "
                          "(a GPU when there is one, else the CPU)")
    if not torch.cuda.is_available():
        why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
               else "PyTorch sees no CUDA GPU on this machine")
        raise DeviceError(f"device {name!r}: {why} (torch {torch.__version__}); use --device cpu, or --device auto "
                          "to take a GPU only when there is one")
    if m.group(1) is not None:
        index = int(m.group(1))
    else:  # under torchrun each process takes its own GPU of the node
        index = int(os.environ.get("LOCAL_RANK", "0") or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {name!r}: GPU {index} asked for, but this machine has {count} "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def check_precision(precision: str, device: torch.device, *, allow_auto: bool = False,
                    default: str = "fp32") -> str:
    """``fp32`` or ``bf16``, and ``auto`` when ``allow_auto`` (a :class:`DeviceError` for another name, or bf16
    on a GPU without it); ``default`` is what the message calls the default."""
    names = INFERENCE_PRECISIONS if allow_auto else PRECISIONS
    if precision not in names:
        listed = ", ".join(f"{n} (default)" if n == default else n for n in names)
        raise DeviceError(f"precision {precision!r}: use {listed}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"precision bf16: the GPU {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                          "use --precision fp32")
    return precision


def native_bf16(device: torch.device) -> bool:
    """True on a CPU whose instructions multiply bfloat16 matrices (AVX512-BF16 or AMX); False elsewhere (a GPU's
    bfloat16 is asked for with --precision bf16: ``auto`` keeps GPUs in float32, where nothing was measured)."""
    if torch.device(device).type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def split_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(the image encoder's precision, the decoder's) for a captioning ``precision``: fp32 and bf16 are both's;
    ``auto`` is fp32 for the encoder (so every encoder runtime can run it) and bf16 for the decoder on a CPU with
    bfloat16 instructions (:func:`native_bf16`), else fp32."""
    precision = check_precision(precision, torch.device(device), allow_auto=True, default="auto")
    if precision != "auto":
        return precision, precision
    return "fp32", "bf16" if native_bf16(device) else "fp32"


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` ("cpu", "cuda") right now, or None when it is off (on
    torch releases before 2.4 too, which lack the device-type forms)."""
    try:
        on = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if on else None
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def autocast(device: torch.device, precision: str = "fp32"):
    """The context a forward pass runs in: nothing for fp32, bfloat16 autocast for bf16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
