"""The README's architecture comparison: for each trained model directory, its size, training
time to the best validation epoch, training speed, `caption` speed and test scores at beam 3.

    python scripts/architecture_table.py runs/flickr8k-{sat,bahdanau-gru,gru-residual,merge,transformer}/best \\
        --corpus work/f8k-eval/corpus.json --features work/f8k-lite0 --images $F8K/Flicker8k_Dataset \\
        [--caption-images 200] [--out bench/architectures.json]

Training figures come from the run's metrics.jsonl beside best/ (a bundled model has none; they
are then taken from its config.json's "timings" note by hand). `caption` images/s is measured
end to end (image decoding, encoder, beam 3 decoding) with `Captioner.caption` on the first N
test images, after a warm-up; run it on an otherwise idle machine. Prints JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from captioner.data.corpus import Corpus
from captioner.evaluation.evaluate import evaluate_model
from captioner.inference.captioner import Captioner

METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]


def training_figures(run: Path, metric: str = "CIDEr-D") -> dict:
    log = run / "metrics.jsonl"
    if not log.exists():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    best = max(rows, key=lambda r: r["val"].get(metric, float("-inf")))
    upto = [r for r in rows if r["epoch"] <= best["epoch"]]
    return {"epochs_run": len(rows), "best_epoch": best["epoch"], "val_" + metric: best["val"][metric],
            "minutes_to_best": round(sum(r["train_seconds"] + r["val_seconds"] for r in upto) / 60, 1),
            "train_captions_per_s": round(statistics.median(r["captions_per_s"] for r in rows), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model directories (runs/NAME/best) or bundled names")
    ap.add_argument("--corpus", required=True, help="corpus.json with every reference (work/f8k-eval)")
    ap.add_argument("--features", required=True)
    ap.add_argument("--images", required=True, help="the Flickr8k image folder, for the caption speed")
    ap.add_argument("--caption-images", type=int, default=200)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    test_images = [str(Path(a.images) / it.image) for it in Corpus.load(a.corpus).split("test")][:a.caption_images]
    rows = []
    for m in a.models:
        cap = Captioner.from_pretrained(m)
        row = {"model": m, "arch": cap.config["arch"],
               "parameters": sum(p.numel() for p in cap.decoder.parameters()),
               "trainable": sum(p.numel() for p in cap.decoder.parameters() if p.requires_grad)}
        row.update(training_figures(Path(m).parent))
        res = evaluate_model(m, a.corpus, a.features, split="test", beams=[a.beam], metrics=METRICS)
        row["test"] = {k: round(100 * v, 1) for k, v in res["beams"][a.beam].items()}
        cap.caption(test_images[:16], beam_size=a.beam)  # warm-up
        t0 = time.perf_counter()
        cap.caption(test_images, beam_size=a.beam)
        row["caption_images_per_s"] = round(len(test_images) / (time.perf_counter() - t0), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"load_average_before": os.getloadavg()[0], "beam": a.beam, "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    print("| architecture | parameters | minutes to best val | train captions/s | caption images/s | "
          + " | ".join(METRICS) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(METRICS))
    for r in rows:
        print(f"| `{r['arch']}` | {r['parameters'] / 1e6:.1f} M | {r.get('minutes_to_best', 'n/a')} | "
              f"{r.get('train_captions_per_s', 'n/a')} | {r['caption_images_per_s']} | "
              + " | ".join(str(r["test"].get(k, "n/a")) for k in METRICS) + " |")


if __name__ == "__main__":
    main()
