"""CaptionData's check that a feature store was extracted from the corpus's own images (issue 7, case 1)."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace

import pytest

from captioner.data.corpus import Corpus
from captioner.data.synthetic import make_shapes_dataset
from captioner.data.text import Vocab
from captioner.data.captions import CaptionData, StoreMismatchError, check_store_matches_corpus
from captioner.data.features import FeatureStore


def _corpus_with_root(synthetic, root) -> Corpus:
    return replace(Corpus.load(synthetic.corpus), image_root=root)


def test_store_of_other_images_with_the_same_names_is_refused(synthetic, tmp_path):
    """Other pictures saved under the same file names (another run of the generator): same names, other files."""
    other = tmp_path / "other"
    make_shapes_dataset(other, 400, seed=1)
    corpus = _corpus_with_root(synthetic, other / "images")
    assert {it.image for it in corpus.items} <= set(FeatureStore.open(synthetic.features).images)  # names match
    store = FeatureStore.open(synthetic.features)
    with pytest.raises(StoreMismatchError) as err:
        CaptionData(corpus, Vocab.load(synthetic.vocab), store, "train", 12)
    msg = str(err.value)
    assert msg.startswith(f"{synthetic.features}: these features were extracted from the images in "
                          f"{(synthetic.root / 'shapes' / 'images').resolve()}")
    assert f"the corpus's images in {other / 'images'} are not the same files (same names, other file sizes)" in msg
    assert "captioner features --corpus" in msg  # the way out


def test_a_moved_copy_of_the_same_images_is_accepted(synthetic, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(synthetic.root / "shapes" / "images", copy)
    corpus = _corpus_with_root(synthetic, copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = CaptionData(corpus, Vocab.load(synthetic.vocab), FeatureStore.open(synthetic.features), "val", 12)
    assert len(data.images) == len(corpus.split("val"))


def test_an_image_changed_in_place_is_refused(synthetic, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(synthetic.root / "shapes" / "images", copy)
    first = sorted(copy.iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")  # one byte more: another file
    with pytest.raises(StoreMismatchError, match="same names, other file sizes"):
        check_store_matches_corpus(FeatureStore.open(synthetic.features), _corpus_with_root(synthetic, copy))


def test_without_the_images_the_check_warns_that_it_cannot_check(synthetic, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning, match="cannot check that these features are of the corpus's images"):
        check_store_matches_corpus(FeatureStore.open(synthetic.features), _corpus_with_root(synthetic, tmp_path / "empty"))


def test_a_store_without_a_fingerprint_is_refused(synthetic):
    store = FeatureStore.open(synthetic.features)
    store.meta = {k: v for k, v in store.meta.items() if k != "fingerprint"}
    with pytest.raises(StoreMismatchError, match="records no fingerprint"):
        check_store_matches_corpus(store, Corpus.load(synthetic.corpus))
