"""The measured inputs of docs/scaling.md: per-image encoder costs, and the trainer's memory at MS-COCO size.

(a) encoders: for EfficientNet-Lite0 at 224 px (7x7 grid), Lite1 at 240 (8x8), Lite2 at 260 (9x9) and
    Lite0 at 448 (14x14): bytes per image in a store, floating-point operations per image (counted,
    so exact on any machine), the fastest of 5 timings of decoding + resizing a COCO-sized JPEG
    (640x480, made from examples/) and of the network on batches of 8 photos (the first N of
    Flickr8k, or synthetic images when the dataset is absent); then ``extract_features`` end to end
    at Lite0/224 on those N photos (the project's Flickr8k copy is pre-resized to 224 px). Timings on
    a busy machine are not measurements: the load average before the run is printed.
(b) trainer memory: a corpus of COCO's size (123,287 images, Karpathy split 113,287 / 5,000 / 5,000,
    5 captions of 8-16 words each, a 10,000-word vocabulary) and a *sparse* feature store of its
    shape (nothing written: rows are memory-mapped like a real store's); the process's private
    memory (RssAnon), the store pages it maps (RssFile, page cache the kernel can drop) and its
    peak (VmHWM) after loading the corpus, building the training and validation data as
    ``captioner train`` does, and reading 200 batches of 64 captions.

    python bench/coco_scale.py [--n 48] [--flickr8k ../shared/datasets/flickr8k] [--skip-memory] [--threads 1]

Prints one JSON object (takes 1-3 minutes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from captioner.data.captions import CaptionData
from captioner.data.corpus import Corpus
from captioner.data.features import DONE, FORMAT, VERSION, FeatureStore, fingerprint
from captioner.data.images import load_image
from captioner.data.synthetic import make_shapes_dataset
from captioner.data.text import Vocab
from captioner.encoders.extract import extract_features
from captioner.encoders.network import ImageEncoder, get_encoder_spec, image_to_array

COCO_IMAGES, COCO_VAL, COCO_TEST = 123_287, 5_000, 5_000


def memory_mib() -> dict:
    """Private memory of this process (RssAnon: what it really needs), file pages it maps (RssFile: the
    store's memory map, page cache the kernel can drop), and the peak resident size so far (VmHWM)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def photos(n: int, flickr8k: Path, tmp: Path) -> tuple[Path, list[str], str]:
    folder = flickr8k / "Flicker8k_Dataset"
    if folder.is_dir():
        names = sorted(p.name for p in folder.glob("*.jpg"))[:n]
        return folder, names, f"first {len(names)} Flickr8k photos"

    make_shapes_dataset(tmp / "shapes", n, size=256, seed=0)
    folder = tmp / "shapes" / "images"
    return folder, sorted(p.name for p in folder.glob("*.png")), f"{n} synthetic 256 px images"


def coco_like_jpegs() -> list[bytes]:
    """COCO's photos are JPEGs of about 640x480: the example photos at that size, both orientations.
    (The project's Flickr8k copy is pre-resized to 224x224, far cheaper to decode than real photos.)"""
    examples = Path(__file__).resolve().parents[1] / "examples"
    out = []
    for path in sorted(examples.glob("*.*")):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        img = Image.open(path).convert("RGB")
        for size in ((640, 480), (480, 640)):
            buf = io.BytesIO()
            img.resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def encoder_costs(n: int, flickr8k: Path, tmp: Path, reps: int = 5) -> dict:
    """Per image: the network's floating-point operations (counted, exact), decoding + resizing (PIL)
    and the network on batches of 8 (the fastest of ``reps`` interleaved repetitions: the minimum
    filters out some of the other work on the machine). Then ``extract_features`` end to end at
    Lite0/224 (decoding in a worker process overlaps the network)."""
    folder, names, what = photos(n, flickr8k, tmp)
    for name in names:  # warm the page cache
        (folder / name).read_bytes()
    jpegs = coco_like_jpegs()
    configs = [("efficientnet-lite0", 224), ("efficientnet-lite1", 240), ("efficientnet-lite2", 260),
               ("efficientnet-lite0", 448)]
    specs = {c: get_encoder_spec(c[0], image_size=c[1]) for c in configs}
    encoders = {c: ImageEncoder(specs[c]) for c in configs}
    batch = [load_image(folder / name) for name in names[:8]]
    arrays = {c: encoders[c].preprocess(batch) for c in configs}
    decode = {c: [] for c in configs}
    network = {c: [] for c in configs}
    flops = {}
    for c in configs:
        with FlopCounterMode(display=False) as counter:
            encoders[c].encode_arrays(arrays[c][:1])
        flops[c] = counter.get_total_flops()
        encoders[c].encode_arrays(arrays[c])  # warm-up
    for _ in range(reps):
        for c in configs:
            t0 = time.perf_counter()
            for jpeg in jpegs:
                image_to_array(load_image(jpeg), specs[c])
            decode[c].append((time.perf_counter() - t0) / len(jpegs))
            t0 = time.perf_counter()
            encoders[c].encode_arrays(arrays[c])
            network[c].append((time.perf_counter() - t0) / len(batch))
    out = {"images": what, "decoded": f"{len(jpegs)} JPEGs of 640x480 or 480x640 (quality 90) made from examples/",
           "repetitions": reps}
    for c in configs:
        spec = specs[c]
        out[f"{c[0]}@{c[1]}"] = {"grid": list(spec.grid), "channels": spec.channels,
                                 "bytes_per_image": spec.grid[0] * spec.grid[1] * spec.channels * 2,
                                 "gflop_per_image": round(flops[c] / 1e9, 3),
                                 "decode_resize_ms_per_image": round(1000 * min(decode[c]), 2),
                                 "network_ms_per_image": round(1000 * min(network[c]), 2),
                                 "network_ms_per_image_median": round(1000 * float(np.median(network[c])), 2)}
    base = out["efficientnet-lite0@224"]["network_ms_per_image"]
    for c in configs:
        out[f"{c[0]}@{c[1]}"]["network_cost_vs_lite0_224"] = round(out[f"{c[0]}@{c[1]}"]["network_ms_per_image"]
                                                                  / base, 2)
    s = extract_features(folder, names, tmp / "e2e", progress=False)
    out["extract_features_lite0_224_images_per_second"] = s["images_per_second"]
    return out


def trainer_memory(tmp: Path) -> dict:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(10_000)]
    weights = [1 / (k + 1) for k in range(len(words))]  # Zipf-like, as real captions
    splits = ["val"] * COCO_VAL + ["test"] * COCO_TEST + ["train"] * (COCO_IMAGES - COCO_VAL - COCO_TEST)
    items = []
    for i, split in enumerate(splits):
        caps = [rng.choices(words, weights, k=rng.randint(8, 16)) for _ in range(5)]
        items.append({"image": f"train2014/COCO_train2014_{i:012d}.jpg", "split": split,
                      "captions": [" ".join(c) for c in caps], "tokens": caps})
    corpus_path = tmp / "corpus.json"
    corpus_path.write_text(json.dumps({"format": "captioner-corpus", "version": 1, "name": "coco-sized",
                                       "image_root": str(tmp / "images"), "items": items, "report": {}}))
    del items
    Vocab.build([w.split() for w in words] * 5).save(tmp / "vocab.json")
    spec = get_encoder_spec("efficientnet-lite0")
    shape = (COCO_IMAGES, 49, spec.channels)
    store = tmp / "store"
    store.mkdir()
    names = [f"train2014/COCO_train2014_{i:012d}.jpg" for i in range(COCO_IMAGES)]
    np.lib.format.open_memmap(store / "features.npy", mode="w+", dtype=np.float16, shape=shape).flush()  # sparse
    status = np.lib.format.open_memmap(store / "status.npy", mode="w+", dtype=np.uint8, shape=(COCO_IMAGES,))
    status[:] = DONE
    status.flush()
    (store / "index.json").write_text(json.dumps({"images": names}))
    (store / "meta.json").write_text(json.dumps({
        "format": FORMAT, "version": VERSION, "encoder": spec.to_dict(), "shape": list(shape), "dtype": "float16",
        "image_root": str(tmp / "images"), "fingerprint": fingerprint(spec.to_dict(), names, tmp / "images"),
        "precision": "fp32", "complete": True}))
    out = {"corpus_json_mib": round(corpus_path.stat().st_size / 2**20, 1),
           "store_features_npy_gib_if_written": round(np.prod(shape) * 2 / 2**30, 2), "memory_mib": {}}
    out["memory_mib"]["start"] = memory_mib()
    t0 = time.perf_counter()
    corpus = Corpus.load(corpus_path)
    vocab = Vocab.load(tmp / "vocab.json")
    fs = FeatureStore.open(store)
    out["memory_mib"]["corpus_loaded"] = memory_mib()
    train = CaptionData(corpus, vocab, fs, "train", 30)
    val = CaptionData(corpus, vocab, fs, "val", 30)
    out["seconds_to_load_and_build"] = round(time.perf_counter() - t0, 1)
    out["train_captions"], out["val_images"] = len(train), len(val.images)
    out["memory_mib"]["train_and_val_data_built"] = memory_mib()
    rng_np = np.random.default_rng(0)
    batches = train.batches(64, rng_np)
    for idx in batches[:200]:
        train.batch(idx)
    out["memory_mib"]["after_200_batches_of_64"] = memory_mib()
    out["batches_per_epoch"] = len(batches)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--flickr8k", type=Path, default=Path("../shared/datasets/flickr8k"))
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core); "
                    "1 suffers far less from other work on the machine")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # extract_features' decoding worker
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        res = {"encoders": encoder_costs(a.n, a.flickr8k, tmp / "enc")}
        if not a.skip_memory:
            (tmp / "mem").mkdir()
            res["trainer_memory_coco_size"] = trainer_memory(tmp / "mem")
    res.update(cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
               python=platform.python_version(), load_average_before=round(load_before, 2))
    json.dump(res, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
