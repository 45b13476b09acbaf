"""``captioner export``: a model directory as files another runtime can run (ONNX), with a standalone script.

The export folder (docs/export.md)::

    encoder.onnx          uint8 images (B, S, S, 3) -> features (B, P, C) [, concept_confidences (B, W)]
    decoder_encode.onnx   features -> memory_* and the initial state_* (once per image)
    decoder_step.onnx     prev_tokens, state_*, memory_* -> log_probs (B, V), new_state_* (once per word)
    vocab.json            the model's vocabulary (ids 0-3: <pad> <start> <end> <unk>)
    decoding.json         the model's decoding defaults (config.json "decoding")
    concepts.json         the words of concept_confidences' columns (only with a concept head)
    manifest.json         what each file is, input/output names, dtypes and shapes, the opset and versions
    caption_onnx.py       captions images with onnxruntime, numpy and Pillow only (no torch)

Written into a temporary folder beside ``OUT_DIR`` and renamed into place when complete, so an interrupted
export leaves no half-written folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import import_module
from pathlib import Path

import numpy as np
import torch

from captioner import __version__
from captioner.decoding.settings import STORED, DecodingSettings
from captioner.export.graphs import OPSET, export_decoder, export_encoder
from captioner.inference.captioner import Captioner

FORMATS = ("onnx",)
FORMAT, VERSION = "captioner-onnx", 1
SCRIPT = Path(__file__).with_name("caption_onnx.py")
# ONNX Runtime against torch on the example the export runs: far above rounding, far below a changed caption
CHECK_TOLERANCE = 1e-3
LEFT_OUT = [
    "guided decoding: with concepts 'auto' the toolkit may search a caption again so that it names a confident "
    "concept (and 'mention' makes a caption hold given words); the export reports the concepts with their "
    "confidences but decodes the plain beam search (the toolkit's --concepts off)",
    "the vocabulary extension (extension.safetensors: words taught after training, used only by guided "
    "decoding)",
    "sampling (--sample) and attention maps",
    "ensembles named by several --model flags: write an ensemble directory first (captioner ensemble A B --out "
    "DIR), which exports as one decoder",
    "the int8 encoder (--runtime onnx-int8): the export is float32",
]


class ExportError(ValueError):
    """A model directory or an export folder the export cannot use (the CLI: exit status 2)."""


def _onnx_version() -> str:
    try:
        return import_module("onnx").__version__
    except ImportError:
        raise ExportError("ONNX export needs the 'onnx' package, which is not installed: pip install "
                          "'captioner[fast]' (or pip install onnx)") from None


def _runtime():
    try:
        return import_module("onnxruntime")
    except ImportError:
        return None


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        raise ExportError(f"{out_dir}: already exists; the export writes a new folder: give a path that does not "
                          "exist yet, or remove that one first")


def export_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "onnx") -> dict:
    """Export the model directory (or bundled model name) ``model_dir`` into the new folder ``out_dir``;
    returns the manifest. :class:`ExportError` for an unknown format, an existing ``out_dir`` or a model that
    cannot be exported; a model directory that does not load is a ModelDirError (both ValueErrors)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: not an export format; available: {', '.join(FORMATS)}")
    out = Path(out_dir)
    _check_out_dir(out)
    onnx_version = _onnx_version()
    model = Captioner.from_pretrained(model_dir, runtime="torch")  # the torch network is what gets exported
    if not model.config.get("encoder"):
        raise ExportError(f"{model_dir}: its config.json names no encoder, so the export could not turn images "
                          "into features; export a model trained on an encoder's features")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _write(model, model_dir, work, onnx_version)
        _check_out_dir(out)  # made by someone else meanwhile?
        os.chmod(work, 0o755)  # mkdtemp makes it private
        os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _write(model, model_dir, work: Path, onnx_version: str) -> dict:
    encoder, vocab, head = _torch_encoder(model), model.vocab, model.guide.head
    spec = encoder.spec
    enc_bytes, enc_info = export_encoder(encoder.net, spec, head)
    P, C = spec.grid[0] * spec.grid[1], spec.channels
    dec_encode, dec_step, dec_info = export_decoder(model.decoder, (P, C), vocab.start_id)
    (work / "encoder.onnx").write_bytes(enc_bytes)
    (work / "decoder_encode.onnx").write_bytes(dec_encode)
    (work / "decoder_step.onnx").write_bytes(dec_step)
    vocab.save(work / "vocab.json")
    settings = DecodingSettings.from_model(model.config)
    decoding = {k: v for k, v in settings.to_dict().items() if k in STORED}
    (work / "decoding.json").write_text(json.dumps(decoding, indent=2) + "\n")
    if head is not None:
        (work / "concepts.json").write_text(json.dumps({"words": list(head.words)}, indent=1) + "\n")
    shutil.copyfile(SCRIPT, work / SCRIPT.name)
    runtime = _runtime()
    manifest = {
        "format": FORMAT, "version": VERSION, "model": str(model_dir), "arch": model.config["arch"],
        "opset": OPSET,
        "versions": {"captioner": __version__, "torch": torch.__version__, "onnx": onnx_version,
                     "onnxruntime": runtime.__version__ if runtime else None},
        "files": {
            "encoder.onnx": "the image encoder: uint8 RGB images resized to image_size x image_size, normalised "
                            "inside; features (B, P, C), row-major grid" + (", and each concept word's confidence "
                                                                            "from the ImageNet classifier"
                                                                            if head is not None else ""),
            "decoder_encode.onnx": "the decoder's encode(features) and init_state(memory): run once per image",
            "decoder_step.onnx": "the decoder's step(prev_tokens, state, memory): run once per word; feed only "
                                 "the inputs the session lists",
            "vocab.json": "the vocabulary: itos[id] is the word of id (0-3: <pad> <start> <end> <unk>)",
            "decoding.json": "the model's decoding defaults",
            **({"concepts.json": "the words of concept_confidences' columns"} if head is not None else {}),
            SCRIPT.name: "captions images with onnxruntime, numpy and Pillow only: python caption_onnx.py IMAGE...",
        },
        "encoder": {"file": "encoder.onnx", "name": spec.name, "image_size": spec.image_size, "resize": spec.resize,
                    "grid": list(spec.grid), "channels": C, "mean": list(spec.mean), "std": list(spec.std),
                    **enc_info},
        "concepts": ({"file": "concepts.json", "words": len(head.words), "output": "concept_confidences"}
                     if head is not None else None),
        "decoder": {"encode": {"file": "decoder_encode.onnx", **dec_info["encode"]},
                    "step": {"file": "decoder_step.onnx", **dec_info["step"]},
                    "memory": dec_info["memory"], "state": dec_info["state"], "vocab_size": len(vocab)},
        "vocab": "vocab.json", "decoding": "decoding.json", "script": SCRIPT.name,
        "special_ids": {"pad": vocab.pad_id, "start": vocab.start_id, "end": vocab.end_id, "unk": vocab.unk_id},
        "left_out": LEFT_OUT,
    }
    if runtime is not None:
        manifest["check"] = _self_check(runtime, work, model, manifest)
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _torch_encoder(model):
    """The model's torch ImageEncoder (under another runtime, the one it wraps)."""
    return getattr(model.encoder, "torch_encoder", model.encoder)


def _self_check(ort, work: Path, model, manifest: dict) -> dict:
    """Run the exported graphs once in ONNX Runtime against torch (two images, three words): the largest
    differences. A difference above :data:`CHECK_TOLERANCE` is a bug in the export (RuntimeError)."""
    encoder = _torch_encoder(model)
    spec = encoder.spec
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    sess = {n: ort.InferenceSession(str(work / n), providers=["CPUExecutionProvider"])
            for n in ("encoder.onnx", "decoder_encode.onnx", "decoder_step.onnx")}
    outs = sess["encoder.onnx"].run(None, {"images": images})
    feats, pooled = encoder.encode_all(images)
    feats = feats.float().cpu()
    diff = {"features": float(np.abs(outs[0] - feats.numpy()).max())}
    if len(outs) > 1:
        conf = model.guide.confidences(feats if pooled is None else pooled.float().cpu())
        diff["concept_confidences"] = float(np.abs(outs[1] - conf.numpy()).max()) if conf is not None else None
    names = manifest["decoder"]
    enc = dict(zip(names["memory"] + names["state"], sess["decoder_encode.onnx"].run(None, {"features": outs[0]})))
    step_inputs = {i.name for i in sess["decoder_step.onnx"].get_inputs()}
    decoder = model.decoder
    with torch.inference_mode():
        memory = decoder.encode(torch.from_numpy(outs[0]))
        state = decoder.init_state(memory)
        prev = torch.full((2,), model.vocab.start_id, dtype=torch.long)
        worst = 0.0
        for _ in range(3):
            log_probs, state, _ = decoder.step(prev, state, memory)
            feed = {"prev_tokens": prev.numpy(), **{k: v for k, v in enc.items() if k in step_inputs}}
            got = sess["decoder_step.onnx"].run(None, {k: v for k, v in feed.items() if k in step_inputs})
            worst = max(worst, float(np.abs(got[0] - log_probs.numpy()).max()))
            enc.update(zip(names["state"], got[1:]))
            prev = log_probs.argmax(dim=-1)
    diff["log_probs"] = worst
    bad = {k: v for k, v in diff.items() if v is not None and not v <= CHECK_TOLERANCE}
    if bad:
        raise RuntimeError(f"the exported graphs do not compute what the model does (largest differences {bad}, "
                           f"more than {CHECK_TOLERANCE})")
    return {"max_abs_diff": diff, "tolerance": CHECK_TOLERANCE,
            "what": "ONNX Runtime against torch on 2 random images and 3 decoding steps"}
