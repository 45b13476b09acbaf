"""Argument types and option groups the commands share; decoding flags derived from the one definition."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from captioner.checks import json_safe
from captioner.decoding.settings import SETTINGS, Setting
from captioner.runtime.workers import MAX_WORKERS


def _number(text: str, ok: Callable[[Any], bool], what: str, cast: type = float):
    try:
        v = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v != v or not ok(v):  # NaN fails every bound
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return v


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def positive_float(text: str) -> float:
    return _number(text, lambda v: 0 < v < float("inf"), "a number > 0")


def nonneg_float(text: str) -> float:
    return _number(text, lambda v: 0 <= v < float("inf"), "a number >= 0")


def nonneg_int(text: str) -> int:
    return _number(text, lambda v: v >= 0, "a whole number >= 0", int)


def workers(text: str) -> int:
    """--workers: image decoding processes, 0 (decode in the command's own process) to MAX_WORKERS."""
    return _number(text, lambda v: 0 <= v <= MAX_WORKERS, f"from 0 to {MAX_WORKERS}", int)


def ratios(text: str) -> tuple[float, float, float]:
    try:
        r = tuple(float(x) for x in text.split(","))
    except ValueError:
        r = ()
    if len(r) != 3 or not all(0 <= x <= 1 for x in r) or abs(sum(r) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected three ratios train,val,test summing to 1, got {text!r}")
    return r


def print_json(obj, **kw) -> None:
    """Print one line of strict JSON (never NaN or Infinity, which are not JSON)."""
    print(json.dumps(json_safe(obj), allow_nan=False), **kw)


# the names of captioner.encoders.runtime.RUNTIMES, kept here so that `--help` does not import torch
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")


def runtime_options(s: argparse.ArgumentParser) -> None:
    """--runtime and --calibration: what runs the image encoder (:mod:`captioner.encoders.runtime`)."""
    s.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="what runs the image encoder: auto (default: onnx when ONNX Runtime is installed and the "
                        "encoder runs on the CPU in fp32, else torch), torch, onnx (ONNX Runtime, fp32, 4-5x "
                        "torch's speed on a CPU), onnx-int8 (quantized: faster, slightly different features)")
    s.add_argument("--calibration", default=None, metavar="DIR",
                   help="--runtime onnx-int8: a folder of a few hundred photos like the ones to encode (e.g. "
                        "training images) to calibrate the quantized encoder on, once; later runs reuse it")


def device_options(s: argparse.ArgumentParser, default: str | None = "cpu", where: str = "",
                   captioning: bool = False) -> None:
    """--device and --precision (checked when the command runs: an absent GPU is exit status 2). ``captioning``:
    --precision also takes auto, its default (runtime/devices.py, split_precision)."""
    s.add_argument("--device", default=default, metavar="{cpu,cuda,auto}",
                   help="where the networks run: cpu (default), cuda (cuda:N for one GPU) or auto, a GPU when "
                        f"there is one{where}")
    if captioning:
        s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                       help="auto (default): the image encoder in float32, the decoder in bfloat16 on a CPU with "
                            "bfloat16 instructions (AVX512-BF16, AMX), else float32; fp32: both in float32; bf16: "
                            "both under bfloat16 autocast (the encoder with --runtime torch)")
        return
    s.add_argument("--precision", choices=["fp32", "bf16"] + (["auto"] if default is None else []),
                   default=None if default is None else "fp32",
                   help="bf16: bfloat16 autocast, for GPUs with bfloat16 units and CPUs with bfloat16 "
                        "instructions; " + ("auto: bf16 on a CPU with them, else fp32 (default: the config's, fp32)"
                                            if default is None else "(default fp32)"))


def _setting_type(s: Setting) -> Callable[[str], Any]:
    """An argparse type for a decoding setting: its kind here; its bounds when the settings are checked
    (DecodingSettings.checked, where the other settings are known too)."""
    def parse(text: str) -> Any:
        try:
            return s.parse(text, check=False)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = s.kind.__name__  # argparse names the type in its messages
    return parse


def decoding_flags(parser: argparse.ArgumentParser | Any, names: list[str] | None = None) -> None:
    """A flag for each decoding setting in ``names`` (default: all), from its one definition in
    :mod:`captioner.decoding.settings`; a flag left out keeps the model's default (None)."""
    for name in names or list(SETTINGS):
        s = SETTINGS[name]
        default_note = "" if s.kind is bool else " (default: the model's)"
        if s.kind is bool:
            parser.add_argument(s.flag, dest=name, action="store_const", const=True, default=None, help=s.help)
        elif s.kind is tuple:  # words: the flag repeated or comma-separated values, gathered into one list
            parser.add_argument(s.flag, dest=name, type=_setting_type(s), action="extend", default=None,
                                metavar="WORD", help=s.help)
        elif s.kind is str:
            parser.add_argument(s.flag, dest=name, type=_setting_type(s), choices=s.choices, default=None,
                                help=f"{s.help}{default_note}")
        else:
            parser.add_argument(s.flag, dest=name, type=_setting_type(s), default=None,
                                metavar=s.flag.lstrip("-").upper().replace("-", "_") if s.kind is int else None,
                                help=f"{s.help}{default_note}")


def decoding_overrides(a: argparse.Namespace, names: list[str] | None = None) -> dict[str, Any]:
    """The decoding settings given on the command line (None: not given)."""
    return {name: tuple(v) if isinstance(v, list) else v
            for name in names or list(SETTINGS) if hasattr(a, name) for v in [getattr(a, name)]}


def model_option(parser: argparse.ArgumentParser, *, required: bool = False, what: str = "") -> None:
    """--model, repeatable: several models are decoded as one ensemble (:func:`model_arg` reads it)."""
    default = "" if required else " (default: the bundled one)"
    parser.add_argument("--model", action="append", required=required, metavar="MODEL",
                        help=f"model directory or bundled model name{default}; give it again (--model A --model B) "
                             f"to decode several models as one ensemble{what} (they must share the vocabulary and "
                             "the encoder)")


def model_arg(a: argparse.Namespace, default: str | None = None) -> Any:
    """The --model given: one path or name as a string, several as a list (an ensemble), ``default`` if none."""
    models = a.model or ([default] if default else [])
    return models[0] if len(models) == 1 else list(models)
