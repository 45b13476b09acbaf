"""Ensembles on disk and on the command line: a model directory that names its members, or several model
directories given at once (``--model A --model B``), loaded as one :class:`~captioner.models.ensemble.Ensemble`.

An ensemble's directory (docs/formats.md)::

    config.json     {"format": "captioner-model", "version": 1, "arch": "ensemble",
                     "ensemble": {"members": ["members/0-a", "members/1-b"]},
                     "encoder": {...}, "decoding": {...}, "metrics": {...}}
    vocab.json      the vocabulary every member shares
    members/0-a/    each member a complete model directory (its weights, its own vocabulary extension)

The members are paths relative to the directory, inside it; they share vocab.json and config.json's "encoder"
entry exactly (one encoder pass serves them all). :func:`load_model` loads any model: a single one, an
ensemble's directory or several directories; :func:`write_ensemble` writes a directory from members.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import torch

from captioner.data.text import Vocab
from captioner.files import METADATA_BYTES, read_bytes
from captioner.inference.extension_file import ExtensionFileError, load_extension, write_extension
from captioner.inference.modeldir import (FORMAT, VERSION, ModelDirError, _validate_decoding, _validate_encoder,
                                          check_format_version,
                                          load_model_dir, resolve_model_path, save_model_dir)
from captioner.models.base import Decoder
from captioner.models.ensemble import MAX_MEMBERS, Ensemble, EnsembleExtension, harmonised
from captioner.models.extension import ExtensionError, VocabExtension
from captioner.models.wordvec import WordVectorError

KEY, ARCH, MEMBERS_DIR = "ensemble", "ensemble", "members"
_SECTIONS = ("encoder", "decoding", "training", "metrics")

ModelArg = str | os.PathLike | Sequence[str | os.PathLike]  # one model (a directory or a bundled name), or several


def is_ensemble_config(cfg: Any) -> bool:
    return isinstance(cfg, dict) and KEY in cfg


# ----------------------------------------------------------------------------- config.json schema

def validate_ensemble_config(cfg: dict, where: str | os.PathLike, *, vocab_size: int | None = None) -> dict:
    """Check an ensemble directory's config.json (its own keys; each member is checked as it loads).
    ``vocab_size`` is unused (the members' vocabularies are compared with vocab.json as they load)."""
    def fail(problem: str) -> ModelDirError:
        return ModelDirError(f"{where}: {problem}")

    check_format_version(cfg, fail)
    if cfg.get("arch", ARCH) != ARCH:
        raise fail(f"'arch' is {cfg['arch']!r} but the file names ensemble members; an ensemble's arch is "
                   f"{ARCH!r} (each member's architecture is in its own config.json)")
    if "model" in cfg:
        raise fail("an ensemble has no 'model' entry (its members have theirs); remove it")
    for section in _SECTIONS:
        if section in cfg and not isinstance(cfg[section], dict) and cfg[section] is not None:
            raise fail(f"'{section}' must be an object, got {type(cfg[section]).__name__}")
    record = cfg[KEY]
    if not isinstance(record, dict):
        raise fail(f"'{KEY}' must be an object {{\"members\": [\"members/a\", ...]}}, got {type(record).__name__}")
    unknown = sorted(set(record) - {"members"})
    if unknown:
        raise fail(f"{KEY}: unknown field(s) {unknown}; known: ['members']")
    members = record.get("members")
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
        raise fail(f"{KEY}.members must be a list of 1 to {MAX_MEMBERS} member directories, got {members!r}")
    for m in members:
        problem = _member_path_problem(m)
        if problem:
            raise fail(f"{KEY}.members: {m!r} {problem}")
    if cfg.get("encoder"):
        _validate_encoder(cfg["encoder"], {}, fail)
    _validate_decoding(cfg.get("decoding") or {}, fail)
    return cfg


def _member_path_problem(m: Any) -> str | None:
    """What is wrong with a member's path as config.json gives it (None: a relative path inside the directory)."""
    if not isinstance(m, str) or not m.strip():
        return "must be a non-empty string"
    if "\\" in m or "\0" in m:
        return "must be a relative path with / between folders"
    p = PurePosixPath(m)
    if p.is_absolute() or re.match(r"^[A-Za-z]:", m):
        return "is absolute; a member's path is relative to the ensemble's directory, inside it"
    if ".." in p.parts or p == PurePosixPath("."):
        return "leaves the ensemble's directory; a member's path must name a folder inside it"
    return None


def member_dirs(root: Path, cfg: dict) -> list[Path]:
    """The members' directories of the ensemble directory ``root`` (config ``cfg``, checked), each resolved
    (symbolic links followed) strictly inside ``root``, a directory, and not an ensemble itself."""
    top = root.resolve()
    out = []
    for m in cfg[KEY]["members"]:
        p = (root / m).resolve()
        if p == top or not p.is_relative_to(top):
            raise ModelDirError(f"{root / 'config.json'}: {KEY}.members: {m!r} leads outside the ensemble's "
                                "directory (a symbolic link?); a member must be a folder inside it")
        if not p.is_dir():
            raise ModelDirError(f"{root / m}: missing; config.json names it as an ensemble member, a model directory "
                                "inside the ensemble's")
        if _peek_ensemble(p):
            raise ModelDirError(f"{root / m}: an ensemble itself; an ensemble's members are single models (list "
                                "its members instead)")
        out.append(p)
    return out


def _peek_ensemble(p: Path) -> bool:
    """Whether the model directory ``p`` is an ensemble's (its config.json names members); False when it cannot
    be read (loading it says why)."""
    try:
        return is_ensemble_config(json.loads(read_bytes(p / "config.json", "the model's config.json",
                                                        METADATA_BYTES).decode("utf-8")))
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- loading

def _vocab_difference(a: Vocab, b: Vocab, first: str) -> str | None:
    for i, (x, y) in enumerate(zip(a.itos, b.itos)):
        if x != y:
            return f"its vocab.json entry {i} is {y!r} where {first}'s is {x!r}"
    if len(a) != len(b):
        i = min(len(a), len(b))
        extra = b.itos[i] if len(b) > len(a) else a.itos[i]
        return f"its vocab.json has {len(b)} entries, {first}'s {len(a)} (the first extra entry: {i} {extra!r})"
    return None


def _encoder_difference(a: dict | None, b: dict | None, first: str) -> str | None:
    a, b = a or {}, b or {}

    def shown(d: dict, key: str) -> str:
        return repr(d[key]) if key in d else "absent"

    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) or (key in a) != (key in b):
            return f"its config.json encoder.{key} is {shown(b, key)} where {first}'s is {shown(a, key)}"
    return None


def _load_member(path: Path) -> tuple[Decoder, Vocab, dict, VocabExtension | None]:
    decoder, vocab, cfg = load_model_dir(path)
    try:
        extension = load_extension(path, decoder, vocab, cfg)
    except ExtensionFileError as e:
        raise ModelDirError(str(e)) from None
    return decoder, vocab, cfg, extension


def load_members(paths: Sequence[Path], shown: Sequence[str]) -> tuple[Ensemble, Vocab]:
    """The model directories ``paths`` (named ``shown`` in messages) as one ensemble: they must share the
    vocabulary and the encoder; their added words are made the same for all (:func:`harmonised`, kept as the
    ensemble's ``loaded_extension``)."""
    loaded = [_load_member(p) for p in paths]
    _, vocab, cfg0, _ = loaded[0]
    for (_, v, cfg, _), s in zip(loaded[1:], shown[1:]):
        problem = _vocab_difference(vocab, v, shown[0]) or _encoder_difference(cfg0.get("encoder"), cfg.get("encoder"),
                                                                                  shown[0])
        if problem:
            raise ModelDirError(f"{s}: cannot be decoded in one ensemble with {shown[0]}: {problem}. The members of "
                                "an ensemble share one vocabulary and one encoder (trained on the same captions and "
                                "features)")
    ensemble = Ensemble([d for d, *_ in loaded], [cfg for _, _, cfg, _ in loaded])
    try:
        ensemble.loaded_extension = harmonised(ensemble.members, [e for *_, e in loaded], vocab)
    except (ExtensionError, WordVectorError) as e:
        raise ModelDirError(f"{' + '.join(shown)}: the members add different words after training, and the ones "
                            f"some lack cannot be made for them ({e}); give every member the same words with "
                            "`captioner vocab extend`") from None
    return ensemble.eval(), vocab


def load_ensemble_dir(p: Path, cfg: dict) -> tuple[Ensemble, Vocab, dict]:
    """An ensemble's model directory ``p`` whose config.json holds ``cfg`` (as :func:`load_model_dir` returns:
    the decoder, the vocabulary, the config)."""
    validate_ensemble_config(cfg, p / "config.json")
    try:
        vocab = Vocab.load(p / "vocab.json")
    except ValueError as e:
        raise ModelDirError(str(e)) from None
    dirs = member_dirs(p, cfg)
    names = [str(p / m) for m in cfg[KEY]["members"]]
    ensemble, member_vocab = load_members(dirs, names)
    problem = _vocab_difference(vocab, member_vocab, str(p)) or _encoder_difference(
        cfg.get("encoder"), ensemble.member_configs[0].get("encoder"), str(p))
    if problem:
        raise ModelDirError(f"{names[0]}: does not belong to the ensemble {p}: {problem}")
    ensemble.member_names = list(cfg[KEY]["members"])
    return ensemble, vocab, {**cfg, "arch": ARCH}


def _expanded(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Each model named (a directory or a bundled name) as its directory; an ensemble's directory as its
    members' (an ensemble of ensembles is the ensemble of all their members)."""
    dirs, shown = [], []
    for x in paths:
        p = resolve_model_path(x)
        if _peek_ensemble(p):
            cfg = json.loads(read_bytes(p / "config.json", "the model's config.json", METADATA_BYTES).decode("utf-8"))
            validate_ensemble_config(cfg, p / "config.json")
            dirs += member_dirs(p, cfg)
            shown += [str(Path(os.fspath(x)) / m) for m in cfg[KEY]["members"]]
        else:
            dirs.append(p)
            shown.append(os.fspath(x))
    if len(dirs) > MAX_MEMBERS:
        raise ModelDirError(f"{len(dirs)} models: an ensemble has at most {MAX_MEMBERS} members")
    return dirs, shown


def several(model: ModelArg) -> bool:
    return not isinstance(model, (str, os.PathLike))


def load_model(model: ModelArg) -> tuple[Decoder, Vocab, dict, VocabExtension | None]:
    """(decoder, vocabulary, config, vocabulary extension) of any model: a model directory or bundled name (an
    ensemble's directory included), or a list of them decoded as one ensemble (a list of one: that model). The
    config of a list is made as an ensemble directory's, with the first member's encoder and decoding defaults.
    ModelDirError (a ValueError) names the file and the problem."""
    if several(model) and len(model) == 1:
        model = model[0]
    if not several(model):
        p = resolve_model_path(model)
        decoder, vocab, cfg = load_model_dir(p)
        if isinstance(decoder, Ensemble):
            return decoder, vocab, cfg, decoder.loaded_extension
        try:
            return decoder, vocab, cfg, load_extension(p, decoder, vocab, cfg)
        except ExtensionFileError as e:
            raise ModelDirError(str(e)) from None
    if not model:
        raise ModelDirError("no model given")
    dirs, shown = _expanded(model)
    ensemble, vocab = load_members(dirs, shown)
    first = ensemble.member_configs[0]
    ensemble.member_names = member_names(dirs)
    cfg = {"format": FORMAT, "version": VERSION, "arch": ARCH, "name": model_name(model),
           KEY: {"members": [os.fspath(x) for x in model]},
           **{k: first[k] for k in ("encoder", "decoding") if first.get(k) is not None}}
    return ensemble, vocab, cfg, ensemble.loaded_extension


def model_name(model: ModelArg) -> str:
    """How messages name a model: its path or name; several joined by " + "."""
    return " + ".join(os.fspath(x) for x in model) if several(model) else os.fspath(model)


def short_name(model: ModelArg) -> str:
    """A model's short name: its folder's; several joined by " + ", each a training run's ``best`` or ``last``
    with its run's name ("run-a-best + run-b-best")."""
    if several(model):
        return " + ".join(_label(x) for x in model)
    return Path(os.fspath(model)).name or os.fspath(model)


def _label(model: str | os.PathLike) -> str:
    p = Path(os.fspath(model))
    return f"{p.resolve().parent.name}-{p.name}" if p.name in ("best", "last") else p.name or str(p)


def member_names(dirs: Sequence[Path]) -> list[str]:
    """The members' folder names inside a new ensemble directory: members/<k>-<its short name>."""
    out = []
    for k, d in enumerate(dirs):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", _label(d)).strip("-.")[:40] or "model"
        out.append(f"{MEMBERS_DIR}/{k}-{slug}")
    return out


# ----------------------------------------------------------------------------- writing

def _parts(extension: VocabExtension | None, n: int) -> list[VocabExtension | None]:
    if extension is None or not len(extension):
        return [None] * n
    if not isinstance(extension, EnsembleExtension) or len(extension.parts) != n:
        raise ModelDirError("an ensemble's added words need rows for each of its members")
    return list(extension.parts)


def _write_config(out: Path, cfg: dict) -> None:
    tmp = out / "config.json.tmp"
    try:
        tmp.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, out / "config.json")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ModelDirError(f"{out}: cannot write the model directory ({e.strerror or e}); is the disk full?") from None


def _ensemble_config(names: list[str], config: dict) -> dict:
    rest = {k: v for k, v in config.items() if k not in ("format", "version", "arch", "model", KEY, "vocab_extension")}
    return {"format": FORMAT, "version": VERSION, "arch": ARCH, KEY: {"members": list(names)}, **rest}


def save_ensemble_dir(path: str | os.PathLike, ensemble: Ensemble, vocab: Vocab, config: dict, *,
                      dtype: torch.dtype = torch.float32, extension: VocabExtension | None = None,
                      encoder_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``ensemble`` as a model directory (:func:`captioner.inference.modeldir.save_model_dir` for an
    ensemble): each member with its own part of ``extension`` (and the shared fine-tuned ``encoder_weights``,
    if any) under its folder, then vocab.json, then config.json (``config``'s entries other than the members',
    which are written from the ensemble)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for member, name, mcfg, part in zip(ensemble.members, ensemble.member_names, ensemble.member_configs,
                                        _parts(extension, len(ensemble))):
        save_model_dir(out / name, member, vocab, {**mcfg, "encoder": config.get("encoder", mcfg.get("encoder"))},
                       dtype=dtype, extension=part, encoder_weights=encoder_weights)
    vocab.save(out / "vocab.json")
    cfg = _ensemble_config(ensemble.member_names, config)
    validate_ensemble_config(cfg, out / "config.json")
    _write_config(out, cfg)
    return out


def _write_member_extension(d: Path, part: VocabExtension | None, cfg: dict) -> dict:
    """Give the member directory ``d`` (config ``cfg``) the added words ``part``: extension.safetensors and
    config.json's record, both written before either replaces the old one. Returns the new config."""
    config, place = write_extension(d, part, cfg)
    tmp = d / "config.json.tmp"
    try:
        tmp.write_text(json.dumps(config, indent=2))
        place()
        os.replace(tmp, d / "config.json")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ModelDirError(f"{d}: cannot write the model directory ({e.strerror or e}); is the disk full?") from None
    return config


def write_ensemble(models: ModelArg, out: str | os.PathLike, *, decoding: dict | None = None,
                   name: str | None = None) -> Path:
    """Write a new ensemble directory ``out`` from the model directories ``models`` (an ensemble's directory
    counts as its members). Each member is copied as it is (its weights in their own dtype, its own files), and
    given the words another member adds after training, if it lacks them. The decoding defaults are the first
    member's, with ``decoding``'s settings over them. ``out`` must be new or empty; it appears complete or not at
    all. ModelDirError for members that do not fit together, or an unwritable ``out``."""
    models = list(models) if several(models) else [models]
    if not models:
        raise ModelDirError("an ensemble needs at least one model directory")
    dirs, shown = _expanded(models)
    ensemble, vocab = load_members(dirs, shown)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ModelDirError(f"{target}: exists and is not empty; give a new directory for the ensemble")
    first = ensemble.member_configs[0]
    names = member_names(dirs)
    cfg = _ensemble_config(names, {**({"name": name} if name else {}), "encoder": first.get("encoder"),
                                   "decoding": {**(first.get("decoding") or {}), **(decoding or {})}})
    validate_ensemble_config(cfg, target / "config.json")  # the decoding settings given, before any copying
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise ModelDirError(f"{target}: cannot write the model directory ({e.strerror or e})") from None
    try:
        parts = _parts(ensemble.loaded_extension, len(ensemble))
        for d, member, mcfg, part in zip(dirs, names, ensemble.member_configs, parts):
            shutil.copytree(d, tmp / member)
            if (part.words if part is not None else []) != (mcfg.get("vocab_extension") or {}).get("words", []):
                _write_member_extension(tmp / member, part, mcfg)
        vocab.save(tmp / "vocab.json")
        _write_config(tmp, cfg)
        os.chmod(tmp, 0o755)  # mkdtemp's folder is private; a model directory is readable like its files
        os.replace(tmp, target)  # onto an empty directory too
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelDirError(f"{target}: cannot write the model directory ({e.strerror or e}); is the disk full?") \
            from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def extend_ensemble_dir(source: Path, out: Path, ensemble: Ensemble, extension: VocabExtension) -> None:
    """`captioner vocab extend` for an ensemble's directory ``source``: ``out`` (``source`` itself, or a copy of
    it) with each member's part of ``extension`` in the member's own directory."""
    if out.resolve() != source.resolve():
        try:
            shutil.copytree(source, out, dirs_exist_ok=True)
        except (OSError, shutil.Error) as e:
            raise ModelDirError(f"{out}: cannot copy the ensemble {source} there ({e})") from None
    for name, mcfg, part in zip(ensemble.member_names, ensemble.member_configs, _parts(extension, len(ensemble))):
        _write_member_extension(out / name, part, mcfg)


def encoder_dir(path: str | os.PathLike) -> Path:
    """The model directory whose encoder files (fine-tuned weights) a model uses: its own, or for an ensemble
    (whose members share one encoder, the same "encoder" entry) its first member's."""
    p = resolve_model_path(path)
    if not _peek_ensemble(p):
        return p
    cfg = json.loads(read_bytes(p / "config.json", "the model's config.json", METADATA_BYTES).decode("utf-8"))
    return member_dirs(p, validate_ensemble_config(cfg, p / "config.json"))[0]
