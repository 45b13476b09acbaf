"""Tests for captioner.data.prepare (what `captioner prepare` reads and writes) and Corpus.images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.data.corpus import Corpus, CorpusError
from captioner.data.prepare import PREPARE_OUTPUTS, prepare_corpus
from captioner.data.synthetic import make_shapes_dataset
from captioner.data.text import Vocab


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, 12, size=32, seed=5)
    return root


def test_prepare_writes_corpus_vocab_and_report(shapes, tmp_path):
    p = prepare_corpus("folder", shapes / "captions.csv", images=shapes / "images", out=tmp_path / "out",
                       min_freq=1, max_len=4)
    assert p.out == tmp_path / "out" and sorted(f.name for f in p.out.iterdir()) == sorted(PREPARE_OUTPUTS)
    assert Corpus.load(p.out / "corpus.json").to_dict() == p.corpus.to_dict()
    assert Vocab.load(p.out / "vocab.json").itos == p.vocab.itos
    report = json.loads((p.out / "report.json").read_text())
    assert report["vocab_size"] == len(p.vocab) and report["train_caption_lengths"] == p.lengths
    assert p.lengths["max_len"] == 4 and p.lengths["truncated"] > 0


def test_prepare_refuses_a_prepared_folder_and_extra_files_outside_coco(shapes, tmp_path):
    args = ("folder", shapes / "captions.csv")
    kw = dict(images=shapes / "images", out=tmp_path / "out")
    prepare_corpus(*args, **kw)
    (tmp_path / "out" / "vocab.json").write_text("kept")
    with pytest.raises(CorpusError, match="already holds a prepared corpus"):
        prepare_corpus(*args, **kw)
    assert (tmp_path / "out" / "vocab.json").read_text() == "kept"
    prepare_corpus(*args, **kw, overwrite=True)
    assert Vocab.load(tmp_path / "out" / "vocab.json")
    with pytest.raises(CorpusError, match=r"unexpected extra arguments \['more.json'\]: only the coco format"):
        prepare_corpus(*args, ["more.json"], **kw, overwrite=True)


def test_corpus_images_by_split(shapes, tmp_path):
    corpus = prepare_corpus("folder", shapes / "captions.csv", images=shapes / "images", out=tmp_path).corpus
    assert corpus.images() == [it.image for it in corpus.items]
    assert corpus.images({"val", "test"}) == [it.image for it in corpus.items if it.split != "train"]
    assert corpus.images(set()) == []


def test_21_a_prepare_overwrite_killed_between_its_renames_leaves_no_silent_mismatch(shapes, tmp_path, monkeypatch):
    """kill -9 between the renames of `prepare --overwrite` left a new corpus.json beside the old vocab.json,
    and training used the pair. The three files are one unit now: whichever file the kill left behind,
    training refuses the pair, naming both files."""
    import os

    from captioner.training.config import DataConfig, TrainConfig
    from captioner.training.loop import train

    out = tmp_path / "out"
    prepare_corpus("folder", shapes / "captions.csv", images=shapes / "images", out=out, min_freq=1)
    first = Vocab.load(out / "vocab.json").itos
    real_replace, renames = os.replace, []

    def killed_after_the_first_rename(src, dst):
        if renames:
            raise KeyboardInterrupt  # the process dies here: nothing after it happens
        renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus("folder", shapes / "captions.csv", images=shapes / "images", out=out, max_words=5,
                       overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(renames) == 1  # one of the three files is new, the others old
    cfg = TrainConfig(data=DataConfig(corpus=str(out / "corpus.json"), features=str(tmp_path / "no-store")),
                      out_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match=r"vocab.json: not the vocabulary prepared with .*corpus.json") as e:
        train(cfg)
    assert "prepare" in str(e.value)
    # run again to the end, the pair is one again
    prepare_corpus("folder", shapes / "captions.csv", images=shapes / "images", out=out, max_words=5, overwrite=True)
    assert Vocab.load(out / "vocab.json").itos != first
    with pytest.raises(ValueError, match="no-store"):  # the next thing training reads
        train(cfg)
