"""Decoding speed of an ensemble against its single member: images/s of the search alone (encoder features given).

    .venv/bin/python bench/ensemble_decode.py                       # the bundled model, and it twice as an ensemble
    .venv/bin/python bench/ensemble_decode.py --model runs/a/best --model runs/b/best --images 64 --beam 3

The features are the bundled encoder's grids of the example photos, repeated to ``--images``; each setting is
decoded ``--repeats`` times after one warm-up and the best time kept. Guided search (concepts) is off, so the
figure is the engine's: an ensemble of M members runs M decoders per step. Prints one JSON object: images/s
per model and the ratio, the machine's load average before and after (a load well above 0 means the figures
share the cores with other work).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image

from captioner.inference.captioner import Captioner

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def features(model: Captioner, n: int) -> torch.Tensor:
    photos = [Image.open(p).convert("RGB") for p in sorted(EXAMPLES.glob("*.png"))[:8]]
    grids = model.encoder.encode(photos)
    return grids.repeat((n + len(grids) - 1) // len(grids), 1, 1)[:n]


def speed(model: Captioner, feats: torch.Tensor, repeats: int, **settings) -> float:
    model.decode_features(feats[:4], **settings)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.decode_features(feats, **settings)
        best = min(best, time.perf_counter() - t0)
    return len(feats) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None, help="members (default: the bundled model twice)")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    members = a.model or ["flickr8k-sat", "flickr8k-sat"]
    load_before = os.getloadavg()[0]
    single, ensemble = Captioner.from_pretrained(members[0]), Captioner.from_pretrained(members)
    feats = features(single, a.images)
    settings = dict(beam_size=a.beam, concepts="off", n_best=1)
    one = speed(single, feats, a.repeats, **settings)
    many = speed(ensemble, feats, a.repeats, **settings)
    print(json.dumps({"members": members, "images": a.images, "beam": a.beam, "grid": list(feats.shape[1:]),
                      "single_images_per_s": round(one, 2), "ensemble_images_per_s": round(many, 2),
                      "ensemble_over_single": round(many / one, 3), "cores": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                      "load_average_before": round(load_before, 2),
                      "load_average_after": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
