"""Choose the concept settings on development data: score a model's captions under each setting in a grid.

Decodes the images of one split of a prepared corpus (its cached features) with the model's decoding defaults
and each combination of the concept settings given, scores them with pycocoevalcap, and prints one JSON line
per combination (the settings, the metrics, how many captions changed against concepts off, and seconds).
Use it on development data only (Flickr8k val, coco-dev): the test split is scored once per model, by
`captioner evaluate`.

    python scripts/concept_sweep.py --model flickr8k-sat --corpus work/coco-dev/corpus.json \
        --features work/coco-lite0 --split test --threshold 0.3 0.5 --max-concepts 1 2 --ban 0 0.02
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from captioner.data.captions import CaptionData
from captioner.data.corpus import Corpus
from captioner.data.features import FeatureStore
from captioner.evaluation.evaluate import evaluate_split
from captioner.inference.captioner import Captioner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="flickr8k-sat")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--threshold", type=float, nargs="+", default=[0.5])
    ap.add_argument("--max-concepts", type=int, nargs="+", default=[1])
    ap.add_argument("--ban", type=float, nargs="+", default=[0.0])
    ap.add_argument("--margin", type=float, nargs="+", default=[10.0])
    ap.add_argument("--length-penalty", type=float, nargs="+", default=[None])
    ap.add_argument("--metrics", nargs="+", default=["BLEU-4", "METEOR", "CIDEr-D"])
    ap.add_argument("--show", type=int, default=0, help="print this many changed captions per setting")
    a = ap.parse_args()

    model = Captioner.from_pretrained(a.model)
    data = CaptionData(Corpus.load(a.corpus), model.vocab, FeatureStore.open(a.features), a.split, 10_000)

    def run(**overrides) -> tuple[dict, dict, float]:
        s = model.decoding_settings(beam_size=a.beam, **overrides)
        t0 = time.perf_counter()
        scores, cands, _ = evaluate_split(model.decoder, model.vocab, data, s, metrics=a.metrics, guide=model.guide)
        return {k: round(100 * v, 2) for k, v in scores.items()}, cands, time.perf_counter() - t0

    for lp in a.length_penalty:
        off_scores, off, secs = run(concepts="off", length_penalty=lp)
        print(json.dumps({"concepts": "off", "length_penalty": lp, **off_scores, "seconds": round(secs, 1)}),
              flush=True)
        for th, mc, ban, margin in itertools.product(a.threshold, a.max_concepts, a.ban, a.margin):
            scores, cands, secs = run(concepts="auto", concept_threshold=th, max_concepts=mc, concept_ban=ban,
                                      concept_margin=margin, length_penalty=lp)
            changed = [k for k in cands if cands[k] != off[k]]
            print(json.dumps({"concepts": "auto", "threshold": th, "max_concepts": mc, "ban": ban, "margin": margin,
                              "length_penalty": lp, **scores, "changed": len(changed), "seconds": round(secs, 1)}),
                  flush=True)
            for k in changed[:a.show]:
                print(f"   {k}: {off[k]!r} -> {cands[k]!r}")


if __name__ == "__main__":
    main()
