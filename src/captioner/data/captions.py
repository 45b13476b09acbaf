"""The captions of one split, ready for training and scoring: token ids, lengths, references,
and each caption's image row in a feature store (read per batch from its memory map)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from captioner.data.corpus import Corpus
from captioner.data.features import FeatureStore, fingerprint
from captioner.data.text import Vocab


class StoreMismatchError(ValueError):
    """A feature store was not extracted from the images of the corpus it is used with."""


def check_store_matches_corpus(store: FeatureStore, corpus: Corpus) -> None:
    """Refuse a feature store made from other images than the corpus's, even when the names match.

    The store's meta.json records the image folder it was extracted from and a fingerprint of
    the encoder, the image names and their file sizes. The fingerprint is recomputed over the
    corpus's image folder (one stat per image): equal means the same files, wherever the folder
    now is. If the corpus's folder holds none of the store's images there is nothing to compare
    (features kept, images deleted): a warning says so. Checked once per store and folder."""
    root = Path(corpus.image_root)
    checked = store.__dict__.setdefault("_checked_roots", set())
    if str(root) in checked:
        return
    meta = store.meta
    made_from = meta.get("image_root")
    how = "`captioner features --corpus CORPUS.json --out NEW_FOLDER` on this corpus, and use NEW_FOLDER"
    if not isinstance(meta.get("fingerprint"), str) or not isinstance(meta.get("encoder"), dict):
        raise StoreMismatchError(f"{store.path}/meta.json: records no fingerprint of the images it was made from, so "
                                 f"it cannot be checked against the corpus (images in {root}); run {how}")
    if fingerprint(meta["encoder"], store.images, root) != meta["fingerprint"]:
        present = sum(1 for name in store.images if (root / name).is_file())
        if present == 0:
            warnings.warn(f"{store.path}: cannot check that these features are of the corpus's images: none of its "
                          f"{len(store.images)} images is in {root} (the store was made from {made_from})",
                          stacklevel=3)
        else:
            missing = len(store.images) - present
            differ = ("same names, other file sizes" if not missing else
                      f"{missing} of the store's {len(store.images)} images are not there, and names or file "
                      "sizes differ")
            where = (f"from the images in {made_from}" if made_from and Path(made_from) != root.resolve()
                     else f"from other files in {root} (changed since)")
            raise StoreMismatchError(
                f"{store.path}: these features were extracted {where}, and the corpus's images in {root} are not "
                f"the same files ({differ}). Training or scoring with them would silently use other images' "
                f"features. Run {how}")
    checked.add(str(root))


class CaptionData:
    """Caption token ids, their lengths and the feature row of their image."""

    def __init__(self, corpus: Corpus, vocab: Vocab, store: FeatureStore, split: str, max_len: int):
        check_store_matches_corpus(store, corpus)
        all_items = corpus.split(split)
        items = [it for it in all_items if store.has(it.image)]
        if not items:
            raise ValueError(f"no {split!r} images of the corpus have features in {store.path}")
        if len(items) < len(all_items):
            warnings.warn(f"{len(all_items) - len(items)} of {len(all_items)} {split!r} images have no features in "
                          f"{store.path} (unreadable or not computed); they are left out", stacklevel=2)
        self.images = [it.image for it in items]
        self.refs = {it.image: it.captions for it in items}
        self.ref_tokens = {it.image: it.tokens for it in items}  # tokenised references (SCST's reward)
        # rows of the store's memory map: nothing is loaded up front, each batch reads its own rows
        # (the OS page cache keeps hot rows in RAM), so COCO-sized stores need no more memory than a batch
        self.rows = np.array([store.row_of[im] for im in self.images])
        self.store = store
        self.finish = None  # maps -> (grids, concept input): evaluation on a trunk store (encoders/tail.py Finisher)
        seqs, owner = [], []
        for i, it in enumerate(items):
            for toks in it.tokens:
                if toks:
                    seqs.append(vocab.encode(toks, max_len=max_len))
                    owner.append(i)
        self.lengths = torch.tensor([len(s) for s in seqs])
        self.tokens = torch.zeros(len(seqs), int(self.lengths.max()), dtype=torch.long)
        for j, s in enumerate(seqs):
            self.tokens[j, : len(s)] = torch.tensor(s)
        self.owner = torch.tensor(owner)

    def __len__(self) -> int:
        return len(self.owner)

    def batches(self, batch_size: int, rng: np.random.Generator) -> list[torch.Tensor]:
        """Shuffle, bucket by length in pools of 50 batches, sort each batch longest first."""
        order = rng.permutation(len(self))
        pool = batch_size * 50
        out = []
        for p in range(0, len(order), pool):
            chunk = order[p:p + pool]
            chunk = chunk[np.argsort(-self.lengths[chunk].numpy(), kind="stable")]
            out += [torch.from_numpy(chunk[i:i + batch_size].copy()) for i in range(0, len(chunk), batch_size)]
        rng.shuffle(out)
        return out

    def image_batches(self, batch_size: int, rng: np.random.Generator) -> list[torch.Tensor]:
        """Batches of about ``batch_size`` captions made of whole images (all of an image's captions together, so
        one encoder pass serves them: fine-tuning), each sorted longest first."""
        per_image = np.bincount(self.owner.numpy(), minlength=len(self.images))
        images = max(1, round(batch_size / max(per_image.mean(), 1)))
        by_owner = np.argsort(self.owner.numpy(), kind="stable")
        starts = np.concatenate([[0], np.cumsum(per_image)])
        out = []
        for chunk in np.array_split(rng.permutation(len(self.images)), max(1, -(-len(self.images) // images))):
            idx = np.concatenate([by_owner[starts[i]:starts[i + 1]] for i in chunk])
            if len(idx):
                out.append(torch.from_numpy(idx[np.argsort(-self.lengths[idx].numpy(), kind="stable")].copy()))
        return out

    def image_batch(self, idx: np.ndarray):
        """(features of each image of the captions ``idx`` once, the row of each caption's image among them,
        tokens, lengths)."""
        images, inverse = np.unique(self.owner[idx].numpy(), return_inverse=True)
        lengths = self.lengths[idx]
        return self.features(images), inverse, self.tokens[idx, :int(lengths.max())], lengths

    def batch(self, idx: torch.Tensor):
        lengths = self.lengths[idx]
        T = int(lengths.max())
        return self.features(self.owner[idx].numpy()), self.tokens[idx, :T], lengths

    def features(self, images: np.ndarray | slice) -> torch.Tensor:
        """float32 (n, P, C) grids of images (positions in ``self.images``), read from the store (a
        FeatureStoreError names an image whose row holds NaN or infinity); with a ``finish`` (a trunk store's
        maps to a model's grids, :class:`captioner.encoders.tail.Finisher`), its grids."""
        return self.features_and_concepts(images)[0]

    def features_and_concepts(self, images: np.ndarray | slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(:meth:`features`, the concept head's input when ``finish`` gives it apart, else None)."""
        x = torch.from_numpy(self.store.read(self.rows[images])).float()
        if self.finish is None:
            return x, None
        grid, concepts = self.finish(x.to(next(self.finish.parameters()).device))
        return grid, concepts.cpu()
