"""The image encoder through ONNX Runtime (captioner.encoders.runtime): fp32 features equal torch's, the
exported file's cache, int8 calibration and its feature stores, the --runtime flags of the commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioner.cli import args as cli_args
from captioner.cli.main import main
from captioner.data.features import FeatureStore, FeatureStoreError
from captioner.data.synthetic import make_shapes_dataset
from captioner.encoders import onnx_cache, runtime
from captioner.encoders.extract import extract_features
from captioner.encoders.network import ImageEncoder, get_encoder_spec
from captioner.encoders.quantize import CalibrationError
from captioner.encoders.runtime import FP32_TOLERANCE, RuntimeChoiceError, resolve_runtime, with_runtime

pytest.importorskip("onnxruntime", reason="the fast extra (onnxruntime) is not installed")

SIZE = 64  # Lite0 at 64 px (a 2x2 grid): exports and runs in a moment, same network and weights


@pytest.fixture(scope="module")
def lite0() -> ImageEncoder:
    return ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=SIZE))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("runtime-cache")


@pytest.fixture(scope="module")
def onnx_lite0(lite0, cache):
    return with_runtime(lite0, "onnx", cache=cache)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, 24, size=80, seed=5)
    return root / "images"


def _batch(n: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (n, SIZE // 8, SIZE // 8, 3)).repeat(8, axis=1).repeat(8, axis=2)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ fp32 features


def test_onnx_features_equal_torch_within_the_stated_tolerance(lite0, onnx_lite0):
    batch = _batch()
    want, got = lite0.encode_arrays(batch), onnx_lite0.encode_arrays(batch)
    assert got.dtype == torch.float32 and got.shape == want.shape == (6, 4, 1280)
    assert (got - want).abs().max().item() <= FP32_TOLERANCE
    assert want.abs().max().item() > 1  # real activations, not all zeros
    torch.testing.assert_close(onnx_lite0.encode_arrays(batch[2:3]), got[2:3], atol=1e-5, rtol=0)  # batch size
    assert onnx_lite0.spec == lite0.spec and onnx_lite0.precision == "fp32" and onnx_lite0.device.type == "cpu"


def test_the_onnx_encoder_has_the_interface_of_the_torch_one(lite0, onnx_lite0, shapes):
    from PIL import Image

    images = [Image.open(p) for p in sorted(shapes.glob("*.png"))[:3]]
    assert np.array_equal(onnx_lite0.preprocess(images), lite0.preprocess(images))
    grid, pooled = onnx_lite0.encode_all(onnx_lite0.preprocess(images))
    assert pooled is None and grid.shape == (3, 4, 1280)
    torch.testing.assert_close(onnx_lite0.encode(images), lite0.encode(images), atol=FP32_TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match=r"\(B >= 1, 64, 64, 3\)"):
        onnx_lite0.encode_arrays(np.zeros((2, 32, 32, 3), np.uint8))


def test_runtime_torch_is_the_torch_encoder_itself(lite0):
    assert with_runtime(lite0, "torch") is lite0


def test_auto_is_onnx_on_the_cpu_in_fp32_and_torch_otherwise(monkeypatch):
    assert resolve_runtime("auto", "cpu", "fp32") == "onnx"
    assert resolve_runtime("auto", "cpu", "bf16") == "torch"
    assert resolve_runtime("auto", "cuda", "fp32") == "torch"  # a GPU keeps torch (onnxruntime-gpu is not used)
    with pytest.raises(RuntimeChoiceError, match="runs the encoder on the CPU, but the device is cuda"):
        resolve_runtime("onnx", "cuda", "fp32")
    with pytest.raises(RuntimeChoiceError, match="--runtime torch"):
        resolve_runtime("onnx", "cpu", "bf16")
    monkeypatch.setattr(runtime, "onnxruntime_installed", lambda: False)
    assert resolve_runtime("auto", "cpu", "fp32") == "torch"
    with pytest.raises(RuntimeChoiceError, match=r"captioner\[fast\]"):
        resolve_runtime("onnx", "cpu", "fp32")
    with pytest.raises(RuntimeChoiceError, match="unknown; use one of auto, torch, onnx, onnx-int8"):
        resolve_runtime("tensorrt", "cpu", "fp32")


def test_the_cli_lists_the_runtimes_of_the_library():
    assert cli_args.RUNTIMES == runtime.RUNTIMES


# ------------------------------------------------------------------ the cache


def test_a_second_build_reuses_the_exported_file(lite0, own_cache, monkeypatch):
    first = with_runtime(lite0, "onnx")
    assert first.path.parent == own_cache and first.path.with_suffix(".sha256").is_file()
    exports = []
    real = onnx_cache.export_onnx
    monkeypatch.setattr(onnx_cache, "export_onnx", lambda *a: exports.append(a) or real(*a))
    again = with_runtime(lite0, "onnx")
    assert exports == [] and again.path == first.path
    assert not list(own_cache.glob("*.tmp"))  # no temporary file left behind


def _spec():
    return get_encoder_spec("efficientnet-lite0", image_size=SIZE)


def test_a_start_with_a_cached_export_builds_no_network(lite0, own_cache, monkeypatch):
    """An ImageEncoder that can say what it is (its weights file, cut, tuned digest, code) finds its exported file
    through an alias named by that, without building its network; a built network is keyed by its own weights
    (it may have been changed in place), and another identity is another alias."""
    first = with_runtime(ImageEncoder(_spec()), "onnx")  # exported (or found) and its alias written
    assert len(list(own_cache.glob("encoder-*.alias"))) == 1
    fresh = ImageEncoder(_spec())
    keys = []
    real = onnx_cache.encoder_key
    monkeypatch.setattr(onnx_cache, "encoder_key", lambda *a: keys.append(a) or real(*a))
    again = with_runtime(fresh, "onnx")
    assert again.path == first.path and keys == [] and fresh._net is None  # nothing built
    batch = _batch(2, seed=3)
    assert (again.encode_arrays(batch) - lite0.encode_arrays(batch)).abs().max().item() <= FP32_TOLERANCE
    assert fresh.identity() is not None and fresh.identity() == ImageEncoder(_spec()).identity()
    assert fresh.identity() != ImageEncoder(_spec(), cut=2).identity()
    assert fresh.identity() != ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=SIZE, grid=1)).identity()
    fresh.net  # built: from now on its own weights key it
    assert fresh.identity() is None
    with torch.no_grad():
        next(iter(fresh.net.parameters())).add_(0.01)
    changed = with_runtime(fresh, "onnx")
    assert len(keys) == 1 and changed.path != first.path


def test_a_damaged_cache_file_is_exported_again(lite0, own_cache, monkeypatch):
    path = with_runtime(lite0, "onnx").path
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # cut short
    exports = []
    real = onnx_cache.export_onnx
    monkeypatch.setattr(onnx_cache, "export_onnx", lambda *a: exports.append(a) or real(*a))
    enc = with_runtime(lite0, "onnx")
    assert len(exports) == 1 and onnx_cache.cached_is_valid(path)
    batch = _batch(2, seed=1)
    assert (enc.encode_arrays(batch) - lite0.encode_arrays(batch)).abs().max().item() <= FP32_TOLERANCE
    flipped = bytearray(path.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # one weight damaged: still a loadable file, caught by its hash
    path.write_bytes(bytes(flipped))
    with_runtime(lite0, "onnx")
    assert len(exports) == 2 and path.read_bytes() != bytes(flipped)


def test_another_network_is_another_cache_file(lite0, cache):
    other = ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=SIZE))
    with torch.no_grad():
        next(iter(other.net.parameters())).add_(0.01)  # as a fine-tuned tail changes the weights
    assert onnx_cache.encoder_key(other, "x") != onnx_cache.encoder_key(lite0, "x")
    assert onnx_cache.encoder_key(lite0, "x") != onnx_cache.encoder_key(lite0, "y")  # the runtime's version


# ------------------------------------------------------------------ int8


def test_int8_is_calibrated_once_on_a_folder_and_reused(lite0, shapes, cache, tmp_path):
    with pytest.raises(CalibrationError, match="--calibration DIR"):
        with_runtime(lite0, "onnx-int8", cache=tmp_path)  # never calibrated in this cache
    with pytest.raises(CalibrationError, match="not a folder"):
        with_runtime(lite0, "onnx-int8", calibration=tmp_path / "nowhere", cache=cache)
    q = with_runtime(lite0, "onnx-int8", calibration=shapes, cache=cache)
    assert q.precision == "int8" and q.runtime == "onnx-int8"
    again = with_runtime(lite0, "onnx-int8", cache=cache)  # no --calibration: the last one of this network
    assert again.path == q.path
    batch = _batch(4, seed=2)
    want, got = lite0.encode_arrays(batch), q.encode_arrays(batch)
    assert got.shape == want.shape
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < 0.5, rel  # quantized: close to fp32, not equal
    with pytest.raises(RuntimeChoiceError, match="--calibration is for --runtime onnx-int8"):
        with_runtime(lite0, "onnx", calibration=shapes, cache=cache)


def test_an_int8_store_is_recorded_and_never_finished_with_fp32(shapes, own_cache, tmp_path):
    names = sorted(p.name for p in shapes.glob("*.png"))[:6]
    out = tmp_path / "store"
    extract_features(shapes, names, out, image_size=SIZE, workers=0, progress=False, runtime="onnx-int8",
                     calibration=shapes)
    assert json.loads((out / "meta.json").read_text())["precision"] == "int8"
    with pytest.raises(FeatureStoreError, match="finish it with --runtime onnx-int8"):
        extract_features(shapes, names, out, image_size=SIZE, workers=0, progress=False, runtime="onnx")
    fp32 = tmp_path / "fp32"
    extract_features(shapes, names, fp32, image_size=SIZE, workers=0, progress=False, runtime="onnx")
    with pytest.raises(FeatureStoreError, match=r"--precision fp32 \(and any runtime but onnx-int8\)"):
        extract_features(shapes, names, fp32, image_size=SIZE, workers=0, progress=False, runtime="onnx-int8")


# ------------------------------------------------------------------ the commands


def test_features_runtime_torch_gives_todays_exact_features(shapes, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "store"
    assert main(["features", "--images", str(shapes), "--out", str(out), "--image-size", str(SIZE),
                 "--runtime", "torch", "--workers", "0", "--quiet", "--batch-size", "8"]) == 0
    store = FeatureStore.open(out, require_complete=True)
    first = store.images[:8]  # the first batch, encoded as the command did: the torch encoder, 8 images at once
    enc = ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=SIZE))
    want = enc.encode([Image.open(shapes / name).convert("RGB") for name in first]).numpy().astype(np.float16)
    assert np.array_equal(np.stack([store.get(name) for name in first]), want)


def test_features_runtime_onnx_is_torchs_within_tolerance(shapes, tmp_path, own_cache, capsys):
    stores = {}
    for rt in ("torch", "onnx"):
        stores[rt] = tmp_path / rt
        assert main(["features", "--images", str(shapes), "--out", str(stores[rt]), "--image-size", str(SIZE),
                     "--runtime", rt, "--workers", "0", "--quiet"]) == 0
    a, b = (FeatureStore.open(stores[rt], require_complete=True).features.astype(np.float32) for rt in stores)
    assert np.abs(a - b).max() <= FP32_TOLERANCE + 1e-2  # + the float16 store's rounding at values up to 6


def test_a_bad_runtime_is_exit_2_with_a_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["caption", "examples/chelsea.png", "--runtime", "tensorrt"])
    assert e.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err
    assert main(["caption", "examples/chelsea.png", "--runtime", "onnx", "--precision", "bf16"]) == 2
    assert "--runtime onnx computes in fp32, not bf16" in capsys.readouterr().err
    assert main(["features", "--images", "examples", "--out", str(tmp_path / "s"), "--runtime", "onnx",
                 "--calibration", "examples"]) == 2
    assert "--calibration is for --runtime onnx-int8" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before any file was made


def test_the_caption_flags_reach_the_encoder(monkeypatch, capsys):
    from captioner.inference import captioner as inference

    seen = []

    def recording(encoder, name, **kw):
        seen.append((name, kw))
        return encoder

    monkeypatch.setattr(inference, "with_runtime", recording)
    monkeypatch.setattr(inference, "_ENCODERS", type(inference._ENCODERS)())  # none built yet in this process
    assert main(["caption", "examples/chelsea.png", "--runtime", "onnx-int8", "--calibration", "x", "--quiet"]) == 0
    assert seen == [("onnx-int8", {"calibration": "x", "threads": None})]  # one image: no pipeline to share
    assert main(["caption", "examples/chelsea.png", "--quiet"]) == 0
    assert seen[-1][0] == "onnx"  # auto, with ONNX Runtime installed and the CPU in fp32
    assert main(["caption", "examples/chelsea.png", "--quiet", "--runtime", "torch"]) == 0
    assert seen[-1][0] == "torch"
    assert capsys.readouterr().out.count("chelsea.png: ") == 3


def test_caption_shares_the_cores_between_the_runtime_and_the_decoder(monkeypatch, shapes, capsys):
    """Many images through an inference runtime: its pool gets half of torch's threads and the decoder the rest,
    during the command only; with torch as the encoder's runtime nothing changes."""
    import torch

    from captioner.inference import captioner as inference

    seen = []
    monkeypatch.setattr(inference, "with_runtime", lambda encoder, name, **kw: seen.append((name, kw)) or encoder)
    monkeypatch.setattr(inference, "_ENCODERS", type(inference._ENCODERS)())
    real = torch.set_num_threads
    during = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: during.append(n) or real(n))
    before = torch.get_num_threads()
    real(4)
    try:
        assert main(["caption", str(shapes), "--batch-size", "2", "--quiet"]) == 0
        # split, split again as the images start, all back to the decoder once the encoder is done, restored
        assert seen[-1] == ("onnx", {"calibration": None, "threads": 2}) and during[:2] == [2, 2]
        assert during[2:] == [4, 4]
        assert torch.get_num_threads() == 4  # given back
        assert main(["caption", str(shapes), "--batch-size", "2", "--quiet", "--runtime", "torch"]) == 0
        assert seen[-1][0] == "torch" and during[4:] == [4]  # untouched but for the restoring call
    finally:
        real(before)
    capsys.readouterr()


def test_the_features_and_serve_flags_reach_the_encoder(monkeypatch, shapes, tmp_path, capsys):
    from captioner.encoders import extract
    from captioner.serving import server

    seen = []
    monkeypatch.setattr(extract, "with_runtime", lambda enc, name, **kw: seen.append((name, kw)) or enc)
    assert main(["features", "--images", str(shapes), "--out", str(tmp_path / "s"), "--image-size", str(SIZE),
                 "--workers", "0", "--quiet", "--runtime", "torch"]) == 0
    assert seen == [("torch", {"calibration": None, "threads": None})]
    # an inference runtime: a session of one thread, which one thread per core calls (each its own batches); no
    # hint, which would fill the store without torch
    monkeypatch.setenv("CAPTIONER_HINTS", "0")
    assert main(["features", "--images", str(shapes), "--out", str(tmp_path / "o"), "--image-size", str(SIZE),
                 "--quiet", "--runtime", "onnx"]) == 0
    assert seen[-1] == ("onnx", {"calibration": None, "threads": 1})
    called = {}
    monkeypatch.setattr(server, "serve", lambda model, cfg, **kw: called.update(kw) or 0)
    assert main(["serve", "--runtime", "onnx-int8", "--calibration", "photos"]) == 0
    assert called["runtime"] == "onnx-int8" and called["calibration"] == "photos"


def test_grid_pooling_is_exported_and_an_unexportable_net_stays_on_torch(cache, capsys):
    pooled = ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=128, grid=2))  # 4x4 averaged to 2x2
    onnx = with_runtime(pooled, "auto", cache=cache)
    batch = np.concatenate([_batch(2), _batch(2, seed=3)], axis=1).repeat(2, axis=2)[:, :128, :128]
    assert onnx is not pooled and onnx.encode_arrays(batch).shape == (2, 4, 1280)
    assert (onnx.encode_arrays(batch) - pooled.encode_arrays(batch)).abs().max().item() <= FP32_TOLERANCE
    uneven = ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=128, grid=3))  # 4x4 to 3x3: overlapping
    assert with_runtime(uneven, "auto", cache=cache) is uneven  # auto: the fastest runtime that can run it
    assert "the encoder runs with torch: it cannot be exported to ONNX" in capsys.readouterr().err
    with pytest.raises(RuntimeChoiceError, match="cannot be exported to ONNX .*; use --runtime torch"):
        with_runtime(uneven, "onnx", cache=cache)


def test_an_unwritable_cache_is_torch_for_auto_and_an_error_when_asked(lite0, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert with_runtime(lite0, "auto", cache=blocked / "captioner") is lite0
    assert "cannot be written" in capsys.readouterr().err
    with pytest.raises(RuntimeChoiceError, match="set XDG_CACHE_HOME to a writable folder"):
        with_runtime(lite0, "onnx", cache=blocked / "captioner")


def test_a_tuned_encoder_runs_with_both_outputs_of_encode_all(cache):
    from captioner.encoders.tail import tail_state

    spec = get_encoder_spec("efficientnet-lite0", image_size=SIZE)
    tuned = {k: v * 1.05 if v.is_floating_point() else v for k, v in tail_state(spec.build(), 1).items()}
    enc = ImageEncoder(spec, tuned=tuned, tuned_units=1)  # its concepts' input comes from the pretrained units
    onnx = with_runtime(enc, "onnx", cache=cache)
    (grid, pooled), (got_grid, got_pooled) = enc.encode_all(_batch(3)), onnx.encode_all(_batch(3))
    assert pooled is not None and got_pooled.shape == pooled.shape == (3, 1, 1280)
    assert (got_grid - grid).abs().max().item() <= FP32_TOLERANCE
    assert (got_pooled - pooled).abs().max().item() <= FP32_TOLERANCE
