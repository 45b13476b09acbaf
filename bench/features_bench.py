"""Feature-extraction throughput: a plain tutorial-style loop vs ``captioner.encoders.extract.extract_features``.

Both encode the first N images (sorted names) of Flickr8k with EfficientNet-Lite0 at 224 px,
in the same process, after a warm-up, and the script prints ONE JSON object on stdout.

(a) reference: single-threaded PIL decode + bicubic resize to 224x224 + (x-127)/128, eager
    un-fused Lite0 forward in batches of 32, features kept in memory as float16.
(b) ours: ``extract_features`` with its default settings, into a temporary directory.

Both timings include building the network (weights load; for (b) also BN folding) and reading
the images; the page cache is warmed for every image first so neither run pays for cold I/O.

    python bench/features_bench.py [--n 500] [--flickr8k ../shared/datasets/flickr8k]
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioner.data.features import FeatureStore
from captioner.encoders.extract import extract_features
from captioner.encoders.network import get_encoder_spec

REPO = Path(__file__).resolve().parents[1]
ENCODER = "efficientnet-lite0"
SIZE = 224
REF_BATCH = 32


def reference_loop(paths: list[Path]) -> np.ndarray:
    """What a tutorial writes: decode, resize, normalise, batch, forward; no workers, no fusion."""
    net = get_encoder_spec(ENCODER).build().eval()  # plain EfficientNet-Lite0 trunk with ImageNet weights
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), REF_BATCH):
            arrs = []
            for p in paths[i : i + REF_BATCH]:
                with Image.open(p) as im:
                    arrs.append(np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)))
            x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
            x = (x - 127.0) / 128.0
            fmap = net(x)  # (B, 1280, 7, 7)
            out.append(fmap.flatten(2).transpose(1, 2).numpy().astype(np.float16))
    return np.concatenate(out)


def ours(root: Path, names: list[str], out_dir: Path) -> dict:
    return extract_features(root, names, out_dir, encoder=ENCODER, progress=False)


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flickr8k", type=Path, default=REPO.parent / "shared" / "datasets" / "flickr8k",
                    help="Flickr8k folder holding Flicker8k_Dataset/ (default: ../shared/datasets/flickr8k)")
    ap.add_argument("--n", type=int, default=500, help="number of images (first N sorted names)")
    ap.add_argument("--warmup", type=int, default=REF_BATCH, help="images used for the warm-up of each method")
    a = ap.parse_args(argv)

    root = a.flickr8k / "Flicker8k_Dataset"
    if not root.is_dir():
        ap.error(f"{root} not found")
    names = sorted(p.name for p in root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: a.n]
    if len(names) < a.n:
        print(f"warning: only {len(names)} images in {root}", file=sys.stderr)
    paths = [root / n for n in names]
    for p in paths:  # warm the page cache: both runs read from memory
        p.read_bytes()

    defaults = {k: v.default for k, v in inspect.signature(extract_features).parameters.items()
                if v.default is not inspect.Parameter.empty}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="features_bench_") as tmp:
        tmp = Path(tmp)
        # warm-up: kernels, allocator, oneDNN primitive caches, imports (DataLoader etc.)
        reference_loop(paths[: a.warmup])
        ours(root, names[: a.warmup], tmp / "warmup")

        ref_feats, ref_s = timed(reference_loop, paths)
        summary, our_s = timed(ours, root, names, tmp / "store")

        store = FeatureStore.open(tmp / "store")
        ok = store.status == 1
        max_diff = float(np.abs(store.features[ok].astype(np.float32) - ref_feats[ok].astype(np.float32)).max())

    n = len(names)
    result = {
        "benchmark": "feature extraction throughput",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "encoder": ENCODER,
        "image_size": SIZE,
        "n_images": n,
        "dataset": str(root),
        "reference": {
            "what": "single-threaded PIL decode+resize, eager un-fused Lite0 forward, same process",
            "batch_size": REF_BATCH,
            "seconds": round(ref_s, 2),
            "img_per_s": round(n / ref_s, 2),
        },
        "extract_features": {
            "what": "captioner.encoders.extract.extract_features, default settings, into a temp dir",
            "batch_size": defaults["batch_size"],
            "workers": defaults["workers"],
            "seconds": round(our_s, 2),
            "img_per_s": round(n / our_s, 2),
            "img_per_s_reported": summary["images_per_second"],
            "failed": summary["failed"],
        },
        "speedup_ours_vs_reference": round(ref_s / our_s, 3),  # >1: extract_features is faster
        "max_abs_diff_vs_reference": round(max_diff, 4),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_1m_before": round(load_before, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
