"""optim.warmup (issue 19): the lr rises linearly over the first optimizer steps, under both schedules and
across --resume; unset, it is the architecture's default (the transformer's lives in code), recorded in
the config a run writes; and with it the plain transformer config learns the synthetic data."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
import yaml

import captioner.training.loop as loop
from captioner.cli.main import main
from captioner.config import load_config
from captioner.models import available_architectures, get_architecture
from captioner.models.transformer import TransformerDecoder
from captioner.training.config import DataConfig, OptimConfig, TrainConfig, TrainError
from captioner.training.loop import train
from captioner.training.warmup import default_warmup, warmed_up, warmup_factor

TINY = {"embed_dim": 32, "d_model": 32, "heads": 2, "num_layers": 1, "ff_dim": 64, "dropout": 0.1}
STEPS_PER_EPOCH = 15  # the synthetic data's 960 training captions in batches of 64


def tiny_config(data, out_dir, epochs: int, **optim) -> TrainConfig:
    return TrainConfig(arch="transformer", model=dict(TINY),
                       data=DataConfig(corpus=str(data.corpus), features=str(data.features), max_len=12),
                       optim=OptimConfig(**{"lr": 2e-3, "batch_size": 64, "epochs": epochs, "early_stop": 0, **optim}),
                       out_dir=str(out_dir), progress=False, seed=0)


@pytest.fixture
def lrs(monkeypatch) -> list[float]:
    """The lr of every optimizer step training takes while the test runs, as the step saw it."""
    seen: list[float] = []
    step = loop.train_step

    def recording(run, *args):
        seen.append(run.opt.param_groups[0]["lr"])
        return step(run, *args)

    monkeypatch.setattr(loop, "train_step", recording)
    return seen


def test_the_factor_rises_linearly_to_one_over_the_warmup_steps():
    assert warmup_factor(0, 10) == pytest.approx(0.1)  # the first step trains at lr / warmup, not at 0
    assert warmup_factor(4, 10) == pytest.approx(0.5)
    assert warmup_factor(9, 10) == 1.0 and warmup_factor(10, 10) == 1.0 and warmup_factor(10_000, 10) == 1.0
    assert [warmup_factor(s, 4) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert warmup_factor(0, 0) == 1.0 and warmup_factor(0, None) == 1.0 and warmup_factor(0, 1) == 1.0


def test_warmed_up_scales_every_group_for_the_block_only():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [p], "lr": 1e-3}, {"params": [q], "lr": 1e-4}])
    with warmed_up(opt, 0.25):
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 2.5e-5])
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]  # the schedule's lr, exactly
    with pytest.raises(RuntimeError), warmed_up(opt, 0.5):
        raise RuntimeError("a failed step")
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]
    with warmed_up(opt, 1.0):
        assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]


def test_unset_warmup_is_the_architectures_default_and_a_number_is_kept():
    data = DataConfig(corpus="c.json", features="f")
    assert TransformerDecoder.default_warmup > 0
    for arch in available_architectures():
        expected = TransformerDecoder.default_warmup if arch == "transformer" else 0
        assert getattr(get_architecture(arch)[0], "default_warmup", 0) == expected
        assert TrainConfig(arch=arch, data=data).checked().optim.warmup == expected
    # from a trained model (a later stage, fine-tuning, SCST): no default warm-up
    assert TrainConfig(arch="transformer", data=data, init_from="runs/x/best").checked().optim.warmup == 0
    assert default_warmup("transformer", init_from="runs/x/best") == 0
    for given in (0, 7):  # an explicit number, 0 included, is what the run uses
        cfg = TrainConfig(arch="transformer", data=data, optim=OptimConfig(warmup=given)).checked()
        assert cfg.optim.warmup == given
    # YAML null and the override `optim.warmup=null` mean "the default", as leaving it out does
    for overrides in ([], ["optim.warmup=null"], ["optim.warmup=none"]):
        cfg = load_config(TrainConfig, None, ["arch=transformer", "data.corpus=c.json", "data.features=f",
                                              *overrides])
        assert cfg.optim.warmup is None and cfg.checked().optim.warmup == TransformerDecoder.default_warmup
    assert load_config(TrainConfig, None, ["data.corpus=c.json", "data.features=f", "arch=transformer"]) \
        .checked().optim.warmup == TransformerDecoder.default_warmup  # an arch override is not shadowed


@pytest.mark.parametrize("value", ["-1", "2.5", "true", "ten", "[100]", "100000000"])
def test_a_bad_warmup_is_refused_with_the_setting_named(value, capsys):
    status = main(["train", "data.corpus=c.json", "data.features=f", f"optim.warmup={value}"])
    err = capsys.readouterr().err
    assert status == 2 and "optim.warmup" in err and "Traceback" not in err, err


def test_bad_values_raise_train_error():
    for bad in (-1, 10**8, True, 2.5, "100"):
        with pytest.raises(TrainError, match="optim.warmup"):
            OptimConfig(warmup=bad).checked()


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_the_lr_ramps_over_the_first_steps_then_follows_the_schedule(schedule, synthetic, tmp_path, lrs):
    warmup, lr, epochs = 20, 2e-3, 2
    train(tiny_config(synthetic, tmp_path / "run", epochs, warmup=warmup, schedule=schedule))
    assert len(lrs) == epochs * STEPS_PER_EPOCH
    for s, seen in enumerate(lrs):
        epoch, b = divmod(s, STEPS_PER_EPOCH)
        scheduled = lr if schedule == "plateau" else \
            lr * 0.5 * (1 + math.cos(math.pi * (epoch + b / STEPS_PER_EPOCH) / epochs))
        assert seen == pytest.approx(scheduled * min(1.0, (s + 1) / warmup), rel=1e-9), s
    assert lrs[0] == pytest.approx(lr / warmup)  # step 0
    if schedule == "plateau":
        assert lrs[9] == pytest.approx(lr / 2) and lrs[19:] == [lr] * (len(lrs) - 19)  # mid-way, then the lr
    # the optimizer keeps the schedule's lr, not the warmed one: a plateau decay and last.pt act on it
    last = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lrs[-1])
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["warmup"] == warmup
    training = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["training"]
    assert training["config"]["optim"]["warmup"] == warmup


def test_resume_continues_the_ramp_where_it_stopped(synthetic, tmp_path, lrs):
    """A warm-up longer than an epoch: a run resumed after epoch 1 takes the same steps, at the same lrs, as
    one run, and ends in the same state."""
    warmup = 2 * STEPS_PER_EPOCH + 5
    train(tiny_config(synthetic, tmp_path / "whole", 2, warmup=warmup))
    whole = list(lrs)
    lrs.clear()
    train(tiny_config(synthetic, tmp_path / "resumed", 1, warmup=warmup))
    train(tiny_config(synthetic, tmp_path / "resumed", 2, warmup=warmup), resume=True)
    assert lrs == whole
    assert lrs[STEPS_PER_EPOCH] == pytest.approx(2e-3 * (STEPS_PER_EPOCH + 1) / warmup)  # not back to lr/warmup
    a = torch.load(tmp_path / "whole" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", map_location="cpu", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_zero_turns_the_warmup_off(synthetic, tmp_path, lrs):
    cfg = tiny_config(synthetic, tmp_path / "run", 1, warmup=0)
    train(cfg)
    assert lrs == [2e-3] * STEPS_PER_EPOCH
    assert cfg.optim.warmup == 0


def test_the_plain_transformer_config_learns_the_synthetic_data_through_the_cli(synthetic, tmp_path, capsys):
    """Issue 19's bar: arch=transformer at its default sizes, lr 3e-3, batch 32, 6 epochs and nothing else
    (the settings tests/test_architectures.py gives every architecture, without its smaller sizes) reaches
    test CIDEr-D >= 3.0 at beam 3. Measured on this data (one run each): 2.7 without warm-up (the issue's
    2.6), 5.9 with the default 100 steps (6.0 with 30), as the other attention models (5.6-5.9)."""
    run = tmp_path / "run"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        status = main(["train", "arch=transformer", f"out_dir={run}", f"data.corpus={synthetic.corpus}",
                       f"data.features={synthetic.features}", "data.max_len=12", "optim.epochs=6", "optim.lr=3e-3",
                       "optim.batch_size=32", "progress=false"])
    assert status == 0, log.getvalue()[-2000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["warmup"] == TransformerDecoder.default_warmup
    assert main(["evaluate", "--model", str(run / "best"), "--corpus", str(synthetic.corpus), "--features",
                 str(synthetic.features), "--split", "test", "--beam", "3", "--out", str(tmp_path / "eval")]) == 0
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())["beams"]["3"]
    with capsys.disabled():
        print(f"\nplain transformer config: test beam 3 {json.dumps(scores)}")
    assert scores["CIDEr-D"] >= 3.0


def test_a_checkpoint_from_before_warmup_resumes_as_a_run_without_it(synthetic, tmp_path):
    """last.pt written before optim.warmup existed: it trained without warm-up, so it resumes with warmup 0
    (every architecture but the transformer by default); the transformer's default would change the run, and
    the refusal names the setting."""
    cfg = tiny_config(synthetic, tmp_path / "run", 1, warmup=0)
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    old = json.loads(ckpt["config"])
    del old["optim"]["warmup"]  # as written before optim.warmup existed
    ckpt["config"] = json.dumps(old)
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(TrainError, match=rf"optim\.warmup: 0 -> {TransformerDecoder.default_warmup}"):
        train(tiny_config(synthetic, tmp_path / "run", 2, warmup=None), resume=True)
    assert train(tiny_config(synthetic, tmp_path / "run", 2, warmup=0), resume=True)["epochs"] == 2
