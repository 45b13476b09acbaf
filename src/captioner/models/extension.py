"""Words a model was never taught: new embedding and output rows transferred from related known words.

A trained decoder can only say the words of its training captions (Flickr8k has no "giraffe", "zebra" or
"kitten"). To let it say a new word w anyway, we give w the rows of the words it is most like, as the direct
transfer of DCC (Hendricks et al., 2016) does: the pretrained word vectors (GloVe, the package already used for
embeddings) find w's k nearest known words by cosine similarity, and w's embedding row, output row and output
bias are their average, weighted by ``softmax(similarity / temperature)``. "giraffe" then enters the decoder
where "elephant", "zebra" or "animal" would, and is scored as the model scores those.

An extension's words are *asked-for only*: the decoding engine never picks them unless a caption is asked to
hold one (a mention or a concept), and the model's scores of every other caption are unchanged (the rows are
not in the softmax of an unguided search). Extensions are stored beside the weights of a model directory
(``extension.safetensors``, named in config.json "vocab_extension") by ``captioner vocab extend``, or made
on the fly for a mentioned word.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from captioner.data.text import Vocab
from captioner.models.base import Decoder
from captioner.models.wordvec import load_word_vectors

DEFAULT_VECTORS = "glove-6b-50d"
NEIGHBOURS, TEMPERATURE = 5, 0.1  # the k nearest known words and the softmax temperature of their weights
MAX_EXTENSION_WORDS = 10000


class ExtensionError(ValueError):
    pass


def output_layer(decoder: Decoder) -> nn.Linear:
    """The decoder's output projection (hidden -> vocabulary scores): ``decoder.output_name`` names it."""
    return getattr(decoder, decoder.output_name)


@dataclass
class VocabExtension:
    """New words and their rows: ``embed`` (n, E), ``out_weight`` (n, H), ``out_bias`` (n,)."""

    words: list[str]
    embed: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    vectors: str = DEFAULT_VECTORS
    neighbours: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # word -> [(known word, weight)]

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def empty(cls) -> "VocabExtension":
        return cls([], torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0))

    def merged(self, other: "VocabExtension") -> "VocabExtension":
        """This extension with ``other``'s words that it lacks appended."""
        if not len(self):
            return other
        new = [i for i, w in enumerate(other.words) if w not in self.index]
        if not new:
            return self
        idx = torch.tensor(new, dtype=torch.long)
        return VocabExtension(self.words + [other.words[i] for i in new],
                              torch.cat([self.embed, other.embed[idx].to(self.embed)]),
                              torch.cat([self.out_weight, other.out_weight[idx].to(self.out_weight)]),
                              torch.cat([self.out_bias, other.out_bias[idx].to(self.out_bias)]), self.vectors,
                              {**self.neighbours, **{other.words[i]: other.neighbours.get(other.words[i], [])
                                                     for i in new}})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"embed": self.embed.contiguous(), "out_weight": self.out_weight.contiguous(),
                "out_bias": self.out_bias.contiguous()}

    def record(self) -> dict:
        """What config.json "vocab_extension" says of it."""
        return {"words": list(self.words), "vectors": self.vectors,
                "method": f"direct transfer: the {NEIGHBOURS} nearest known words by cosine similarity of the word "
                          f"vectors, rows averaged with softmax(similarity / {TEMPERATURE}) weights",
                # one line per word in config.json: "elephant 0.2522, crocodile 0.2380, ..."
                "neighbours": {w: ", ".join(f"{n} {x:.4f}" for n, x in self.neighbours.get(w, [])) for w in self.words}}


def known_vectors(vocab: Vocab, vectors: str) -> tuple[list[int], np.ndarray]:
    """The vocabulary ids that the word vectors know (special words left out) and their unit vectors."""
    index, table = load_word_vectors(vectors)
    ids = [i for i, w in enumerate(vocab.itos) if i > vocab.unk_id and w in index]
    rows = np.asarray(table[np.asarray([index[vocab.itos[i]] for i in ids])], dtype=np.float32)
    return ids, rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-8)


def unknown_words(words: list[str], vectors: str = DEFAULT_VECTORS) -> list[str]:
    """The words of ``words`` that the word vectors do not know."""
    index, _ = load_word_vectors(vectors)
    return [w for w in words if w not in index]


def transfer(decoder: Decoder, vocab: Vocab, words: list[str], *, vectors: str = DEFAULT_VECTORS,
             known: tuple[list[int], np.ndarray] | None = None) -> VocabExtension:
    """Rows for ``words`` (none of them in ``vocab``; each known to the word vectors) from their nearest known
    words. ExtensionError names a word that is in the vocabulary already or that the vectors do not know."""
    if hasattr(decoder, "transfer_words"):  # an ensemble (captioner.models.ensemble): each member's own rows
        return decoder.transfer_words(vocab, words, vectors=vectors)
    index, table = load_word_vectors(vectors)
    inside = [w for w in words if w in vocab]
    if inside:
        raise ExtensionError(f"{', '.join(inside[:5])}: already in the model's vocabulary")
    unknown = [w for w in words if w not in index]
    if unknown:
        raise ExtensionError(f"{', '.join(unknown[:5])}: not a word the word vectors {vectors} know, so the model "
                             "cannot be taught it")
    ids, unit = known if known is not None else known_vectors(vocab, vectors)
    if not ids:
        raise ExtensionError(f"none of the model's words is known to the word vectors {vectors}")
    out = output_layer(decoder)
    E, W = decoder.embed.weight.detach(), out.weight.detach()
    b = out.bias.detach() if out.bias is not None else W.new_zeros(W.shape[0])
    embed, weight, bias, neighbours = [], [], [], {}
    for w in words:
        v = np.asarray(table[index[w]], dtype=np.float32)
        sims = unit @ (v / max(float(np.linalg.norm(v)), 1e-8))
        top = np.argsort(-sims)[:NEIGHBOURS]
        mix = torch.softmax(torch.from_numpy(sims[top].copy()) / TEMPERATURE, dim=0)
        rows = torch.tensor([ids[j] for j in top], dtype=torch.long, device=E.device)
        mix = mix.to(E)
        embed.append(mix @ E[rows])
        weight.append(mix @ W[rows])
        bias.append(mix @ b[rows])
        neighbours[w] = [(vocab.itos[ids[j]], float(x)) for j, x in zip(top, mix.tolist())]
    if not words:
        return VocabExtension.empty()
    return VocabExtension(list(words), torch.stack(embed), torch.stack(weight), torch.stack(bias), vectors,
                          neighbours)


def extended_view(decoder: Decoder, ext: VocabExtension, rows: torch.Tensor) -> Decoder:
    """The decoder with ``ext``'s rows ``rows`` appended to its vocabulary (word ``V + j`` is ``ext`` word
    ``rows[j]``), sharing every other weight with ``decoder`` (nothing is copied but the two enlarged layers)."""
    if hasattr(decoder, "extended"):  # an ensemble (captioner.models.ensemble): the ensemble of its members' views
        return decoder.extended(ext, rows)
    view = copy.copy(decoder)
    view._modules = dict(decoder._modules)  # a shallow copy shares the module table: give the view its own
    out = output_layer(decoder)
    E = decoder.embed.weight
    rows = rows.to(ext.embed.device)  # the extension may live elsewhere than the decoder (loaded on the CPU)
    with torch.no_grad():  # built from the rows as they are (no random initialisation to overwrite)
        embed = nn.Embedding(E.shape[0] + len(rows), E.shape[1], padding_idx=decoder.embed.padding_idx,
                             _weight=torch.cat([E, ext.embed[rows].to(E)]), _freeze=True)
        # a 1 x 1 layer given the enlarged weights (nn.utils.skip_init would do, but building on the meta device
        # imports sympy and torch's meta registrations: 0.4 s at a process's first guided search)
        proj = nn.Linear(1, 1, device=E.device, dtype=out.weight.dtype)
        proj.weight = nn.Parameter(torch.cat([out.weight, ext.out_weight[rows].to(out.weight)]))
        bias = out.bias if out.bias is not None else out.weight.new_zeros(out.out_features)
        proj.bias = nn.Parameter(torch.cat([bias, ext.out_bias[rows].to(bias)]))
        proj.in_features, proj.out_features = out.in_features, out.out_features + len(rows)
    view.embed = embed
    setattr(view, decoder.output_name, proj)
    # what it adds words to (a decoder may build on the base's cached decoding weights); in __dict__, not as a
    # submodule, so that the view's parameters stay its own
    object.__setattr__(view, "_extends", decoder)
    return view
