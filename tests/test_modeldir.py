"""Tests for captioner.inference.modeldir: model directory round trips, safe loading, errors, and the
Captioner pipeline on real images (random tiny decoder + the packaged EfficientNet-Lite0)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from captioner.data.text import Vocab
from captioner.decoding.search import decode
from captioner.encoders.network import get_encoder_spec
from captioner.models.base import Decoder
from captioner.models.sat import SATConfig, SATDecoder
from captioner.inference.captioner import Captioner
from captioner.inference.modeldir import ModelDirError, load_model_dir, save_model_dir

WORDS = ["a", "dog", "runs", "on", "the", "grass", "man", "red"]
P, C = 4, 8


def make_vocab() -> Vocab:
    return Vocab.build([WORDS])


def make_decoder(seed: int = 0, feature_dim: int = C, vocab_size: int = len(WORDS) + 4) -> SATDecoder:
    torch.manual_seed(seed)
    model = SATDecoder(SATConfig(vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=16, hidden_dim=16,
                                 attention_dim=16))
    with torch.no_grad():  # outputs that depend on the input (the default init is nearly constant)
        model.embed.weight.normal_(0.0, 1.0)
        model.out.weight.normal_(0.0, 1.0)
    return model.eval()


def outputs(model: Decoder, seed: int = 0):
    """Teacher-forced logits + beam search results on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, P, model.cfg.feature_dim, generator=g)
    tokens = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 2, 0], [1, 9, 2, 0, 0]])
    lengths = torch.tensor([5, 4, 3])
    with torch.no_grad():
        logits = model(feats, tokens, lengths).logits
    hyps = decode(model, feats, start_id=1, end_id=2, beam_size=3, n_best=3, max_len=8)
    return logits, hyps


CONFIG = {"decoding": {"beam_size": 3, "max_len": 12, "length_penalty": 0.0},
          "training": {"epochs": 1, "note": "tiny"}, "metrics": {"BLEU-4": 0.0}}


@pytest.fixture
def saved(tmp_path):
    model, vocab = make_decoder(), make_vocab()
    path = save_model_dir(tmp_path / "m", model, vocab, CONFIG)
    return path, model, vocab


# ---------------------------------------------------------------------------------------
# round trips


def test_round_trip_float32_is_identical(saved):
    path, model, vocab = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["format"] == "captioner-model" and cfg["version"] == 1
    assert cfg["arch"] == "sat"
    assert cfg["model"] == dataclasses.asdict(model.cfg)
    for k, v in CONFIG.items():
        assert cfg[k] == v

    loaded, vocab2, cfg2 = load_model_dir(path)
    assert isinstance(loaded, SATDecoder) and not loaded.training
    assert vocab2 == vocab and vocab2.itos == vocab.itos
    assert cfg2 == cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    (la, ha), (lb, hb) = outputs(model), outputs(loaded)
    assert torch.equal(la, lb)
    for x, y in zip(ha, hb):
        assert [h.tokens for h in x] == [h.tokens for h in y]
        assert [h.score for h in x] == [h.score for h in y]


def test_round_trip_float16_is_close(tmp_path):
    model, vocab = make_decoder(1), make_vocab()
    path = save_model_dir(tmp_path / "half", model, vocab, CONFIG, dtype=torch.float16)
    stored = load_file(str(path / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    full = save_model_dir(tmp_path / "full", model, vocab, CONFIG)
    assert (path / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size

    loaded, _, _ = load_model_dir(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # upcast on load
    (la, _), (lb, _) = outputs(model), outputs(loaded)
    assert not torch.equal(la, lb)
    torch.testing.assert_close(la, lb, rtol=0, atol=2e-2)


def test_loading_never_unpickles(saved, monkeypatch):
    path, model, _ = saved

    def boom(*a, **k):
        raise AssertionError("unpickling during load_model_dir")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    loaded, _, _ = load_model_dir(path)
    assert torch.equal(outputs(model)[0], outputs(loaded)[0])
    cap = Captioner.from_pretrained(path)
    assert isinstance(cap.decoder, SATDecoder)


def test_save_overwrites_in_place_and_leaves_no_temporary_files(saved):
    path, _, vocab = saved
    other = make_decoder(7)
    save_model_dir(path, other, vocab, CONFIG)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    loaded, _, _ = load_model_dir(path)
    assert torch.equal(outputs(other)[0], outputs(loaded)[0])


# ---------------------------------------------------------------------------------------
# errors


def test_error_unknown_name(tmp_path):
    with pytest.raises(ModelDirError, match="no-such-model: no such model directory"):
        load_model_dir("no-such-model")
    with pytest.raises(ModelDirError, match="no such model directory"):
        load_model_dir(tmp_path / "missing")


def test_error_missing_config(saved):
    path, _, _ = saved
    (path / "config.json").unlink()
    with pytest.raises(ModelDirError, match="config.json missing"):
        load_model_dir(path)


def test_error_invalid_json_config(saved):
    path, _, _ = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match=r"config\.json: invalid JSON"):
        load_model_dir(path)


@pytest.mark.parametrize("fmt", ["something-else", None])
def test_error_wrong_format(saved, fmt):
    path, _, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    if fmt is None:
        del cfg["format"]
    else:
        cfg["format"] = fmt
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match=r"config\.json: not a captioner model"):
        load_model_dir(path)


def test_error_newer_version(saved):
    path, _, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="newer captioner"):
        load_model_dir(path)


def test_error_missing_weights(saved):
    path, _, _ = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"model\.safetensors: missing"):
        load_model_dir(path)


def test_error_weights_with_wrong_keys(saved):
    path, model, _ = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("f_beta.weight")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ModelDirError, match=r"model\.safetensors: weights do not match") as e:
        load_model_dir(path)
    assert "f_beta.weight" in str(e.value) and "extra.weight" in str(e.value)


def test_error_weights_with_wrong_shapes(saved):
    path, _, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["hidden_dim"] = 24  # same parameter names, other shapes
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match=r"model\.safetensors"):
        load_model_dir(path)


def test_error_corrupt_weights(saved):
    path, _, _ = saved
    (path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelDirError, match=r"model\.safetensors"):
        load_model_dir(path)


def test_error_missing_vocab_names_the_file(saved):
    path, _, _ = saved
    (path / "vocab.json").unlink()
    with pytest.raises(ValueError, match=r"vocab\.json"):  # Vocab.load's error, not a ModelDirError
        load_model_dir(path)


# ---------------------------------------------------------------------------------------
# the Captioner pipeline with the real EfficientNet-Lite0 encoder

ENCODER = get_encoder_spec("efficientnet-lite0").to_dict()


@pytest.fixture(scope="module")
def captioner():
    assert ENCODER == {"name": "efficientnet-lite0", "image_size": 224, "grid": [7, 7], "channels": 1280,
                       "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0], "resize": "squash"}
    cap = Captioner(make_decoder(3, feature_dim=1280), make_vocab(),
                    {"encoder": ENCODER, "decoding": {"beam_size": 3, "max_len": 6}})
    cap.encoder  # build it once (about a second)
    return cap


def _gradient(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def _image_files(tmp_path):
    rgb = Image.fromarray(_gradient(640, 120))
    rgb.save(tmp_path / "wide.jpg", quality=90)
    Image.fromarray(_gradient(50, 400)[..., 0]).save(tmp_path / "tall_gray.png")
    rgba = Image.fromarray(np.dstack([_gradient(120, 90), np.full((90, 120), 128, np.uint8)]), "RGBA")
    rgba.save(tmp_path / "alpha.png")
    Image.fromarray(_gradient(97, 61)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.gif")
    deep = (np.arange(80 * 64, dtype=np.uint32).reshape(64, 80) * 13 % 65536).astype(np.uint16)
    im16 = Image.fromarray(deep)
    assert im16.mode == "I;16"
    im16.save(tmp_path / "deep16.png")
    Image.fromarray(_gradient(3000, 2000)).save(tmp_path / "big.jpg", quality=85)
    return {"wide.jpg": (640, 120), "tall_gray.png": (50, 400), "alpha.png": (120, 90),
            "palette.gif": (97, 61), "deep16.png": (80, 64), "big.jpg": (3000, 2000)}


def _check_result(result, n_best: int, image_size, *, attention: bool) -> None:
    assert result.ok, result.error
    r = result.to_dict()
    assert isinstance(r["caption"], str)
    assert isinstance(r["words"], list) and all(isinstance(w, str) for w in r["words"])
    assert r["caption"] == " ".join(r["words"])
    assert all(w in WORDS + ["<unk>"] for w in r["words"])
    assert len(r["words"]) <= 6
    assert isinstance(r["score"], float) and r["score"] <= 0.0
    assert isinstance(r["n_best"], list) and len(r["n_best"]) == n_best
    scores = [h["score"] for h in r["n_best"]]
    assert scores == sorted(scores, reverse=True)
    assert r["n_best"][0] == {"caption": r["caption"], "score": r["score"]}
    assert all(isinstance(h["caption"], str) for h in r["n_best"])
    assert r["image_size"] == list(image_size)
    assert r["grid"] == [7, 7]
    if attention:
        rows = r["attention"]
        assert len(rows) == len(r["words"])
        for row in rows:
            assert len(row) == 7 * 7
            assert sum(row) == pytest.approx(1.0, abs=1e-4)
    else:
        assert "attention" not in r


def test_caption_image_files_of_all_kinds(captioner, tmp_path):
    sizes = _image_files(tmp_path)
    paths = [tmp_path / name for name in sizes]
    res = captioner.caption(paths, n_best=2, return_attention=True, batch_size=4)  # two batches
    assert len(res) == len(paths)
    for r, size in zip(res, sizes.values()):
        _check_result(r, 2, size, attention=True)
    # str paths and bytes work the same way and give the same captions
    again = captioner.caption([str(tmp_path / "wide.jpg"), (tmp_path / "tall_gray.png").read_bytes()], n_best=2)
    assert [r.caption for r in again] == [res[0].caption, res[1].caption]
    assert [r.score for r in again] == [res[0].score, res[1].score]


def test_caption_pil_images_of_all_modes(captioner):
    rgb = Image.fromarray(_gradient(640, 120))
    images = [
        rgb,
        Image.fromarray(_gradient(50, 400)[..., 0]),  # L
        rgb.convert("RGBA"),
        rgb.convert("P", palette=Image.ADAPTIVE),
        Image.fromarray((np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 11)),  # I;16
        rgb.convert("CMYK"),
        rgb.convert("1"),
        Image.fromarray(_gradient(31, 17)[..., 1].astype(np.float32) / 255.0),  # F
    ]
    res = captioner.caption(images, return_attention=True)
    assert len(res) == len(images)
    for r, im in zip(res, images):
        _check_result(r, 1, im.size, attention=True)


def test_caption_single_image_and_options(captioner):
    im = Image.fromarray(_gradient(200, 150))
    single = captioner.caption(im)
    assert isinstance(single, list) and len(single) == 1
    _check_result(single[0], 1, (200, 150), attention=False)
    many = captioner.caption([im, im], n_best=3, max_len=3)
    assert many[0].to_dict() == {**many[1].to_dict(), "source": "image 0"}
    _check_result(many[0], 3, (200, 150), attention=False)
    assert all(len(h.caption.split()) <= 3 for h in many[0].n_best)
    greedy = captioner.caption(im, beam_size=1)
    _check_result(greedy[0], 1, (200, 150), attention=False)


def test_caption_refuses_images_over_max_pixels(captioner, tmp_path):

    Image.fromarray(_gradient(300, 200)).save(tmp_path / "x.png")
    (r,) = captioner.caption([tmp_path / "x.png"], max_pixels=1000)  # reported in its result, not raised
    assert not r.ok and "more than the limit" in r.error and r.caption is None
    assert r.to_dict() == {"source": str(tmp_path / "x.png"), "error": r.error}


def test_save_pretrained_from_pretrained_round_trip(captioner, tmp_path):
    path = captioner.save_pretrained(tmp_path / "cap")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["encoder"] == ENCODER and cfg["decoding"] == captioner.config["decoding"]
    assert cfg["arch"] == "sat" and cfg["model"]["feature_dim"] == 1280
    again = Captioner.from_pretrained(path)
    assert again.vocab == captioner.vocab
    again._encoder = captioner.encoder  # share the already built encoder
    ims = [Image.fromarray(_gradient(160, 90)), Image.fromarray(_gradient(90, 160))]
    assert again.caption(ims, n_best=2, return_attention=True) == captioner.caption(ims, n_best=2,
                                                                                    return_attention=True)
    # saving again from the loaded one keeps the same config (no nested format/version/arch keys)
    path2 = again.save_pretrained(tmp_path / "cap2", dtype=torch.float16)
    cfg2 = json.loads((path2 / "config.json").read_text())
    assert cfg2 == cfg
    half = Captioner.from_pretrained(path2)
    half._encoder = captioner.encoder
    feats = captioner.encoder.encode(ims)
    a = captioner.decode_features(feats, n_best=2)
    b = half.decode_features(feats, n_best=2)
    for x, y in zip(a, b):
        assert x[0].score == pytest.approx(y[0].score, abs=0.05)


# ---------------------------------------------------------------------------------------
# attention rows must belong to the words shown


class _ScriptDecoder(Decoder):
    """Says ``script`` then <end>, attending to region t at step t (one-hot)."""

    def __init__(self, script: list[int], regions: int):
        super().__init__()
        self.script, self.regions = script + [2], regions

    def init_state(self, memory):
        return (torch.zeros(memory[0].shape[0], dtype=torch.long),)

    def step(self, prev_tokens, state, memory):
        t = state[0]
        B, V = t.shape[0], len(WORDS) + 4
        logp = torch.full((B, V), -30.0)
        word = torch.tensor([self.script[min(int(i), len(self.script) - 1)] for i in t])
        logp[torch.arange(B), word] = 0.0
        att = torch.nn.functional.one_hot(t.clamp(max=self.regions - 1), self.regions).float()
        return logp, (t + 1,), att


class _FakeEncoder:
    spec = get_encoder_spec("efficientnet-lite0")

    def encode_arrays(self, batch):
        return torch.zeros(len(batch), 49, 8)


def test_caption_attention_rows_match_words():
    vocab = make_vocab()
    dog, runs = vocab.stoi["dog"], vocab.stoi["runs"]
    cap = Captioner(_ScriptDecoder([dog, runs], 49), vocab, {"encoder": ENCODER, "decoding": {"beam_size": 1}})
    cap._encoder = _FakeEncoder()
    r = cap.caption(Image.new("RGB", (8, 8)), return_attention=True)[0]
    assert r.words == ["dog", "runs"]
    assert [int(np.argmax(row)) for row in r.attention] == [0, 1]


def test_caption_never_contains_special_tokens_and_rows_stay_aligned():
    """A model that wants to say <pad> first: the engine bans it, so the runner-up word ("dog",
    always at log-prob -1 here) is said instead, and every attention row belongs to its word."""
    vocab = make_vocab()
    dog, runs = vocab.stoi["dog"], vocab.stoi["runs"]

    class WantsPad(_ScriptDecoder):
        def step(self, prev_tokens, state, memory):
            logp, state, att = super().step(prev_tokens, state, memory)
            logp[:, dog] = torch.maximum(logp[:, dog], torch.tensor(-1.0))
            return logp, state, att

    cap = Captioner(WantsPad([vocab.pad_id, dog, runs], 49), vocab,
                    {"encoder": ENCODER, "decoding": {"beam_size": 1}})
    cap._encoder = _FakeEncoder()
    for beam in (1, 3):
        r = cap.caption(Image.new("RGB", (8, 8)), beam_size=beam, return_attention=True)[0]
        assert r.words == ["dog", "dog", "runs"]
        assert [int(np.argmax(row)) for row in r.attention] == [0, 1, 2]  # the steps that said them


def test_averaging_model_dirs_gives_the_mean_weights_and_refuses_other_shapes(tmp_path):
    from captioner.inference.modeldir import average_model_dirs

    vocab = make_vocab()
    models = [make_decoder(seed) for seed in (0, 1, 2)]
    paths = [save_model_dir(tmp_path / f"m{i}", m, vocab, CONFIG) for i, m in enumerate(models)]
    mean, mean_vocab, cfg = average_model_dirs(paths)
    for k, v in mean.state_dict().items():
        want = sum(m.state_dict()[k] for m in models) / 3
        assert torch.allclose(v, want, atol=1e-6), k
    assert mean_vocab.itos == vocab.itos and "metrics" not in cfg and cfg["averaged_from"] == [str(p) for p in paths]
    assert cfg["decoding"] == CONFIG["decoding"]
    bigger = save_model_dir(tmp_path / "big", make_decoder(feature_dim=2 * C), vocab, CONFIG)
    with pytest.raises(ModelDirError, match="not the same sizes"):
        average_model_dirs([paths[0], bigger])
    other = save_model_dir(tmp_path / "other", make_decoder(vocab_size=len(WORDS) + 5),
                           Vocab.build([WORDS + ["cat"]]), CONFIG)
    with pytest.raises(ModelDirError, match="vocabulary differs"):
        average_model_dirs([paths[0], other])
    with pytest.raises(ModelDirError, match="at least two"):
        average_model_dirs(paths[:1])


# ---------------------------------------------------------------------------------------
# issue 21: tensors of another dtype than the architecture's are refused, not upcast


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64, torch.uint8, torch.float8_e4m3fn])
def test_error_weights_of_a_non_float_dtype_name_the_tensor(saved, dtype):
    """int8/bool/int64 weights were upcast silently and captioned nonsense."""
    path, model, _ = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["out.weight"] = (state["out.weight"] * 3).to(dtype)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ModelDirError) as e:
        load_model_dir(path)
    msg = str(e.value)
    assert msg.startswith(f"{path / 'model.safetensors'}: tensor 'out.weight' is {str(dtype).replace('torch.', '')}")
    assert "float16, bfloat16, float32 or float64" in msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_weights_in_any_float_precision_load_as_float32(saved, dtype):
    path, model, _ = saved
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    loaded, _, _ = load_model_dir(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(outputs(loaded)[0], outputs(model)[0], rtol=0, atol=0.1)


def test_a_buffer_of_another_dtype_than_its_own_is_refused(tmp_path):
    from captioner.models import build_decoder

    model = build_decoder("bahdanau-gru", {"vocab_size": len(WORDS) + 4, "feature_dim": C})
    path = save_model_dir(tmp_path / "bgru", model, make_vocab(), CONFIG)
    state = load_file(str(path / "model.safetensors"))
    assert state["bn.num_batches_tracked"].dtype == torch.int64
    load_model_dir(path)  # as written: loads
    state["bn.num_batches_tracked"] = state["bn.num_batches_tracked"].float()
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ModelDirError, match=r"tensor 'bn\.num_batches_tracked' is float32, but the architecture's "
                                            r"is int64"):
        load_model_dir(path)
