"""Feature store: extraction, zero-copy reading, kill-and-resume, bad images, fingerprints."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.cli.main import main
from captioner.data.features import DONE, FAILED, TODO, FeatureStore, FeatureStoreError
from captioner.data.prepare import prepare_corpus
from captioner.data.synthetic import make_shapes_dataset
from captioner.encoders.extract import extract_features, images_to_encode
from captioner.encoders.network import ImageEncoder

N_IMAGES = 40
BATCH = 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, N_IMAGES, size=96, seed=3)
    image_dir = root / "images"
    return image_dir, sorted(p.name for p in image_dir.glob("*.png"))


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run over all images (batch 4, no workers)."""
    image_dir, names = shapes
    out = tmp_path_factory.mktemp("reference") / "store"
    summary = extract_features(image_dir, names, out, batch_size=BATCH, workers=0, progress=False)
    return out, summary


# ------------------------------------------------------------------ store layout and reading


def test_extraction_writes_a_complete_store(shapes, reference):
    image_dir, names = shapes
    out, summary = reference
    assert summary["images"] == summary["computed"] == N_IMAGES
    assert summary["already_done"] == 0 and summary["failed"] == 0 and summary["complete"]
    assert summary["images_per_second"] > 0
    for f in ("features.npy", "status.npy", "index.json", "meta.json", "errors.jsonl"):
        assert (out / f).exists(), f
    assert json.loads((out / "index.json").read_text()) == {"images": names}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "captioner-features" and meta["complete"] is True
    assert meta["shape"] == [N_IMAGES, 49, 1280] and meta["dtype"] == "float16"
    assert meta["encoder"]["name"] == "efficientnet-lite0" and meta["encoder"]["grid"] == [7, 7]
    assert meta["image_root"] == str(image_dir.resolve())
    assert (out / "errors.jsonl").read_text() == ""


def test_store_opens_zero_copy(shapes, reference):
    image_dir, names = shapes
    out, _ = reference
    store = FeatureStore.open(out, require_complete=True)
    assert isinstance(store.features, np.memmap) and isinstance(store.status, np.memmap)
    assert store.features.dtype == np.float16 and store.features.shape == (N_IMAGES, 49, 1280)
    assert not store.features.flags.writeable  # opened read-only
    assert store.images == names and store.grid == (7, 7)
    assert (store.status == DONE).all() and store.errors() == []
    assert store.row_of[names[5]] == 5 and store.has(names[5]) and not store.has("nope.png")

    view = store.get(names[5])
    assert view.shape == (49, 1280) and view.dtype == np.float16
    assert np.shares_memory(view, store.features)  # a view into the map, not a copy
    assert np.array_equal(view, store.features[5])
    assert np.isfinite(view).all() and np.abs(view).max() > 0
    with pytest.raises(KeyError):
        store.get("nope.png")


def test_store_matches_the_encoder(shapes, reference):
    image_dir, names = shapes
    store = FeatureStore.open(reference[0])
    want = ImageEncoder("efficientnet-lite0").encode([Image.open(image_dir / names[7]).convert("RGB")])
    np.testing.assert_allclose(store.get(names[7]).astype(np.float32), want[0].numpy(), atol=2e-2, rtol=1e-2)


def test_rerun_of_a_complete_store_computes_nothing(shapes, reference):
    image_dir, names = shapes
    out, _ = reference
    before = (out / "features.npy").stat().st_mtime_ns
    s = extract_features(image_dir, names, out, batch_size=BATCH, workers=0, progress=False)
    assert (s["computed"], s["already_done"], s["complete"]) == (0, N_IMAGES, True)
    assert (out / "features.npy").stat().st_mtime_ns == before


def test_open_errors(tmp_path, reference):
    with pytest.raises(FeatureStoreError, match="not a feature store"):
        FeatureStore.open(tmp_path)
    # a partial store opens, unless require_complete
    out, _ = reference
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in ("features.npy", "index.json", "meta.json"):
        (partial / f).write_bytes((out / f).read_bytes())
    status = np.load(out / "status.npy").copy()
    status[3:] = TODO
    np.save(partial / "status.npy", status)
    assert FeatureStore.open(partial).has(FeatureStore.open(out).images[2])
    with pytest.raises(FeatureStoreError, match=f"{N_IMAGES - 3} rows still to compute"):
        FeatureStore.open(partial, require_complete=True)


def _damaged_copy(store_dir: Path, target: Path, values: dict[int, float]) -> Path:
    """A copy of a store with ``values`` written into rows (row -> NaN, inf, ...)."""
    target.mkdir()
    for f in ("features.npy", "status.npy", "index.json", "meta.json", "errors.jsonl"):
        (target / f).write_bytes((store_dir / f).read_bytes())
    feats = np.load(target / "features.npy", mmap_mode="r+")
    for row, value in values.items():
        feats[row, 10, 3] = value
    feats.flush()
    del feats
    return target


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_row_holding_nan_or_infinity_is_an_error_naming_the_image(reference, tmp_path, value):
    """Issue 21, defect 4: such rows were read silently (evaluate scored empty captions, train "diverged")."""
    out, _ = reference
    bad = _damaged_copy(out, tmp_path / "bad", {6: value})
    store = FeatureStore.open(bad, require_complete=True)  # opening stays cheap: rows are checked when read
    name = store.images[6]
    assert np.isfinite(store.get(store.images[5])).all()
    with pytest.raises(FeatureStoreError) as err:
        store.get(name)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: the features of {name} (row 6) hold NaN or infinite values; the store is damaged")
    assert f"captioner features --corpus CORPUS.json --out {bad} --overwrite" in msg
    rows = np.array([9, 6, 2])
    with pytest.raises(FeatureStoreError, match=f"the features of {name} "):
        store.read(rows)
    good = store.read(np.array([9, 5, 2]))  # the rows asked for, in that order
    assert good.dtype == np.float16 and np.array_equal(good, store.features[[9, 5, 2]])


# ------------------------------------------------------------------ kill and resume

_CHILD = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(int(sys.argv[4]))
    from captioner.encoders import network as encoders
    from captioner.encoders.extract import extract_features

    from captioner.encoders import runtime

    # Slow every batch down (the values are untouched) so the kill surely lands mid-run, whichever runtime
    # (torch, or ONNX Runtime when it is installed) encodes.
    def slowed(encode):
        def slow_encode(self, batch):
            out = encode(self, batch)
            time.sleep(0.4)
            return out
        return slow_encode
    encoders.ImageEncoder.encode_arrays = slowed(encoders.ImageEncoder.encode_arrays)
    runtime.OnnxImageEncoder.encode_arrays = slowed(runtime.OnnxImageEncoder.encode_arrays)

    names = sys.argv[3].split(",")
    extract_features(sys.argv[1], names, sys.argv[2], batch_size=%d, workers=0, progress=False)
""" % BATCH)


def _run_and_kill(image_dir: Path, names: list[str], out: Path, timeout: float = 120.0) -> np.ndarray:
    """Start extraction in a child process, SIGKILL it once some rows are done; return status."""
    status_path = out / "status.npy"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(image_dir), str(out), ",".join(names), str(torch.get_num_threads())],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if (out / "meta.json").exists():  # written after status.npy is fully created
                try:
                    if (np.load(status_path, mmap_mode="r") == DONE).any():
                        break
                except (ValueError, OSError):  # caught mid-creation
                    pass
            time.sleep(0.005)
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        err = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert alive, f"the extraction child ended before being killed (rc={proc.returncode}):\n{err[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    return np.load(status_path)


def test_kill_and_resume_is_byte_identical(shapes, reference, tmp_path):
    image_dir, names = shapes
    out = tmp_path / "killed"
    status = _run_and_kill(image_dir, names, out)
    n_done = int((status == DONE).sum())
    assert 0 < n_done < N_IMAGES, n_done
    assert set(np.unique(status)) <= {TODO, DONE}
    assert not json.loads((out / "meta.json").read_text())["complete"]
    with pytest.raises(FeatureStoreError, match="still to compute"):
        FeatureStore.open(out, require_complete=True)

    s = extract_features(image_dir, names, out, batch_size=BATCH, workers=0, progress=False)
    assert s["already_done"] == n_done and s["computed"] == N_IMAGES - n_done
    assert s["computed"] + s["already_done"] == N_IMAGES and s["complete"] and s["failed"] == 0

    got = FeatureStore.open(out, require_complete=True)
    want = FeatureStore.open(reference[0], require_complete=True)
    assert got.images == want.images
    assert np.array_equal(got.features, want.features)  # byte-identical float16
    assert (out / "features.npy").read_bytes() == (reference[0] / "features.npy").read_bytes()


# ------------------------------------------------------------------ bad images


def test_bad_images_are_skipped_and_logged(shapes, tmp_path):
    image_dir, names = shapes
    root = tmp_path / "imgs"
    root.mkdir()
    good = names[:6]
    for n in good:
        (root / n).write_bytes((image_dir / n).read_bytes())
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not a png\n")
    listed = [good[0], "empty.png", good[1], good[2], "text.png", "missing.png", *good[3:]]
    out = tmp_path / "store"

    s = extract_features(root, listed, out, batch_size=BATCH, workers=1, progress=False)
    assert (s["computed"], s["failed"], s["complete"]) == (len(good), 3, True)

    store = FeatureStore.open(out, require_complete=True)  # failed rows do not count as "to do"
    row = store.row_of
    for bad in ("empty.png", "text.png", "missing.png"):
        assert store.status[row[bad]] == FAILED and not store.has(bad)
        with pytest.raises(KeyError, match="failed"):
            store.get(bad)
    for n in good:
        assert store.status[row[n]] == DONE and np.abs(store.get(n)).max() > 0
    errors = {e["image"]: e["error"] for e in store.errors()}
    assert set(errors) == {"empty.png", "text.png", "missing.png"}
    assert "empty file (0 bytes)" in errors["empty.png"]
    assert "not an image file" in errors["text.png"]
    assert "file not found" in errors["missing.png"]
    assert np.count_nonzero(store.features[row["text.png"]]) == 0  # failed rows stay zero

    # A rerun does not retry failed images (they are not "to do") and logs nothing new.
    s2 = extract_features(root, listed, out, batch_size=BATCH, workers=0, progress=False)
    assert (s2["computed"], s2["already_done"], s2["failed"]) == (0, len(good), 3)
    assert len(FeatureStore.open(out).errors()) == 3

    # Repairing a bad file changes its size, hence the fingerprint: the store must be rebuilt.
    (root / "text.png").write_bytes((image_dir / names[10]).read_bytes())
    with pytest.raises(FeatureStoreError, match="other images"):
        extract_features(root, listed, out, workers=0, progress=False)


# ------------------------------------------------------------------ fingerprint and overwrite


def test_fingerprint_mismatch_and_overwrite(shapes, tmp_path):
    image_dir, names = shapes
    out = tmp_path / "store"
    first, other = names[:3], names[3:7]
    extract_features(image_dir, first, out, batch_size=BATCH, workers=0, progress=False)
    before = (out / "features.npy").read_bytes()

    with pytest.raises(FeatureStoreError, match=r"made from other images or another encoder.*--overwrite"):
        extract_features(image_dir, other, out, workers=0, progress=False)
    with pytest.raises(FeatureStoreError, match="other images"):  # same count, different names
        extract_features(image_dir, names[1:4], out, workers=0, progress=False)
    with pytest.raises(FeatureStoreError, match="other images"):  # same images, other preprocessing
        extract_features(image_dir, first, out, resize="center-crop", workers=0, progress=False)
    with pytest.raises(FeatureStoreError, match="other images"):  # same images, other encoder
        extract_features(image_dir, first, out, encoder="efficientnet-lite1", workers=0, progress=False)
    assert (out / "features.npy").read_bytes() == before  # refused runs leave the store alone
    assert json.loads((out / "index.json").read_text())["images"] == first

    with pytest.raises(FeatureStoreError, match="duplicates"):
        extract_features(image_dir, [names[0], names[0]], tmp_path / "dup", workers=0, progress=False)

    # --overwrite: the old store is replaced by a fresh one for the new list.
    s = extract_features(image_dir, other, out, overwrite=True, batch_size=BATCH, workers=0, progress=False)
    assert (s["computed"], s["already_done"], s["complete"]) == (len(other), 0, True)
    store = FeatureStore.open(out, require_complete=True)
    assert store.images == other and store.features.shape == (len(other), 49, 1280)
    # overwrite also recomputes an identical, complete store from scratch
    s = extract_features(image_dir, other, out, overwrite=True, batch_size=BATCH, workers=0, progress=False)
    assert (s["computed"], s["already_done"]) == (len(other), 0)


def test_limit_batches_leaves_a_resumable_store(shapes, reference, tmp_path):
    image_dir, names = shapes
    few = names[:10]
    out = tmp_path / "store"
    s = extract_features(image_dir, few, out, batch_size=BATCH, workers=0, progress=False, limit_batches=1)
    assert (s["computed"], s["complete"]) == (BATCH, False)
    s = extract_features(image_dir, few, out, batch_size=BATCH, workers=0, progress=False)
    assert (s["computed"], s["already_done"], s["complete"]) == (len(few) - BATCH, BATCH, True)
    ref = FeatureStore.open(reference[0])
    assert np.array_equal(FeatureStore.open(out).features, ref.features[: len(few)])


# ------------------------------------------------------------------ which images a store is made from


def test_images_to_encode_from_a_folder_or_a_corpus(shapes, tmp_path):
    image_dir, names = shapes
    assert images_to_encode(None, image_dir) == (image_dir, names)
    corpus = prepare_corpus("folder", image_dir.parent / "captions.csv", images=image_dir, out=tmp_path).corpus
    root, val = images_to_encode(tmp_path / "corpus.json", None, "val")
    assert root == image_dir and val == corpus.images({"val"}) and val
    with pytest.raises(FeatureStoreError, match=r"--splits: no split named \['nope'\] in .*corpus.json "
                                                r"\(splits: train, val, test\)"):
        images_to_encode(tmp_path / "corpus.json", None, "val,nope")
    with pytest.raises(FeatureStoreError, match="not a folder"):
        images_to_encode(None, image_dir / names[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureStoreError, match="no images to encode in"):
        images_to_encode(None, tmp_path / "empty")


def test_image_names_that_are_not_utf8_are_encoded_and_named(shapes, reference, tmp_path, capsys):
    """Issue 21, defect 6: one file whose name is not valid UTF-8 failed the whole store (exit 2, "surrogates not
    allowed" from the fingerprint), naming no file."""
    image_dir, names = shapes
    folder = tmp_path / "photos"
    folder.mkdir()
    good, bad = os.fsdecode(b"caf\xe9.png"), os.fsdecode(b"notes\xff.png")
    shutil.copy(image_dir / names[0], folder / good)
    shutil.copy(image_dir / names[1], folder / "plain.png")
    (folder / bad).write_text("not a picture")
    out = tmp_path / "store"
    args = ["features", "--images", str(folder), "--out", str(out), "--workers", "1", "--quiet"]
    assert main(args) == 1  # the unreadable file failed, the others were done
    store = FeatureStore.open(out, require_complete=True)
    assert store.images == [good, bad, "plain.png"] and store.has(good) and store.has("plain.png")
    ref = FeatureStore.open(reference[0])
    assert np.abs(store.get(good) - ref.get(names[0])).max() < 0.02 < np.abs(store.get(good) - ref.get(names[1])).max()
    [error] = store.errors()
    assert error["image"] == "notes\ufffd.png" and error["error"].startswith(str(folder / "notes\ufffd.png"))
    assert os.fsdecode(base64.b64decode(error["image_b64"])) == bad
    capsys.readouterr()
    assert main(args) == 1  # a rerun resumes: the same fingerprint
    assert json.loads(capsys.readouterr().out)["already_done"] == 2


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(shapes, tmp_path, capsys):
    """Issue 21: progress bars wrote carriage-return lines into logs."""
    image_dir, names = shapes
    extract_features(image_dir, names[:3], tmp_path / "store", workers=0, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "3/3" in err.splitlines()[-1]


@pytest.mark.parametrize("workers", [-1, 65])
def test_the_number_of_workers_is_bounded(shapes, tmp_path, workers, capsys):
    image_dir, names = shapes
    with pytest.raises(ValueError, match=f"workers {workers}: must be from 0 to 64"):
        extract_features(image_dir, names[:2], tmp_path / "store", workers=workers, progress=False)
    assert not (tmp_path / "store").exists()
    with pytest.raises(SystemExit) as exit_status:  # argparse's refusal
        main(["features", "--images", str(image_dir), "--out", str(tmp_path / "s"), "--workers", str(workers)])
    assert exit_status.value.code == 2
    assert "--workers: must be from 0 to 64" in capsys.readouterr().err
