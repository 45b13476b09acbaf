"""Tests for captioner.data.corpus and captioner.data.readers (readers, validation report, save/load)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from captioner.data.corpus import Corpus, CorpusError, Item, ValidationReport, hash_split
from captioner.data.readers import (
    detect_format,
    read_coco,
    read_corpus,
    read_flickr8k_text,
    read_folder,
    read_kaggle_csv,
    read_karpathy,
)
from captioner.data.text import tokenize

# --------------------------------------------------------------------------- fixtures

# image -> split ("" = in no split file), captions #0..#n
FLICKR = {
    "111_a.jpg": ("train", ["A dog runs .", "A brown dog is running on grass .",
                            "Dog-running fast"]),
    "222_b.jpg": ("train", ["Two kids ( boys ) play # 3 .", "Children play outside"]),
    "333_c.jpg": ("val", ["A man rides a bike .", "A cyclist on a road"]),
    "444_d.jpg": ("test", ["A cat sleeps .", "The cat is sleeping on a sofa ."]),
    "555_e.jpg": ("", ["An image in no split ."]),
}
SPLIT_FILE = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
              "test": "Flickr_8k.testImages.txt"}


_TINY_JPEG = None


def _touch_images(folder: Path, names: list[str]) -> None:
    global _TINY_JPEG
    if _TINY_JPEG is None:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, format="JPEG")
        _TINY_JPEG = buf.getvalue()
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_TINY_JPEG)


def _write_flickr(root: Path, token_lines: list[str] | None = None,
                  split_order: dict[str, list[str]] | None = None) -> tuple[Path, Path]:
    """Official-release layout in ``root``; returns (text_dir, image_dir)."""
    text_dir, image_dir = root / "Flickr8k_text", root / "Flicker8k_Dataset"
    text_dir.mkdir(parents=True)
    image_dir.mkdir()
    _touch_images(image_dir, list(FLICKR))
    if token_lines is None:
        token_lines = [f"{img}#{i}\t{cap}" for img, (_, caps) in FLICKR.items()
                       for i, cap in enumerate(caps)]
    (text_dir / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n", encoding="utf-8")
    if split_order is None:
        split_order = {s: [img for img, (sp, _) in FLICKR.items() if sp == s] for s in SPLIT_FILE}
        split_order["train"].reverse()  # split-file order, not token-file order, is used
    for split, fname in SPLIT_FILE.items():
        (text_dir / fname).write_text("".join(f"{i}\n" for i in split_order[split]),
                                      encoding="utf-8")
    return text_dir, image_dir


def _karpathy_json(path: Path, images: list[tuple[str, str, list[str]]], **extra: object) -> Path:
    data = {
        "images": [
            {"filename": name, "split": split, "imgid": k,
             "sentences": [{"raw": raw, "tokens": ["WRONG"]} for raw in caps], **extra}
            for k, (name, split, caps) in enumerate(images)
        ],
        "dataset": "tiny",
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def flickr(tmp_path: Path) -> tuple[Path, Path]:
    return _write_flickr(tmp_path)


# --------------------------------------------------------------------------- Flickr8k text


def test_flickr8k_text_reader(flickr: tuple[Path, Path]) -> None:
    text_dir, image_dir = flickr
    corpus = read_flickr8k_text(text_dir, image_dir)
    assert corpus.name == "flickr8k"
    assert corpus.image_root == image_dir.absolute()
    assert [i.image for i in corpus.items] == ["222_b.jpg", "111_a.jpg", "333_c.jpg", "444_d.jpg"]
    assert [i.split for i in corpus.items] == ["train", "train", "val", "test"]
    first = corpus.items[1]
    assert first.captions == FLICKR["111_a.jpg"][1]
    assert first.tokens == [tokenize(c) for c in first.captions]
    assert first.tokens[2] == ["dog", "running", "fast"]
    rep = corpus.report
    assert rep.images_per_split == {"train": 2, "val": 1, "test": 1}
    assert rep.captions_per_image == {"2": 3, "3": 1}
    assert rep.unsplit_images == ["555_e.jpg"]
    assert rep.problems() == []
    assert corpus.image_path(first) == image_dir.absolute() / "111_a.jpg"
    assert [i.image for i in corpus.split("val")] == ["333_c.jpg"]


def test_flickr8k_text_accepts_dataset_root_and_token_file(flickr: tuple[Path, Path]) -> None:
    text_dir, image_dir = flickr
    a = read_flickr8k_text(text_dir, image_dir)
    assert read_flickr8k_text(text_dir.parent, image_dir).items == a.items
    assert read_flickr8k_text(text_dir / "Flickr8k.token.txt", image_dir).items == a.items


def test_flickr8k_numbered_key_quirk(tmp_path: Path) -> None:
    lines = [f"{img}#{i}\t{cap}" for img, (_, caps) in FLICKR.items() for i, cap in enumerate(caps)]
    lines += ["2258277193_586949ec62.jpg.1#0\tpeople waiting for the subway",
              "2258277193_586949ec62.jpg#1\tSome people looking out windows ."]
    text_dir, image_dir = _write_flickr(tmp_path, token_lines=lines)
    corpus = read_flickr8k_text(text_dir, image_dir)
    rep = corpus.report
    assert rep.missing_images == ["2258277193_586949ec62.jpg"]
    assert rep.malformed_lines == []
    assert all(not i.image.startswith("2258277193") for i in corpus.items)
    assert "2258277193_586949ec62.jpg: image file not found (skipped)" in rep.problems()

    # with the image present (and in a split) both captions belong to it
    _touch_images(image_dir, ["2258277193_586949ec62.jpg"])
    with (text_dir / SPLIT_FILE["test"]).open("a") as f:
        f.write("2258277193_586949ec62.jpg\n")
    item = read_flickr8k_text(text_dir, image_dir).items[-1]
    assert item.image == "2258277193_586949ec62.jpg"
    assert item.captions == ["people waiting for the subway", "Some people looking out windows ."]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("111_a.jpg#3 no tab here", "no tab between the caption id and the caption"),
        ("111_a.jpg\tA caption without index .", "has no '#'"),
        ("111_a.jpg#x\tBad index .", "bad caption index 'x'"),
        ("111_a.jpg#-1\tNegative index .", "bad caption index '-1'"),
        ("111_a.jpg#0\tSame id twice .", "caption 111_a.jpg#0 already given on line 1"),
        ("../etc/passwd#0\tEscaping path .", "must not contain '..'"),
    ],
)
def test_flickr8k_malformed_lines(tmp_path: Path, bad_line: str, message: str) -> None:
    lines = [f"{img}#{i}\t{cap}" for img, (_, caps) in FLICKR.items() for i, cap in enumerate(caps)]
    lines.insert(3, bad_line)  # line 4
    text_dir, image_dir = _write_flickr(tmp_path, token_lines=lines)
    corpus = read_flickr8k_text(text_dir, image_dir)
    token_file = text_dir / "Flickr8k.token.txt"
    [entry] = corpus.report.malformed_lines
    assert entry.startswith(f"{token_file}:4: ") and message in entry
    assert len(corpus.items) == 4  # everything else still read
    assert sum(len(i.captions) for i in corpus.items) == 9


def test_flickr8k_empty_and_duplicate_captions(tmp_path: Path) -> None:
    lines = ["111_a.jpg#0\tA dog runs .", "111_a.jpg#1\t", "111_a.jpg#2\ta dog runs",
             "111_a.jpg#3\t ?! ", "111_a.jpg#4\tA dog sits ."]
    text_dir, image_dir = _write_flickr(
        tmp_path, token_lines=lines, split_order={"train": ["111_a.jpg"], "val": [], "test": []})
    token_file = text_dir / "Flickr8k.token.txt"
    corpus = read_flickr8k_text(text_dir, image_dir, dedupe=True)
    rep = corpus.report
    assert corpus.items[0].captions == ["A dog runs .", "A dog sits ."]
    assert rep.empty_captions == [f"{token_file}:2: empty caption",
                                  f"{token_file}:4: caption has no words ('?!')"]
    assert rep.duplicate_captions == [
        f"{token_file}:3: duplicate caption for 111_a.jpg (same words as line 1); kept the first"]
    # default: duplicates are reported but kept (standard evaluation uses every reference)
    kept = read_flickr8k_text(text_dir, image_dir)
    assert kept.items[0].captions == ["A dog runs .", "a dog runs", "A dog sits ."]
    assert kept.report.duplicate_captions == [
        f"{token_file}:3: duplicate caption for 111_a.jpg (same words as line 1); kept both"]


def test_flickr8k_split_file_problems(tmp_path: Path) -> None:
    order = {"train": ["111_a.jpg", "222_b.jpg"], "val": ["111_a.jpg", "333_c.jpg", "999_z.jpg"],
             "test": ["444_d.jpg"]}
    text_dir, image_dir = _write_flickr(tmp_path, split_order=order)
    rep = read_flickr8k_text(text_dir, image_dir).report
    assert rep.malformed_lines == [
        f"{text_dir / SPLIT_FILE['val']}:1: 111_a.jpg is already in split 'train'"]
    assert rep.missing_images == ["999_z.jpg"]  # listed, no file on disk
    rep = read_flickr8k_text(text_dir, image_dir, check_images=False).report
    assert rep.uncaptioned_images == ["999_z.jpg"]  # listed, no captions


def test_missing_and_unreadable_images(flickr: tuple[Path, Path]) -> None:
    text_dir, image_dir = flickr
    (image_dir / "333_c.jpg").unlink()
    (image_dir / "444_d.jpg").write_bytes(b"")
    (image_dir / "111_a.jpg").write_text("not a picture, just text")  # no image header
    corpus = read_flickr8k_text(text_dir, image_dir)
    assert [i.image for i in corpus.items] == ["222_b.jpg"]
    assert corpus.report.missing_images == ["333_c.jpg"]
    assert sorted(corpus.report.unreadable_images) == ["111_a.jpg", "444_d.jpg"]
    assert corpus.report.images_per_split == {"train": 1, "val": 0, "test": 0}
    assert set(corpus.report.skipped_images) == {"111_a.jpg", "333_c.jpg", "444_d.jpg", "555_e.jpg"}
    # without image checks nothing on disk is looked at
    unchecked = read_flickr8k_text(text_dir, image_dir, check_images=False)
    assert len(unchecked.items) == 4 and unchecked.report.problems() == []
    assert len(read_flickr8k_text(text_dir, text_dir / "nowhere", check_images=False).items) == 4


def test_strict_raises_listing_all_problems(tmp_path: Path) -> None:
    lines = [f"{img}#{i}\t{cap}" for img, (_, caps) in FLICKR.items() for i, cap in enumerate(caps)]
    lines += ["broken line", "222_b.jpg#7\t", "222_b.jpg#8\tChildren play outside ."]
    text_dir, image_dir = _write_flickr(tmp_path, token_lines=lines)
    (image_dir / "333_c.jpg").unlink()
    with pytest.raises(CorpusError) as err:
        read_flickr8k_text(text_dir, image_dir, strict=True)
    msg, problems = str(err.value), err.value.problems
    assert len(problems) == 4
    assert "4 problem(s)" in msg
    for needle in ("333_c.jpg: image file not found", "txt:11: no tab", "txt:12: empty caption",
                   "txt:13: duplicate caption for 222_b.jpg"):
        assert needle in msg
        assert any(needle in p for p in problems)
    # the default mode reports and skips the same problems
    assert read_flickr8k_text(text_dir, image_dir).report.problems() == problems


def test_unreadable_sources_raise(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="Flickr8k.token.txt: Flickr8k caption file not found"):
        read_flickr8k_text(tmp_path, tmp_path)
    text_dir, _ = _write_flickr(tmp_path / "x")
    with pytest.raises(CorpusError, match="image folder not found") as err:
        read_flickr8k_text(text_dir, tmp_path / "no_images")
    assert str(tmp_path / "no_images") in str(err.value)
    (text_dir / SPLIT_FILE["test"]).unlink()
    with pytest.raises(CorpusError, match="Flickr_8k.testImages.txt: split file not found"):
        read_flickr8k_text(text_dir, tmp_path, check_images=False)


# --------------------------------------------------------------------------- Karpathy


def test_karpathy_and_official_text_give_identical_corpora(flickr: tuple[Path, Path]) -> None:
    text_dir, image_dir = flickr
    official = read_flickr8k_text(text_dir, image_dir)
    images = [(i.image, i.split, FLICKR[i.image][1]) for i in official.items]
    json_path = _karpathy_json(text_dir.parent / "dataset_flickr8k.json", images)
    karpathy = read_karpathy(json_path, image_dir)
    assert karpathy.name == "tiny"
    assert karpathy.items == official.items
    assert karpathy.report.images_per_split == official.report.images_per_split
    assert karpathy.report.captions_per_image == official.report.captions_per_image


def test_karpathy_restval_filepath_and_malformed(tmp_path: Path) -> None:
    _touch_images(tmp_path / "coco", ["val2014/a.jpg", "train2014/b.jpg", "val2014/c.jpg"])
    data = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "restval",
         "sentences": [{"raw": "A Thing ."}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "train",
         "sentences": [{"raw": "Other thing"}, {"tokens": ["no", "raw"]}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "holdout",
         "sentences": [{"raw": "x"}]},
        {"split": "train", "sentences": []},
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": []},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    corpus = read_karpathy(path, tmp_path / "coco")
    assert corpus.name == "coco"
    assert [(i.image, i.split) for i in corpus.items] == [("val2014/a.jpg", "train"),
                                                         ("train2014/b.jpg", "train")]
    assert corpus.items[0].tokens == [["a", "thing"]]
    expected_path = (tmp_path / "coco" / "val2014" / "a.jpg").absolute()
    assert corpus.image_path(corpus.items[0]) == expected_path
    assert corpus.report.malformed_lines == [
        f"{path}: images[1] (train2014/b.jpg): sentences[1]: no 'raw' caption text",
        f"{path}: images[2] (val2014/c.jpg): unknown split 'holdout' "
        "(expected train, val, test, restval)",
        f"{path}: images[3]: no 'filename'",
        f"{path}: images[4] (val2014/a.jpg): val2014/a.jpg is already listed at images[0]",
    ]
    kept = read_karpathy(path, tmp_path / "coco", restval="keep")
    assert kept.items[0].split == "restval"
    assert kept.splits()["restval"] == [kept.items[0]]
    assert kept.report.images_per_split == {"train": 1, "val": 0, "test": 0, "restval": 1}


def test_karpathy_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(CorpusError, match="not valid JSON") as err:
        read_karpathy(bad, tmp_path)
    assert str(bad) in str(err.value)
    bad.write_text('{"annotations": []}', encoding="utf-8")
    with pytest.raises(CorpusError, match="not a Karpathy-split file"):
        read_karpathy(bad, tmp_path)
    with pytest.raises(CorpusError, match="not found"):
        read_karpathy(tmp_path / "missing.json", tmp_path)


# --------------------------------------------------------------------------- Kaggle CSV


def test_kaggle_csv(tmp_path: Path) -> None:
    _touch_images(tmp_path / "Images", ["a.jpg", "b.jpg"])
    path = tmp_path / "captions.txt"
    path.write_text(
        "image,caption\n"
        'a.jpg,"A dog, a cat ."\n'
        "a.jpg,A dog runs , fast .\n"  # unquoted comma: joined back into the caption
        "b.jpg\n"
        "b.jpg,A bird flies .\n"
        ",No image .\n"
        "c.jpg,Not on disk .\n",
        encoding="utf-8",
    )
    corpus = read_kaggle_csv(path, tmp_path / "Images")
    assert [(i.image, i.captions) for i in corpus.items] == [
        ("a.jpg", ["A dog, a cat .", "A dog runs , fast ."]), ("b.jpg", ["A bird flies ."])]
    assert [i.split for i in corpus.items] == [hash_split("a.jpg"), hash_split("b.jpg")]
    assert corpus.report.malformed_lines == [
        f"{path}:4: expected 2 fields (image,caption), got 1", f"{path}:6: empty image name"]
    assert corpus.report.missing_images == ["c.jpg"]


def test_kaggle_csv_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "captions.txt"
    path.write_text("file,text\na.jpg,hello\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"captions.txt:1: expected a CSV header"):
        read_kaggle_csv(path, tmp_path)


# --------------------------------------------------------------------------- folder


def test_folder_csv_with_split_column(tmp_path: Path) -> None:
    _touch_images(tmp_path, ["x.png", "sub/y.png", "z.png"])
    path = tmp_path / "caps.csv"
    path.write_text(
        "image,caption,split\n"
        "x.png,First one,train\n"
        "sub/y.png,Second one,dev\n"
        "z.png,Third one,\n"
        "x.png,Another,test\n"
        "z.png,Bad split,holdout\n"
        "/etc/passwd,Absolute,train\n",
        encoding="utf-8",
    )
    corpus = read_folder(tmp_path, path)
    assert corpus.name == tmp_path.name
    assert [(i.image, i.split) for i in corpus.items] == [
        ("x.png", "train"), ("sub/y.png", "val"), ("z.png", hash_split("z.png"))]
    assert corpus.image_path(corpus.items[1]) == tmp_path.absolute() / "sub" / "y.png"
    assert corpus.report.malformed_lines == [
        f"{path}:5: x.png is in split 'train' earlier but 'test' here (skipped)",
        f"{path}:6: unknown split 'holdout' (expected train, val or test)",
        f"{path}:7: image path '/etc/passwd' must be relative to the image folder",
    ]


def test_folder_jsonl(tmp_path: Path) -> None:
    _touch_images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    path = tmp_path / "caps.jsonl"
    path.write_text(
        '{"image": "a.jpg", "caption": "A red car .", "split": "val"}\n'
        "\n"
        '{"image": "b.jpg", "caption": "A blue car ."}\n'
        "{oops\n"
        '{"image": "b.jpg"}\n'
        '["a.jpg", "x"]\n',
        encoding="utf-8",
    )
    corpus = read_folder(tmp_path / "imgs", path, name="cars")
    assert corpus.name == "cars"
    assert [(i.image, i.split, i.tokens) for i in corpus.items] == [
        ("a.jpg", "val", [["a", "red", "car"]]),
        ("b.jpg", hash_split("b.jpg"), [["a", "blue", "car"]]),
    ]
    msgs = corpus.report.malformed_lines
    assert [m.split(": ", 1)[0] for m in msgs] == [f"{path}:4", f"{path}:5", f"{path}:6"]
    assert "not valid JSON" in msgs[0] and "no 'caption'" in msgs[1] and "JSON object" in msgs[2]


# --------------------------------------------------------------------------- COCO


def test_coco(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _touch_images(root, ["train2014/t1.jpg", "train2014/t2.jpg", "val2014/v1.jpg"])
    ann = root / "annotations"
    ann.mkdir()
    (ann / "captions_train2014.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "t1.jpg"}, {"id": 2, "file_name": "t2.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "A train on tracks.\n"},
                        {"id": 11, "image_id": 99, "caption": "Orphan"},
                        {"id": 12, "image_id": 1, "caption": "A locomotive"}],
    }), encoding="utf-8")
    (ann / "captions_val2014.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "v1.jpg"}],
        "annotations": [{"id": 20, "image_id": 1, "caption": "A vase of flowers"}],
    }), encoding="utf-8")
    corpus = read_coco([ann / "captions_train2014.json", ann / "captions_val2014.json"], root)
    assert [(i.image, i.split, i.captions) for i in corpus.items] == [
        ("train2014/t1.jpg", "train", ["A train on tracks.", "A locomotive"]),
        ("val2014/v1.jpg", "val", ["A vase of flowers"])]
    assert corpus.report.uncaptioned_images == ["train2014/t2.jpg"]
    assert corpus.report.malformed_lines == [
        f"{ann / 'captions_train2014.json'}: annotations[1]: unknown image_id 99"]


# --------------------------------------------------------------------------- hash split


def test_hash_split_deterministic_and_proportional() -> None:
    names = [f"img_{i:05d}.jpg" for i in range(4000)]
    first = [hash_split(n) for n in names]
    assert first == [hash_split(n) for n in names]
    counts = {s: first.count(s) for s in ("train", "val", "test")}
    assert 0.87 < counts["train"] / 4000 < 0.93
    assert 0.035 < counts["val"] / 4000 < 0.065 and 0.035 < counts["test"] / 4000 < 0.065
    halves = [hash_split(n, (0.5, 0.5, 0.0)) for n in names]
    assert "test" not in halves and 0.45 < halves.count("train") / 4000 < 0.55
    assert [hash_split(n, seed=1) for n in names] != first
    assert hash_split("x.jpg", (0, 0, 1)) == "test"
    with pytest.raises(ValueError):
        hash_split("x.jpg", (0.5, 0.5))
    with pytest.raises(ValueError):
        hash_split("x.jpg", (0, 0, 0))


# --------------------------------------------------------------------------- Corpus API


def test_corpus_save_load_roundtrip(flickr: tuple[Path, Path], tmp_path: Path) -> None:
    corpus = read_flickr8k_text(*flickr)
    path = tmp_path / "out" / "corpus.json"
    corpus.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "captioner-corpus" and data["version"] == 1
    assert Path(data["image_root"]).is_absolute()
    loaded = Corpus.load(path)
    assert loaded == corpus
    assert "images: 4 (train 2, val 1, test 1)" in loaded.report.summary()


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda d: d.update(format="other"), "'format'"),
        (lambda d: d.update(version=99), "'version'"),
        (lambda d: d["items"][1].update(split="dev"), "items[1]: 'split'"),
        (lambda d: d["items"][0]["tokens"].pop(), "items[0]: 3 captions but 2 token lists"),
        (lambda d: d.update(report={"missing_images": "x"}), "'missing_images'"),
    ],
)
def test_corpus_load_rejects_bad_files(
    flickr: tuple[Path, Path], tmp_path: Path, mutate: Callable[[dict[str, Any]], Any], problem: str
) -> None:
    path = tmp_path / "corpus.json"
    data = read_flickr8k_text(*flickr).to_dict()
    assert data["items"][0]["image"] == "222_b.jpg"
    data["items"] = data["items"][1:]  # items[0] is now 111_a.jpg (3 captions)
    mutate(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CorpusError) as err:
        Corpus.load(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_corpus_split_access() -> None:
    items = [Item("a.jpg", "train", ["A"], [["a"]]), Item("b.jpg", "test", ["B"], [["b"]])]
    corpus = Corpus("t", Path("/data"), items, ValidationReport())
    assert list(corpus.splits()) == ["train", "val", "test"]
    assert corpus.split("val") == [] and corpus.split("test") == [items[1]]
    assert corpus.image_path("b.jpg") == Path("/data/b.jpg")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        corpus.split("dev")


def test_detect_format_and_read_corpus(flickr: tuple[Path, Path], tmp_path: Path) -> None:
    text_dir, image_dir = flickr
    official = read_flickr8k_text(text_dir, image_dir)
    karpathy = _karpathy_json(tmp_path / "k.json",
                              [(i.image, i.split, i.captions) for i in official.items])
    kaggle = tmp_path / "captions.txt"
    kaggle.write_text("image,caption\n111_a.jpg,A dog .\n", encoding="utf-8")
    folder = tmp_path / "caps.csv"
    folder.write_text("image,caption,split\n111_a.jpg,A dog .,train\n", encoding="utf-8")
    coco = tmp_path / "captions_val2014.json"
    coco.write_text('{"images": [], "annotations": []}', encoding="utf-8")
    assert detect_format(text_dir) == "flickr8k-text"
    assert detect_format(text_dir.parent) == "flickr8k-text"
    assert detect_format(karpathy) == "karpathy"
    assert detect_format(kaggle) == "kaggle"
    assert detect_format(folder) == "folder"
    assert detect_format(coco) == "coco"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="cannot tell"):
        detect_format(tmp_path / "empty")

    assert read_corpus("flickr8k-text", text_dir, image_dir).items == official.items
    assert read_corpus("karpathy", json_path=karpathy, image_dir=image_dir).items == official.items
    assert read_corpus("auto", karpathy, image_dir).items == official.items
    assert len(read_corpus("kaggle", kaggle, image_dir).items) == 1
    assert read_corpus("folder", folder, image_dir).items[0].split == "train"
    with pytest.raises(ValueError, match="unknown corpus format 'xml'"):
        read_corpus("xml", kaggle, image_dir)


# --------------------------------------------------------------------------- malformed entries
# Each bad entry gives one "<where>: <what>" report entry, is skipped while the rest of the
# file is still read, and strict mode raises a CorpusError listing exactly that entry.


def _assert_one_skipped(
    read: Callable[..., Corpus], where: str, what: str, items: list[tuple[str, list[str]]]
) -> str:
    corpus = read()
    [entry] = corpus.report.malformed_lines
    assert entry.startswith(f"{where}: "), entry
    assert what in entry[len(where):], entry
    assert [(i.image, i.captions) for i in corpus.items] == items  # the rest is still read
    assert corpus.report.problems() == [entry]
    with pytest.raises(CorpusError) as err:
        read(strict=True)
    assert err.value.problems == [entry]
    assert "1 problem(s) found (strict mode)" in str(err.value) and entry in str(err.value)
    return entry


_AB_ITEMS = [("a.jpg", ["A dog ."]), ("b.jpg", ["A cat ."])]


def _coco_data() -> dict[str, Any]:
    return {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "A dog ."},
                        {"id": 11, "image_id": 2, "caption": "A cat ."}],
    }


@pytest.mark.parametrize(
    ("mutate", "where", "what"),
    [
        (lambda d: d["images"].append({"id": 3}), "images[2]",
         "expected an object with 'id' and 'file_name'"),
        (lambda d: d["images"].insert(1, "c.jpg"), "images[1]",
         "expected an object with 'id' and 'file_name'"),
        (lambda d: d["images"].append({"id": 3, "file_name": 7}), "images[2]",
         "expected an object with 'id' and 'file_name'"),
        (lambda d: d["images"].append({"id": 3, "file_name": "a.jpg"}), "images[2]",
         "a.jpg is already listed at {path}: images[0]"),
        (lambda d: d["images"].append({"file_name": "c.jpg"}), "images[2]",
         "missing or repeated image id None"),
        (lambda d: d["images"].append({"id": 1, "file_name": "c.jpg"}), "images[2]",
         "missing or repeated image id 1"),
        (lambda d: d["images"].append({"id": 2.5, "file_name": "c.jpg"}), "images[2]",
         "missing or repeated image id 2.5"),
        (lambda d: d["images"].append({"id": [3], "file_name": "c.jpg"}), "images[2]",
         "missing or repeated image id [3]"),  # was a TypeError (unhashable)
        (lambda d: d["images"].append({"id": 3, "file_name": "../c.jpg"}), "images[2]",
         "image path '../c.jpg' must not contain '..'"),
        (lambda d: d["images"].append({"id": 3, "file_name": "c\0.jpg"}), "images[2]",
         "contains a NUL byte"),
        (lambda d: d["annotations"].insert(1, "A caption ."), "annotations[1]",
         "expected an object"),
        (lambda d: d["annotations"].append({"id": 12, "image_id": 1}), "annotations[2]",
         "no 'caption' text"),
        (lambda d: d["annotations"].append({"id": 12, "image_id": 1, "caption": None}),
         "annotations[2]", "no 'caption' text"),
        (lambda d: d["annotations"].append({"id": 12, "image_id": 99, "caption": "x"}),
         "annotations[2]", "unknown image_id 99"),
        (lambda d: d["annotations"].append({"id": 12, "image_id": "1", "caption": "x"}),
         "annotations[2]", "unknown image_id '1'"),
        (lambda d: d["annotations"].append({"id": 12, "caption": "x"}),
         "annotations[2]", "unknown image_id None"),
        (lambda d: d["annotations"].append({"id": 12, "image_id": [1], "caption": "x"}),
         "annotations[2]", "unknown image_id [1]"),  # was a TypeError (unhashable)
    ],
)
def test_coco_malformed_entries(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], Any], where: str, what: str
) -> None:
    _touch_images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    path = tmp_path / "captions_train.json"
    data = _coco_data()
    mutate(data)
    path.write_text(json.dumps(data), encoding="utf-8")

    def read(**kw: Any) -> Corpus:
        return read_coco(path, tmp_path / "imgs", **kw)

    _assert_one_skipped(read, f"{path}: {where}", what.format(path=path), _AB_ITEMS)
    assert {i.split for i in read().items} == {"train"}


def test_coco_duplicate_file_name_across_files(tmp_path: Path) -> None:
    _touch_images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    first, second = tmp_path / "captions_train.json", tmp_path / "captions_val.json"
    first.write_text(json.dumps(_coco_data()), encoding="utf-8")
    second.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "b.jpg"}],
        "annotations": [{"id": 20, "image_id": 1, "caption": "A second cat ."}],
    }), encoding="utf-8")
    corpus = read_coco([first, second], tmp_path / "imgs")
    assert corpus.report.malformed_lines == [
        f"{second}: images[0]: b.jpg is already listed at {first}: images[1]",
        f"{second}: annotations[0]: unknown image_id 1",  # its image entry was skipped
    ]
    assert [(i.image, i.split, i.captions) for i in corpus.items] == [
        ("a.jpg", "train", ["A dog ."]), ("b.jpg", "train", ["A cat ."])]
    with pytest.raises(CorpusError) as err:
        read_coco([first, second], tmp_path / "imgs", strict=True)
    assert err.value.problems == corpus.report.malformed_lines
    assert f"{first}, {second}: 2 problem(s) found" in str(err.value)


@pytest.mark.parametrize(
    "content",
    [
        '{"images": [{"filename": "a.jpg", "split": "train", "sentences": []}]}',  # Karpathy
        '[{"image_id": 1, "caption": "x"}]',
        '{"images": [], "annotations": {}}',
        '{"images": {}, "annotations": []}',
        '"captions"',
    ],
)
def test_coco_not_a_coco_file(tmp_path: Path, content: str) -> None:
    good, bad = tmp_path / "captions_train.json", tmp_path / "captions_val.json"
    good.write_text(json.dumps(_coco_data()), encoding="utf-8")
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match="not a COCO captions file") as err:
        read_coco([good, bad], tmp_path, check_images=False)
    assert str(err.value).startswith(f"{bad}: ")
    bad.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(CorpusError, match="not valid JSON") as err:
        read_coco(bad, tmp_path, check_images=False)
    assert str(err.value).startswith(f"{bad}:1: ")


def _bird(**kw: object) -> dict[str, object]:
    return {"filename": "c.jpg", "split": "train", "sentences": [{"raw": "A bird ."}], **kw}


@pytest.mark.parametrize(
    ("mutate", "where", "what"),
    [
        (lambda imgs: imgs.insert(1, "c.jpg"), "images[1]", "expected an object"),
        (lambda imgs: imgs.append(["c.jpg", "train"]), "images[2]", "expected an object"),
        (lambda imgs: imgs.append(_bird(filepath=5)), "images[2]", "'filepath' must be a string"),
        (lambda imgs: imgs.append(_bird(filepath=["x"])), "images[2]",
         "'filepath' must be a string"),
        (lambda imgs: imgs.append(_bird(sentences="A bird .")), "images[2] (c.jpg)",
         "'sentences' must be a list"),
        (lambda imgs: imgs.append(_bird(sentences={"raw": "A bird ."})), "images[2] (c.jpg)",
         "'sentences' must be a list"),
        (lambda imgs: imgs[0]["sentences"].append({"tokens": ["a", "dog"]}),
         "images[0] (a.jpg): sentences[1]", "no 'raw' caption text"),
        (lambda imgs: imgs[1]["sentences"].insert(0, "A cat sits ."),
         "images[1] (b.jpg): sentences[0]", "no 'raw' caption text"),
        (lambda imgs: imgs[1]["sentences"].append({"raw": 5}),
         "images[1] (b.jpg): sentences[1]", "no 'raw' caption text"),
        (lambda imgs: imgs.append(_bird(filename="../c.jpg")), "images[2] (../c.jpg)",
         "must not contain '..'"),
        (lambda imgs: imgs.append(_bird(filepath="../data")), "images[2] (../data/c.jpg)",
         "image path '../data/c.jpg' must not contain '..'"),
    ],
)
def test_karpathy_malformed_entries(
    tmp_path: Path, mutate: Callable[[list[Any]], Any], where: str, what: str
) -> None:
    _touch_images(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg"])
    path = _karpathy_json(tmp_path / "dataset_tiny.json",
                          [("a.jpg", "train", ["A dog ."]), ("b.jpg", "val", ["A cat ."])])
    data = json.loads(path.read_text(encoding="utf-8"))
    mutate(data["images"])
    path.write_text(json.dumps(data), encoding="utf-8")

    def read(**kw: Any) -> Corpus:
        return read_karpathy(path, tmp_path / "imgs", **kw)

    _assert_one_skipped(read, f"{path}: {where}", what, _AB_ITEMS)
    assert [i.split for i in read().items] == ["train", "val"]


@pytest.mark.parametrize(
    "content",
    ['[{"filename": "a.jpg"}]', '{"images": {"a.jpg": []}}', '{"dataset": "tiny"}', "null"],
)
def test_karpathy_not_a_karpathy_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "dataset_tiny.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match="not a Karpathy-split file") as err:
        read_karpathy(path, tmp_path)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("bad_row", "what"),
    [
        (",A caption without image .,train", "empty image name"),
        ("   ,A caption without image .,", "empty image name"),
        ('"",A caption without image .,val', "empty image name"),
        ("c\0.jpg,A NUL in the name .,train", "image name 'c\\x00.jpg' contains a NUL byte"),
        ("C:\\pics\\c.jpg,A drive letter .,train", "must be relative to the image folder"),
        ("c.jpg,Too,many,fields", "expected 3 fields (image,caption,split), got 4"),
    ],
)
def test_folder_csv_malformed_rows(tmp_path: Path, bad_row: str, what: str) -> None:
    _touch_images(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg"])
    path = tmp_path / "caps.csv"
    path.write_bytes(("image,caption,split\n"
                      "a.jpg,A dog .,train\n"
                      f"{bad_row}\n"
                      "b.jpg,A cat .,val\n").encode("utf-8"))

    def read(**kw: Any) -> Corpus:
        return read_folder(tmp_path / "imgs", path, **kw)

    _assert_one_skipped(read, f"{path}:3", what, _AB_ITEMS)
    # a caption-less image name must not poison the image check (NUL used to raise ValueError)
    assert read(check_images=False).report.malformed_lines == read().report.malformed_lines


def test_kaggle_csv_empty_image_name_strict(tmp_path: Path) -> None:
    _touch_images(tmp_path / "Images", ["a.jpg", "b.jpg"])
    path = tmp_path / "captions.txt"
    path.write_text("image,caption\na.jpg,A dog .\n,Nobody's image .\nb.jpg,A cat .\n",
                    encoding="utf-8")

    def read(**kw: Any) -> Corpus:
        return read_kaggle_csv(path, tmp_path / "Images", **kw)

    assert _assert_one_skipped(read, f"{path}:3", "empty image name", _AB_ITEMS) == (
        f"{path}:3: empty image name")


@pytest.mark.parametrize("file_name", ["captions.txt", "caps.csv", "caps"])
def test_csv_not_utf8_raises_naming_the_file(tmp_path: Path, file_name: str) -> None:
    path = tmp_path / file_name
    path.write_bytes(b"image,caption\na.jpg,A dog .\nb.jpg,Caf\xe9 au lait\n")
    with pytest.raises(CorpusError, match="caption file is not UTF-8 text") as err:
        read_folder(tmp_path, path, check_images=False)
    assert str(err.value).startswith(f"{path}: ")
    with pytest.raises(CorpusError, match="not UTF-8"):
        read_kaggle_csv(path, tmp_path, check_images=False)


@pytest.mark.parametrize("reader", ["kaggle", "folder"])
def test_csv_unterminated_quote_is_a_malformed_line_not_a_swallowed_file(tmp_path: Path, reader: str) -> None:
    """Issue 7, case 2: an unterminated quote used to swallow every following row into one
    caption (exit 0, even strict). Now that line is reported and the rows after it are read."""
    _touch_images(tmp_path / "Images", ["000001.png", "000002.png", "000003.png"])
    path = tmp_path / "captions.txt"
    path.write_text('image,caption\n000001.png,"a blue square above a red circle\n'
                    "000002.png,a green circle\n000003.png,a red square\n", encoding="utf-8")

    def read(**kw: Any) -> Corpus:
        if reader == "kaggle":
            return read_kaggle_csv(path, tmp_path / "Images", **kw)
        return read_folder(tmp_path / "Images", path, **kw)

    corpus = read()
    assert [(i.image, i.captions) for i in corpus.items] == [
        ("000002.png", ["a green circle"]), ("000003.png", ["a red square"])]
    (bad,) = corpus.report.malformed_lines
    assert bad.startswith(f"{path}:2: unterminated quote")
    with pytest.raises(CorpusError, match="unterminated quote") as err:
        read(strict=True)
    assert err.value.problems == [bad]


def test_csv_line_over_the_field_limit_is_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "captions.txt"
    path.write_text("image,caption\na.jpg," + "x" * 200_000 + "\nb.jpg,A cat .\n", encoding="utf-8")
    corpus = read_kaggle_csv(path, tmp_path, check_images=False)
    assert [i.image for i in corpus.items] == ["b.jpg"]
    assert corpus.report.malformed_lines[0].startswith(f"{path}:2: field larger than field limit")


@pytest.mark.parametrize(
    ("content", "got"),
    [
        ("image,text\na.jpg,A dog .\n", "'image,text'"),
        ("caption,split\nA dog .,train\n", "'caption,split'"),
        ("a.jpg,A dog .\nb.jpg,A cat .\n", "'a.jpg,a dog .'"),  # no header line at all
        ("", "''"),
    ],
)
def test_csv_missing_header_columns(tmp_path: Path, content: str, got: str) -> None:
    path = tmp_path / "caps.csv"
    path.write_text(content, encoding="utf-8")
    for read in (read_folder, lambda p, d, **kw: read_kaggle_csv(d, p, **kw)):
        with pytest.raises(CorpusError) as err:
            read(tmp_path, path, check_images=False)
        msg = str(err.value)
        assert msg.startswith(f"{path}:1: expected a CSV header with 'image' and 'caption'"), msg
        assert msg.endswith(f"got {got}")


@pytest.mark.parametrize(
    ("bad_line", "what"),
    [
        ("{oops", "not valid JSON (Expecting property name enclosed in double quotes)"),
        ('{"image": "c.jpg", "caption": "A bird ."', "not valid JSON"),
        ('"a.jpg"', "expected a JSON object"),
        ('{"caption": "A bird ."}', "no 'image'"),
        ('{"image": 3, "caption": "A bird ."}', "no 'image'"),
        ('{"image": null, "caption": "A bird ."}', "no 'image'"),
        ('{"image": "c.jpg"}', "no 'caption' text"),
        ('{"image": "c.jpg", "caption": ["A bird ."]}', "no 'caption' text"),
        ('{"image": "", "caption": "A bird ."}', "empty image name"),
        ('{"image": "c\\u0000.jpg", "caption": "A bird ."}', "contains a NUL byte"),
        ('{"image": "../c.jpg", "caption": "A bird ."}', "must not contain '..'"),
    ],
)
def test_folder_jsonl_malformed_lines(tmp_path: Path, bad_line: str, what: str) -> None:
    _touch_images(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg"])
    path = tmp_path / "caps.jsonl"
    path.write_text(
        '{"image": "a.jpg", "caption": "A dog .", "split": "train"}\n'
        "\n"
        f"{bad_line}\n"
        '{"image": "b.jpg", "caption": "A cat .", "split": "test"}\n',
        encoding="utf-8",
    )

    def read(**kw: Any) -> Corpus:
        return read_folder(tmp_path / "imgs", path, **kw)

    _assert_one_skipped(read, f"{path}:3", what, _AB_ITEMS)
    assert [i.split for i in read().items] == ["train", "test"]


def test_folder_jsonl_not_utf8_raises(tmp_path: Path) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_bytes(b'{"image": "a.jpg", "caption": "Caf\xe9"}\n')
    with pytest.raises(CorpusError, match="caption file is not UTF-8 text") as err:
        read_folder(tmp_path, path, check_images=False)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("bad_name", "what"),
    [
        ("/data/333_c.jpg", "image path '/data/333_c.jpg' must be relative to the image folder"),
        ("../333_c.jpg", "image path '../333_c.jpg' must not contain '..'"),
        ("imgs\\..\\333_c.jpg", "must not contain '..'"),
        ("C:/Flickr/333_c.jpg", "must be relative to the image folder"),
        ("333\0_c.jpg", "contains a NUL byte"),
    ],
)
def test_flickr8k_split_file_bad_image_name(tmp_path: Path, bad_name: str, what: str) -> None:
    order = {"train": ["222_b.jpg", "111_a.jpg"], "val": ["333_c.jpg", bad_name],
             "test": ["444_d.jpg"]}
    text_dir, image_dir = _write_flickr(tmp_path, split_order=order)

    def read(**kw: Any) -> Corpus:
        return read_flickr8k_text(text_dir, image_dir, **kw)

    items = [(img, FLICKR[img][1]) for img in ("222_b.jpg", "111_a.jpg", "333_c.jpg", "444_d.jpg")]
    _assert_one_skipped(read, f"{text_dir / SPLIT_FILE['val']}:2", what, items)
    assert read().report.unsplit_images == ["555_e.jpg"]  # info only, not a problem


# --------------------------------------------------------------------------- empty sources (issue 7, case 2)


@pytest.mark.parametrize("strict", [False, True])
def test_empty_jsonl_is_an_error_not_an_empty_corpus(tmp_path: Path, strict: bool) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(CorpusError, match="no image with a usable caption found") as err:
        read_folder(tmp_path, path, strict=strict)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("emptied", ["Flickr8k.token.txt", "split files"])
def test_empty_flickr8k_text_files_are_an_error(tmp_path: Path, strict: bool, emptied: str) -> None:
    text_dir, image_dir = _write_flickr(tmp_path)
    for name in ([emptied] if emptied != "split files" else list(SPLIT_FILE.values())):
        (text_dir / name).write_text("", encoding="utf-8")
    with pytest.raises(CorpusError, match="no image with a usable caption found") as err:
        read_flickr8k_text(text_dir, image_dir, strict=strict)
    msg = str(err.value)
    assert msg.startswith(f"{text_dir / 'Flickr8k.token.txt'}: ")
    if emptied == "split files":  # the captions are there: say why none was kept
        assert f"{len(FLICKR)} image(s) are in no split" in msg


def test_a_source_whose_every_entry_is_bad_lists_the_problems(tmp_path: Path) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image": "a.jpg"}\n[1]\n', encoding="utf-8")
    with pytest.raises(CorpusError) as err:
        read_folder(tmp_path, path)
    assert err.value.problems == [f"{path}:1: no 'caption' text", f"{path}:2: expected a JSON object"]
    assert f"{path}:2: expected a JSON object" in str(err.value)
