"""Dataset-scale check: the official Flickr8k text files and dataset_flickr8k.json give the same corpus.

    python scripts/check_flickr8k_prepare.py [../shared/datasets/flickr8k]

Prints one JSON object: images per split and captions per image for both readers, whether the
two corpora are equal item by item (image, split, captions, tokens), and what each reported.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from captioner.data.readers import read_flickr8k_text, read_karpathy


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / ".." / "shared"
                / "datasets" / "flickr8k")
    images = root / "Flicker8k_Dataset"
    t0 = time.perf_counter()
    text = read_flickr8k_text(root / "Flickr8k_text", images)
    t1 = time.perf_counter()
    karpathy = read_karpathy(root / "dataset_flickr8k.json", images)
    t2 = time.perf_counter()

    def describe(c, secs):
        return {"images_per_split": {k: len(v) for k, v in c.splits().items()},
                "captions_per_image": dict(Counter(len(it.captions) for it in c.items)),
                "missing_images": c.report.missing_images,
                "images_in_no_split": len(c.report.unsplit_images),
                "duplicate_captions_reported": len(c.report.duplicate_captions),
                "seconds": round(secs, 2)}

    same = [(a.image, a.split, a.captions, a.tokens) for a in text.items] == \
           [(b.image, b.split, b.captions, b.tokens) for b in karpathy.items]
    print(json.dumps({"flickr8k-text": describe(text, t1 - t0), "karpathy": describe(karpathy, t2 - t1),
                      "identical_items": same}, indent=1))


if __name__ == "__main__":
    main()
