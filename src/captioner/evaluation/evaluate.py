"""Scoring: decode a split of cached features and score it with the COCO metrics (used by training's
validation and by `captioner evaluate`, which also writes JSON + Markdown)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from captioner.data.corpus import Corpus
from captioner.data.text import Vocab, join_tokens, write_text_atomic
from captioner.data.captions import CaptionData
from captioner.runtime.devices import autocast, module_device, resolve_device, split_precision
from captioner.data.features import FeatureStore
from captioner.evaluation.metrics import METRIC_NAMES, compute_metrics
from captioner.decoding.search import NonFiniteError, generate
from captioner.decoding.settings import EVALUATION_BEAMS, DecodingSettings
from captioner.encoders.network import get_encoder_spec
from captioner.encoders.tail import Finisher, TailError, check_trunk
from captioner.inference.encoder_file import EncoderFileError, read_encoder_file
from captioner.inference.ensemble_dir import ModelArg, encoder_dir, load_model, model_name, several, short_name
from captioner.inference.modeldir import ModelDirError
from captioner.inference.guidance import Guide


def evaluate_split(decoder, vocab: Vocab, data: CaptionData, settings: DecodingSettings, *,
                   batch_size: int = 100, metrics=None, limit: int = 0,
                   precision: str = "fp32", guide: Guide | None = None) -> tuple[dict, dict[str, str], dict[str, str]]:
    """Decode the images of ``data`` with ``settings`` and score them against their references.

    Decoding runs where the decoder's weights are (each batch of features is moved there); with a
    ``guide``, concepts and mentions are used as `captioner caption` uses them.
    Returns (scores, candidate caption per image, metric -> why it could not be computed)."""
    n = len(data.images) if not limit else min(limit, len(data.images))
    cands = decode_images(decoder, vocab, data, settings, range(n), batch_size=batch_size, precision=precision,
                          guide=guide)
    refs = {k: data.refs[k] for k in cands}
    res = compute_metrics(refs, cands, metrics=metrics)
    return res.scores, cands, dict(res.unavailable)


def decode_images(decoder, vocab: Vocab, data: CaptionData, settings: DecodingSettings, positions: range, *,
                  batch_size: int = 100, precision: str = "fp32", guide: Guide | None = None) -> dict[str, str]:
    """The best caption of each image ``data.images[i]`` for i in ``positions`` (a range: a share of
    the split under torchrun), in that order. Image i draws from the random stream of seed offset i
    when sampling, whatever share it is in."""
    device = module_device(decoder)
    cands: dict[str, str] = {}
    for i in range(positions.start, positions.stop, batch_size):
        feats, concept_feats = data.features_and_concepts(slice(i, min(positions.stop, i + batch_size)))
        feats = feats.to(device)
        with autocast(device, precision):
            if guide is not None:
                hyps, _ = guide.generate(feats, settings, seed_offset=i, concept_features=concept_feats)
            else:
                hyps = generate(decoder, vocab, feats, settings, seed_offset=i)
        words = guide.vocab if guide is not None else vocab
        for j, h in enumerate(hyps):
            cands[data.images[i + j]] = join_tokens(words.decode(h[0].tokens))
    return cands


def _finisher(model: ModelArg, cfg: dict, have: dict, features: str) -> Finisher | None:
    """What turns a trunk store's maps into the model's grids (its encoder's last units, tuned or not), or None for
    a store of grids, which must then come from the model's own encoder: the packaged one, not a tuned one."""
    try:
        tuned = read_encoder_file(encoder_dir(model[0] if several(model) else model), cfg)
    except EncoderFileError as e:
        raise ModelDirError(str(e)) from None
    if not have.get("cut"):
        if tuned is not None:
            raise ValueError(f"{features}: grids of the packaged encoder, but this model's encoder was fine-tuned (its "
                             f"last {tuned[1]} units); evaluate it on a trunk store: `captioner features --corpus "
                             f"CORPUS.json --out DIR --cut {tuned[1]}`")
        return None
    spec = get_encoder_spec(have["name"], resize=have.get("resize"), image_size=have.get("image_size"),
                            grid=have.get("grid"))
    try:
        check_trunk(spec, have, f"{features}/meta.json")
        return Finisher(spec, have["cut"], have["trunk_grid"], tuned)
    except TailError as e:
        raise ValueError(f"{features}: {e}") from None


def markdown_table(rows: dict[int, dict[str, float]], *, title: str = "") -> str:
    """rows: beam size -> scores in [0,1]. Percentages with one decimal, as papers print them."""
    names = [m for m in METRIC_NAMES if any(m in r for r in rows.values())]
    lines = [f"**{title}**", ""] if title else []
    lines.append("| beam | " + " | ".join(names) + " |")
    lines.append("|---:|" + "---:|" * len(names))
    for beam, r in rows.items():
        lines.append(f"| {beam} | " + " | ".join(f"{100 * r[m]:.1f}" if m in r else "n/a" for m in names) + " |")
    return "\n".join(lines) + "\n"


def evaluate_model(model: ModelArg, corpus: str, features: str, *, split: str = "test",
                   beams: Sequence[int] = EVALUATION_BEAMS, out: str | None = None, limit: int = 0,
                   metrics: Sequence[str] | None = None, device: str = "cpu", precision: str = "auto",
                   **decoding) -> dict:
    """Decode ``split`` at each beam size as `captioner caption` does (the model's decoding defaults, with
    ``decoding`` overrides such as ``length_penalty=1.0`` or ``allow_unk=True``; None keeps the default)
    and score it. ``device`` (cpu, cuda, auto) and ``precision`` (auto, fp32, bf16): where and how the decoder
    runs (auto: as `captioner caption` runs it, :func:`captioner.runtime.devices.split_precision`)."""
    dev = resolve_device(device)
    precision = split_precision(precision, dev)[1]
    decoder, vocab, cfg, extension = load_model(model)  # a list of models: one ensemble
    decoder.to(dev)
    guide = Guide(decoder, vocab, cfg, extension)
    store = FeatureStore.open(features)
    have, want = store.meta["encoder"], cfg["encoder"]
    for key in ("name", "image_size", "grid", "resize", "mean", "std"):
        if have.get(key) != want.get(key):
            raise ValueError(f"{features}: features made with encoder {key}={have.get(key)!r}, but the model "
                             f"was trained with {want.get(key)!r}; run `captioner features` with the model's "
                             "encoder settings")
    data = CaptionData(Corpus.load(corpus), vocab, store, split, 10_000)
    data.finish = _finisher(model, cfg, have, features)
    if data.finish is not None:  # the encoder's last units run where the decoder runs
        data.finish.to(dev)
    # decoded as `captioner caption` decodes with this model, at each beam size
    base = DecodingSettings.from_model(cfg).replace(**decoding)
    result = {"model": model_name(model), "split": split, "unk_allowed": base.allow_unk,
              "images": min(limit, len(data.images)) if limit else len(data.images),
              "precision": precision,
              "decoding": {"length_penalty": base.length_penalty, "no_repeat_ngram": base.no_repeat_ngram,
                           **({"concepts": base.concepts, "concept_threshold": base.concept_threshold,
                               "max_concepts": base.max_concepts, "concept_ban": base.concept_ban,
                               "concept_margin": base.concept_margin} if base.concepts != "off" else {}),
                           **({"mention": list(base.mention)} if base.mention else {})},
              "beams": {}, "seconds": {}, "captions": {}}
    for k in beams:
        t0 = time.perf_counter()
        try:
            scores, cands, unavailable = evaluate_split(decoder, vocab, data, base.replace(beam_size=k),
                                                        metrics=metrics, limit=limit, precision=precision,
                                                        guide=guide)
        except NonFiniteError as e:  # a damaged model: named as the user gave it
            raise e.naming(model_name(model)) from None
        result["beams"][k] = scores
        result["seconds"][k] = round(time.perf_counter() - t0, 1)
        result["captions"][k] = cands
    result["unavailable"] = unavailable
    result["markdown"] = markdown_table(result["beams"], title=f"{short_name(model)} on {split} "
                                                              f"({result['images']} images)")
    for name, why in result["unavailable"].items():
        result["markdown"] += f"\n{name}: not computed: {why}\n"
    if out:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        # each file complete or absent: written to a temporary file, then renamed
        write_text_atomic(o / "metrics.json", json.dumps({k: v for k, v in result.items() if k != "captions"}, indent=2))
        write_text_atomic(o / "captions.json", json.dumps(result["captions"], indent=1))
        write_text_atomic(o / "metrics.md", result["markdown"])
    return result


