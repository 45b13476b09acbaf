"""Every registered architecture through the command line on the synthetic shapes dataset:
`captioner train arch=NAME` learns it, and `captioner evaluate` / `captioner caption` work
with the model directory it writes, guided decoding (--mention, --concepts) included."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from captioner.cli.main import main
from captioner.data.corpus import Corpus
from captioner.data.features import FeatureStore
from captioner.data.synthetic import COLORS, SHAPES
from captioner.evaluation.metrics import compute_metrics
from captioner.inference.captioner import Captioner
from captioner.models import available_architectures

from .conftest import ARCH_SIZES as SIZES  # each architecture's sizes for a 6-epoch run in seconds


def test_every_architecture_has_sizes_here():
    assert sorted(SIZES) == available_architectures()


@pytest.fixture(scope="module")
def blind_cider(synthetic) -> float:
    """CIDEr-D of a 'blind' model: the most frequent training caption for every test image."""
    corpus = Corpus.load(synthetic.corpus)
    blind = Counter(c for it in corpus.split("train") for c in it.captions).most_common(1)[0][0]
    refs = {it.image: it.captions for it in corpus.split("test")}
    return compute_metrics(refs, {k: blind for k in refs}, metrics=["CIDEr-D"]).scores["CIDEr-D"]


@pytest.fixture(scope="module")
def trained(trained_arch):
    """``trained(arch)`` -> (run directory, training log): each architecture trained once (tests/conftest.py)."""
    return trained_arch


@pytest.mark.parametrize("arch", available_architectures())
def test_architecture_learns_the_synthetic_data_through_the_cli(arch, synthetic, trained, blind_cider, tmp_path,
                                                               capsys):
    run, log = trained(arch)
    if arch == "merge":  # pretrained word vectors by default, and the log counts the words they lack
        assert "word vectors glove-6b-50d:" in log and "initialised randomly" in log

    ev = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run / "best"), "--corpus", str(synthetic.corpus), "--features",
                 str(synthetic.features), "--split", "test", "--beam", "3", "--out", str(ev)]) == 0
    scores = json.loads((ev / "metrics.json").read_text())["beams"]["3"]
    with capsys.disabled():
        print(f"\n{arch}: test beam 3 {json.dumps(scores)}; blind CIDEr-D {blind_cider:.3f}")
    assert scores["CIDEr-D"] >= 2 * blind_cider

    image = synthetic.root / "shapes" / "images" / Corpus.load(synthetic.corpus).split("test")[0].image
    capsys.readouterr()
    assert main(["caption", str(image), "--model", str(run / "best"), "--json", "--n-best", "2"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["caption"] and len(line["n_best"]) == 2


def _caption(args: list[str], capsys) -> dict:
    capsys.readouterr()
    assert main(["caption", *args, "--json", "--quiet"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("arch", available_architectures())
def test_every_architecture_says_the_words_it_is_asked_for(arch, synthetic, trained, capsys):
    """The guided-decoding contract: ``--mention WORD`` puts WORD in the caption, for a word of the model's
    vocabulary that its caption lacks and for a word it was never taught (GloVe knows it), and ``--concepts
    auto`` runs, whatever the architecture."""
    best = trained(arch)[0] / "best"
    item = Corpus.load(synthetic.corpus).split("test")[1]
    image = str(synthetic.root / "shapes" / "images" / item.image)
    model = Captioner.from_pretrained(best)  # its plain caption, from the stored features (no encoder to build)
    feats = torch.tensor(FeatureStore.open(synthetic.features).get(item.image), dtype=torch.float32).unsqueeze(0)
    plain = model.vocab.decode(model.decode_features(feats)[0][0].tokens)
    known = next(w for w in [*COLORS, *SHAPES] if w not in plain and w in model.vocab)
    assert "giraffe" not in model.vocab
    for word in (known, "giraffe"):
        line = _caption([image, "--model", str(best), "--mention", word], capsys)
        assert word in line["caption"].split(), (word, plain, line)
    line = _caption([image, "--model", str(best), "--concepts", "auto"], capsys)
    assert line["caption"] and isinstance(line["concepts"], list)  # the encoder (Lite0) has a classifier
