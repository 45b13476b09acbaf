"""Model directories (the unit users share): written, read and checked against their schema.

A model directory holds::

    config.json         format/version, architecture + its config, encoder spec, decoding
                        defaults, how it was trained, its measured metrics
    vocab.json          the vocabulary (captioner.data.text.Vocab)
    model.safetensors   the decoder weights (safetensors: loading never unpickles anything)
    encoder.safetensors only when the encoder's last units were fine-tuned: their weights
                        (:mod:`captioner.inference.encoder_file`)

The encoder is named in config.json and rebuilt from its packaged weights (with the tuned units' own).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from captioner.checks import is_int, is_number
from captioner.files import (METADATA_BYTES, WEIGHTS_BYTES, FileTooLargeError, NotRegularFileError, check_regular,
                             read_bytes)
from captioner.data.text import Vocab
from captioner.decoding.settings import SETTINGS
from captioner.encoders.network import RESIZE_POLICIES, available_encoders, get_encoder_spec
from captioner.encoders.tail import weights_digest
from captioner.inference.encoder_file import check_tuned_record, write_encoder_file
from captioner.inference.extension_file import discard as discard_extension, write_extension
from captioner.models import build_decoder, get_architecture
from captioner.models.base import Decoder
from captioner.models.ensemble import Ensemble
from captioner.models.extension import VocabExtension

FORMAT = "captioner-model"
VERSION = 1
PRETRAINED_DIR = Path(__file__).parent.parent / "pretrained"


class ModelDirError(ValueError):
    pass


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.is_dir():
        return p
    bundled = PRETRAINED_DIR / str(name_or_path)
    if bundled.is_dir():
        return bundled
    names = sorted(d.name for d in PRETRAINED_DIR.iterdir() if d.is_dir()) if PRETRAINED_DIR.is_dir() else []
    raise ModelDirError(f"{name_or_path}: no such model directory, and not a bundled model "
                        f"(bundled: {', '.join(names) or 'none'})")


def save_model_dir(path: str | os.PathLike, decoder: Decoder, vocab: Vocab, config: dict,
                   *, dtype: torch.dtype = torch.float32, extension: VocabExtension | None = None,
                   encoder_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json + vocab.json + model.safetensors (each written atomically), and the vocabulary
    ``extension`` if any (extension.safetensors; a stale one is removed), and a fine-tuned encoder's
    ``encoder_weights`` (encoder.safetensors; config's encoder.tuned must describe them)."""
    if isinstance(decoder, Ensemble):  # its members' directories inside this one (inference/ensemble_dir.py)
        from captioner.inference.ensemble_dir import save_ensemble_dir  # (it imports this module)
        return save_ensemble_dir(path, decoder, vocab, config, dtype=dtype, extension=extension,
                                 encoder_weights=encoder_weights)
    tuned = (config.get("encoder") or {}).get("tuned")
    if bool(tuned) != (encoder_weights is not None) or (tuned and tuned.get("digest") != weights_digest(encoder_weights)):
        raise ModelDirError(f"{path}: config.json's encoder.tuned and the encoder weights given do not match (a tuned "
                            "encoder's weights must be saved with its record); nothing was written")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in config.items() if k not in ("format", "version", "arch", "model")}
    state = {k: v.detach().to(dtype).contiguous() if v.is_floating_point() else v.detach().contiguous()
             for k, v in decoder.state_dict().items()}
    tmp, tmpc = out / "model.safetensors.tmp", out / "config.json.tmp"
    try:
        config, place_extension = write_extension(out, extension, config)  # its record in config.json, or none
        cfg = {"format": FORMAT, "version": VERSION, **config,
               "arch": decoder.arch_name, "model": dataclasses.asdict(decoder.cfg)}
        write_encoder_file(out, encoder_weights)
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # readable like the other files (the writer may create it private)
        os.replace(tmp, out / "model.safetensors")
        vocab.save(out / "vocab.json")
        tmpc.write_text(json.dumps(cfg, indent=2))
        place_extension()
        os.replace(tmpc, out / "config.json")
    except Exception as e:  # full disk, quota, unwritable folder: no temporary file left behind
        discard_extension(out)
        for t in (tmp, tmpc):
            try:
                t.unlink(missing_ok=True)
            except OSError:
                pass
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ModelDirError(f"{out}: cannot write the model directory ({why}); is the disk full?") from None
    return out


def load_model_dir(path: str | os.PathLike) -> tuple[Decoder, Vocab, dict]:
    p = resolve_model_path(path)
    try:
        cfg = json.loads(read_bytes(p / "config.json", "the model's config.json", METADATA_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"{p}: config.json missing; not a captioner model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{p / 'config.json'}: invalid JSON ({e})") from None
    except OSError as e:
        raise ModelDirError(f"{p / 'config.json'}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # not a regular file, too large
        raise ModelDirError(str(e)) from None
    if isinstance(cfg, dict) and "ensemble" in cfg:  # a directory naming its members (inference/ensemble_dir.py)
        from captioner.inference.ensemble_dir import load_ensemble_dir  # (it imports this module)
        return load_ensemble_dir(p, cfg)
    try:
        vocab = Vocab.load(p / "vocab.json")
    except ValueError as e:
        raise ModelDirError(str(e)) from None
    # types, bounds and size, before anything is allocated
    validate_model_config(cfg, p / "config.json", vocab_size=len(vocab))
    try:
        decoder = build_decoder(cfg["arch"], cfg["model"])
    except (KeyError, ValueError, TypeError) as e:
        raise ModelDirError(f"{p / 'config.json'}: bad architecture or model config ({e})") from None
    weights = p / "model.safetensors"
    if not weights.exists():
        raise ModelDirError(f"{weights}: missing")
    try:
        state = load_file(str(check_regular(weights, "the model's weights file", WEIGHTS_BYTES)))  # not a FIFO
    except (NotRegularFileError, FileTooLargeError) as e:
        raise ModelDirError(str(e)) from None
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ModelDirError(f"{weights}: cannot read weights ({e})") from None
    problem = _dtype_problem(state, decoder.state_dict())
    if problem:  # an int8 or bool tensor would be upcast silently into weights that caption nonsense
        raise ModelDirError(f"{weights}: {problem}; the file is damaged or was not written for this model")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = decoder.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelDirError(f"{weights}: weights do not match the architecture ({e})") from None
    if missing or unexpected:
        raise ModelDirError(f"{weights}: weights do not match the architecture "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelDirError(f"{weights}: {len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}); "
                            "the training run that wrote them diverged. Use another model, or retrain with a "
                            "lower optim.lr")
    decoder.eval()
    return decoder, vocab, cfg


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # floating weights load as float32


def _dtype_problem(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with the dtypes of the stored tensors ``state``: a floating weight must be stored in a
    floating dtype, a buffer (a step counter) in its own; None when every tensor is fine. Names the first."""
    for key, tensor in state.items():
        want = expected.get(key)
        if want is None:  # an unexpected tensor: reported with the missing ones
            continue
        if want.is_floating_point() and tensor.dtype not in FLOAT_DTYPES:
            return (f"tensor {key!r} is {_dtype_name(tensor.dtype)}, but the architecture's is floating point "
                    "(float16, bfloat16, float32 or float64)")
        if not want.is_floating_point() and tensor.dtype != want.dtype:
            return f"tensor {key!r} is {_dtype_name(tensor.dtype)}, but the architecture's is {_dtype_name(want.dtype)}"
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- config.json schema

MAX_MODEL_BYTES = 4 * 2**30  # float32 parameters a model directory may need: refused above (before allocating)
_SIZE_BOUNDS = {  # integer size fields of any architecture's config, by name: inclusive (low, high)
    "vocab_size": (4, 2_000_000),  # at least the 4 special tokens
}
_DIM_BOUNDS = (1, 65_536)  # *_dim, *_size
_COUNT_BOUNDS = (1, 1_024)  # layers, heads
_IMAGE_SIZE_BOUNDS = (32, 2_048)  # encoder input side in pixels


def _size_bounds(name: str) -> tuple[int, int] | None:
    """Bounds of an integer field by its name (any architecture), or None for a free integer."""
    if name in _SIZE_BOUNDS:
        return _SIZE_BOUNDS[name]
    if name.endswith(("_dim", "_size", "_dims")) or name in ("dim", "d_model", "width"):
        return _DIM_BOUNDS
    if "layers" in name or "heads" in name or name in ("depth", "n_head", "n_layer"):
        return _COUNT_BOUNDS
    return None


def _type_problem(value: Any, hint: Any) -> str | None:
    """What is wrong with a JSON value for a config field annotated ``hint`` (strict: "3" is not 3)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return None
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        problems = [_type_problem(value, o) for o in options if o is not type(None)]
        return None if any(pr is None for pr in problems) else f"expected {hint}, got {value!r}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if hint is int:
        return None if is_int(value) else f"expected a whole number, got {value!r}"
    if hint is float:
        return None if is_number(value) else f"expected a finite number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if origin in (list, tuple) or hint in (list, tuple):
        return None if isinstance(value, list) else f"expected a list, got {value!r}"
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else f"expected an object, got {value!r}"
    return None


def _check_bounds(where: str, value: Any, bounds: tuple[int, int], fail) -> None:
    lo, hi = bounds
    if not is_int(value) or not lo <= value <= hi:
        raise fail(f"{where} must be a whole number from {lo} to {hi}, got {value!r}")


def check_format_version(cfg: dict, fail) -> None:
    """config.json's ``format`` and ``version`` (a single model's or an ensemble's)."""
    if cfg.get("format") != FORMAT:
        raise fail(f"not a captioner model (format={cfg.get('format')!r})")
    version = cfg.get("version", VERSION)
    if not is_int(version) or version < 1:
        raise fail(f"'version' must be a whole number >= 1, got {version!r}")
    if version > VERSION:
        raise fail(f"written by a newer captioner (version {version}; this one reads {VERSION}): upgrade captioner")


def validate_model_config(cfg: Any, where: str | os.PathLike, *, vocab_size: int | None = None) -> dict:
    """Check a model directory's config.json against its schema before anything is built.

    Types and sane bounds of every section, for every registered architecture: each field of the
    architecture's config dataclass is type-checked strictly from its annotation, integer sizes
    (``*_dim``, ``*_size``, ``vocab_size``, layers, heads) are bounded, and the decoder is built on
    PyTorch's "meta" device (shapes only, no memory) to count its parameters: a model that would
    need more than ``MAX_MODEL_BYTES`` is refused before a single weight is allocated.
    Raises :class:`ModelDirError` naming the file, the field and what to do; returns ``cfg``."""
    def fail(problem: str) -> ModelDirError:
        return ModelDirError(f"{where}: {problem}")

    if not isinstance(cfg, dict):
        raise fail(f"expected a JSON object at the top level, got {type(cfg).__name__}; "
                   "not a captioner model configuration")
    if "ensemble" in cfg:  # a directory naming its members (inference/ensemble_dir.py)
        from captioner.inference.ensemble_dir import validate_ensemble_config  # (it imports this module)
        return validate_ensemble_config(cfg, where, vocab_size=vocab_size)
    check_format_version(cfg, fail)
    missing_keys = [k for k in ("arch", "model") if k not in cfg]
    if missing_keys:
        raise fail(f"missing {', '.join(missing_keys)}")
    arch = cfg["arch"]
    if not isinstance(arch, str):
        raise fail(f"'arch' must be a string, got {arch!r}")
    try:
        _, cfg_cls = get_architecture(arch)
    except ValueError as e:
        raise fail(str(e)) from None
    for section in ("model", "encoder", "decoding", "training", "metrics"):
        if section in cfg and not isinstance(cfg[section], dict) and not (section != "model" and cfg[section] is None):
            raise fail(f"'{section}' must be an object, got {type(cfg[section]).__name__}")

    merged = _validated_model(cfg["model"], arch, cfg_cls, fail, vocab_size)

    # --- encoder (optional: a model without one captions features only)
    enc = cfg.get("encoder")
    if enc:
        _validate_encoder(enc, merged, fail)

    _validate_decoding(cfg.get("decoding") or {}, fail)

    # --- size: build on the meta device (shapes only) and count
    n_params = estimate_parameters(arch, merged, fail)
    if n_params * 4 > MAX_MODEL_BYTES:
        raise fail(f"the model's sizes ({_size_summary(merged)}) mean {n_params:,} parameters, "
                   f"{n_params * 4 / 2**30:.1f} GiB in float32, more than the {MAX_MODEL_BYTES / 2**30:.0f} GiB "
                   "a model directory may need; refused before allocating. The sizes in config.json are "
                   "probably damaged")
    return cfg


def _validated_model(model: dict, arch: str, cfg_cls: type, fail, vocab_size: int | None) -> dict:
    """The architecture's config (``model``) strictly typed from its dataclass, sizes bounded; returns it
    with the defaults of the fields it leaves out."""
    hints = typing.get_type_hints(cfg_cls)
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(model) - set(fields))
    if unknown:
        raise fail(f"model: unknown field(s) {unknown} for architecture {arch!r}; known: {sorted(fields)}")
    for name, value in model.items():
        problem = _type_problem(value, hints[name])
        if problem:
            raise fail(f"model.{name}: {problem}")
    merged = {}
    for name, f in fields.items():
        if name in model:
            merged[name] = model[name]
        elif f.default is not dataclasses.MISSING:
            merged[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            merged[name] = f.default_factory()  # type: ignore[misc]
        else:
            raise fail(f"model.{name}: missing (architecture {arch!r} needs it)")
    for name, value in merged.items():
        bounds = _size_bounds(name)
        if bounds is not None and hints.get(name) in (int, typing.Optional[int]) and value is not None:
            _check_bounds(f"model.{name}", value, bounds, fail)
        elif isinstance(value, float) and "dropout" in name and not 0.0 <= value < 1.0:
            raise fail(f"model.{name} must be from 0 to 1 (exclusive), got {value!r}")
    if vocab_size is not None and "vocab_size" in merged and merged["vocab_size"] != vocab_size:
        raise fail(f"model.vocab_size is {merged['vocab_size']} but vocab.json beside it has {vocab_size} "
                   "entries; the two files come from different models")
    return merged


def _validate_decoding(decoding: dict, fail) -> None:
    """Decoding defaults: every decoding setting within its bounds, any other key a finite JSON scalar."""
    for key, value in decoding.items():
        if key in SETTINGS:
            if SETTINGS[key].problem(value) is not None:
                raise fail(f"decoding.{key} must be {SETTINGS[key].described()}, got {value!r}")
        elif not (value is None or isinstance(value, (bool, str)) or is_number(value)):
            raise fail(f"decoding.{key} must be a finite number, a string, true/false or null, got {value!r}")


def _size_summary(model: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in model.items() if is_int(v) and _size_bounds(k) is not None)


class _SkipInPlaceOnMeta(torch.overrides.TorchFunctionMode):
    """In-place ops on meta tensors (the ``nn.init`` fills) do nothing: meta tensors have no values.

    Only a speed-up: run for real, some meta fills go through Python decompositions that import
    torch._dynamo (about 1 s, once per process) just to compute nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            target = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if target is not None and target.is_meta:
                return target
        return func(*args, **kwargs)


def estimate_parameters(arch: str, model: dict, fail=ModelDirError) -> int:
    """Parameters (and buffers) of a decoder, counted on the meta device: no memory is allocated."""
    try:
        with torch.device("meta"), _SkipInPlaceOnMeta():
            decoder = build_decoder(arch, model)
    except (KeyError, ValueError, TypeError) as e:
        raise fail(f"bad architecture or model config ({e})") from None
    except Exception as e:  # an architecture whose constructor cannot run on the meta device
        raise fail(f"cannot check the size of architecture {arch!r} before building it "
                   f"({type(e).__name__}: {e})") from None
    return sum(t.numel() for t in decoder.parameters()) + sum(t.numel() for t in decoder.buffers())


def _validate_encoder(enc: Any, model: dict, fail) -> None:
    if not isinstance(enc, dict):
        raise fail(f"'encoder' must be an object, got {type(enc).__name__}")
    missing = [k for k in ("name", "image_size", "grid", "channels", "mean", "std", "resize") if k not in enc]
    if "tuned" in enc:
        check_tuned_record(enc["tuned"], fail)
    if missing:
        raise fail(f"encoder: missing {', '.join(missing)} (expected the spec written by training, e.g. "
                   f"{{\"name\": \"efficientnet-lite0\", \"image_size\": 224, \"grid\": [7, 7], ...}})")
    name = enc["name"]
    if not isinstance(name, str) or name not in available_encoders():
        raise fail(f"encoder.name {name!r} is not a known encoder ({', '.join(available_encoders())})")
    _check_bounds("encoder.image_size", enc["image_size"], _IMAGE_SIZE_BOUNDS, fail)
    if enc["resize"] not in RESIZE_POLICIES:
        raise fail(f"encoder.resize must be one of {', '.join(RESIZE_POLICIES)}, got {enc['resize']!r}")
    for key in ("mean", "std"):
        v = enc[key]
        if not (isinstance(v, list) and len(v) == 3 and all(is_number(x) for x in v)) or (
                key == "std" and min(v) <= 0):
            raise fail(f"encoder.{key} must be a list of 3 finite numbers{' > 0' if key == 'std' else ''}, got {v!r}")
    grid = enc["grid"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(is_int(g) and 1 <= g <= 256 for g in grid)):
        raise fail(f"encoder.grid must be [rows, columns], two whole numbers from 1 to 256, got {grid!r}")
    try:
        spec = get_encoder_spec(name, resize=enc["resize"], image_size=enc["image_size"], grid=grid)
    except ValueError as e:
        raise fail(f"encoder: {e}") from None
    if list(spec.grid) != grid or spec.channels != enc["channels"]:
        raise fail(f"encoder: {name} at {enc['image_size']} px gives a {list(spec.grid)} grid of {spec.channels} "
                   f"channels, but config.json says grid {grid!r}, channels {enc['channels']!r}")
    if "feature_dim" in model and model["feature_dim"] != spec.channels:
        raise fail(f"model.feature_dim is {model['feature_dim']!r} but encoder {name} gives {spec.channels} channels")


def average_model_dirs(paths: list[str | os.PathLike]) -> tuple[Decoder, Vocab, dict]:
    """The mean of the weights of several model directories ("model soup", Wortsman et al. 2022): models
    fine-tuned from one starting point average into one model that often decodes better than each.
    They must share architecture, sizes, vocabulary and encoder; the first one's config is kept."""
    if len(paths) < 2:
        raise ModelDirError("averaging needs at least two model directories")
    first, vocab, cfg = load_model_dir(paths[0])
    total = {k: v.double() if v.is_floating_point() else v for k, v in first.state_dict().items()}
    for p in paths[1:]:
        decoder, other_vocab, other = load_model_dir(p)
        if other_vocab.itos != vocab.itos:
            raise ModelDirError(f"{p}: its vocabulary differs from {paths[0]}'s")
        for key, what in (("arch", "architecture"), ("model", "sizes"), ("encoder", "encoder")):
            if other.get(key) != cfg.get(key):
                raise ModelDirError(f"{p}: not the same {what} as {paths[0]}; only models of one architecture, "
                                    "size, vocabulary and encoder can be averaged")
        for k, v in decoder.state_dict().items():
            if v.is_floating_point():
                total[k] += v.double()
    first.load_state_dict({k: (v / len(paths)).float() if v.is_floating_point() else v for k, v in total.items()})
    cfg.pop("metrics", None)  # the average has not been scored
    cfg["averaged_from"] = [str(p) for p in paths]
    return first, vocab, cfg
