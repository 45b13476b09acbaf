"""A fine-tuned encoder in a model directory: ``encoder.safetensors`` and config.json's ``encoder.tuned``.

    "encoder": {"name": "efficientnet-lite0", ..., "tuned": {"units": 2, "batchnorm": "frozen",
                                                            "digest": "3f2a..."}}

``encoder.safetensors`` holds the weights of the encoder's last ``units`` units (names as in the
EfficientNet's state dict; :mod:`captioner.encoders.tail`), ``digest`` their
:func:`~captioner.encoders.tail.weights_digest`: a file that does not match it is refused. A model directory
without ``tuned`` uses the packaged ImageNet weights as they are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from captioner.checks import is_int
from captioner.encoders.tail import BATCHNORM_MODES, weights_digest
from captioner.files import WEIGHTS_BYTES, check_regular

ENCODER_FILE = "encoder.safetensors"
MAX_UNITS = 64


class EncoderFileError(ValueError):
    pass


def tuned_record(weights: dict[str, torch.Tensor], units: int, batchnorm: str) -> dict:
    """config.json's ``encoder.tuned`` for these weights."""
    return {"units": units, "batchnorm": batchnorm, "digest": weights_digest(weights)}


def check_tuned_record(tuned: Any, fail) -> None:
    """The ``encoder.tuned`` entry of a config.json: types and bounds (``fail(problem)`` makes the error)."""
    if not isinstance(tuned, dict) or set(tuned) != {"units", "batchnorm", "digest"}:
        raise fail(f"encoder.tuned must be {{\"units\": N, \"batchnorm\": \"frozen\"|\"train\", \"digest\": HEX}}, "
                   f"got {tuned!r}")
    if not (is_int(tuned["units"]) and 1 <= tuned["units"] <= MAX_UNITS):
        raise fail(f"encoder.tuned.units must be a whole number from 1 to {MAX_UNITS}, got {tuned['units']!r}")
    if tuned["batchnorm"] not in BATCHNORM_MODES:
        raise fail(f"encoder.tuned.batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got {tuned['batchnorm']!r}")
    d = tuned["digest"]
    if not (isinstance(d, str) and len(d) == 32 and all(c in "0123456789abcdef" for c in d)):
        raise fail(f"encoder.tuned.digest must be 32 lowercase hex digits, got {d!r}")


def write_encoder_file(out: Path, weights: dict[str, torch.Tensor] | None) -> None:
    """Write (atomically) or, with no weights, remove the directory's encoder.safetensors."""
    if weights is None:
        (out / ENCODER_FILE).unlink(missing_ok=True)
        return
    tmp = out / (ENCODER_FILE + ".tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()}, str(tmp),
              metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / ENCODER_FILE)


def read_encoder_file(model_dir: Path, config: dict) -> tuple[dict[str, torch.Tensor], int] | None:
    """(tuned weights, units) of a model directory whose config.json records a tuned encoder, else None."""
    tuned = (config.get("encoder") or {}).get("tuned")
    if not tuned:
        return None
    path = model_dir / ENCODER_FILE
    try:
        weights = load_file(str(check_regular(path, "the model's tuned encoder weights", WEIGHTS_BYTES)))
    except FileNotFoundError:
        raise EncoderFileError(f"{path}: missing, but config.json says the encoder was fine-tuned "
                               f"(encoder.tuned); copy the whole model directory") from None
    except ValueError as e:  # not a regular file, too large
        raise EncoderFileError(str(e)) from None
    except Exception as e:  # safetensors' own error types for damaged files
        raise EncoderFileError(f"{path}: cannot read the tuned encoder weights ({e})") from None
    bad = next((k for k, v in weights.items() if not v.is_floating_point()), None)
    if bad is not None:
        raise EncoderFileError(f"{path}: {bad} is {weights[bad].dtype}, not floating point; the file is damaged")
    if weights_digest(weights) != tuned["digest"]:
        raise EncoderFileError(f"{path}: its weights do not match encoder.tuned.digest in config.json; the file is "
                               "damaged or belongs to another model")
    return {k: v.float() for k, v in weights.items()}, int(tuned["units"])
