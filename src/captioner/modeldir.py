"""Model directories (the unit users share) and the :class:`Captioner` pipeline.

A model directory holds::

    config.json         format/version, architecture + its config, encoder spec, decoding
                        defaults, how it was trained, its measured metrics
    vocab.json          the vocabulary (captioner.data.text.Vocab)
    model.safetensors   the decoder weights (safetensors: loading never unpickles anything)

The encoder is not stored: it is named in config.json and rebuilt from its packaged weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from .data.text import Vocab
from .models import build_decoder
from .models.base import Decoder

FORMAT = "captioner-model"
VERSION = 1
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_MODEL = "flickr8k-sat"


class ModelDirError(ValueError):
    pass


def banned_ids(vocab: Vocab, allow_unk: bool = False) -> tuple[int, ...]:
    """Words a caption never contains: <pad>, <start> and, unless allowed, <unk>."""
    return (vocab.pad_id, vocab.start_id) if allow_unk else (vocab.pad_id, vocab.start_id, vocab.unk_id)


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
                   *, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json + vocab.json + model.safetensors (each written atomically)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in config.items() if k not in ("format", "version", "arch", "model")}
    cfg = {"format": FORMAT, "version": VERSION, **config,
           "arch": decoder.arch_name, "model": dataclasses.asdict(decoder.cfg)}
    state = {k: v.detach().to(dtype).contiguous() if v.is_floating_point() else v.detach().contiguous()
             for k, v in decoder.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # readable like the other files (the writer may create it private)
    os.replace(tmp, out / "model.safetensors")
    vocab.save(out / "vocab.json")
    tmpc = out / "config.json.tmp"
    tmpc.write_text(json.dumps(cfg, indent=2))
    os.replace(tmpc, out / "config.json")
    return out


def load_model_dir(path: str | os.PathLike) -> tuple[Decoder, Vocab, dict]:
    p = resolve_model_path(path)
    try:
        cfg = json.loads((p / "config.json").read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{p}: config.json missing; not a captioner model directory") from None
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{p / 'config.json'}: invalid JSON ({e})") from None
    if cfg.get("format") != FORMAT:
        raise ModelDirError(f"{p / 'config.json'}: not a captioner model (format={cfg.get('format')!r})")
    missing_keys = [k for k in ("arch", "model") if k not in cfg]
    if missing_keys:
        raise ModelDirError(f"{p / 'config.json'}: missing {', '.join(missing_keys)}")
    if cfg.get("version", 0) > VERSION:
        raise ModelDirError(f"{p / 'config.json'}: written by a newer captioner (version {cfg['version']})")
    try:
        vocab = Vocab.load(p / "vocab.json")
    except ValueError as e:
        raise ModelDirError(str(e)) from None
    try:
        decoder = build_decoder(cfg["arch"], cfg["model"])
    except (KeyError, ValueError, TypeError) as e:
        raise ModelDirError(f"{p / 'config.json'}: bad architecture or model config ({e})") from None
    if getattr(decoder.cfg, "vocab_size", len(vocab)) != len(vocab):
        raise ModelDirError(f"{p}: vocab.json has {len(vocab)} entries but the model expects "
                            f"{decoder.cfg.vocab_size}")
    weights = p / "model.safetensors"
    if not weights.exists():
        raise ModelDirError(f"{weights}: missing")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ModelDirError(f"{weights}: cannot read weights ({e})") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = decoder.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelDirError(f"{weights}: weights do not match the architecture ({e})") from None
    if missing or unexpected:
        raise ModelDirError(f"{weights}: weights do not match the architecture "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    decoder.eval()
    return decoder, vocab, cfg


class Captioner:
    """Image in, caption out. ``Captioner.from_pretrained("flickr8k-sat").caption(["a.jpg"])``."""

    def __init__(self, decoder: Decoder, vocab: Vocab, config: dict):
        self.decoder, self.vocab, self.config = decoder.eval(), vocab, config
        self._encoder = None
        self._specials = {vocab.pad_id, vocab.start_id, vocab.end_id}

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = DEFAULT_MODEL) -> "Captioner":
        return cls(*load_model_dir(name_or_path))

    def save_pretrained(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
        extra = {k: v for k, v in self.config.items() if k not in ("format", "version", "arch", "model")}
        return save_model_dir(path, self.decoder, self.vocab, extra, dtype=dtype)

    @property
    def encoder(self):
        if self._encoder is None:
            from .encoders import ImageEncoder, get_encoder_spec

            e = self.config.get("encoder")
            if not e:
                raise ModelDirError("this model's config.json names no encoder, so it can only caption features "
                                    "(decode_features), not images")
            spec = get_encoder_spec(e["name"], resize=e.get("resize"), image_size=e.get("image_size"))
            self._encoder = ImageEncoder(spec)
        return self._encoder

    def decode_features(self, features: torch.Tensor, *, beam_size: int | None = None, n_best: int = 1,
                        max_len: int | None = None, length_penalty: float | None = None,
                        allow_unk: bool = False, sample: bool = False, num_captions: int = 1,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                        seed_offset: int = 0):
        """Hypotheses per image: the n best of a beam search, or ``num_captions`` samples (image b
        drawing from the stream of ``(seed, seed_offset + b)``)."""
        from .decoding import decode
        from .decoding import sample as draw

        d = self.config.get("decoding", {})
        common = dict(start_id=self.vocab.start_id, end_id=self.vocab.end_id, max_len=max_len or d.get("max_len", 30),
                      banned=banned_ids(self.vocab, allow_unk))
        if sample:
            return draw(self.decoder, features.float(), temperature=temperature, top_k=top_k, top_p=top_p,
                        num_samples=num_captions, seed=seed, seed_offset=seed_offset, **common)
        beam = max(beam_size or d.get("beam_size", 3), n_best)  # an n-best list needs at least n beams
        return decode(self.decoder, features.float(), beam_size=beam, n_best=n_best,
                      length_penalty=d.get("length_penalty", 0.0) if length_penalty is None else length_penalty,
                      **common)

    def caption(self, images: Sequence[Any] | Any, *, beam_size: int | None = None, n_best: int = 1,
                max_len: int | None = None, return_attention: bool = False, max_pixels: int | None = None,
                batch_size: int = 16, allow_unk: bool = False, length_penalty: float | None = None,
                sample: bool = False, num_captions: int = 1, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, seed: int | None = None, seed_offset: int = 0) -> list[dict]:
        """Caption image paths, bytes or PIL images. One dict per image:
        ``{"caption", "score", "n_best": [{"caption", "score"}...], "words", "attention"?, "grid"}``.

        With ``sample=True`` the captions are drawn from the model (temperature, top-k, top-p;
        ``seed`` makes them repeatable: the k-th image draws from the stream of ``(seed,
        seed_offset + k)``, whatever the batch): ``"samples"`` lists ``num_captions`` of them and
        ``"caption"`` is the first. ``"attention"`` is None for a model without attention."""
        from .data.images import DEFAULT_MAX_PIXELS, load_image

        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results: list[dict] = []
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            pil = [load_image(im, max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
                   for im in chunk]
            feats = self.encoder.encode(pil)
            all_hyps = self.decode_features(
                feats, beam_size=beam_size, n_best=n_best, max_len=max_len, allow_unk=allow_unk,
                length_penalty=length_penalty, sample=sample, num_captions=num_captions, temperature=temperature,
                top_k=top_k, top_p=top_p, seed=seed, seed_offset=seed_offset + i)
            for im, hyps in zip(pil, all_hyps):
                best = hyps[0]
                # words and their attention rows together, skipping any special token the model emitted
                keep = [i for i, t in enumerate(best.tokens) if t not in self._specials]
                words = [self.vocab.itos[best.tokens[i]] for i in keep]
                listed = [{"caption": " ".join(self.vocab.decode(h.tokens)), "score": round(h.norm_score, 4)}
                          for h in hyps]
                r = {
                    "caption": " ".join(words),
                    "score": round(best.norm_score, 4),
                    "n_best": listed if not sample else listed[:1],
                    "words": words,
                    "image_size": list(im.size),
                    "grid": list(self.config["encoder"]["grid"]),
                }
                if sample:
                    r["samples"] = listed
                if return_attention:
                    r["attention"] = best.attention[keep].tolist() if best.attention is not None else (
                        [] if self.decoder.has_attention else None)
                results.append(r)
        return results
