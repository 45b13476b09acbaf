"""What the last run's hint allows: `caption`'s head start (captioner.encoders.head_start: the first images encoded
before torch is imported, taken only when the command's encoder runs the same file with the same input, the results
those of a run without one) and `features` without torch (captioner.encoders.quick_features: the same store); the
`features` threads that each decode and encode their own batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.cli.main import main
from captioner.data.features import FeatureStore, images_to_encode
from captioner.data.images import DEFAULT_MAX_PIXELS
from captioner.data.synthetic import make_shapes_dataset
from captioner.encoders import head_start
from captioner.encoders.extract import extract_features
from captioner.encoders.head_start import HeadStart, Hint, caption_key
from captioner.encoders.quick_features import features_key, features_without_torch, read_features_hint
from captioner.encoders.network import ImageEncoder, get_encoder_spec
from captioner.encoders.sessions import cache_dir
from captioner.encoders.runtime import with_runtime

ort = pytest.importorskip("onnxruntime", reason="the fast extra (onnxruntime) is not installed")

SIZE = 64  # Lite0 at 64 px: exports and runs in a moment


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, 20, size=80, seed=7)
    return root / "images"


def _finished(head: HeadStart) -> HeadStart:
    """Wait until the head start's thread has encoded every image it can (the commands take it when they are
    ready; a test waits, so that what it hands over does not depend on the machine's speed)."""
    if head._thread is not None:
        head._thread.join(timeout=120)
    return head


def _sources(folder):
    root, names = images_to_encode(None, folder)
    return root, names, [str(root / name) for name in names]


def _store(path):
    store = FeatureStore.open(path, require_complete=True)
    return store.images, np.asarray(store.features)


def test_onnx_runtime_gives_an_image_the_same_features_in_any_batch_and_with_any_threads(tmp_path):
    """What makes a head start change nothing: the features of an image do not depend on the images encoded with it
    or on the session's threads."""
    lite0 = ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=SIZE))
    one, two = (with_runtime(lite0, "onnx", threads=t, cache=tmp_path) for t in (1, 2))
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
    whole = one.encode_arrays(batch).numpy()
    assert np.array_equal(whole, two.encode_arrays(batch).numpy())
    assert np.array_equal(whole, np.concatenate([one.encode_arrays(batch[:2]).numpy(),
                                                 two.encode_arrays(batch[2:]).numpy()]))


def _hint_run(args: list[str]) -> dict:
    """A `captioner` command in a new process: its exit status and whether it imported torch."""
    code = ("import json, sys\nfrom captioner.cli.main import main\nrc = main(sys.argv[1:])\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_features_leaves_a_hint_then_fills_the_same_store_without_torch(shapes, tmp_path, own_cache):
    flags = ["--image-size", str(SIZE), "--runtime", "onnx", "--quiet"]
    assert main(["features", "--images", str(shapes), "--out", str(tmp_path / "a"), *flags]) == 0
    key = features_key("efficientnet-lite0", None, SIZE, None, "onnx")
    hint = read_features_hint(key)  # the first run leaves it
    assert hint is not None and hint["encoder"]["image_size"] == SIZE and len(hint["stamps"]) == 1 and hint["code"]
    got = _hint_run(["features", "--images", str(shapes), "--out", str(tmp_path / "b"), *flags])
    assert got == {"rc": 0, "torch": False}
    a_names, a = _store(tmp_path / "a")
    b_names, b = _store(tmp_path / "b")
    assert a_names == b_names and np.array_equal(a, b)
    meta = [json.loads((tmp_path / d / "meta.json").read_text()) for d in "ab"]
    assert [{k: v for k, v in m.items() if k != "created"} for m in meta][0] == \
        [{k: v for k, v in m.items() if k != "created"} for m in meta][1]
    # another device, precision or --cut takes the usual path
    got = _hint_run(["features", "--images", str(shapes), "--out", str(tmp_path / "c"), *flags, "--runtime", "torch"])
    assert got == {"rc": 0, "torch": True}


def test_a_store_begun_either_way_is_finished_the_other_way_the_same(shapes, tmp_path, own_cache):
    root, names, _ = _sources(shapes)
    kw = dict(image_size=SIZE, runtime="onnx", progress=False, batch_size=4)
    extract_features(root, names, tmp_path / "whole", **kw)  # leaves the hint
    extract_features(root, names, tmp_path / "part", limit_batches=2, **kw)
    summary = features_without_torch(root, names, tmp_path / "part", key=features_key("efficientnet-lite0", None,
                                                                                     SIZE, None, "onnx"),
                                     batch_size=4, max_pixels=DEFAULT_MAX_PIXELS, overwrite=False, progress=False)
    assert summary["already_done"] == 8 and summary["computed"] == len(names) - 8 and summary["complete"]
    assert np.array_equal(_store(tmp_path / "part")[1], _store(tmp_path / "whole")[1])


def test_a_stale_or_damaged_features_hint_takes_the_usual_path_and_is_made_again(shapes, tmp_path, own_cache):
    flags = ["--images", str(shapes), "--image-size", str(SIZE), "--runtime", "onnx", "--quiet"]
    assert main(["features", *flags, "--out", str(tmp_path / "a")]) == 0
    key = features_key("efficientnet-lite0", None, SIZE, None, "onnx")
    path = own_cache / f"features-{key}.json"
    good = json.loads(path.read_text())
    stale = {**good, "stamps": [[good["stamps"][0][0], 1, 1], *good["stamps"][1:]]}  # the weights file changed
    other_code = {**good, "code": "0" * 24}  # made by another checkout's code (of the same version)
    for hint in (stale, other_code, {**good, "encoder": {**good["encoder"], "resize": "zoom"}}, {**good, "stamps": []}):
        path.write_text(json.dumps(hint))
        assert read_features_hint(key) is None
        assert _hint_run(["features", *flags, "--out", str(tmp_path / "b"), "--overwrite"]) == {"rc": 0,
                                                                                                "torch": True}
        assert json.loads(path.read_text()) == good  # the usual path wrote it again
    exported = Path(good["path"])
    exported.write_bytes(exported.read_bytes()[:-10])  # cut short: its hash no longer matches
    assert read_features_hint(key) is None
    assert _hint_run(["features", *flags, "--out", str(tmp_path / "c")]) == {"rc": 0, "torch": True}
    assert np.array_equal(_store(tmp_path / "c")[1], _store(tmp_path / "a")[1])


@pytest.mark.parametrize("text", ["", "{", "[]", '{"path": 3}', '{"path": "%s", "image_size": 64, "resize": "zoom"}',
                                  '{"path": "%s", "image_size": 0, "resize": "squash"}',
                                  '{"path": "/nonexistent/encoder.onnx", "image_size": 64, "resize": "squash"}'])
def test_a_damaged_or_stale_hint_is_no_head_start(text, own_cache, shapes, tmp_path):
    real = tmp_path / "encoder.onnx"
    real.write_bytes(b"not read")
    own_cache.mkdir(parents=True)
    (own_cache / "hint-k.json").write_text(text.replace("%s", str(real)))
    head = HeadStart.start("k", _sources(shapes)[2], max_pixels=DEFAULT_MAX_PIXELS)
    assert head.hint is None and head._thread is None and head.take(None) == []


def test_a_file_onnx_runtime_cannot_load_or_a_damaged_one_is_no_result_and_no_error(own_cache, shapes, tmp_path):
    from captioner.encoders.sessions import file_sha256

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx graph")
    bad.with_suffix(".sha256").write_text(file_sha256(bad) + "\n")
    head = _finished(HeadStart("k", _sources(shapes)[2], max_pixels=DEFAULT_MAX_PIXELS,
                               hint=Hint(str(bad), SIZE, "squash")))
    assert head._done == []
    head.stop()
    lite0 = ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=SIZE))
    enc = with_runtime(lite0, "onnx", threads=1)
    damaged = tmp_path / "damaged.onnx"  # loads, but is not the file its hash was made of
    damaged.write_bytes(enc.path.read_bytes())
    damaged.with_suffix(".sha256").write_text("0" * 64 + "\n")
    head = _finished(HeadStart("k", _sources(shapes)[2], max_pixels=DEFAULT_MAX_PIXELS,
                               hint=Hint(str(damaged), SIZE, "squash")))
    assert head._done == []


def test_a_head_start_on_another_file_hands_nothing_over_and_the_hint_is_mended(shapes, tmp_path, own_cache):
    lite0 = ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=SIZE))
    enc = with_runtime(lite0, "onnx", threads=1)  # exported into own_cache
    other = tmp_path / "other.onnx"  # the same graph under another name: not the encoder's file
    other.write_bytes(enc.path.read_bytes())
    other.with_suffix(".sha256").write_bytes(enc.path.with_suffix(".sha256").read_bytes())
    key = caption_key([str(tmp_path / "model")], "auto")
    own_cache.mkdir(parents=True, exist_ok=True)
    (own_cache / f"hint-{key}.json").write_text(json.dumps({"path": str(other), "image_size": SIZE,
                                                            "resize": "squash"}))
    _, _, sources = _sources(shapes)
    head = _finished(HeadStart.start(key, sources, max_pixels=DEFAULT_MAX_PIXELS))
    assert head.hint is not None and head._done  # it ran, on the other file
    assert head.take(enc) == []
    assert Hint.read(key) == Hint(str(enc.path.resolve()), SIZE, "squash")  # the next run's hint names the right one
    # another image input is not the encoder's either
    head = _finished(HeadStart(key, sources, max_pixels=DEFAULT_MAX_PIXELS, hint=Hint(str(enc.path), SIZE,
                                                                                       "center-crop")))
    assert head._done and head.take(enc) == []
    # nor is an encoder that runs on torch
    head = _finished(HeadStart(key, sources, max_pixels=DEFAULT_MAX_PIXELS, hint=Hint(str(enc.path), SIZE, "squash")))
    assert head.take(lite0) == []


def test_captioner_hints_0_turns_them_off(monkeypatch, own_cache, shapes, tmp_path):
    real = tmp_path / "encoder.onnx"
    real.write_bytes(b"x")
    own_cache.mkdir(parents=True)
    (own_cache / "hint-k.json").write_text(json.dumps({"path": str(real), "image_size": SIZE, "resize": "squash"}))
    assert Hint.read("k") is not None
    monkeypatch.setenv("CAPTIONER_HINTS", "0")
    assert not head_start.enabled() and HeadStart.start("k", ["a.jpg"], max_pixels=None).hint is None
    assert read_features_hint("k") is None
    # and none is written
    assert main(["features", "--images", str(shapes), "--out", str(tmp_path / "s"), "--image-size", str(SIZE),
                 "--quiet"]) == 0
    assert not list(own_cache.glob("features-*.json"))


def test_keys_follow_what_decides_the_encoder(tmp_path):
    assert features_key("efficientnet-lite0", None, 64, None, "auto") == features_key("efficientnet-lite0", None, 64,
                                                                                      None, "onnx")
    assert features_key("efficientnet-lite0", None, 64, None, "onnx") != features_key("efficientnet-lite0", None, 96,
                                                                                      None, "onnx")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    before = caption_key([str(model)], "auto")
    (model / "config.json").write_text('{"changed": 1}')
    assert caption_key([str(model)], "auto") != before
    assert caption_key(["flickr8k-sat"], "auto") != caption_key([str(model)], "auto")


def test_without_torch_an_unreadable_image_is_reported_and_the_rest_done(shapes, tmp_path, own_cache, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    names = sorted(p.name for p in shapes.iterdir())
    for name in names:
        (folder / name).symlink_to(shapes / name)
    (folder / f"{names[3][:-4]}b.png").write_bytes(b"not a png")
    flags = ["--images", str(folder), "--image-size", str(SIZE), "--runtime", "onnx", "--quiet"]
    assert main(["features", *flags, "--out", str(tmp_path / "a")]) == 1  # leaves the hint
    capsys.readouterr()
    assert _hint_run(["features", *flags, "--out", str(tmp_path / "b")]) == {"rc": 1, "torch": False}
    lines = (tmp_path / "b" / "errors.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "b.png" in json.loads(lines[0])["image"]
    a, b = (FeatureStore.open(tmp_path / d) for d in "ab")
    done = [name for name in a.images if not name.endswith("b.png")]
    assert np.array_equal(np.stack([a.get(n) for n in done]), np.stack([b.get(n) for n in done]))


def test_features_threads_keep_the_order_of_rows_and_their_failures(shapes, tmp_path, own_cache, monkeypatch):
    """Several threads, each decoding and encoding its own batches: every row lands where one thread with a decoding
    process puts it (what runs with a single thread, as under torchrun), an unreadable image is a failed row and the
    rest are done."""
    folder = tmp_path / "images"
    folder.mkdir()
    for p in shapes.iterdir():
        (folder / p.name).symlink_to(p)
    Image.new("RGB", (4000, 4000)).save(folder / "zz-large.png")  # over the pixel limit below: a failure
    root, names, _ = _sources(folder)
    from captioner.encoders import extract

    monkeypatch.setattr(extract, "default_threads", lambda: 3)
    kw = dict(image_size=SIZE, runtime="onnx", progress=False, batch_size=3, max_pixels=1_000_000)
    s = extract_features(root, names, tmp_path / "threads", **kw)
    monkeypatch.setattr(extract, "default_threads", lambda: 1)  # one thread: decoding processes, as torch's path
    extract_features(root, names, tmp_path / "one", workers=1, **kw)
    assert s["failed"] == 1 and s["computed"] == len(names) - 1
    a, b = FeatureStore.open(tmp_path / "threads"), FeatureStore.open(tmp_path / "one")
    assert a.images == b.images and np.array_equal(np.asarray(a.features), np.asarray(b.features))
    assert np.array_equal(np.load(tmp_path / "threads" / "status.npy"), np.load(tmp_path / "one" / "status.npy"))


# ------------------------------------------------------------------ caption


@pytest.fixture(scope="module")
def bundled():
    from captioner.inference.captioner import Captioner

    return Captioner.from_pretrained(runtime="onnx")


def test_caption_takes_whole_batches_from_the_head_start_and_gives_the_same_results(bundled, shapes, tmp_path,
                                                                                     monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, p in enumerate(sorted(shapes.iterdir())[:12]):
        paths.append(str(folder / f"{i:02d}.png"))
        (folder / f"{i:02d}.png").symlink_to(p)
    paths[9] = str(folder / "09-broken.png")
    (folder / "09-broken.png").write_bytes(b"not a png")
    enc = bundled.encoder
    hint = Hint(str(enc.path), enc.spec.image_size, enc.spec.resize)
    handed = []
    real = HeadStart.take
    monkeypatch.setattr(HeadStart, "take", lambda self, *a: handed.append(real(self, *a)) or handed[-1])

    want = [(r.source, r.caption, r.score, r.error) for r in bundled.iter_captions(paths, batch_size=3)]
    # the head start reads images 0-7 (four calls of CHUNK = 2), stops at the unreadable 10th in its fifth: 8 images
    # done, two whole batches of 3 and the first 2 of the third, whose last image the captioner encodes itself
    head = _finished(HeadStart("k", paths, max_pixels=DEFAULT_MAX_PIXELS, hint=hint))
    encoded = []
    real_chunk = type(bundled)._encode_chunk
    monkeypatch.setattr(type(bundled), "_encode_chunk", lambda self, c: encoded.append(len(c)) or real_chunk(self, c))
    got = [(r.source, r.caption, r.score, r.error) for r in bundled.iter_captions(paths, batch_size=3, head_start=head)]
    assert len(handed[-1]) == 8 and sum(encoded) == 3  # images 8, 10 and 11 (the 9th is the unreadable one)
    assert got == want
    # all the images encoded (none unreadable): all taken, the last batch a short one
    good = [p for p in paths if "broken" not in p]
    head = _finished(HeadStart("k", good, max_pixels=DEFAULT_MAX_PIXELS, hint=hint))
    got = [(r.source, r.caption, r.score) for r in bundled.iter_captions(good, batch_size=3, head_start=head)]
    assert len(handed[-1]) == len(good)
    assert got == [(r.source, r.caption, r.score) for r in bundled.iter_captions(good, batch_size=3)]
    # a head start with another pixel limit than the captioner's: nothing taken
    head = _finished(HeadStart("k", good, max_pixels=None, hint=hint))
    encoded.clear()
    got = [(r.source, r.caption, r.score) for r in bundled.iter_captions(good, batch_size=3, head_start=head)]
    assert sum(encoded) == len(good)
    # a head start on other images: nothing taken
    head = _finished(HeadStart("k", good[::-1], max_pixels=DEFAULT_MAX_PIXELS, hint=hint))
    got = [(r.source, r.caption, r.score) for r in bundled.iter_captions(good, batch_size=3, head_start=head)]
    assert got == [(r.source, r.caption, r.score) for r in bundled.iter_captions(good, batch_size=3)]


def test_the_caption_command_leaves_a_hint_and_prints_the_same_with_a_head_start(shapes, capsys, monkeypatch):
    hint = cache_dir() / f"hint-{caption_key(['flickr8k-sat'], 'auto')}.json"  # the session's cache: exported once
    hint.unlink(missing_ok=True)
    args = ["caption", str(shapes), "--json", "--quiet", "--batch-size", "4"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert hint.is_file()
    assert main(args) == 0  # with a head start from the hint
    assert capsys.readouterr().out == first
    monkeypatch.setenv("CAPTIONER_HINTS", "0")
    assert main(args) == 0
    assert capsys.readouterr().out == first
