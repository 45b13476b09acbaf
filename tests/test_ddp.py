"""Training under torchrun (DDP, gloo on the CPU): two ranks sharing each global batch train as one
process with that batch, a killed run resumes to the same end, and a failure on one rank stops both.

Each rank runs one thread (OMP_NUM_THREADS=1), as does the single process it is compared with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .test_distributed import kill_tree
from .test_train import _cli_args, assert_same_training_state

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
EPOCHS = 3
KILLED_EPOCHS = 2  # the killed run and its reference: killed inside their last epoch (equality needs no more)
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CAPTIONER_DEBUG")},
       "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_args(out_dir: Path, data, *extra: str, epochs: int = EPOCHS) -> list[str]:
    """`train` and the settings of tests/test_train.py's runs (SAT, small sizes, batch 32, lr 3e-3)."""
    return [*_cli_args(out_dir, data, epochs)[3:], *extra]


def torchrun_train(*args: str) -> subprocess.Popen:
    return subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "captioner", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def single_train(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "captioner", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s (a rank waiting for another?):\n{err[-3000:]}")
    return proc.returncode, out, err


def checkpoint(run: Path) -> dict:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)


def test_two_ranks_learn_as_one_process_with_the_same_global_batch(synthetic, tmp_path):
    """optim.batch_size=32 is the global batch: each of the 2 ranks takes 16 captions of every batch, and
    their shares of the loss are weighted (words for the cross-entropy, captions for the attention
    regulariser) so that the averaged gradient is the one a single process computes on the 32.
    Dropout off, so both runs are deterministic. Measured: the mean training loss of each epoch (30
    steps of 32 captions per epoch, 90 in all) differs by at most 4.6e-8 (1.6e-8 after epoch 1's 30
    steps) with the step-by-step SAT step, and up to 1.1e-6 by epoch 3 since issue 20 regrouped it (each
    weight's gradient is one X^T G over all steps' rows, so a rank's 16 captions and the whole 32 round
    differently and Adam amplifies it on tiny gradients), the validation scores of every epoch are equal to 5 decimals (CIDEr-D 1.576, 2.782,
    3.616), and the weights after 90 Adam steps differ by at most 2.2e-3 (Adam's step is about lr on
    weights whose gradients are tiny, so rounding differences there move them by about lr). Required:
    losses within 4e-6 (shares' losses averaged without that weighting are 1.9e-5 off after epoch 1),
    validation CIDEr-D within 0.05, and above 2.0 after 3 epochs (the blind most-frequent caption
    scores about 1.55)."""
    args = train_args(tmp_path / "ddp", synthetic, "model.dropout=0")
    single = single_train(*train_args(tmp_path / "single", synthetic, "model.dropout=0"))
    t0 = time.perf_counter()
    code, out, err = finish(torchrun_train(*args))
    ddp_seconds = time.perf_counter() - t0
    assert code == 0, err[-3000:]
    code_single, _, err_single = finish(single)
    assert code_single == 0, err_single[-3000:]

    # rank 0 alone prints: an epoch line per epoch and one summary; rank 1 prints nothing
    lines = out.splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == EPOCHS
    assert sum(line.startswith("{") for line in lines) == 1
    assert "Traceback" not in err and "Warning" not in err, err[-3000:]

    ddp, one = checkpoint(tmp_path / "ddp"), checkpoint(tmp_path / "single")
    rows_ddp, rows_one = (json.loads(c["state"])["history"] for c in (ddp, one))
    loss_diff = [abs(a["train_loss"] - b["train_loss"]) for a, b in zip(rows_ddp, rows_one)]
    cider_diff = [abs(a["val"]["CIDEr-D"] - b["val"]["CIDEr-D"]) for a, b in zip(rows_ddp, rows_one)]
    weight_diff = max(float((ddp["model"][k] - one["model"][k]).abs().max()) for k in one["model"])
    print(json.dumps({"ddp_seconds": round(ddp_seconds, 1), "loss_diff_per_epoch": loss_diff,
                      "val_cider_diff_per_epoch": cider_diff, "max_weight_diff": weight_diff,
                      "val_cider_ddp": [r["val"]["CIDEr-D"] for r in rows_ddp]}))
    assert len(rows_ddp) == len(rows_one) == EPOCHS
    assert json.loads(ddp["state"])["step"] == json.loads(one["state"])["step"]  # the same number of global steps
    assert max(loss_diff) <= 4e-6
    assert max(cider_diff) <= 0.05
    assert rows_ddp[-1]["val"]["CIDEr-D"] > 2.0
    assert (tmp_path / "ddp" / "best" / "model.safetensors").exists() and "rng_ranks" in ddp


def test_a_killed_ddp_run_resumes_and_ends_as_an_uninterrupted_one(synthetic, tmp_path):
    """Launcher and both ranks killed at once inside epoch 2 (the last); `--resume` under torchrun: every rank
    loads last.pt (weights, optimizer, scheduler and its own random state; dropout on), and the run
    ends bit-identical to an uninterrupted one."""
    reference = torchrun_train(*train_args(tmp_path / "reference", synthetic, epochs=KILLED_EPOCHS))
    killed = tmp_path / "killed"
    proc = torchrun_train(*train_args(killed, synthetic, epochs=KILLED_EPOCHS))
    try:
        deadline = time.monotonic() + 300
        while not (killed / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # somewhere inside epoch 2
        alive = proc.poll() is None
    finally:
        kill_tree(proc.pid)
        proc.communicate()
    assert alive, "the run ended before it could be killed"
    assert json.loads(checkpoint(killed)["state"])["epoch"] < KILLED_EPOCHS
    code, out, err = finish(torchrun_train(*train_args(killed, synthetic, epochs=KILLED_EPOCHS), "--resume"))
    assert code == 0, err[-3000:]
    code, _, err = finish(reference)
    assert code == 0, err[-3000:]

    a, b = checkpoint(tmp_path / "reference"), checkpoint(killed)
    assert_same_training_state(a, b)  # epochs, best, losses, scores, weights, Adam's moments
    assert len(a["rng_ranks"]) == 2 and not torch.equal(a["rng_ranks"][0]["torch"], a["rng_ranks"][1]["torch"])
    for ra, rb in zip(a["rng_ranks"], b["rng_ranks"]):
        assert torch.equal(ra["torch"], rb["torch"])
    assert (killed / "metrics.jsonl").read_text().count("\n") == KILLED_EPOCHS


def test_rank_0s_clock_stops_both_ranks_and_a_failure_on_one_stops_both(synthetic, tmp_path):
    """A time budget with the cosine schedule: rank 0's clock decides when the epoch in progress ends
    and where the cosine is, for both ranks (else one would wait for the other in a collective, or
    their weights would part, which every checkpoint checks). Then a setting every rank refuses, and
    a write only rank 0 makes (out_dir is a file): both ranks stop with status 2 and a one-line error
    (rank 1's says rank 0 stopped), neither waits for the other."""
    budget = torchrun_train(*train_args(tmp_path / "budget", synthetic, "optim.epochs=1000", "optim.max_minutes=0.15",
                                        "optim.schedule=cosine"))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    procs = {"batch": torchrun_train(*train_args(tmp_path / "run", synthetic, "optim.batch_size=1")),
             "out_dir": torchrun_train(*train_args(blocked, synthetic))}
    want = {"batch": "optim.batch_size=1: the global batch, shared by the 2 processes torchrun started",
            "out_dir": f"{blocked}: File exists"}
    for name, proc in procs.items():
        code, _, err = finish(proc, timeout=120)
        assert code != 0  # torchrun's own status for failed ranks
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        own = [e for e in errors if "(rank 0 stopped; so does rank 1)" not in e]
        assert len(own) == 1 and own[0].startswith(f"error: {want[name]}"), err[-3000:]
        assert len(errors) <= 2  # rank 1 repeats it, marked, unless torchrun stopped it first
        assert "exitcode  : 2" in err  # a user's mistake, not a crash
        assert "Traceback" not in err.split(" failed (exitcode")[0], err[-3000:]
    assert not (tmp_path / "run").exists()

    code, out, err = finish(budget)
    assert code == 0, err[-3000:]
    summary = json.loads(out[out.index("{"):])
    rows = [json.loads(line) for line in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    # the budget stopped it: inside an epoch (that row is cut short) or just as the next one began
    assert 1 <= len(rows) < 1000 and summary["out_of_time"] and not any(r["cut_short"] for r in rows[:-1])
    assert rows[-1]["elapsed_seconds"] <= 0.15 * 60 * 1.5  # validation time was kept in reserve
    lrs = [r["lr"] for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 3e-3


def test_stages_under_torchrun_one_process_group_each(synthetic, tmp_path):
    """A run with `then` under torchrun: each stage sets up and tears down its process group in turn, and
    the second stage starts from the first one's best/ on both ranks."""
    y = tmp_path / "stages.yaml"
    y.write_text("then:\n  - {name: more, optim: {lr: 1.0e-3, batch_size: 32, epochs: 1}, seed: 1}\n")
    code, out, err = finish(torchrun_train(*train_args(tmp_path / "run", synthetic, "optim.epochs=1"),
                                           "--config", str(y)))
    assert code == 0, err[-3000:]
    assert "stage 2 of 2" in out and out.count("stage 2 of 2") == 1  # rank 0 alone prints
    state = json.loads(checkpoint(tmp_path / "run-more")["state"])
    assert state["epoch"] == 1 and len(checkpoint(tmp_path / "run-more")["rng_ranks"]) == 2
    assert json.loads(out[out.rindex("\n{"):])["out_dir"] == str(tmp_path / "run-more")
