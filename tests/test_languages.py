"""Captions in any language through the command line (issue 21, defect 9): `captioner synth --language`,
`prepare` (a vocabulary of characters for Japanese, a warning when a vocabulary looks wrong), and the
Japanese synthetic data learned through `synth`, `prepare`, `features`, `train`, `evaluate`, `caption`."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from captioner.cli.main import main
from captioner.data.corpus import Corpus
from captioner.data.text import Vocab
from captioner.evaluation.metrics import compute_metrics


def _captions(csv_path: Path) -> list[str]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return [row["caption"] for row in csv.DictReader(fh)]


def test_synth_writes_captions_in_the_language_asked_for(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "fr"), "--n", "6", "--size", "32", "--language", "fr"]) == 0
    assert all(c.startswith("un ") and " d'un " in c for c in _captions(tmp_path / "fr" / "captions.csv"))
    assert main(["synth", "--out", str(tmp_path / "ja"), "--n", "6", "--size", "32", "--language", "ja"]) == 0
    assert all("の" in c and " " not in c for c in _captions(tmp_path / "ja" / "captions.csv"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--out", str(tmp_path / "xx"), "--language", "xx"])
    assert exc.value.code == 2 and "invalid choice: 'xx'" in capsys.readouterr().err
    assert not (tmp_path / "xx").exists()


def _prepare(tmp_path: Path, language: str, n: int = 60, glue: bool = False) -> Path:
    """`synth` then `prepare folder` (min_freq 1): the prepared folder."""
    shapes = tmp_path / f"shapes-{language}"
    assert main(["synth", "--out", str(shapes), "--n", str(n), "--size", "32", "--language", language]) == 0
    if glue:  # a language written without spaces, in a script the tokenizer does not split into characters
        text = (shapes / "captions.csv").read_text(encoding="utf-8")
        (shapes / "captions.csv").write_text(text.replace(" ", "_"), encoding="utf-8")
    out = tmp_path / f"prepared-{language}"
    status = main(["prepare", "folder", str(shapes / "captions.csv"), "--images", str(shapes / "images"),
                   "--out", str(out), "--min-freq", "1"])
    assert status == 0
    return out


def test_japanese_is_prepared_into_a_vocabulary_of_characters_without_warnings(tmp_path, capsys):
    out = _prepare(tmp_path, "ja")
    err = capsys.readouterr().err
    vocab = Vocab.load(out / "vocab.json")
    assert all(len(w) == 1 for w in vocab.itos[4:]) and 15 <= len(vocab) - 4 <= 30, vocab.itos
    corpus = Corpus.load(out / "corpus.json")
    assert all(len(t) >= 7 for it in corpus.items for t in it.tokens)
    assert "warning" not in err and json.loads((out / "report.json").read_text())["warnings"] == []


def test_prepare_warns_when_the_vocabulary_looks_wrong(tmp_path, capsys):
    out = _prepare(tmp_path, "en", glue=True)
    err = capsys.readouterr().err
    assert "warning: vocabulary:" in err and "train captions are one token long" in err, err
    assert "seen once" in err and "put spaces between the words" in err
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert len(warnings) == 3 and all(w in err for w in warnings) and "longer than 24 characters" in err


# Sizes as tests/test_architectures.py gives sat; Japanese captions are 12-16 characters long.
SAT = ["arch=sat", "model.embed_dim=48", "model.hidden_dim=96", "model.attention_dim=48", "model.dropout=0.1",
       "data.max_len=20", "optim.epochs=6", "optim.lr=3e-3", "optim.batch_size=32", "progress=false"]


def test_japanese_synthetic_data_is_learned_through_the_cli(tmp_path, capsys):
    prepared = _prepare(tmp_path, "ja", n=400)
    corpus, features = prepared / "corpus.json", tmp_path / "features"
    assert main(["features", "--corpus", str(corpus), "--out", str(features), "--workers", "0", "--quiet"]) == 0
    run = tmp_path / "run"
    assert main(["train", f"out_dir={run}", f"data.corpus={corpus}", f"data.features={features}", *SAT]) == 0
    ev = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run / "best"), "--corpus", str(corpus), "--features", str(features),
                 "--split", "test", "--beam", "3", "--out", str(ev)]) == 0
    result = json.loads((ev / "metrics.json").read_text())
    scores = result["beams"]["3"]

    loaded = Corpus.load(corpus)
    blind = Counter(c for it in loaded.split("train") for c in it.captions).most_common(1)[0][0]
    refs = {it.image: it.captions for it in loaded.split("test")}
    blind_cider = compute_metrics(refs, {k: blind for k in refs}, metrics=["CIDEr-D"]).scores["CIDEr-D"]
    with capsys.disabled():
        print(f"\nja sat: test beam 3 {json.dumps(scores)}; blind CIDEr-D {blind_cider:.3f}")
    assert scores["CIDEr-D"] >= 2 * blind_cider and "METEOR" not in scores

    image = corpus.parent.parent / "shapes-ja" / "images" / loaded.split("test")[0].image
    capsys.readouterr()
    assert main(["caption", str(image), "--model", str(run / "best"), "--json"]) == 0
    caption = json.loads(capsys.readouterr().out)["caption"]
    assert "の" in caption and "にある" in caption and " " not in caption, caption  # shown without spaces


def test_an_english_only_validation_metric_is_refused_for_japanese_captions_before_training(tmp_path, capsys):
    """val_metric=METEOR on Japanese captions: METEOR is not computed for them, so training refuses it at
    once instead of failing after the first epoch (a KeyError before)."""
    prepared = _prepare(tmp_path, "ja", n=30)
    corpus, features = prepared / "corpus.json", tmp_path / "features"
    assert main(["features", "--corpus", str(corpus), "--out", str(features), "--workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    status = main(["train", f"out_dir={run}", f"data.corpus={corpus}", f"data.features={features}", *SAT,
                   "val_metric=METEOR"])
    err = capsys.readouterr().err
    assert status == 2 and "val_metric=METEOR" in err and "are not English; use CIDEr-D or BLEU-4" in err, err
    assert not (run / "last.pt").exists()
