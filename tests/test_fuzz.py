"""Property-based tests (Hypothesis): every reader of outside data, fed arbitrary or mutated bytes,
gives a valid result or the project's own error naming the file, never another exception, never a hang.

Readers covered: the five corpus formats (Flickr8k text, Karpathy JSON, Kaggle CSV, COCO JSON, own
CSV and JSONL) and corpus.json, vocab.json, model directories (config.json, vocab.json, weights),
YAML training configs with command-line overrides, the image loader and feature stores.

Seed inputs are this file's own fixtures (nothing from ../shared). Each property runs
``FUZZ_EXAMPLES`` examples (tests/conftest.py: 200 by default, derandomized so CI runs are
reproducible; ``CAPTIONER_FUZZ_EXAMPLES=2000`` for a deeper local run). A hang guard (SIGALRM,
60 s per example) turns a blocked reader into a failure; it is a watchdog, not a speed check.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from captioner.config import ConfigError, load_config
from captioner.data.corpus import KNOWN_SPLITS, Corpus, CorpusError
from captioner.data.readers import read_corpus
from captioner.data.images import ImageError, load_image
from captioner.data.text import SPECIALS, Vocab, tokenize
from captioner.models.sat import SATConfig, SATDecoder
from captioner.inference.modeldir import ModelDirError, load_model_dir, save_model_dir
from captioner.training.config import TrainConfig
from captioner.training.stages import stage_configs

from .watchdog import hang_guard

# Pillow warns about the damaged TIFF/EXIF metadata the mutations produce, numpy about escapes in damaged
# .npy headers; the properties are about errors
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:PIL.*"),
              pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:invalid escape sequence:SyntaxWarning")]




# ----------------------------------------------------------------------------- mutation strategies

# byte strings that matter to the formats: quotes, separators, line ends, NUL, BOM, bad UTF-8,
# path tricks, JSON and YAML syntax, numbers at the edges
INTERESTING = [b'"', b",", b"\t", b"\n", b"\r", b"\r\n", b"\x00", b"#", b"#0", b"../", b"/", b"\\", b"\xff",
               b"\xef\xbb\xbf", b"\xc3", b"{", b"}", b"[", b"]", b":", b"null", b"true", b"NaN", b"-Infinity",
               b"1e999", b"-1", b"0", b"99999999999999999999", b'"split": "test"', b"&a", b"*a", b"!!python/object:x",
               b"  ", b"a.jpg", b"C:\\x.jpg", b"\xe2\x80\xa8", b"image,caption", b"\x1b[2J"]


@st.composite
def mutated_bytes(draw, seed: bytes, max_ops: int = 6) -> bytes:
    """``seed`` after a few random edits: flips, inserts (often of INTERESTING strings), deletions,
    truncation, duplicated or swapped chunks."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "insert", "interesting", "delete", "truncate", "duplicate", "swap"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "interesting":
            data[pos:pos] = draw(st.sampled_from(INTERESTING))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "duplicate":
            end = min(len(data), pos + draw(st.integers(1, 64)))
            data[pos:pos] = data[pos:end]
        elif op == "swap" and len(data) > 2:
            j = draw(st.integers(0, len(data) - 1))
            data[pos:pos + 1], data[j:j + 1] = data[j:j + 1], data[pos:pos + 1]
    return bytes(data)


SCHEMA_KEYS = ["image", "caption", "split", "filename", "filepath", "sentences", "raw", "images", "annotations",
               "id", "image_id", "file_name", "itos", "format", "version", "min_freq", "max_size", "arch", "model",
               "encoder", "decoding", "name", "grid", "image_size", "channels", "mean", "std", "resize",
               "vocab_size", "feature_dim", "hidden_dim", "embed_dim", "attention_dim", "dropout", "beam_size",
               "max_len", "length_penalty", "items", "captions", "tokens", "image_root", "report", "dataset"]
interesting_values = st.sampled_from(
    ["train", "val", "test", "restval", "dev", "a.jpg", "../x.jpg", "/abs.jpg", "", "\x00", "a\x00b", "<pad>",
     "3", "captioner-corpus", "captioner-vocab", "captioner-model", "sat", "efficientnet-lite0", "squash",
     -1, 0, 1, 2, 7, 12, 224, 2**31, 2**63, 1e300, -0.0, float("nan"), float("inf"), True, False, None, [], {},
     [7, 7], [0, 7], ["7", 7], [127.0, 127.0, 127.0], [0.0, 0.0, 0.0]])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=12) | interesting_values,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(SCHEMA_KEYS) | st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_json(draw, seed) -> object:
    """``seed`` (a JSON value) after a few tree edits: a node replaced, deleted or duplicated, a key added."""
    doc = json.loads(json.dumps(seed))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "delete", "add_key", "duplicate"]))
        if not path:  # the root
            if op == "replace":
                doc = copy.deepcopy(draw(json_values))
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        # deep copies: drawn values may be shared objects (sampled_from), and the next edit may change them
        if op == "replace":
            parent[last] = copy.deepcopy(draw(json_values))
        elif op == "delete":
            del parent[last]
        elif op == "add_key" and isinstance(parent[last], dict):
            parent[last][draw(st.sampled_from(SCHEMA_KEYS))] = copy.deepcopy(draw(json_values))
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(json.loads(json.dumps(parent[last])))
    return doc


def json_bytes(seed) -> st.SearchStrategy[bytes]:
    """Mostly structure-aware edits (they reach the schema checks), some byte-level ones and pure noise."""
    text = json.dumps(seed).encode()
    return st.one_of(
        mutated_json(seed).map(lambda d: json.dumps(d).encode()),  # json.dumps writes NaN/Infinity: read as such
        mutated_bytes(text),
        st.binary(max_size=300),
    )


def text_bytes(seed: str) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated_bytes(seed.encode()), st.binary(max_size=300))


# ----------------------------------------------------------------------------- corpus readers


IMAGES = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "img").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, format="JPEG")
    for name in IMAGES:
        (root / "img" / name).write_bytes(buf.getvalue())
    return root


FLICKR_TOKENS = ("a.jpg#0\tA dog runs on the grass .\na.jpg#1\tA brown dog is running\n"
                 "b.jpg#0\tTwo kids play outside .\nb.jpg#1\tChildren ( boys ) play\n"
                 "c.jpg#0\tA man rides a bike .\nd.jpg#0\tA cat sleeps on a sofa .\n")
FLICKR_SPLITS = {"Flickr_8k.trainImages.txt": "a.jpg\nb.jpg\n", "Flickr_8k.devImages.txt": "c.jpg\n",
                 "Flickr_8k.testImages.txt": "d.jpg\n"}
KARPATHY = {"dataset": "tiny", "images": [
    {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog runs ."}, {"raw": "A brown dog"}]},
    {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "Two kids play ."}]},
    {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "A man rides a bike ."}]},
    {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "A cat sleeps ."}]}]}
COCO = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": "c", "file_name": "c.jpg"}],
        "annotations": [{"image_id": 1, "caption": "A dog runs ."}, {"image_id": 2, "caption": "Two kids play."},
                        {"image_id": "c", "caption": "A man rides a bike"}, {"image_id": 1, "caption": "A dog"}]}
KAGGLE = 'image,caption\na.jpg,"A dog, running ."\na.jpg,A brown dog\nb.jpg,Two kids play .\nc.jpg,A man rides\n'
FOLDER_CSV = "image,caption,split\na.jpg,A dog runs .,train\nb.jpg,Two kids play .,val\nc.jpg,\"A man, a bike\",test\n"
FOLDER_JSONL = ('{"image": "a.jpg", "caption": "A dog runs .", "split": "train"}\n'
                '{"image": "b.jpg", "caption": "Two kids play ."}\n{"image": "c.jpg", "caption": "A man", "split": "dev"}\n')


def check_corpus_or_error(read, named: Path) -> None:
    """The reader's result is a valid corpus, or it raised CorpusError naming the source."""
    with hang_guard():
        try:
            corpus = read()
        except CorpusError as e:
            assert str(named) in str(e), str(e)
            event("project error")
            return
    event("valid corpus")
    assert corpus.items  # an empty corpus is an error, never a result
    for it in corpus.items:
        assert it.split in KNOWN_SPLITS and it.captions
        assert it.tokens == [tokenize(c) for c in it.captions] and all(it.tokens)
        assert not it.image.startswith("/") and ".." not in it.image.split("/") and "\0" not in it.image
    again = Corpus.load(_saved(corpus, named.parent / "roundtrip.json"))
    assert [(i.image, i.split, i.captions, i.tokens) for i in again.items] == \
           [(i.image, i.split, i.captions, i.tokens) for i in corpus.items]


def _saved(corpus: Corpus, path: Path) -> Path:
    corpus.save(path)
    return path


@given(token_file=text_bytes(FLICKR_TOKENS), which=st.sampled_from(sorted(FLICKR_SPLITS)), split_file=st.data(),
       strict=st.booleans())
def test_flickr8k_text_reader(work, token_file, which, split_file, strict):
    d = work / "flickr"
    d.mkdir(exist_ok=True)
    (d / "Flickr8k.token.txt").write_bytes(token_file)
    for name, text in FLICKR_SPLITS.items():
        (d / name).write_bytes(split_file.draw(text_bytes(text)) if name == which else text.encode())
    check_corpus_or_error(lambda: read_corpus("flickr8k-text", d, work / "img", strict=strict), d)


@given(content=json_bytes(KARPATHY), strict=st.booleans())
def test_karpathy_reader(work, content, strict):
    path = work / "dataset_tiny.json"
    path.write_bytes(content)
    check_corpus_or_error(lambda: read_corpus("karpathy", path, work / "img", strict=strict), path)


@given(content=json_bytes(COCO), strict=st.booleans())
def test_coco_reader(work, content, strict):
    path = work / "captions_train2014.json"
    path.write_bytes(content)
    check_corpus_or_error(lambda: read_corpus("coco", [path], work / "img", strict=strict), path)


@given(content=text_bytes(KAGGLE), strict=st.booleans())
def test_kaggle_csv_reader(work, content, strict):
    path = work / "captions.txt"
    path.write_bytes(content)
    check_corpus_or_error(lambda: read_corpus("kaggle", path, work / "img", strict=strict), path)


@given(content=st.one_of(text_bytes(FOLDER_CSV), text_bytes(FOLDER_JSONL)), suffix=st.sampled_from([".csv", ".jsonl"]),
       strict=st.booleans())
def test_folder_reader_csv_and_jsonl(work, content, suffix, strict):
    path = work / f"captions{suffix}"
    path.write_bytes(content)
    check_corpus_or_error(lambda: read_corpus("folder", path, work / "img", strict=strict), path)


@given(content=st.data())
def test_corpus_json_loader(work, content):
    seed = read_corpus("folder", _write(work / "seed.jsonl", FOLDER_JSONL), work / "img").to_dict()
    path = work / "corpus.json"
    path.write_bytes(content.draw(json_bytes(seed)))
    with hang_guard():
        try:
            corpus = Corpus.load(path)
        except CorpusError as e:
            assert str(e).startswith(f"{path}"), str(e)
            event("project error")
            return
    event("valid corpus")
    for it in corpus.items:
        assert it.split in KNOWN_SPLITS and len(it.tokens) == len(it.captions)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- vocabulary


VOCAB = Vocab.build([["a", "dog", "runs"], ["a", "cat"]]).to_dict()


@given(content=json_bytes(VOCAB))
def test_vocab_loader(work, content):
    path = work / "vocab.json"
    path.write_bytes(content)
    with hang_guard():
        try:
            vocab = Vocab.load(path)
        except ValueError as e:
            assert str(e).startswith(f"{path}"), str(e)
            event("project error")
            return
    event("valid vocabulary")
    assert tuple(vocab.itos[:4]) == SPECIALS and len(set(vocab.itos)) == len(vocab)
    assert vocab.decode(vocab.encode(["a", "dog"], max_len=5)) == [w if w in vocab else "<unk>" for w in ["a", "dog"]]


# ----------------------------------------------------------------------------- model directories


@pytest.fixture(scope="module")
def model_seed(work) -> Path:
    torch.manual_seed(0)
    vocab = Vocab.build([["a", "dog", "runs"]])
    decoder = SATDecoder(SATConfig(vocab_size=len(vocab), feature_dim=1280, embed_dim=4, hidden_dim=4,
                                   attention_dim=4))
    return save_model_dir(work / "model-seed", decoder, vocab, {
        "encoder": {"name": "efficientnet-lite0", "image_size": 224, "grid": [7, 7], "channels": 1280,
                    "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0], "resize": "squash"},
        "decoding": {"beam_size": 3, "max_len": 12, "length_penalty": 0.0}})


@given(which=st.sampled_from(["config.json", "config.json", "config.json", "vocab.json", "model.safetensors"]),
       data=st.data())
def test_model_dir_loader(work, model_seed, which, data):
    import captioner.inference.modeldir as modeldir

    d = work / "model"
    d.mkdir(exist_ok=True)
    for name in ("config.json", "vocab.json", "model.safetensors"):
        (d / name).write_bytes((model_seed / name).read_bytes())
    seed = (model_seed / which).read_bytes()
    if which == "model.safetensors":
        content = data.draw(st.one_of(mutated_bytes(seed[:200], max_ops=3).map(lambda head: head + seed[200:]),
                                      mutated_bytes(seed, max_ops=2)))
    else:
        content = data.draw(json_bytes(json.loads(seed)))
    (d / which).write_bytes(content)
    # sizes that pass the bounds could still build a model of up to MAX_MODEL_BYTES (4 GiB): the property is the
    # same with a 64 MiB cap, and the examples stay small
    with pytest.MonkeyPatch.context() as mp, hang_guard():
        mp.setattr(modeldir, "MAX_MODEL_BYTES", 64 * 2**20)
        try:
            decoder, vocab, cfg = load_model_dir(d)
        except ModelDirError as e:
            assert str(d) in str(e), str(e)
            event("project error")
            return
    event("valid model")
    assert decoder.cfg.vocab_size == len(vocab)
    assert all(torch.isfinite(p).all() for p in decoder.parameters())
    feats = torch.zeros(1, 49, decoder.cfg.feature_dim)
    log_probs, _, _ = decoder.step(torch.tensor([vocab.start_id]), decoder.init_state(decoder.encode(feats)),
                                   decoder.encode(feats))
    assert log_probs.shape == (1, len(vocab))


# ----------------------------------------------------------------------------- training config


CONFIG_YAML = Path(__file__).resolve().parents[1].joinpath("configs", "flickr8k-sat.yaml").read_text()
override_keys = st.sampled_from(["optim.lr", "optim.epochs", "model.hidden_dim", "data.corpus", "seed", "threads",
                                 "optim", "val_metric", "progress", "nope", "optim.nope", "data.max_len.x", "then", ""])
override_values = st.one_of(st.sampled_from(["1e-3", "inf", "nan", "-1", "[1, 2]", "{a: 1}", "true", "null", "",
                                             "'3'", "0x10", "!!python/object:os.system", "&a [*a]", "1e999"]),
                            st.text(max_size=10))


@given(content=text_bytes(CONFIG_YAML), overrides=st.lists(st.tuples(override_keys, override_values)
                                                          .map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=8),
                                                          max_size=3))
def test_config_loader(work, content, overrides):
    path = work / "config.yaml"
    path.write_bytes(content)
    with hang_guard():
        try:
            cfg = load_config(TrainConfig, path, overrides)
        except ConfigError as e:
            assert str(e), "an empty message"
            event("project error")
            return
    event("valid config")
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.optim.epochs, int) and isinstance(cfg.model, dict)
    try:  # the later stages (``then``) are read when training starts: a bad one is a message too
        stages = stage_configs(cfg)
    except ValueError as e:
        assert str(e), "an empty message"
        event("bad stage")
        return
    assert len(stages) == 1 + len(cfg.then) and all(isinstance(s.optim.lr, float) for s in stages)


# ----------------------------------------------------------------------------- images


def _image_seeds() -> list[bytes]:
    seeds = []
    im = Image.new("RGB", (12, 9), (10, 120, 200))
    im.putpixel((3, 3), (255, 0, 0))
    for fmt, mode, extra in [("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("JPEG", "RGB", {}), ("GIF", "P", {}),
                             ("BMP", "RGB", {}), ("TIFF", "RGB", {}), ("WEBP", "RGB", {}), ("PNG", "I;16", {}),
                             ("JPEG", "CMYK", {})]:
        buf = io.BytesIO()
        im.convert(mode).save(buf, format=fmt, **extra)
        seeds.append(buf.getvalue())
    return seeds


IMAGE_SEEDS = _image_seeds()


@given(content=st.one_of(st.sampled_from(IMAGE_SEEDS).flatmap(mutated_bytes), st.binary(max_size=200)),
       as_path=st.booleans())
def test_image_loader(work, content, as_path):
    path = work / "image.bin"
    if as_path:
        path.write_bytes(content)
    with hang_guard():
        try:
            im = load_image(path if as_path else content, max_pixels=1_000_000)
        except ImageError as e:
            assert str(e).startswith(f"{path}: " if as_path else "<bytes>: "), str(e)
            event("project error")
            return
    event("valid image")
    assert im.mode == "RGB" and im.width >= 1 and im.height >= 1 and im.width * im.height <= 1_000_000
    im.getpixel((0, 0))  # decoded, not lazy


# ----------------------------------------------------------------------------- feature stores


@pytest.fixture(scope="module")
def store_seed(work) -> Path:
    """A finished 3-image store (2x2 grid, 8 channels) written directly, without running an encoder."""
    import numpy as np

    d = work / "store-seed"
    d.mkdir()
    rng = np.random.default_rng(0)
    np.save(d / "features.npy", rng.standard_normal((3, 4, 8)).astype(np.float16))
    np.save(d / "status.npy", np.array([1, 1, 2], dtype=np.uint8))
    (d / "index.json").write_text(json.dumps({"images": ["a.jpg", "b.jpg", "c.jpg"]}))
    (d / "meta.json").write_text(json.dumps({
        "format": "captioner-features", "version": 1, "shape": [3, 4, 8], "dtype": "float16", "complete": True,
        "encoder": {"name": "efficientnet-lite0", "image_size": 64, "grid": [2, 2], "channels": 8,
                    "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0], "resize": "squash"},
        "image_root": str(work / "img"), "fingerprint": "0" * 64}))
    return d


@given(which=st.sampled_from(["meta.json", "index.json", "features.npy", "status.npy"]), data=st.data())
def test_feature_store_opener(work, store_seed, which, data):
    from captioner.data.features import FeatureStore, FeatureStoreError

    d = work / "store"
    d.mkdir(exist_ok=True)
    for name in ("meta.json", "index.json", "features.npy", "status.npy"):
        (d / name).write_bytes((store_seed / name).read_bytes())
    seed = (store_seed / which).read_bytes()
    if which.endswith(".json"):
        content = data.draw(json_bytes(json.loads(seed)))
    else:  # mostly the .npy header (dtype, shape, order), sometimes anywhere
        content = data.draw(st.one_of(mutated_bytes(seed[:128], max_ops=3).map(lambda head: head + seed[128:]),
                                      mutated_bytes(seed, max_ops=2)))
    (d / which).write_bytes(content)
    with hang_guard():
        try:
            store = FeatureStore.open(d)
        except FeatureStoreError as e:
            assert str(d) in str(e), str(e)
            event("project error")
            return
        event("valid store")
        for name in store.images:
            if store.has(name):
                try:
                    grid = store.get(name)
                except FeatureStoreError as e:  # a mutated byte may make a row NaN or infinite: named, refused
                    assert str(d) in str(e) and name in str(e) and "NaN or infinite" in str(e), str(e)
                    event("non-finite row")
                    continue
                assert grid.shape == tuple(store.features.shape[1:])
