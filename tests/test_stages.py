"""Staged training in one command (``then``): each stage starts from the best/ of the one before, and
trains exactly as the same stage run on its own would; --resume skips what is finished."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from captioner.config import load_config
from captioner.inference.modeldir import load_model_dir
from captioner.training.config import OptimConfig, TrainConfig
from captioner.training.loop import train
from captioner.training.stages import stage_configs

from .test_train import _cli_args, small_config

STAGE2 = {"name": "fine", "optim": {"lr": 1e-3, "batch_size": 32, "epochs": 1}, "seed": 1}


def _weights(model_dir):
    decoder, _, cfg = load_model_dir(model_dir)
    return decoder.state_dict(), cfg


def test_a_stage_is_the_run_it_would_be_on_its_own(synthetic, tmp_path):
    cfg = small_config(synthetic, tmp_path / "run", epochs=1)
    cfg.then = [dict(STAGE2)]
    summary = train(cfg)
    assert summary["out_dir"] == str(tmp_path / "run-fine")
    assert [s["out_dir"] for s in summary["stages"]] == [str(tmp_path / "run"), str(tmp_path / "run-fine")]
    assert (tmp_path / "run-fine" / "best").is_dir()

    # the same second stage by hand: a config of its own, init_from stage 1's best/
    alone = TrainConfig(arch="sat", data=cfg.data, optim=OptimConfig(lr=1e-3, batch_size=32, epochs=1), seed=1,
                        init_from=str(tmp_path / "run" / "best"), out_dir=str(tmp_path / "by-hand"), progress=False)
    by_hand = train(alone)
    assert by_hand["best"] == summary["best"] and by_hand["best_epoch"] == summary["best_epoch"]
    chained, cfg_chained = _weights(tmp_path / "run-fine" / "best")
    manual, _ = _weights(tmp_path / "by-hand" / "best")
    assert all(torch.equal(v, manual[k]) for k, v in chained.items())
    assert cfg_chained["training"]["config"]["init_from"] == str(tmp_path / "run" / "best")
    assert cfg_chained["training"]["config"]["optim"]["lr"] == 1e-3


def test_a_stage_keeps_arch_and_data_and_defaults_the_rest(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("arch: sat\nmodel: {hidden_dim: 64}\ndata: {corpus: c.json, features: f, max_len: 12}\n"
                 "optim: {lr: 0.001, epochs: 7, restore_best: true}\nval_beam: 2\nthreads: 1\nout_dir: runs/x\n"
                 "then:\n  - {name: scst, objective: scst, optim: {lr: 2.0e-5}, data: {max_len: 20}}\n"
                 "  - {name: more, seed: 3}\n")
    first, scst, more = stage_configs(load_config(TrainConfig, y, ["data.features=g", "out_dir=runs/y"]))
    assert first.then == [] and first.optim.epochs == 7 and first.model == {"hidden_dim": 64}
    assert (scst.out_dir, scst.init_from) == ("runs/y-scst", "runs/y/best")
    assert (more.out_dir, more.init_from) == ("runs/y-more", "runs/y-scst/best")
    assert scst.data.features == "g" and scst.data.corpus == "c.json" and scst.data.max_len == 20
    assert scst.threads == 1 and scst.model == {}
    assert scst.optim.lr == 2e-5 and scst.optim.epochs == 20 and not scst.optim.restore_best  # defaults
    assert scst.val_beam == 1 and more.objective == "xe" and more.seed == 3 and more.data.max_len == 12


@pytest.mark.parametrize("then, message", [
    ([{"optim": {"lr": 1e-4}}], "needs a name"),
    ([{"name": "a/b"}], "needs a name"),
    ([{"name": "a"}, {"name": "a"}], "second stage named"),
    ([{"name": "a", "out_dir": "x"}], "out_dir: set by the run"),
    ([{"name": "a", "init_from": "x"}], "init_from: set by the run"),
    ([{"name": "a", "model": {"hidden_dim": 8}}], "model: set by the run"),
    ([{"name": "a", "arch": "transformer"}], "arch: set by the run"),
    ([{"name": "a", "device": "cuda"}], "device: set by the run"),
    ([{"name": "a", "data": {"features": "nowhere"}}], r"then\[0\] \(a\): data.features=nowhere: not found"),
    ([{"name": "a", "optim": {"lrr": 1}}], "unknown key"),
    ([{"name": "a", "seed": "x"}], "expected int"),
])
def test_a_wrong_stage_is_refused_before_anything_trains(synthetic, tmp_path, then, message):
    cfg = small_config(synthetic, tmp_path / "run", epochs=1)
    cfg.then = then
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_later_stage_checked_first_and_an_old_stage_dir_refused(synthetic, tmp_path):
    cfg = small_config(synthetic, tmp_path / "run", epochs=1)
    cfg.then = [{"name": "s", "objective": "scst", "scst": {"baseline": "best"}}]
    with pytest.raises(ValueError, match=r"then\[0\] \(s\): scst.baseline"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    (tmp_path / "run-s").mkdir()
    (tmp_path / "run-s" / "last.pt").write_bytes(b"")
    cfg.then = [{"name": "s"}]
    with pytest.raises(ValueError, match="run-s already holds a training run"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_the_command_runs_every_stage_and_resume_skips_the_finished_ones(synthetic, tmp_path):
    y = tmp_path / "stages.yaml"
    y.write_text("then:\n  - {name: fine, optim: {lr: 1.0e-3, batch_size: 32, epochs: 1}, seed: 1}\n")
    args = [*_cli_args(tmp_path / "run", synthetic, 1), "--config", str(y)]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stage 2 of 2" in r.stdout and f"from {tmp_path / 'run' / 'best'}" in r.stdout
    summary = json.loads(r.stdout[r.stdout.rindex("\n{"):])
    assert summary["out_dir"] == str(tmp_path / "run-fine") and len(summary["stages"]) == 2
    before = (tmp_path / "run-fine" / "last.pt").read_bytes()

    again = subprocess.run(args, capture_output=True, text=True)  # a second fresh run would overwrite
    assert again.returncode == 2 and "already holds a training run" in again.stderr
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (tmp_path / "run-fine" / "last.pt").read_bytes() == before  # nothing trained again
    assert json.loads(resumed.stdout[resumed.stdout.rindex("\n{"):])["best"] == summary["best"]


def test_a_later_stage_refuses_to_resume_from_a_best_that_changed_under_it(synthetic, tmp_path):
    cfg = small_config(synthetic, tmp_path / "run", epochs=1)
    cfg.then = [dict(STAGE2)]
    train(cfg)
    started = json.loads((tmp_path / "run-fine" / "started_from.json").read_text())
    assert started["init_from"] == str(tmp_path / "run" / "best")
    longer = small_config(synthetic, tmp_path / "run", epochs=2)  # stage 1 trains on and finds a better best/
    longer.then = [dict(STAGE2)]
    with pytest.raises(ValueError, match="started from an earlier"):
        train(longer, resume=True)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2


def test_stage_directories_sit_beside_the_runs_directory(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("then:\n  # - name: scst\n")  # every stage commented out: none
    assert load_config(TrainConfig, y).then == []
    y.write_text("then: {name: scst}\n")
    with pytest.raises(ValueError, match="then: expected a list"):
        load_config(TrainConfig, y)
    cfg = TrainConfig(out_dir=str(tmp_path / "run") + "/", then=[{"name": "s"}])
    assert [s.out_dir for s in stage_configs(cfg)] == [str(tmp_path / "run") + "/", str(tmp_path / "run-s")]
    with pytest.raises(ValueError, match="needs an out_dir with a name"):
        stage_configs(TrainConfig(out_dir=".", then=[{"name": "s"}]))
