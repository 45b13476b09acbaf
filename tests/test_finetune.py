"""Fine-tuning the encoder's last units (issue 19): trunk stores, training through the CLI for every
architecture, what trains and what stays, the tuned model directory, exact resume, and pooled grids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from captioner import Captioner
from captioner.cli.main import main
from captioner.data.corpus import Corpus
from captioner.data.features import FeatureStore
from captioner.encoders.extract import extract_features
from captioner.encoders.network import ImageEncoder, get_encoder_spec
from captioner.encoders.tail import Finisher, tail_state
from captioner.inference.encoder_file import read_encoder_file
from captioner.inference.modeldir import ModelDirError
from captioner.models import available_architectures
from tests.test_architectures import SIZES
from tests.test_train import assert_same_training_state

SPEC = get_encoder_spec("efficientnet-lite0")


@pytest.fixture(scope="module")
def trunk(synthetic, tmp_path_factory) -> dict[int, Path]:
    """Trunk stores of the synthetic images: the maps before the encoder's last 1 and 2 units."""
    corpus = Corpus.load(synthetic.corpus)
    names = [it.image for it in corpus.items]
    out = {}
    for cut in (1, 2):
        out[cut] = tmp_path_factory.mktemp(f"trunk{cut}")
        extract_features(corpus.image_root, names, out[cut], cut=cut, progress=False, workers=0)
    return out


def _train_args(run: Path, synthetic, store: Path, *extra: str, arch: str = "sat", epochs: int = 1,
                sized: bool = True) -> list[str]:
    return ["train", f"arch={arch}", f"out_dir={run}", f"data.corpus={synthetic.corpus}", f"data.features={store}",
            "data.max_len=12", f"optim.epochs={epochs}", "optim.lr=3e-3", "optim.batch_size=32", "progress=false",
            "data.val_images=40", *(SIZES[arch] if sized else []), *extra]


def _image(synthetic, split: str = "test", k: int = 0) -> tuple[str, Path]:
    item = Corpus.load(synthetic.corpus).split(split)[k]
    return item.image, synthetic.root / "shapes" / "images" / item.image


@pytest.mark.parametrize("arch", available_architectures())
def test_every_architecture_fine_tunes_the_encoder_through_the_cli(arch, synthetic, trunk, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(run, synthetic, trunk[1], "encoder.train_blocks=1", "encoder.lr=1e-3", arch=arch)) == 0
    best = run / "best"
    cfg = json.loads((best / "config.json").read_text())
    assert cfg["encoder"]["tuned"]["units"] == 1 and "cut" not in cfg["encoder"]
    weights, units = read_encoder_file(best, cfg)
    pretrained = tail_state(SPEC.build(), 1)
    assert set(weights) == set(pretrained) and units == 1
    assert not torch.equal(weights["_conv_head.weight"], pretrained["_conv_head.weight"])  # it learnt
    # the model's encoder at caption time makes the grids training made from the trunk store
    name, path = _image(synthetic)
    model = Captioner.from_pretrained(best)
    grid = model.encoder.encode_arrays(model.encoder.preprocess([Image.open(path)]))
    maps = torch.from_numpy(FeatureStore.open(trunk[1]).get(name).astype(np.float32))[None]
    from_store, _ = Finisher(SPEC, 1, [7, 7], (weights, 1))(maps)
    assert torch.allclose(grid, from_store, atol=0.05, rtol=0.02)  # float16 store
    packaged = ImageEncoder(SPEC).encode_arrays(model.encoder.preprocess([Image.open(path)]))
    assert (grid - packaged).abs().max() > 0.05  # and they are not the packaged encoder's
    capsys.readouterr()
    assert main(["caption", str(path), "--model", str(best), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["caption"]


def test_only_the_last_units_train_and_frozen_batchnorm_stays(synthetic, trunk, tmp_path):
    run = tmp_path / "run"
    assert main(_train_args(run, synthetic, trunk[2], "encoder.train_blocks=1", "encoder.lr=1e-3")) == 0
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]
    pretrained = tail_state(SPEC.build(), 2)
    back = {k[len("back."):]: v for k, v in ckpt.items() if k.startswith("back.")}
    block = {k: v for k, v in back.items() if k.startswith("blocks.") and not k.endswith("num_batches_tracked")}
    assert block and all(torch.equal(v, pretrained["_blocks.15." + k[len("blocks.0."):]]) for k, v in block.items())
    for k in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):  # batchnorm frozen: as ImageNet left it
        assert torch.equal(back[k], pretrained["_" + k]), k
    assert not torch.equal(back["conv_head.weight"], pretrained["_conv_head.weight"])
    weights, units = read_encoder_file(run / "best", json.loads((run / "best" / "config.json").read_text()))
    assert units == 1 and sorted(weights) == ["_bn1.bias", "_bn1.running_mean", "_bn1.running_var", "_bn1.weight",
                                              "_conv_head.weight"]


def test_a_tuned_model_round_trips_and_a_damaged_encoder_file_is_refused(synthetic, trunk, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(run, synthetic, trunk[1], "encoder.train_blocks=1")) == 0
    model = Captioner.from_pretrained(run / "best")
    copy = model.save_pretrained(tmp_path / "copy")
    assert load_file(str(copy / "encoder.safetensors")).keys() == load_file(
        str(run / "best" / "encoder.safetensors")).keys()
    _, path = _image(synthetic)
    a = model.caption(str(path))[0]
    b = Captioner.from_pretrained(copy).caption(str(path))[0]
    assert (a.caption, a.score) == (b.caption, b.score)
    # the concepts keep coming from the packaged encoder: the head's input is the mean of the packaged grid
    arrays = model.encoder.preprocess([Image.open(path)])
    _, concept_input = model.encoder.encode_all(arrays)
    assert torch.allclose(concept_input[:, 0], ImageEncoder(SPEC).encode_arrays(arrays).mean(1), atol=1e-4)

    w = load_file(str(copy / "encoder.safetensors"))
    w["_conv_head.weight"] = w["_conv_head.weight"] * 1.01
    save_file(w, str(copy / "encoder.safetensors"))
    with pytest.raises(ModelDirError, match="encoder.tuned.digest"):
        Captioner.from_pretrained(copy)
    capsys.readouterr()
    assert main(["caption", str(path), "--model", str(copy)]) == 2
    assert "encoder.safetensors" in capsys.readouterr().err
    (copy / "encoder.safetensors").unlink()
    with pytest.raises(ModelDirError, match="missing"):
        Captioner.from_pretrained(copy)


def test_a_store_of_packaged_grids_is_refused_for_a_tuned_model_and_a_trunk_store_serves_it(synthetic, trunk, tmp_path,
                                                                                          capsys):
    run = tmp_path / "run"
    assert main(_train_args(run, synthetic, trunk[1], "encoder.train_blocks=1")) == 0
    base = ["evaluate", "--model", str(run / "best"), "--corpus", str(synthetic.corpus), "--split", "val",
            "--beam", "1", "--limit", "20"]
    capsys.readouterr()
    assert main([*base, "--features", str(synthetic.features)]) == 2
    assert "--cut 1" in capsys.readouterr().err  # the command that makes the right store
    assert main([*base, "--features", str(trunk[2]), "--out", str(tmp_path / "ev")]) == 0  # a deeper cut serves too
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["beams"]["1"]["CIDEr-D"] >= 0
    # a tuned model cannot go on training on packaged grids either
    capsys.readouterr()
    assert main(_train_args(tmp_path / "on", synthetic, synthetic.features, f"init_from={run / 'best'}",
                            sized=False)) == 2
    assert "trunk store" in capsys.readouterr().err
    assert main(_train_args(tmp_path / "more", synthetic, synthetic.features, "encoder.train_blocks=1")) == 2
    assert "--cut 1" in capsys.readouterr().err


def _cli(run: Path, synthetic, store: Path) -> list[str]:
    return [sys.executable, "-m", "captioner", *_train_args(run, synthetic, store, "encoder.train_blocks=2",
                                                            "encoder.batchnorm=train", "optim.early_stop=0",
                                                            "threads=1", epochs=3)]


def test_fine_tuning_resumes_exactly_after_a_kill(synthetic, trunk, tmp_path):
    """One thread: oneDNN's convolution gradients sum over threads in an order that can vary from run to run (a
    last-digit difference in epoch 1 of two uninterrupted runs with 2 threads), so exactness is tested on one."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = tmp_path / "reference"
    r = subprocess.run(_cli(ref, synthetic, trunk[2]), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    killed = tmp_path / "killed"
    p = subprocess.Popen(_cli(killed, synthetic, trunk[2]), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                         env=env)
    deadline = time.time() + 600
    while not (killed / "last.pt").exists():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert json.loads(torch.load(killed / "last.pt", map_location="cpu", weights_only=True)["state"])["epoch"] < 3
    r = subprocess.run([*_cli(killed, synthetic, trunk[2]), "--resume"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    a = torch.load(ref / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("back.") for k in a["model"]) and len(a["optimizer"]["param_groups"]) == 2
    assert_same_training_state(a, b)
    assert load_file(str(ref / "best" / "encoder.safetensors")).keys() == load_file(
        str(killed / "best" / "encoder.safetensors")).keys()


def test_a_grid_pooled_at_any_size(synthetic, tmp_path, capsys):
    spec = get_encoder_spec("efficientnet-lite0", image_size=448, grid=7)
    assert spec.grid == (7, 7) and spec.image_size == 448
    x = np.random.default_rng(0).integers(0, 255, (1, 448, 448, 3), dtype=np.uint8)
    pooled = ImageEncoder(spec).encode_arrays(x)
    full = ImageEncoder(get_encoder_spec("efficientnet-lite0", image_size=448)).encode_arrays(x)  # 14x14
    want = torch.nn.functional.avg_pool2d(full.transpose(1, 2).reshape(1, 1280, 14, 14), 2).flatten(2).transpose(1, 2)
    assert pooled.shape == (1, 49, 1280) and torch.allclose(pooled, want, atol=1e-4)
    with pytest.raises(ValueError, match="finer than"):
        get_encoder_spec("efficientnet-lite0", grid=14)  # 224 px gives 7x7
    capsys.readouterr()
    images = synthetic.root / "shapes" / "images"
    assert main(["features", "--images", str(images), "--out", str(tmp_path / "s"), "--grid", "9"]) == 2
    assert "finer than" in capsys.readouterr().err


def test_vocab_extend_keeps_a_tuned_encoder(synthetic, trunk, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(run, synthetic, trunk[1], "encoder.train_blocks=1")) == 0
    out = tmp_path / "extended"
    assert main(["vocab", "extend", str(run / "best"), "--out", str(out), "--words", "giraffe"]) == 0
    assert (out / "encoder.safetensors").read_bytes() == (run / "best" / "encoder.safetensors").read_bytes()
    assert Captioner.from_pretrained(out).encoder_weights is not None


def test_a_staged_recipe_that_would_tune_on_grids_is_refused_before_training(synthetic, trunk, tmp_path, capsys):
    """A stage after a fine-tuning stage that did not get a trunk store of its own fails before anything trains."""
    cfg = tmp_path / "staged.yaml"
    cfg.write_text(f"""arch: sat
model: {{embed_dim: 48, hidden_dim: 96, attention_dim: 48}}
data: {{corpus: {synthetic.corpus}, features: {synthetic.features}, max_len: 12, val_images: 40}}
optim: {{epochs: 1, batch_size: 32}}
progress: false
out_dir: {tmp_path / 'run'}
then:
  - name: tune
    data: {{features: {trunk[1]}}}
    encoder: {{train_blocks: 1}}
  - name: after
    optim: {{epochs: 1}}
""")
    capsys.readouterr()
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "then[1] (after)" in err and "--cut 1" in err
    assert not (tmp_path / "run").exists()


def test_a_tuned_record_without_its_weights_is_refused(synthetic, trunk, tmp_path):
    from captioner.inference.modeldir import load_model_dir, save_model_dir
    run = tmp_path / "run"
    assert main(_train_args(run, synthetic, trunk[1], "encoder.train_blocks=1")) == 0
    decoder, vocab, cfg = load_model_dir(run / "best")
    with pytest.raises(ModelDirError, match="encoder.tuned"):
        Captioner(decoder, vocab, cfg)  # it would caption with the packaged encoder
    with pytest.raises(ModelDirError, match="nothing was written"):
        save_model_dir(run / "best", decoder, vocab, cfg)  # it would drop encoder.safetensors
    assert (run / "best" / "encoder.safetensors").exists()
