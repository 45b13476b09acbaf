"""Preparing a dataset for training (`captioner prepare`): read a caption source in one of the
formats, build the vocabulary from the train captions, and write ``corpus.json``, ``vocab.json`` and
``report.json`` into a folder that holds no prepared corpus yet (unless asked to replace it).

The three files are one unit: vocab.json is written first, then corpus.json recording the vocabulary's
digest (``vocab_sha256``), then report.json. A kill between the renames of ``prepare --overwrite``
leaves a pair that :func:`check_vocab_matches` refuses (training calls it), never a silent mismatch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from captioner.data.corpus import DEFAULT_RATIOS, Corpus, CorpusError, PathLike, Ratios
from captioner.data.readers import read_corpus
from captioner.data.text import Vocab, length_report, vocabulary_warnings, write_json_atomic

PREPARE_OUTPUTS = ("corpus.json", "vocab.json", "report.json")

# the formats without a split of their own, whose readers take the hash split's ratios and seed
_HASH_SPLIT_FORMATS = ("kaggle", "coco", "folder")


@dataclass
class Prepared:
    """What :func:`prepare_corpus` read and wrote."""

    corpus: Corpus
    vocab: Vocab
    lengths: dict[str, Any]  # length_report of the train captions
    out: Path  # the folder holding corpus.json, vocab.json, report.json
    warnings: list[str] = field(default_factory=list)  # what looks wrong in the vocabulary (vocabulary_warnings)


def check_prepare_out(out: Path, overwrite: bool) -> None:
    """``prepare`` never replaces a prepared corpus silently."""
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out}: exists and is not a folder; give a folder for corpus.json, vocab.json "
                          "and report.json")
    found = [name for name in PREPARE_OUTPUTS if (out / name).exists()]
    if found and not overwrite:
        raise CorpusError(f"--out {out}: already holds a prepared corpus ({', '.join(found)}); nothing was "
                          "changed. Use another --out folder, or --overwrite to replace it")


def prepare_corpus(
    fmt: str,
    source: PathLike,
    extra: Sequence[PathLike] = (),
    *,
    images: PathLike,
    out: PathLike,
    overwrite: bool = False,
    strict: bool = False,
    dedupe: bool = False,
    ratios: Ratios = DEFAULT_RATIOS,
    seed: int = 0,
    restval: str = "train",
    min_freq: int = 5,
    max_words: int | None = None,
    max_len: int = 30,
) -> Prepared:
    """Read ``source`` (and, for coco, the ``extra`` annotation files) in the format ``fmt`` with its
    images in ``images``; build the vocabulary of the train captions (``min_freq``, at most
    ``max_words`` words); write corpus.json, vocab.json and report.json (the reader's report, the
    vocabulary size and the train captions' lengths against ``max_len``) into ``out``.

    ``ratios`` and ``seed`` are the hash split of the formats without splits (kaggle, coco,
    folder); ``restval`` is karpathy's. Nothing is written when the source cannot be read, or
    when ``out`` already holds a prepared corpus and ``overwrite`` is false."""
    kwargs: dict[str, Any] = {"strict": strict, "dedupe": dedupe}
    if extra and fmt != "coco":
        raise CorpusError(f"unexpected extra arguments {list(extra)}: only the coco format takes several files")
    if fmt in _HASH_SPLIT_FORMATS:
        kwargs.update(ratios=ratios, seed=seed)
    if fmt == "karpathy":
        kwargs["restval"] = restval
    out = Path(out)
    check_prepare_out(out, overwrite)
    corpus = read_corpus(fmt, [source, *extra] if fmt == "coco" else source, images, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    train_tokens = [t for it in corpus.split("train") for t in it.tokens]
    vocab = Vocab.build(train_tokens, min_freq=min_freq, max_size=max_words)
    corpus = replace(corpus, vocab_sha256=vocab_digest(vocab))
    vocab.save(out / "vocab.json")  # first: a kill before corpus.json leaves an old corpus that refuses it
    corpus.save(out / "corpus.json")
    lengths = length_report(train_tokens, max_len)
    warnings = vocabulary_warnings(train_tokens)
    report = {**corpus.report.to_dict(), "vocab_size": len(vocab), "train_caption_lengths": lengths,
              "warnings": warnings, "vocab_sha256": corpus.vocab_sha256}
    write_json_atomic(out / "report.json", report, indent=1)
    return Prepared(corpus, vocab, lengths, out, warnings)


def vocab_digest(vocab: Vocab) -> str:
    """The SHA-256 of a vocabulary's words in order (what corpus.json records of the vocab.json beside it)."""
    return hashlib.sha256(json.dumps(vocab.itos, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_vocab_matches(corpus: Corpus, corpus_path: PathLike, vocab: Vocab, vocab_path: PathLike) -> None:
    """The vocab.json beside a prepared corpus.json must be the one prepared with it (a `prepare --overwrite`
    killed half-way leaves one of them old). Another vocabulary file, given on purpose, is not checked."""
    beside = Path(corpus_path).with_name("vocab.json")
    if corpus.vocab_sha256 is None or Path(vocab_path).resolve() != beside.resolve():
        return
    if vocab_digest(vocab) != corpus.vocab_sha256:
        raise CorpusError(f"{vocab_path}: not the vocabulary prepared with {corpus_path} (a `captioner prepare "
                          "--overwrite` stopped half-way?); run the same `captioner prepare --overwrite` again")
