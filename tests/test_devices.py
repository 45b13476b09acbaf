"""Devices: every tensor the decoding engine and the decoders create is made on the model's device.

The machines here have no GPU, so the check is made on the CPU with PyTorch's default device set
to "meta": the model and its inputs live on the CPU, and any tensor created without naming a device
lands on "meta" instead, so mixing it with the model's tensors fails at once (as a CPU tensor would
next to a CUDA model)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from captioner.decoding.search import beam_search, greedy_search, sample
from captioner.runtime.devices import (DeviceError, autocast, check_precision, module_device, native_bf16, resolve_device,
                                       split_precision)
from captioner.models import available_architectures, build_decoder
from captioner.training.loss import caption_loss

from .models.test_contract import SMALL
from .models.test_sat import random_captions

V, P, C = 14, 5, 12
START, END = 1, 2
ARCHS = available_architectures()


@contextlib.contextmanager
def default_device_meta():
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(before)


def make(arch: str):
    torch.manual_seed(0)
    model = build_decoder(arch, {**SMALL[arch], "vocab_size": V, "feature_dim": C})
    return model


def test_the_meta_default_device_catches_a_tensor_made_without_a_device():
    """The premise of the tests below: a device-less tensor next to the model's CPU tensors fails."""
    x = torch.ones(3)
    with default_device_meta():
        made = torch.zeros(3)
        assert made.device.type == "meta"
        with pytest.raises((RuntimeError, NotImplementedError)):
            (x + made).sum().item()
        assert torch.zeros(3, device=x.device).device.type == "cpu"


@pytest.mark.parametrize("arch", ARCHS)
def test_searches_and_sampling_create_tensors_on_the_models_device(arch):
    model = make(arch).eval()
    feats = torch.randn(3, P, C)
    with default_device_meta():
        greedy = greedy_search(model, feats, start_id=START, end_id=END, max_len=6, banned=(0, 1))
        beams = beam_search(model, feats, start_id=START, end_id=END, beam_size=3, max_len=6, n_best=2,
                            banned=(0, 1))
        drawn = sample(model, feats, start_id=START, end_id=END, max_len=6, num_captions=2, top_k=5, top_p=0.9,
                       banned=(0, 1))
        seeded = sample(model, feats, start_id=START, end_id=END, max_len=6, num_captions=2, seed=7)
    assert len(greedy) == 3 and all(len(b) == 2 for b in beams)
    assert all(len(d) == 2 for d in drawn) and all(len(d) == 2 for d in seeded)
    for h in [*greedy, *(h for b in beams for h in b), *(h for d in drawn for h in d)]:
        assert 0 not in h.tokens and 1 not in h.tokens and h.score <= 0
        if h.attention is not None:
            assert h.attention.device.type == "cpu" and h.attention.shape == (len(h.tokens), P)
    # the results are real numbers, the same as without the meta default
    assert [h.tokens for h in greedy] == [h.tokens for h in greedy_search(model, feats, start_id=START, end_id=END,
                                                                          max_len=6, banned=(0, 1))]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_training_step_creates_tensors_on_the_models_device(arch):
    model = make(arch).train()
    feats, tokens, lengths = random_captions(0, (6, 4, 4, 1), V, P, C)
    params = [p for p in model.parameters() if p.requires_grad]
    with default_device_meta():
        out = model(feats, tokens, lengths)
        loss, ce = caption_loss(out, tokens, lengths)
        loss.backward()
    assert loss.device.type == "cpu" and torch.isfinite(loss) and ce > 0
    assert all(p.grad is not None and p.grad.device.type == "cpu" for p in params)
    assert any(float(p.grad.abs().sum()) > 0 for p in params)


# ------------------------------------------------------------------ device names


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    for bad in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(DeviceError, match="unknown; use cpu, cuda"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_a_clear_error(name):
    with pytest.raises(DeviceError) as err:
        resolve_device(name)
    msg = str(err.value)
    assert msg.startswith(f"device {name!r}: ") and "--device cpu" in msg and "auto" in msg


def test_precision():
    cpu = torch.device("cpu")
    assert check_precision("fp32", cpu) == "fp32" and check_precision("bf16", cpu) == "bf16"
    with pytest.raises(DeviceError, match="use fp32"):
        check_precision("fp16", cpu)
    with autocast(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert module_device(torch.nn.Linear(2, 2)) == cpu and module_device(torch.nn.ReLU()) == cpu


def test_captioning_precision_auto_splits_between_encoder_and_decoder(monkeypatch):
    """auto: the encoder in float32 (any runtime runs it), the decoder in bfloat16 only on a CPU with bfloat16
    instructions; fp32 and bf16 are both networks'. check_precision takes auto only when asked to (training decides
    its auto once, before a run starts)."""
    cpu = torch.device("cpu")
    assert split_precision("fp32", cpu) == ("fp32", "fp32") and split_precision("bf16", cpu) == ("bf16", "bf16")
    assert split_precision("auto", cpu) == ("fp32", "bf16" if native_bf16(cpu) else "fp32")
    assert not native_bf16(torch.device("meta"))
    import captioner.runtime.devices as devices

    for has, decoder in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(devices, "native_bf16", lambda device, has=has: has)
        assert split_precision("auto", cpu) == ("fp32", decoder)
    with pytest.raises(DeviceError, match="use auto"):
        split_precision("fp16", cpu)
    with pytest.raises(DeviceError, match="use fp32"):
        check_precision("auto", cpu)


def test_captioner_precisions_pick_the_decoders_and_keep_the_concepts_in_float32(monkeypatch):
    """The Captioner's default (auto) decodes in the decoder's precision of split_precision (here told the CPU has
    bfloat16 instructions, so bf16); fp32 gives the engine's float32 captions exactly; the concept head computes in
    float32 under any precision."""
    import captioner.runtime.devices as devices
    from captioner.decoding.search import generate
    from captioner.inference.captioner import Captioner

    monkeypatch.setattr(devices, "native_bf16", lambda device: True)
    torch.manual_seed(0)
    feats = torch.randn(4, 49, 1280).abs()
    auto, fp32 = Captioner.from_pretrained("flickr8k-sat"), Captioner.from_pretrained("flickr8k-sat", precision="fp32")
    cpu = torch.device("cpu")
    assert (auto.encoder_precision, auto.decoder_precision) == split_precision("auto", cpu) == ("fp32", "bf16")
    assert (fp32.encoder_precision, fp32.decoder_precision) == ("fp32", "fp32")
    s = fp32.settings.replace(concepts="off", beam_size=3)
    engine = generate(fp32.decoder, fp32.vocab, feats, s)
    assert [h[0].tokens for h in fp32.decode_features(feats, s)] == [h[0].tokens for h in engine]
    with autocast(cpu, auto.decoder_precision):
        engine_auto = generate(auto.decoder, auto.vocab, feats, s)
    assert [h[0].tokens for h in auto.decode_features(feats, s)] == [h[0].tokens for h in engine_auto]
    head = fp32.guide.head
    plain = head.confidences(feats)
    with autocast(cpu, "bf16"):
        assert torch.equal(head.confidences(feats), plain)


def test_the_image_encoder_creates_tensors_on_its_device():
    import numpy as np

    from captioner.encoders.network import ImageEncoder, get_encoder_spec

    enc = ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=64), device="auto")
    assert enc.device == resolve_device("auto")
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    want = enc.encode_arrays(images)
    with default_device_meta():
        got = enc.encode_arrays(images)
    assert got.device == enc.device and got.dtype == torch.float32 and got.shape == (2, 4, 1280)
    assert torch.equal(got, want)
    bf16 = ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=64), precision="bf16").encode_arrays(images)
    assert bf16.dtype == torch.float32  # computed in bfloat16, handed back as float32
    assert not torch.equal(bf16, want) and (bf16 - want).abs().mean() <= 0.15 * want.abs().mean()


# ------------------------------------------------------------------ the commands


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
@pytest.mark.parametrize("command", [
    ["features", "--images", "{d}", "--out", "{d}/store"],
    ["caption", "{d}/a.png"],
    ["evaluate", "--model", "flickr8k-sat", "--corpus", "{d}/corpus.json", "--features", "{d}/store"],
    ["train", "data.corpus={d}/corpus.json", "data.features={d}/store", "out_dir={d}/run"],
])
def test_commands_refuse_a_gpu_that_is_not_there(command, tmp_path, capsys):
    from PIL import Image

    from captioner.cli.main import main

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    args = [a.format(d=tmp_path) for a in command]
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda': ") and "--device cpu" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "run").exists()  # nothing was started
    with pytest.raises(SystemExit) as exited:  # not a choice: argparse's usage error
        main([*args, "--device", "cpu", "--precision", "fp16"])
    assert exited.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


def test_features_on_auto_device_and_in_bf16(tmp_path):
    import json

    import numpy as np

    from captioner.data.synthetic import make_shapes_dataset
    from captioner.data.features import FeatureStore, FeatureStoreError
    from captioner.encoders.extract import extract_features

    make_shapes_dataset(tmp_path / "shapes", 4, size=64, seed=1)
    root = tmp_path / "shapes" / "images"
    names = sorted(p.name for p in root.glob("*.png"))
    kw = dict(image_size=64, workers=0, progress=False)
    extract_features(root, names, tmp_path / "fp32", device="auto", **kw)
    extract_features(root, names, tmp_path / "bf16", precision="bf16", **kw)
    fp32, bf16 = (FeatureStore.open(tmp_path / d, require_complete=True) for d in ("fp32", "bf16"))
    assert fp32.meta["precision"] == "fp32" and bf16.meta["precision"] == "bf16"
    a, b = (np.asarray(s.features, np.float32).reshape(-1, 1280) for s in (fp32, bf16))
    # bfloat16 keeps 8 bits of mantissa through ~60 layers: the grids differ, each cell keeps its direction
    # (measured: mean |difference| 6% of mean |feature|, cosine of every cell's vectors >= 0.997)
    assert not np.array_equal(a, b) and np.abs(a - b).mean() <= 0.15 * np.abs(a).mean()
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() >= 0.98
    # a store is finished in the precision it was started in
    with pytest.raises(FeatureStoreError, match="started in bf16 precision; finish it with --precision bf16"):
        extract_features(root, names, tmp_path / "bf16", **kw)
    meta = json.loads((tmp_path / "fp32" / "meta.json").read_text())
    del meta["precision"]  # a store written before precision was recorded is fp32
    (tmp_path / "fp32" / "meta.json").write_text(json.dumps(meta))
    assert extract_features(root, names, tmp_path / "fp32", **kw)["already_done"] == 4


def test_captioner_on_auto_device_and_in_bf16():
    from PIL import Image

    from captioner.inference.captioner import Captioner

    img = Image.open(Path(__file__).parents[1] / "examples" / "chelsea.png")
    model = Captioner.from_pretrained("flickr8k-sat", device="auto")
    assert model.device == resolve_device("auto") and module_device(model.decoder) == model.device
    fp32 = model.caption(img, beam_size=2, return_attention=True)[0]
    half = Captioner.from_pretrained("flickr8k-sat", precision="bf16").caption(img, beam_size=2)[0]
    assert fp32.caption and half.caption and len(fp32.attention) == len(fp32.words)
    assert abs(fp32.score - half.score) < 0.5 * abs(fp32.score) + 1
    with pytest.raises(DeviceError):
        Captioner.from_pretrained("flickr8k-sat", precision="fp16")


@pytest.mark.parametrize("precision", ["bf16", "auto"])
def test_training_on_auto_device_in_bf16(synthetic, tmp_path, precision, monkeypatch):
    """bf16 trains under bfloat16 autocast; auto does where the CPU has bfloat16 instructions (here: told so)."""
    import captioner.runtime.devices as devices
    from captioner.training import loss
    from captioner.training.config import DataConfig, OptimConfig, TrainConfig
    from captioner.training.loop import train

    monkeypatch.setattr(devices, "native_bf16", lambda device: True)
    seen = []
    real = loss.caption_loss
    monkeypatch.setattr(loss, "caption_loss", lambda out, *a, **k: seen.append(out.logits.dtype) or real(out, *a, **k))
    cfg = TrainConfig(arch="sat", model=dict(embed_dim=16, hidden_dim=16, attention_dim=16),
                      data=DataConfig(corpus=str(synthetic.corpus), features=str(synthetic.features), max_len=12),
                      optim=OptimConfig(batch_size=32, epochs=1), out_dir=str(tmp_path / "run"), progress=False,
                      device="auto", precision=precision)
    assert train(cfg, stop_after_steps=3) == {"stopped_at_step": 3}
    assert seen and set(seen) == {torch.bfloat16}
    # auto is decided once and recorded as what it decided: a resume elsewhere keeps it or is refused
    assert "precision: bf16" in (tmp_path / "run" / "config.yaml").read_text()


def test_resume_may_change_the_device_but_not_the_precision():
    from dataclasses import asdict

    from captioner.training.checkpoint import config_changes as _config_changes
    from captioner.training.config import TrainConfig

    before = asdict(TrainConfig(device="cuda"))
    assert _config_changes(before, asdict(TrainConfig(device="cpu"))) == []
    assert _config_changes(before, asdict(TrainConfig(device="cuda", precision="bf16"))) == [
        "precision: 'fp32' -> 'bf16'"]
