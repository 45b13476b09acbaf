"""Training end to end on the synthetic shapes dataset: it learns, and resume after SIGKILL is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from captioner.config import ConfigError, apply_overrides, load_config
from captioner.data.corpus import Corpus
from captioner.data.features import FeatureStore
from captioner.evaluation.metrics import compute_metrics
from captioner.inference.modeldir import load_model_dir
from captioner.models import build_decoder
from captioner.data.captions import CaptionData
from captioner.evaluation.evaluate import evaluate_split
from captioner.decoding.settings import DecodingSettings
from captioner.training.config import DataConfig, OptimConfig, TrainConfig
from captioner.training.loop import train
from captioner.training.loss import caption_loss

from .conftest import ARCH_SIZES

BEAM3 = DecodingSettings(beam_size=3, max_len=12)
SMALL = {"embed_dim": 48, "hidden_dim": 96, "attention_dim": 48, "dropout": 0.1}


def small_config(data, out_dir, epochs, **optim) -> TrainConfig:
    return TrainConfig(
        arch="sat", model=dict(SMALL),
        data=DataConfig(corpus=str(data.corpus), features=str(data.features), max_len=12),
        optim=OptimConfig(lr=3e-3, batch_size=32, epochs=epochs, early_stop=0, **optim),
        out_dir=str(out_dir), progress=False, seed=0)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two last.pt checkpoints hold the same run: history (timings aside), weights and Adam's moments."""
    assert _untimed(json.loads(a["state"])) == _untimed(json.loads(b["state"]))  # epochs, best, history
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))


def test_sat_learns_the_synthetic_dataset(synthetic, trained_arch):
    """Trained on ~320 images for a few epochs, the model must describe held-out images far
    better than (a) the untrained model and (b) a "blind" model that ignores the image and
    always says the most frequent training caption. (b) is the real bar: it already gets the
    grammar and some n-grams right ("a ... above a ..."), so only a model that reads colours,
    shapes and positions from the features can beat it by a wide margin. Measured on this
    dataset (test split, beam 3): untrained 0.03 CIDEr-D / 0.00 BLEU-4, blind 1.55 / 0.23,
    trained 4.0 / 0.69 after the 6 epochs of the run judged here (the sat run of
    tests/test_architectures.py, trained once per session: tests/conftest.py), 5.1 / 0.81 after 8.
    We require trained CIDEr-D >= blind + 1.5 and >= 2x blind, and BLEU-4 >= blind + 0.3.
    """
    assert ARCH_SIZES["sat"] == [f"model.{k}={v}" for k, v in SMALL.items()]  # the sizes of SMALL
    run, log = trained_arch("sat")  # lr 3e-3, batch 32, as small_config
    summary = json.loads(log[log.rindex("\n{") + 1:])

    corpus = Corpus.load(synthetic.corpus)
    store = FeatureStore.open(synthetic.features)
    decoder, vocab, model_cfg = load_model_dir(run / "best")
    test = CaptionData(corpus, vocab, store, "test", 12)
    metrics = ["BLEU-4", "CIDEr-D"]
    trained, cands, _ = evaluate_split(decoder, vocab, test, BEAM3, metrics=metrics)

    torch.manual_seed(0)
    untrained_model = build_decoder("sat", {**SMALL, "vocab_size": len(vocab), "feature_dim": 1280})
    untrained, _, _ = evaluate_split(untrained_model, vocab, test, BEAM3, metrics=metrics)

    train_caps = Counter(c for it in corpus.split("train") for c in it.captions)
    blind_caption = train_caps.most_common(1)[0][0]
    blind = compute_metrics(test.refs, {k: blind_caption for k in test.refs}, metrics=metrics).scores

    print(json.dumps({"trained": trained, "untrained": untrained, "blind": blind,
                      "example": next(iter(cands.items()))}))
    assert trained["CIDEr-D"] >= blind["CIDEr-D"] + 1.5
    assert trained["CIDEr-D"] >= 2 * blind["CIDEr-D"]
    assert trained["BLEU-4"] >= blind["BLEU-4"] + 0.3
    assert trained["BLEU-4"] >= untrained["BLEU-4"] + 0.3
    assert model_cfg["metrics"]["val"]["CIDEr-D"] == pytest.approx(summary["best"])


def _cli_args(out_dir: Path, data, epochs: int) -> list[str]:
    return [sys.executable, "-m", "captioner", "train", f"out_dir={out_dir}",
            f"data.corpus={data.corpus}", f"data.features={data.features}", "data.max_len=12",
            f"optim.epochs={epochs}", "optim.lr=3e-3", "optim.batch_size=32", "optim.early_stop=0",
            "progress=false", *[f"model.{k}={v}" for k, v in SMALL.items()]]


def _run_cli_train(out_dir: Path, data, epochs: int) -> subprocess.Popen:
    return subprocess.Popen(_cli_args(out_dir, data, epochs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


TIMING = ("captions_per_s", "train_seconds", "val_seconds", "elapsed_seconds")


def _untimed(state: dict) -> dict:
    """The checkpointed state without wall-clock figures (those differ between any two runs)."""
    return {**{k: v for k, v in state.items() if k != "clock"},
            "history": [{k: v for k, v in h.items() if k not in TIMING} for h in state["history"]]}


def test_sigkill_mid_run_then_resume_ends_in_the_same_state(synthetic, tmp_path):
    epochs = 2  # killed inside the last epoch: the resumed run has a partial epoch to redo
    reference = tmp_path / "reference"
    ref = _run_cli_train(reference, synthetic, epochs)  # runs beside the killed run (its own thread count)

    killed = tmp_path / "killed"
    p = _run_cli_train(killed, synthetic, epochs)
    deadline = time.time() + 600
    while not (killed / "last.pt").exists():  # wait for epoch 1's checkpoint ...
        assert p.poll() is None, p.stdout.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # ... then kill somewhere inside epoch 2
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    ckpt = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)
    assert json.loads(ckpt["state"])["epoch"] < epochs  # it really stopped before the end

    r = subprocess.run([*_cli_args(killed, synthetic, epochs), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out.decode()

    a = torch.load(reference / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)
    assert_same_training_state(a, b)
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert (reference / "metrics.jsonl").read_text().count("\n") == epochs
    hist_a = [json.loads(l)["val"] for l in (reference / "metrics.jsonl").read_text().splitlines()]
    hist_b = [json.loads(l)["val"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert hist_a == hist_b


def test_config_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("arch: sat\nmodel: {hidden_dim: 64}\noptim: {lr: 0.001, epochs: 2}\n")
    cfg = load_config(TrainConfig, y, ["optim.batch_size=16", "model.dropout=0.2", "val_metric=BLEU-4"])
    assert cfg.optim.lr == 0.001 and cfg.optim.epochs == 2 and cfg.optim.batch_size == 16
    assert cfg.model == {"hidden_dim": 64, "dropout": 0.2}
    assert cfg.val_metric == "BLEU-4"
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(cfg, ["optim.batch_size=big"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["optim.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(TrainConfig, bad)


def test_init_from_starts_at_the_given_model_and_keeps_it_unless_beaten(synthetic, tmp_path, sat_two_epochs):
    stage1, s1 = sat_two_epochs
    stage2 = small_config(synthetic, tmp_path / "stage2", epochs=1, lr_decay=0.5)
    stage2.model = {}
    stage2.init_from = str(stage1 / "best")
    stage2.optim.lr = 1e-9  # too small to change anything: the starting model must stay "best"
    s2 = train(stage2)
    assert s2["best"] == pytest.approx(s1["best"])  # epoch 0 = the stage-1 model, scored again
    assert s2["best_epoch"] == 0
    start, _, _ = load_model_dir(stage1 / "best")
    kept, _, cfg = load_model_dir(tmp_path / "stage2" / "best")
    assert cfg["metrics"]["val"]["epoch"] == 0
    for k, v in start.state_dict().items():
        assert torch.equal(v, kept.state_dict()[k])


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_an_old_dir(synthetic, tmp_path):
    cfg = small_config(synthetic, tmp_path / "run", epochs=1)
    train(cfg)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(cfg)
    changed = small_config(synthetic, tmp_path / "run", epochs=2)
    changed.optim.lr = 1e-4
    with pytest.raises(ValueError, match="optim.lr"):
        train(changed, resume=True)
    longer = small_config(synthetic, tmp_path / "run", epochs=2)  # more epochs is a legitimate resume
    assert train(longer, resume=True)["epochs"] == 2


def test_restore_best_goes_back_to_the_best_weights_when_the_lr_decays(synthetic, tmp_path, sat_two_epochs):
    stage1, _ = sat_two_epochs
    runs = {}
    for restore in (False, True):
        cfg = small_config(synthetic, tmp_path / f"restore-{restore}", epochs=1, lr_decay=0.5, lr_patience=0,
                           restore_best=restore)
        cfg.model, cfg.init_from = {}, str(stage1 / "best")
        cfg.optim.lr = 1e-7  # epoch 1 cannot beat the starting model (epoch 0), so the lr decays
        train(cfg)
        out = tmp_path / f"restore-{restore}"
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        assert json.loads(last["state"])["best_epoch"] == 0
        best, _, _ = load_model_dir(out / "best")
        runs[restore] = (rows[-1], all(torch.equal(v, last["model"][k]) for k, v in best.state_dict().items()))
    assert runs[True][0]["restored_epoch"] == 0 and runs[True][1]  # continues from the best weights
    assert "restored_epoch" not in runs[False][0] and not runs[False][1]  # the trained weights went on


def test_ema_validates_and_keeps_the_moving_average_and_resumes_exactly(synthetic, tmp_path, sat_two_epochs):
    """optim.ema: training itself is unchanged (the raw weights match a run without it); best/ holds the
    average, scored as val says; a run resumed after epoch 1 ends with the same average as one run."""
    plain_dir, plain = sat_two_epochs  # the same config without optim.ema
    averaged = train(small_config(synthetic, tmp_path / "ema", epochs=2, ema=0.9))
    a = torch.load(plain_dir / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "ema" / "last.pt", map_location="cpu", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    average = {k[len("module."):]: v for k, v in b["ema"].items() if k.startswith("module.")}
    assert set(average) == set(b["model"])
    assert any(not torch.equal(average[k], b["model"][k]) for k in average)  # an average, not a copy
    assert plain["best"] != averaged["best"]
    best, vocab, cfg = load_model_dir(tmp_path / "ema" / "best")
    if cfg["metrics"]["val"]["epoch"] == 2:
        for k, v in best.state_dict().items():
            assert torch.equal(v, average[k]), k
    val = CaptionData(Corpus.load(synthetic.corpus), vocab, FeatureStore.open(synthetic.features), "val", 12)
    scores, _, _ = evaluate_split(best, vocab, val, DecodingSettings(beam_size=1, max_len=12), metrics=["CIDEr-D"])
    assert scores["CIDEr-D"] == pytest.approx(averaged["best"], abs=1e-6)

    train(small_config(synthetic, tmp_path / "resumed", epochs=1, ema=0.9))
    train(small_config(synthetic, tmp_path / "resumed", epochs=2, ema=0.9), resume=True)
    c = torch.load(tmp_path / "resumed" / "last.pt", map_location="cpu", weights_only=True)
    assert_same_training_state(b, c)
    for k, v in b["ema"].items():
        assert torch.equal(v, c["ema"][k]), k


def test_a_checkpoint_from_before_a_new_setting_resumes_with_its_default(synthetic, tmp_path):
    cfg = small_config(synthetic, tmp_path / "run", epochs=1)
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    old = json.loads(ckpt["config"])
    del old["optim"]["ema"]  # as written before optim.ema existed
    ckpt["config"] = json.dumps(old)
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    assert train(small_config(synthetic, tmp_path / "run", epochs=2), resume=True)["epochs"] == 2
    with pytest.raises(ValueError, match="optim.ema"):
        train(small_config(synthetic, tmp_path / "run", epochs=3, ema=0.9), resume=True)


def test_decoding_defaults_are_recorded_in_best(synthetic, tmp_path):
    cfg = small_config(synthetic, tmp_path / "run", epochs=1)
    cfg.decoding = {"length_penalty": 1.0, "beam_size": 2}
    train(cfg)
    _, _, model_cfg = load_model_dir(tmp_path / "run" / "best")
    assert model_cfg["decoding"]["length_penalty"] == 1.0 and model_cfg["decoding"]["beam_size"] == 2
    assert model_cfg["decoding"]["max_len"] == 12  # data.max_len unless set
    assert DecodingSettings.from_model(model_cfg).length_penalty == 1.0


def test_label_smoothing_spreads_the_targets_probability_over_the_vocabulary(synthetic, tmp_path):
    from types import SimpleNamespace

    torch.manual_seed(0)
    logits = torch.randn(3, 4, 10)  # 3 captions, 4 steps, 10 words
    tokens = torch.randint(0, 10, (3, 6))
    lengths = torch.tensor([5, 3, 2])  # real targets: 4, 2 and 1 words
    out = SimpleNamespace(logits=logits, extra_loss=torch.tensor(0.5))
    mask = torch.arange(4)[None] < (lengths - 1)[:, None]
    logp = logits[mask].log_softmax(-1)
    nll = -logp.gather(1, tokens[:, 1:5][mask][:, None]).squeeze(1).mean()
    uniform = -logp.mean()  # the cross-entropy against a uniform target
    total, ce = caption_loss(out, tokens, lengths, label_smoothing=0.2)
    assert ce.item() == pytest.approx(0.8 * nll.item() + 0.2 * uniform.item(), rel=1e-5)
    assert total.item() == pytest.approx(ce.item() + 0.5, rel=1e-6)
    assert caption_loss(out, tokens, lengths)[1].item() == pytest.approx(nll.item(), rel=1e-5)

    cfg = small_config(synthetic, tmp_path / "run", epochs=1)
    cfg.label_smoothing = 1.0
    with pytest.raises(ValueError, match="label_smoothing=1.0"):
        train(cfg)
    cfg.label_smoothing = 0.1
    assert train(cfg)["best"] > 0
    _, _, recorded = load_model_dir(tmp_path / "run" / "best")
    assert recorded["training"]["config"]["label_smoothing"] == 0.1


# ----------------------------------------------------------------------------- issue 21: the out_dir


@pytest.mark.parametrize("where", ["root", "home", "other files"])
def test_21_out_dir_a_root_the_home_folder_or_a_folder_of_other_files_is_refused(tmp_path, monkeypatch, capsys,
                                                                                  where):
    from captioner.cli.main import main

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    out = {"root": "/", "home": str(home), "other files": str(home)}[where]
    if where == "other files":
        monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    status = main(["train", "data.corpus=c.json", "data.features=f", f"out_dir={out}"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(f"error: out_dir={out}: "), err
    assert {"root": "a filesystem root", "home": "the home folder", "other files": "'notes.txt'"}[where] in err
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]


def test_21_a_second_run_into_the_same_out_dir_at_once_is_refused(synthetic, tmp_path):
    """Both "succeeded" before, the second overwriting the first. While one trains (here: at its start, before
    it has written anything) another into the same out_dir stops at once; after it, the folder is free."""
    cfg = small_config(synthetic, tmp_path / "run", epochs=1)
    cfg.data.val_images = 10
    refused = []

    def second_run():
        with pytest.raises(ValueError) as e:
            train(small_config(synthetic, tmp_path / "run", epochs=1))
        refused.append(str(e.value))

    summary = train(cfg, on_start=second_run)
    assert refused and refused[0].startswith(f"out_dir={tmp_path / 'run'}: another training run is writing there")
    assert summary["epochs"] == 1
    cfg.optim.epochs = 2
    assert train(cfg, resume=True)["epochs"] == 2  # the first run let go of the folder when it ended

