"""Copy a trained model directory into the package as a bundled model (float16 weights),
recording its test metrics and how it was made in config.json.

    python scripts/bundle_model.py runs/flickr8k-sat-scst/best runs/flickr8k-sat-scst/test/metrics.json \
        [--name flickr8k-sat] [--note "how it was made"] [--timings timings.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from captioner.inference.captioner import Captioner
from captioner.inference.modeldir import PRETRAINED_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("test_metrics", help="metrics.json written by `captioner evaluate --out`")
    ap.add_argument("--name", default="flickr8k-sat")
    ap.add_argument("--note", default="")
    ap.add_argument("--timings", default=None, help="JSON file of step -> wall-clock description")
    a = ap.parse_args()

    model = Captioner.from_pretrained(a.model_dir)
    test = json.loads(Path(a.test_metrics).read_text())
    model.config.setdefault("metrics", {})["test"] = {
        "split": test["split"], "images": test["images"], "toolkit": "pycocoevalcap 1.2",
        "beams": test["beams"], "unk_allowed": test.get("unk_allowed", False), "decoding": test.get("decoding"),
        # reasons name paths of the machine that evaluated; keep only which metrics are missing
        "unavailable": {name: "not computed when this model was evaluated" for name in test.get("unavailable", {})},
    }
    model.config["name"] = a.name
    if a.note:
        model.config["note"] = a.note
    if a.timings:
        model.config["timings"] = json.loads(Path(a.timings).read_text())
    out = PRETRAINED_DIR / a.name
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, dtype=torch.float16)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"bundled {a.model_dir} as {out} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
