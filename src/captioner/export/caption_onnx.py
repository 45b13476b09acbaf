#!/usr/bin/env python3
"""Caption images with an exported captioner model: ONNX Runtime, numpy and Pillow only (no torch, no captioner).

    python caption_onnx.py photo.jpg more/*.png [--beam 3] [--json]

This file is written by ``captioner export MODEL OUT --format onnx`` into OUT, beside the graphs it runs
(manifest.json says what each file is). Images are resized exactly as the toolkit resizes them, and the
search follows the toolkit's rules (greedy at beam 1, else a batched beam search; length penalty, n-gram
blocking, <unk> banned unless allowed), so the captions are the toolkit's with ``--concepts off``. The
concepts (what the encoder's ImageNet classifier sees) are reported, but no caption is searched again to
name them: that guided search and sampling are left out (manifest.json "left_out", docs/export.md). An
ensemble directory exports as one decoder and runs here like any model.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - depends on the installation
    ort = None

FORMAT, VERSION = "captioner-onnx", 1
MAX_PIXELS = 64_000_000  # larger images are refused before they are decoded (the toolkit's default)
SHOWN_CONCEPTS, SHOWN_MIN_CONFIDENCE = 5, 0.05  # the concepts listed per image
LIMITS = {"beam_size": (1, 50), "max_len": (1, 100), "n_best": (1, 50), "no_repeat_ngram": (0, 100)}
# scripts written without spaces between words: their tokens are joined without spaces (as the toolkit does)
_PER_CHARACTER = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u2e80-\u2fdf\u3005-\u3007\u3021-\u3029\u3038-\u303c"
    "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


class ExportedModelError(ValueError):
    """The export folder is incomplete or not one this script reads."""


# ----------------------------------------------------------------------------- images


def load_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """An image file as RGB: EXIF orientation applied, transparency on white, 16-bit grey scaled to 8 bits."""
    with Image.open(path) as im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ValueError(f"image has {w} x {h} = {w * h} pixels, more than the limit of {max_pixels}")
        im.load()
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # unreadable EXIF must not cost a good image
            im = im.copy()
    if im.mode.startswith("I") or im.mode == "F":
        im = _gray8(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info or (
            im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _gray8(im: Image.Image) -> Image.Image:
    arr = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        out = arr / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        out = arr * 255.0
    elif hi > lo:
        out = (arr - lo) * (255.0 / (hi - lo))
    else:
        out = np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def image_to_array(img: Image.Image, size: int, resize: str) -> np.ndarray:
    """RGB image -> uint8 (size, size, 3): "squash" (the whole image, aspect ignored) or "center-crop"."""
    img = img.convert("RGB")
    if resize == "squash":
        img = img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    elif resize == "center-crop":
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        raise ExportedModelError(f"manifest.json: unknown resize policy {resize!r}")
    return np.asarray(img, dtype=np.uint8)


# ----------------------------------------------------------------------------- the model


class ExportedModel:
    """The three graphs, the vocabulary, the decoding defaults and the concept words of an export folder."""

    def __init__(self, folder: str | Path | None = None, threads: int = 0):
        self.folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
        if ort is None:
            raise ExportedModelError("onnxruntime is not installed: pip install onnxruntime numpy pillow")
        m = self.manifest = self._json("manifest.json")
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
            got = (m.get("format"), m.get("version")) if isinstance(m, dict) else (None, None)
            raise ExportedModelError(f"{self.folder / 'manifest.json'}: not a captioner ONNX export of version "
                                     f"{VERSION} (format {got[0]!r}, version {got[1]!r})")
        try:
            self._load(m, threads)
        except (KeyError, TypeError) as e:
            raise ExportedModelError(f"{self.folder}: manifest.json or a file it names lacks {e}; export the "
                                     "model again (captioner export)") from None

    def _load(self, m: dict, threads: int) -> None:
        self.itos = self._json(m["vocab"])["itos"]
        self.defaults = self._json(m["decoding"])
        self.concept_words = self._json(m["concepts"]["file"])["words"] if m.get("concepts") else None
        ids = m["special_ids"]
        self.pad, self.start, self.end, self.unk = ids["pad"], ids["start"], ids["end"], ids["unk"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.sessions = {}
        for key, file in (("encoder", m["encoder"]["file"]), ("encode", m["decoder"]["encode"]["file"]),
                          ("step", m["decoder"]["step"]["file"])):
            path = self._file(file)
            try:
                self.sessions[key] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # ONNX Runtime's own error types: a damaged or truncated file
                raise ExportedModelError(f"{path}: ONNX Runtime cannot load it ({e}); export the model "
                                         "again") from None
        self.step_inputs = {i.name for i in self.sessions["step"].get_inputs()}
        self.state_names, self.memory_names = m["decoder"]["state"], m["decoder"]["memory"]

    def _file(self, name: str) -> Path:
        path = self.folder / name
        if not path.is_file():
            raise ExportedModelError(f"{path}: missing; export the model again (captioner export)")
        return path

    def _json(self, name: str):
        try:
            return json.loads(self._file(name).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ExportedModelError(f"{self.folder / name}: invalid JSON ({e})") from None

    def to_array(self, img: Image.Image) -> np.ndarray:
        return image_to_array(img, self.manifest["encoder"]["image_size"], self.manifest["encoder"]["resize"])

    def encode_images(self, arrays: np.ndarray):
        """uint8 (B, S, S, 3) -> features (B, P, C) and concept confidences (B, W) or None."""
        out = self.sessions["encoder"].run(None, {"images": np.ascontiguousarray(arrays, dtype=np.uint8)})
        return out[0], (out[1] if len(out) > 1 else None)

    def start_decoding(self, features: np.ndarray):
        """features (B, P, C) -> (memory, state): lists of arrays, batch first."""
        out = self.sessions["encode"].run(None, {"features": features.astype(np.float32)})
        n = len(self.memory_names)
        return out[:n], out[n:]

    def step(self, prev: np.ndarray, state: list, memory: list):
        """prev (R,) word ids -> (log_probs (R, V), new state)."""
        feed = {"prev_tokens": prev.astype(np.int64), **dict(zip(self.state_names, state)),
                **dict(zip(self.memory_names, memory))}
        out = self.sessions["step"].run(None, {k: v for k, v in feed.items() if k in self.step_inputs})
        return out[0], out[1:]

    def concepts(self, conf: np.ndarray | None) -> list | None:
        """Each image's most confident concept words [(word, confidence)], as the toolkit lists them."""
        if conf is None:
            return None
        result = []
        for row in conf:
            top = np.argsort(-row, kind="stable")[:SHOWN_CONCEPTS]
            result.append([(self.concept_words[i], round(float(row[i]), 4)) for i in top
                           if row[i] >= SHOWN_MIN_CONFIDENCE])
        return result


# ----------------------------------------------------------------------------- search (decoding/search.py's rules)


def settings_from(defaults: dict, **overrides) -> dict:
    """The decoding settings: the model's defaults with ``overrides`` (None: keep), checked."""
    s = {"beam_size": 3, "max_len": 30, "length_penalty": 0.0, "n_best": 1, "no_repeat_ngram": 0,
         "allow_unk": False}
    s.update({k: v for k, v in defaults.items() if k in s})
    s.update({k: v for k, v in overrides.items() if v is not None})
    for key, (low, high) in LIMITS.items():
        if not isinstance(s[key], int) or not low <= s[key] <= high:
            raise ValueError(f"{key} {s[key]!r}: must be a whole number from {low} to {high}")
    if not 0.0 <= float(s["length_penalty"]) <= 10.0:
        raise ValueError(f"length_penalty {s['length_penalty']!r}: must be from 0 to 10")
    s["beam_size"] = max(s["beam_size"], s["n_best"])  # an n-best list needs at least n beams
    return s


def _norm(score: float, length: int, length_penalty: float) -> float:
    return score / (max(length, 1) ** length_penalty) if length_penalty else score


def _ban(logp: np.ndarray, banned: tuple) -> np.ndarray:
    logp = logp.copy()
    logp[:, list(banned)] = -np.inf
    return logp


def _block_repeats(logp: np.ndarray, history: np.ndarray, size: int) -> np.ndarray:
    """-inf for each word that would complete an n-gram of ``size`` words its row of ``history`` already holds."""
    T = history.shape[1]
    if not size or T < size:
        return logp
    n = T - size + 1
    match = np.ones((history.shape[0], n), dtype=bool)
    for j in range(size - 1):
        match &= history[:, j:j + n] == history[:, T - size + 1 + j:T - size + 2 + j]
    rows, at = np.nonzero(match)
    if rows.size:
        logp = logp.copy()
        logp[rows, history[rows, at + size - 1]] = -np.inf
    return logp


def _check(logp: np.ndarray, live: np.ndarray, allowed: np.ndarray | None = None) -> None:
    bad = ~(logp.max(axis=-1) < np.inf)
    if allowed is not None:
        bad |= allowed.max(axis=-1) == -np.inf
    if bool((bad & live).any()):
        raise ValueError("the model gives non-finite log-probabilities (NaN or infinity): its weights are damaged")


def _hyp(seq: list, score: float, end: int, length_penalty: float) -> dict:
    n = seq.index(end) if end in seq else len(seq)
    finished = n < len(seq)
    return {"tokens": seq[:n], "score": score, "norm_score": _norm(score, n + 1 if finished else n, length_penalty)}


def greedy(model: ExportedModel, features: np.ndarray, s: dict, banned: tuple) -> list:
    """The most probable allowed word at every step: one hypothesis per image."""
    memory, state = model.start_decoding(features)
    B = features.shape[0]
    prev = np.full(B, model.start, dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    scores = np.zeros(B, dtype=np.float64)
    words = []
    for _ in range(s["max_len"]):
        logp, state = model.step(prev, state, memory)
        allowed = _ban(logp, banned)
        if s["no_repeat_ngram"] and words:
            allowed = _block_repeats(allowed, np.stack(words, 1), s["no_repeat_ngram"])
        _check(logp, ~done, allowed)
        word = np.where(done, model.end, allowed.argmax(axis=-1))
        scores += np.where(done, 0.0, logp[np.arange(B), word].astype(np.float64))
        words.append(word)
        done = done | (word == model.end)
        prev = word
        if done.all():
            break
    hist = np.stack(words, 1) if words else np.zeros((B, 0), dtype=np.int64)
    return [[_hyp(hist[b].tolist(), float(scores[b]), model.end, s["length_penalty"])] for b in range(B)]


def beam_search(model: ExportedModel, features: np.ndarray, s: dict, banned: tuple) -> list:
    """Batched beam search, as the toolkit's: finished beams stay (extending with <end> at no cost); an image
    leaves when its result cannot change; hypotheses ranked by score / length ** length_penalty."""
    k, lp, n_best, ngram, end = s["beam_size"], s["length_penalty"], s["n_best"], s["no_repeat_ngram"], model.end
    memory, state = model.start_decoding(features)
    B = features.shape[0]
    prev = np.full(B, model.start, dtype=np.int64)
    scores = np.full((B, k), -np.inf)
    scores[:, 0] = 0.0  # the beams start identical: keep one so the first step picks k distinct words
    finished = np.zeros((B, k), dtype=bool)
    history = np.zeros((B, k, 0), dtype=np.int64)
    alive, ended = list(range(B)), {}
    for t in range(s["max_len"]):
        n = len(alive)
        logp, state = model.step(prev, state, memory)
        if t == 0:  # the first step ran once per image: now k rows each
            memory, state = [np.repeat(x, k, 0) for x in memory], [np.repeat(x, k, 0) for x in state]
            logp = np.repeat(logp, k, 0)
        _check(logp, ~finished.reshape(-1))
        V = logp.shape[-1]
        logp = _ban(logp, banned)
        if ngram and t:
            logp = _block_repeats(logp, history.reshape(n * k, -1), ngram)
        frozen = np.full(V, -np.inf, dtype=logp.dtype)
        frozen[end] = 0.0
        logp = np.where(finished[:, :, None], frozen, logp.reshape(n, k, V))
        cand = (scores[:, :, None] + logp.astype(np.float64)).reshape(n, k * V)
        top = _top_k(cand, k)
        top_scores = np.take_along_axis(cand, top, 1)
        beam, word = top // V, top % V
        flat = (np.arange(n)[:, None] * k + beam).reshape(-1)
        state = [x[flat] for x in state]
        history = np.concatenate([np.take_along_axis(history, beam[:, :, None], 1), word[:, :, None]], axis=2)
        finished = np.take_along_axis(finished, beam, 1) | (word == end)
        scores, prev = top_scores, word.reshape(-1)
        done = finished.all(axis=1) if lp else finished[:, :n_best].all(axis=1)
        if done.any():
            for i in np.nonzero(done)[0]:
                ended[alive[i]] = (scores[i], history[i])
            keep = np.nonzero(~done)[0]
            if keep.size == 0:
                break
            alive = [alive[i] for i in keep]
            rows = (keep[:, None] * k + np.arange(k)).reshape(-1)
            memory, state = [x[rows] for x in memory], [x[rows] for x in state]
            scores, finished, history, prev = scores[keep], finished[keep], history[keep], prev[rows]
    for i, b in enumerate(alive):
        ended.setdefault(b, (scores[i], history[i]))
    return [_ranked(*ended[b], end, lp)[:n_best] for b in range(B)]


def _top_k(cand: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest, largest first (ties: the lower index first)."""
    part = np.argpartition(-cand, k - 1, axis=1)[:, :k] if cand.shape[1] > k else np.arange(cand.shape[1])[None]
    part = np.broadcast_to(part, (cand.shape[0], part.shape[1]))
    order = np.lexsort((part, -np.take_along_axis(cand, part, 1)), axis=1)
    return np.take_along_axis(part, order, 1)


def _ranked(scores: np.ndarray, history: np.ndarray, end: int, lp: float) -> list:
    hyps = [_hyp(history[j].tolist(), float(scores[j]), end, lp) for j in range(len(scores))
            if scores[j] != -np.inf]
    hyps.sort(key=lambda h: h["norm_score"], reverse=True)
    return hyps


def decode(model: ExportedModel, features: np.ndarray, settings: dict) -> list:
    """Hypotheses per image ({"tokens", "score", "norm_score"}), best first."""
    banned = (model.pad, model.start) if settings["allow_unk"] else (model.pad, model.start, model.unk)
    search = greedy if settings["beam_size"] == 1 else beam_search
    hyps = search(model, features, settings, banned)
    if any(not h or not all(np.isfinite([x["score"], x["norm_score"]]).all() for x in h) for h in hyps):
        raise ValueError("the model gives non-finite scores: its weights are damaged")
    return hyps


def join_tokens(tokens: list) -> str:
    """Tokens as text: spaces between words, none next to a character of a script written without spaces."""
    parts, glued = [], True
    for token in tokens:
        per_character = _PER_CHARACTER.match(token) is not None
        if parts and not (glued or per_character):
            parts.append(" ")
        parts.append(token)
        glued = per_character
    return "".join(parts)


def words_of(model: ExportedModel, tokens: list) -> str:
    specials = (model.pad, model.start, model.end)
    return join_tokens([model.itos[t] for t in tokens if t not in specials])


# ----------------------------------------------------------------------------- images in, captions out


def _why(e: Exception) -> str:
    known = {FileNotFoundError: "file not found", IsADirectoryError: "is a directory, not an image file",
             UnidentifiedImageError: "not an image file (cannot identify format)"}
    return next((v for k, v in known.items() if isinstance(e, k)), f"cannot read the image ({e})")


def caption_images(model: ExportedModel, paths: list, settings: dict, batch_size: int = 16):
    """Yield one result per image, in order: {"image", "caption", "score", "n_best", "concepts"} or
    {"image", "error"}."""
    for i in range(0, len(paths), batch_size):
        batch, arrays = [], []
        for p in paths[i:i + batch_size]:
            try:
                arrays.append(model.to_array(load_image(p)))
                batch.append((p, None))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # reported, the others go on
                batch.append((p, f"{p}: {_why(e)}"))
        results = iter(())
        if arrays:
            feats, conf = model.encode_images(np.stack(arrays))
            hyps, concepts = decode(model, feats, settings), model.concepts(conf)
            results = iter(zip(hyps, concepts if concepts is not None else [None] * len(hyps)))
        for p, error in batch:
            if error is not None:
                yield {"image": str(p), "error": error}
                continue
            h, c = next(results)
            r = {"image": str(p), "caption": words_of(model, h[0]["tokens"]), "score": round(h[0]["norm_score"], 4),
                 "n_best": [{"caption": words_of(model, x["tokens"]), "score": round(x["norm_score"], 4)} for x in h]}
            if c is not None:
                r["concepts"] = [{"word": w, "confidence": v} for w, v in c]
            yield r


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(description="Caption images with an exported captioner model (ONNX Runtime).")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model-dir", default=None, help="the export folder (default: this script's folder)")
    p.add_argument("--beam", type=int, default=None, help="beam size (1: greedy; default: the model's)")
    p.add_argument("--max-len", type=int, default=None, help="longest caption, in words")
    p.add_argument("--length-penalty", type=float, default=None, help="rank by score / length**P")
    p.add_argument("--no-repeat-ngram", type=int, default=None, help="never repeat an N-word sequence (0: off)")
    p.add_argument("--n-best", type=int, default=None, help="also list the N best captions with scores")
    p.add_argument("--allow-unk", action="store_true", default=None, help="let captions contain <unk>")
    p.add_argument("--batch-size", type=int, default=16, help="images encoded and decoded together")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    p.add_argument("--json", action="store_true", help="one JSON object per line per image")
    a = p.parse_args(argv)
    try:
        if a.threads < 0:
            raise ValueError(f"--threads {a.threads}: must be >= 0 (0: ONNX Runtime's default)")
        model = ExportedModel(a.model_dir, threads=a.threads)
        settings = settings_from(model.defaults, beam_size=a.beam, max_len=a.max_len, n_best=a.n_best,
                                 length_penalty=a.length_penalty, no_repeat_ngram=a.no_repeat_ngram,
                                 allow_unk=a.allow_unk)
        if a.batch_size < 1:
            raise ValueError(f"--batch-size {a.batch_size}: must be >= 1")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = 0
    for r in caption_images(model, a.images, settings, a.batch_size):
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
            status = 1
        if a.json:
            print(json.dumps(r if "error" in r else r if settings["n_best"] > 1 else
                             {k: v for k, v in r.items() if k != "n_best"}), flush=True)
        elif "error" not in r:
            print(f"{r['image']}: {r['caption']}", flush=True)
            for j, h in enumerate(r["n_best"] if settings["n_best"] > 1 else [], 1):
                print(f"  {j}. {h['caption']}  ({h['score']:.3f})")
            if r.get("concepts"):
                print("  concepts: " + ", ".join(f"{c['word']} {c['confidence']:.2f}" for c in r["concepts"]))
    return status


if __name__ == "__main__":
    sys.exit(main())
