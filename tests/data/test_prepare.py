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
