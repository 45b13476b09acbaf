"""The `captioner` command end to end: prepare -> features -> evaluate, and caption with the bundled model."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.cli.main import build_parser, main
from captioner.evaluation.metrics import java_available
from captioner.inference.captioner import Captioner
from captioner.inference.modeldir import PRETRAINED_DIR
from captioner.runtime.progress import progress_bar

BUNDLED = PRETRAINED_DIR / "flickr8k-sat"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", *args], capture_output=True, text=True)


def test_prepare_features_evaluate_on_synthetic(synthetic, sat_two_epochs, tmp_path, capsys):
    shapes = synthetic.root / "shapes"
    out = tmp_path / "prep"
    assert main(["prepare", "folder", str(shapes / "captions.csv"), "--images", str(shapes / "images"),
                 "--out", str(out), "--min-freq", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sum(report["images_per_split"].values()) == 400
    assert (out / "corpus.json").exists() and (out / "vocab.json").exists()

    feats = tmp_path / "feats"
    assert main(["features", "--corpus", str(out / "corpus.json"), "--splits", "test", "--out", str(feats),
                 "--quiet", "--workers", "0"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["complete"] and summary["computed"] == report["images_per_split"]["test"]

    # a model trained for a few epochs is enough to check the evaluate command's outputs (one shared with other
    # tests: tests/conftest.py)
    model = sat_two_epochs[0] / "best"
    ev = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model), "--corpus", str(synthetic.corpus),
                 "--features", str(feats), "--beam", "1,2", "--out", str(ev)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((ev / "metrics.json").read_text())
    assert set(metrics["beams"]) == {"1", "2"}
    with_java = java_available()[0]
    for scores in metrics["beams"].values():
        assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"} <= set(scores)
        assert ("METEOR" in scores) == with_java
    assert "SPICE" in metrics["unavailable"]
    assert with_java or "METEOR" in metrics["unavailable"]
    md = (ev / "metrics.md").read_text()
    assert "| beam |" in md and md in printed
    assert metrics["decoding"] == {"length_penalty": 0.0, "no_repeat_ngram": 0}  # the model's defaults
    repeats = [c for c in json.loads((ev / "captions.json").read_text())["2"].values()
               if len(set(c.split())) < len(c.split())]
    assert repeats  # "a red circle above a blue square": "a" twice

    # decoding settings to compare on val: no word twice in a caption
    assert main(["evaluate", "--model", str(model), "--corpus", str(synthetic.corpus),
                 "--features", str(feats), "--beam", "2", "--out", str(ev), "--length-penalty", "1.5",
                 "--no-repeat-ngram", "1"]) == 0
    assert json.loads((ev / "metrics.json").read_text())["decoding"] == {"length_penalty": 1.5, "no_repeat_ngram": 1}
    captions = json.loads((ev / "captions.json").read_text())["2"].values()
    assert captions and all(len(set(c.split())) == len(c.split()) for c in captions)


def test_evaluate_rejects_bad_beam_list():
    r = run_cli("evaluate", "--model", "x", "--corpus", "y", "--features", "z", "--beam", "1,zero")
    assert r.returncode == 2 and "beam sizes" in r.stderr


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Generated 'photos' of many sizes, aspect ratios and colour modes."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    out = []

    def noise(w, h):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    noise(1600, 240).save(d / "panorama.jpg")
    noise(90, 700).convert("L").save(d / "tall_gray.png")
    rgba = noise(320, 200).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "transparent.png")
    noise(64, 48).convert("P").save(d / "palette.gif")
    Image.fromarray((rng.integers(0, 65535, (120, 160))).astype(np.uint16)).save(d / "sixteen_bit.png")
    noise(3000, 2000).save(d / "large.jpg", quality=70)
    noise(17, 9).convert("CMYK").save(d / "tiny_cmyk.jpg")
    noise(200, 200).convert("1").save(d / "bilevel.png")
    for p in sorted(d.iterdir()):
        out.append(p)
    return out


def test_bundled_model_is_shipped_with_its_metrics():
    cfg = json.loads((BUNDLED / "config.json").read_text())
    assert {p.name for p in BUNDLED.iterdir()} >= {"config.json", "vocab.json", "model.safetensors"}
    assert cfg["arch"] == "sat" and cfg["encoder"]["name"] == "efficientnet-lite0"
    test = cfg["metrics"]["test"]
    assert {"1", "3", "5"} <= set(test["beams"])
    # the quality bar of the bundled model (Show, Attend and Tell's published soft-attention figures)
    assert test["beams"]["3"]["BLEU-4"] >= 0.195 and test["beams"]["3"]["METEOR"] >= 0.189


def test_caption_any_photo_with_the_bundled_model(photos):
    model = Captioner.from_pretrained()  # the default: the bundled model
    results = [r.to_dict() for r in model.caption([str(p) for p in photos], beam_size=3, n_best=2,
                                                   return_attention=True)]
    assert len(results) == len(photos)
    for r in results:
        assert isinstance(r["caption"], str) and r["caption"].strip()
        assert len(r["n_best"]) == 2 and r["n_best"][0]["score"] >= r["n_best"][1]["score"]
        assert len(r["attention"]) == len(r["words"]) and all(len(a) == 49 for a in r["attention"])
        assert all("<unk>" not in h["caption"].split() for h in r["n_best"])  # never said by default


def test_caption_cli_json_lines_and_attention_figure(photos, tmp_path):
    paths = [str(p) for p in photos[:3]]
    r = run_cli("caption", *paths, "--json", "--n-best", "3", "--attention", str(tmp_path / "att.png"))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["image"] for o in lines] == paths
    for o in lines:
        assert o["caption"] and len(o["n_best"]) == 3
        fig = Path(o["attention_figure"])
        assert fig.exists() and Image.open(fig).size[0] > 300


def test_caption_cli_reports_bad_files_and_continues(photos, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    r = run_cli("caption", str(bad), str(photos[0]), "--json", "--beam", "1")
    assert r.returncode == 1
    assert f"{bad}: not an image file" in r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[0]["image"] == str(bad) and "not an image file" in lines[0]["error"]
    assert lines[1]["image"] == str(photos[0]) and lines[1]["caption"]


@pytest.mark.parametrize("args, message", [
    (["train", "optim.epochs=1"], "set data.corpus"),
    (["train", "data.corpus=/nope/corpus.json", "data.features=/nope"], "/nope/corpus.json"),
    (["train", "optim.lrr=1"], "unknown key"),
    (["evaluate", "--model", "/nope/model", "--corpus", "c", "--features", "f"], "/nope/model"),
    (["caption", "x.jpg", "--model", "/nope/model"], "/nope/model"),
    (["features", "--images", "/nope/dir", "--out", "/tmp/never"], "/nope/dir: not a folder"),
    (["prepare", "karpathy", "/nope/dataset.json", "--images", "/tmp", "--out", "/tmp/never"],
     "/nope/dataset.json"),
])
def test_cli_bad_input_is_a_clear_error_not_a_traceback(args, message):
    r = run_cli(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_cli_features_on_an_empty_folder_fails(tmp_path):
    r = run_cli("features", "--images", str(tmp_path), "--out", str(tmp_path / "store"))
    assert r.returncode == 2 and "no images to encode" in r.stderr


@pytest.mark.parametrize("flag, message", [(["--beam", "0"], "beam size 0: must be from 1 to 50"),
                                           (["--n-best", "0"], "n-best 0: must be from 1 to 50"),
                                           (["--max-pixels", "-5"], "must be >= 1")])
def test_cli_caption_rejects_non_positive_numbers(flag, message):
    r = run_cli("caption", "x.jpg", *flag)
    assert r.returncode == 2 and message in r.stderr


def test_caption_cli_sampling_is_seeded_and_varied(photos):
    args = ["caption", str(photos[0]), "--sample", "--num-captions", "5", "--seed", "7", "--json"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    line = json.loads(first.stdout)
    samples = [s["caption"] for s in line["samples"]]
    assert len(samples) == 5 and len(set(samples)) >= 2
    assert line["caption"] == samples[0] and line["score"] == line["samples"][0]["score"]
    assert all(s["score"] < 0 for s in line["samples"])
    other = run_cli(*args[:-2], "8", "--json")
    assert other.returncode == 0 and other.stdout != first.stdout


@pytest.mark.parametrize("args, message", [
    (["--sample", "--n-best", "3"], "--num-captions"),
    (["--sample", "--beam", "3"], "--num-captions"),
    (["--sample", "--seed", "18446744073709551616"], "seed 18446744073709551616: must be from 0 to 9223372036854775807"),
    (["--seed", "3"], "add --sample"),
    (["--sample", "--top-p", "1.5"], "top-p 1.5: must be from 1e-06 to 1.0"),
    (["--sample", "--temperature", "0"], "temperature 0.0: must be from 0.01 to 100.0"),
    (["--length-penalty", "nan"], "length penalty: expected a finite number, got 'nan'"),
    (["--length-penalty", "-1"], "length penalty -1.0: must be from 0.0 to 10.0"),
])
def test_caption_cli_rejects_bad_sampling_options(photos, args, message):
    r = run_cli("caption", str(photos[0]), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_caption_cli_attention_figure_needs_an_attention_model(photos, tmp_path):
    import torch

    from captioner.data.text import Vocab
    from captioner.models import build_decoder
    from captioner.inference.modeldir import save_model_dir

    vocab = Vocab.build([["a", "dog"]], min_freq=1)
    torch.manual_seed(0)
    merge = build_decoder("merge", {"vocab_size": len(vocab), "word_vectors": "", "freeze_embeddings": False,
                                    "embed_dim": 8, "hidden_dim": 8})
    enc = json.loads((BUNDLED / "config.json").read_text())["encoder"]
    save_model_dir(tmp_path / "merge", merge, vocab, {"encoder": enc, "decoding": {"beam_size": 2, "max_len": 5}})
    r = run_cli("caption", str(photos[0]), "--model", str(tmp_path / "merge"), "--attention", str(tmp_path / "a.png"))
    assert r.returncode == 2 and "no attention over image regions" in r.stderr
    assert not (tmp_path / "a.png").exists()
    r = run_cli("caption", str(photos[0]), "--model", str(tmp_path / "merge"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["caption"] is not None
    res = Captioner.from_pretrained(tmp_path / "merge").caption(str(photos[0]), return_attention=True)
    assert res[0].ok and res[0].attention is None  # no fake maps


@pytest.mark.parametrize("command, preset, expected", [
    ("evaluate", None, "PASSIVE"), ("caption", None, "PASSIVE"), ("train", None, "unset"),
    ("evaluate", "ACTIVE", "ACTIVE"), ("train", "PASSIVE", "PASSIVE"),
])
def test_openmp_threads_sleep_except_in_training_unless_the_user_chose(command, preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os; from captioner.cli.training import set_wait_policy; set_wait_policy(%r); import torch; "
            "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))" % command)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [expected]


def test_training_on_a_busy_machine_says_how_to_share_it(monkeypatch, capsys):
    from captioner.cli import training as cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    cli.warn_if_busy()
    assert "load average 1.9 on 2 cores" in capsys.readouterr().err
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 1.0, 1.0))
    cli.warn_if_busy()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    cli.warn_if_busy()
    assert capsys.readouterr().err == ""


# a command whose image-decoding worker is slow: it writes its process id, then decodes for two minutes
_SLOW_WORKER = textwrap.dedent("""
    import os, sys, time
    import captioner.encoders.store_fill as store_fill
    import captioner.inference.prepared as prepared

    def slow(*args, **kw):
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(120)

    store_fill.try_load_image = prepared.load_image = slow
    from captioner.cli.main import main
    sys.exit(main(sys.argv[2:]))
""")


def _gone(pid: int) -> bool:
    """The process has ended (a zombie waiting for init to reap it has ended too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("command", ["features", "caption"])
def test_image_decoding_workers_die_with_their_parent(command, photos, tmp_path):
    """Issue 21, defect 8: after `kill -9` of `features` or `caption`, its decoding worker ran on (111 s and more,
    files open, 224 MB)."""
    pid_file = tmp_path / "worker.pid"
    # decoding processes are the torch encoder's in `features` (with ONNX Runtime its threads decode); no hints:
    # `caption`'s head start would encode the photo before any worker starts
    args = (["features", "--images", str(photos[0].parent), "--out", str(tmp_path / "store"), "--runtime", "torch"]
            if command == "features" else ["caption", str(photos[0])])
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WORKER, str(pid_file), *args, "--workers", "1", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "CAPTIONER_HINTS": "0"})
    worker = None
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_file.exists(), f"no worker started (rc={proc.poll()}): {proc.stderr.read1().decode()[-2000:]}"
        worker = int(pid_file.read_text())
        assert worker != proc.pid and not _gone(worker)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(worker), "the worker outlived its parent by 5 s"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if worker is not None and not _gone(worker):
            os.kill(worker, signal.SIGKILL)


def test_synth_help_describes_every_option():
    synth = build_parser()._subparsers._group_actions[0].choices["synth"]
    options = [a for a in synth._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"out", "n", "size", "seed"}
    assert all(a.help for a in options), [a.dest for a in options if not a.help]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_are_live_on_a_terminal_and_plain_lines_in_a_log():
    """Issue 21: progress bars (caption, features, train) wrote carriage-return lines into logs."""
    terminal, log = _Terminal(), io.StringIO()
    for stream in (terminal, log):
        bar = progress_bar(range(500), file=stream, desc="epoch 1/2", unit="batch")
        for i in bar:
            bar.set_postfix(loss=f"{1 / (i + 1):.3f}")  # each step: a redraw on a terminal, no line in a log
    assert "\r" in terminal.getvalue()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2  # the start and the end (one per 30 s between)
    assert lines[-1].startswith("epoch 1/2: 100%|#") and "| 500/500 " in lines[-1] and "loss=0.002" in lines[-1]
    quiet = io.StringIO()
    for _ in progress_bar(range(5), file=quiet, disable=True):
        pass
    assert quiet.getvalue() == ""
