"""COCO and Flickr30k readiness: the files of the large datasets, as they are laid out, prepare correctly.

Fixture files are written here in the exact shape of the real ones (MS-COCO 2014 and 2017
``captions_*.json``, Karpathy's ``dataset_coco.json`` and ``dataset_flickr30k.json``), small:
images with 5, 6 or 7 captions, annotations in no particular order, large image ids, the
``restval`` split of the Karpathy COCO split, images in ``train2014/`` and ``val2014/``.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from captioner.cli.main import main
from captioner.data.corpus import Corpus
from captioner.data.readers import detect_format, read_coco, read_corpus, read_karpathy
from captioner.data.text import tokenize

# real captions of COCO val2014 image 391895 and their tokens in Karpathy's dataset_coco.json
KARPATHY_TOKENS = {
    "A man with a red helmet on a small moped on a dirt road. ":
        ["a", "man", "with", "a", "red", "helmet", "on", "a", "small", "moped", "on", "a", "dirt", "road"],
    "Man riding a motor bike on a dirt road on the countryside.":
        ["man", "riding", "a", "motor", "bike", "on", "a", "dirt", "road", "on", "the", "countryside"],
    "A man riding on the back of a motorcycle.":
        ["a", "man", "riding", "on", "the", "back", "of", "a", "motorcycle"],
    "A dirt path with a young person on a motor bike rests to the foreground of a verdant area with a "
    "bridge and a background of cloud-wreathed mountains. ":
        ["a", "dirt", "path", "with", "a", "young", "person", "on", "a", "motor", "bike", "rests", "to", "the",
         "foreground", "of", "a", "verdant", "area", "with", "a", "bridge", "and", "a", "background", "of",
         "cloud", "wreathed", "mountains"],
    "A man in a red shirt and a red hat is on a motorcycle on a hill side.":
        ["a", "man", "in", "a", "red", "shirt", "and", "a", "red", "hat", "is", "on", "a", "motorcycle", "on",
         "a", "hill", "side"],
}

_JPEG = None


def _jpeg() -> bytes:
    global _JPEG
    if _JPEG is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 6), (20, 120, 200)).save(buf, format="JPEG")
        _JPEG = buf.getvalue()
    return _JPEG


def _caption(image_id: int, k: int) -> str:
    return f"A photo number {image_id} with caption {k} of it."


def coco_images(n_train: int = 6, n_val: int = 8, year: int = 2014) -> list[dict]:
    """Images as the COCO files list them: ids are large and unordered, 5 to 7 captions each."""
    rng = random.Random(year)
    out = []
    for part, n in (("train", n_train), ("val", n_val)):
        for _ in range(n):
            image_id = rng.randrange(1, 581_929)
            while any(im["id"] == image_id for im in out):
                image_id = rng.randrange(1, 581_929)
            name = (f"COCO_{part}{year}_{image_id:012d}.jpg" if year == 2014 else f"{image_id:012d}.jpg")
            out.append({"part": f"{part}{year}", "id": image_id, "file_name": name,
                        "captions": [_caption(image_id, k) for k in range(rng.choice((5, 5, 5, 6, 7)))]})
    out[0]["captions"] = list(KARPATHY_TOKENS)  # real captions, checked against Karpathy's tokens
    return out


def write_coco(root: Path, images: list[dict]) -> list[Path]:
    """captions_<part>.json files (annotations shuffled across images) and the image folders."""
    files = []
    for part in sorted({im["part"] for im in images}):
        mine = [im for im in images if im["part"] == part]
        anns = [{"image_id": im["id"], "caption": c} for im in mine for c in im["captions"]]
        random.Random(part).shuffle(anns)
        for k, a in enumerate(anns):
            a["id"] = 700_000 + k
        data = {"info": {"year": 2014}, "licenses": [],
                "images": [{"license": 3, "file_name": im["file_name"], "height": 6, "width": 8, "id": im["id"]}
                           for im in mine],
                "annotations": anns}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        path = root / "annotations" / f"captions_{part}.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        files.append(path)
        for im in mine:
            (root / part).mkdir(parents=True, exist_ok=True)
            (root / part / im["file_name"]).write_bytes(_jpeg())
    return files


def karpathy_split(images: list[dict]) -> dict[str, str]:
    """Karpathy's COCO split: every train2014 image is train; val2014 images are val, test or restval."""
    cycle = ["val", "test", "restval", "restval"]
    split, k = {}, 0
    for im in images:
        if im["part"].startswith("train"):
            split[im["file_name"]] = "train"
        else:
            split[im["file_name"]] = cycle[k % len(cycle)]
            k += 1
    return split


def write_karpathy_coco(path: Path, images: list[dict]) -> Path:
    split = karpathy_split(images)
    entries, sentid = [], 0
    for imgid, im in enumerate(images):
        sentences = []
        for raw in im["captions"]:
            sentences.append({"tokens": tokenize(raw), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        entries.append({"filepath": im["part"], "sentids": [s["sentid"] for s in sentences],
                        "filename": im["file_name"], "imgid": imgid, "split": split[im["file_name"]],
                        "sentences": sentences, "cocoid": im["id"]})
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- MS-COCO captions_*.json


@pytest.mark.parametrize("year", [2014, 2017])
def test_coco_captions_files_join_captions_to_images_by_id(tmp_path, year):
    images = coco_images(year=year)
    files = write_coco(tmp_path / "coco", images)
    corpus = read_coco(files, tmp_path / "coco")
    assert corpus.report.problems() == [] and corpus.report.skipped_images == []
    got = {it.image: it for it in corpus.items}
    assert len(got) == len(images)
    for im in images:
        item = got[f"{im['part']}/{im['file_name']}"]  # the part's folder, from the file name
        assert item.split == im["part"][:-4]  # train2014 -> train, val2017 -> val
        # every caption of the image, found by its image id among shuffled annotations, none lost
        assert sorted(item.captions) == sorted(c.strip() for c in im["captions"])
    hist = Counter(len(im["captions"]) for im in images)
    assert corpus.report.captions_per_image == {str(k): hist[k] for k in sorted(hist)}
    assert min(hist) == 5 and max(hist) > 5  # the fixture has images with more than 5 captions
    assert corpus.report.images_per_split == {"train": 6, "val": 8, "test": 0}


def test_coco_without_part_folders_reads_images_from_the_root(tmp_path):
    images = coco_images(n_train=2, n_val=2)
    files = write_coco(tmp_path / "coco", images)
    flat = tmp_path / "flat"
    flat.mkdir()
    for im in images:  # all images in one folder, as some mirrors ship them
        (flat / im["file_name"]).write_bytes(_jpeg())
    corpus = read_coco(files, flat)
    assert sorted(it.image for it in corpus.items) == sorted(im["file_name"] for im in images)
    assert corpus.report.problems() == []


def test_prepare_coco_command(tmp_path, capsys):
    images = coco_images()
    train_file, val_file = write_coco(tmp_path / "coco", images)
    assert detect_format(train_file) == "coco"
    out = tmp_path / "prep"
    assert main(["prepare", "coco", str(train_file), str(val_file), "--images", str(tmp_path / "coco"),
                 "--out", str(out), "--min-freq", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["images_per_split"] == {"train": 6, "val": 8, "test": 0}
    assert sum(int(k) * v for k, v in report["captions_per_image"].items()) == sum(len(im["captions"])
                                                                                  for im in images)
    corpus = Corpus.load(out / "corpus.json")
    assert corpus.name == "coco" and len(corpus.items) == 14


# --------------------------------------------------------------------------- Karpathy dataset_coco.json


def test_karpathy_coco_restval_joins_train_and_every_caption_is_kept(tmp_path):
    images = coco_images()
    write_coco(tmp_path / "coco", images)  # the image folders
    path = write_karpathy_coco(tmp_path / "dataset_coco.json", images)
    assert detect_format(path) == "karpathy"
    split = karpathy_split(images)
    n = Counter(split.values())
    assert n["restval"] >= 2  # the fixture has restval images to move

    corpus = read_karpathy(path, tmp_path / "coco")
    assert corpus.name == "coco" and corpus.report.problems() == []
    assert corpus.report.images_per_split == {"train": n["train"] + n["restval"], "val": n["val"],
                                              "test": n["test"]}
    by_image = {it.image: it for it in corpus.items}
    for im in images:
        item = by_image[f"{im['part']}/{im['file_name']}"]
        want_split = split[im["file_name"]]
        assert item.split == ("train" if want_split == "restval" else want_split)
        assert item.captions == [c.strip() for c in im["captions"]]  # 5, 6 or 7: none dropped
        assert corpus.image_path(item) == (tmp_path / "coco" / im["part"] / im["file_name"]).absolute()
    # our tokens are Karpathy's, on real COCO captions
    first = by_image[f"{images[0]['part']}/{images[0]['file_name']}"]
    assert first.tokens == list(KARPATHY_TOKENS.values())

    kept = read_karpathy(path, tmp_path / "coco", restval="keep")
    assert kept.report.images_per_split == {"train": n["train"], "val": n["val"], "test": n["test"],
                                            "restval": n["restval"]}


def test_karpathy_coco_and_the_official_files_agree_image_by_image(tmp_path):
    """The same image (by COCO id: Karpathy's cocoid, the official files' image_id) gets the same path
    and the same captions from both sources."""
    images = coco_images()
    files = write_coco(tmp_path / "coco", images)
    karpathy = read_karpathy(write_karpathy_coco(tmp_path / "dataset_coco.json", images), tmp_path / "coco")
    official = read_coco(files, tmp_path / "coco")
    k = {it.image: sorted(it.captions) for it in karpathy.items}
    o = {it.image: sorted(it.captions) for it in official.items}
    assert k == o and len(k) == len(images)
    entries = json.loads((tmp_path / "dataset_coco.json").read_text())["images"]
    cocoid = {f"{e['filepath']}/{e['filename']}": e["cocoid"] for e in entries}
    for f in files:
        data = json.loads(f.read_text())
        part = f.stem.split("_")[-1]
        for im in data["images"]:
            assert cocoid[f"{part}/{im['file_name']}"] == im["id"]


def test_prepare_karpathy_coco_command_with_restval_kept(tmp_path):
    images = coco_images()
    write_coco(tmp_path / "coco", images)
    path = write_karpathy_coco(tmp_path / "dataset_coco.json", images)
    n = Counter(karpathy_split(images).values())
    for restval, out in (("train", tmp_path / "merged"), ("keep", tmp_path / "kept")):
        assert main(["prepare", "karpathy", str(path), "--images", str(tmp_path / "coco"), "--out", str(out),
                     "--restval", restval, "--min-freq", "1"]) == 0
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())["images_per_split"]
    kept = json.loads((tmp_path / "kept" / "report.json").read_text())["images_per_split"]
    assert merged == {"train": n["train"] + n["restval"], "val": n["val"], "test": n["test"]}
    assert kept == {"train": n["train"], "val": n["val"], "test": n["test"], "restval": n["restval"]}
    # the vocabulary is built from train: restval captions count only when merged into train
    vocab_merged, vocab_kept = (json.loads((tmp_path / d / "vocab.json").read_text())["itos"]
                                for d in ("merged", "kept"))
    assert len(vocab_merged) > len(vocab_kept)


# --------------------------------------------------------------------------- Karpathy dataset_flickr30k.json


def test_karpathy_flickr30k(tmp_path):
    rng = random.Random(30)
    names = [f"{rng.randrange(10**9, 10**10)}.jpg" for _ in range(9)]
    splits = ["train"] * 5 + ["val"] * 2 + ["test"] * 2
    entries = []
    for imgid, (name, split) in enumerate(zip(names, splits)):
        caps = [f"Person {imgid} does thing number {k} ." for k in range(5)]
        entries.append({"sentids": list(range(5 * imgid, 5 * imgid + 5)), "imgid": imgid, "split": split,
                        "filename": name,
                        "sentences": [{"tokens": tokenize(c), "raw": c, "imgid": imgid, "sentid": 5 * imgid + k}
                                      for k, c in enumerate(caps)]})
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}), encoding="utf-8")
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    for name in names:
        (images / name).write_bytes(_jpeg())
    corpus = read_corpus("auto", path, images)
    assert corpus.name == "flickr30k" and corpus.report.problems() == []
    assert [it.image for it in corpus.items] == names  # no filepath: names relative to the image folder
    assert [it.split for it in corpus.items] == splits
    assert corpus.report.images_per_split == {"train": 5, "val": 2, "test": 2}
    assert corpus.report.captions_per_image == {"5": 9}
    assert all(it.tokens == [s["tokens"] for s in e["sentences"]] for it, e in zip(corpus.items, entries))
