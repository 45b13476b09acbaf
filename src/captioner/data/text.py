"""Caption tokenizer and vocabulary.

:func:`tokenize` is :func:`captioner.tokenizer.tokenize` (captions in any script; on English
captions the "Karpathy split" JSON tokenisation: lower case, hyphens become spaces, punctuation
other than ``( ) # & : =`` is removed, whitespace is collapsed). :func:`vocabulary_warnings`
says when the tokens of a corpus look wrong for a vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.checks import is_int
from captioner.files import DATA_BYTES, METADATA_BYTES, read_text
from captioner.tokenizer import join_tokens, tokenize

__all__ = ["PAD", "START", "END", "UNK", "SPECIALS", "Vocab", "tokenize", "join_tokens", "vocabulary_warnings", "length_report",
           "read_json_file", "write_text_atomic", "write_json_atomic"]

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, START, END, UNK)

VOCAB_FORMAT = "captioner-vocab"
VOCAB_VERSION = 1

LONG_TOKEN = 24  # characters: longer tokens are suspicious (few words of any language are that long)


@dataclass
class Vocab:
    """Word <-> id mapping; ids 0-3 are ``<pad> <start> <end> <unk>``."""

    itos: list[str]
    min_freq: int = 1
    max_size: int | None = None
    _stoi: dict[str, int] = field(init=False, repr=False, compare=False)

    pad_id = 0
    start_id = 1
    end_id = 2
    unk_id = 3

    def __post_init__(self) -> None:
        problem = _itos_problem(self.itos)
        if problem:
            raise ValueError(f"invalid vocabulary: {problem}")
        self.itos = list(self.itos)
        self._stoi = {word: i for i, word in enumerate(self.itos)}

    @property
    def stoi(self) -> dict[str, int]:
        """Word -> id mapping (do not modify)."""
        return self._stoi

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: object) -> bool:
        return word in self._stoi

    @classmethod
    def build(
        cls,
        token_lists: Iterable[Sequence[str]],
        *,
        min_freq: int = 1,
        max_size: int | None = None,
    ) -> Vocab:
        """Build from tokenised captions: most frequent first, ties alphabetical.

        ``max_size`` limits the number of real words (specials not counted);
        words seen fewer than ``min_freq`` times are left out.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be >= 0 or None, got {max_size}")
        counts: Counter[str] = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        for special in SPECIALS:
            counts.pop(special, None)
        words = sorted(
            (w for w, n in counts.items() if n >= min_freq and w),
            key=lambda w: (-counts[w], w),
        )
        if max_size is not None:
            words = words[:max_size]
        return cls(list(SPECIALS) + words, min_freq=min_freq, max_size=max_size)

    def encode(
        self,
        tokens: Sequence[str],
        *,
        max_len: int | None = None,
        add_special: bool = True,
    ) -> list[int]:
        """Map tokens to ids as ``<start> w1..wn <end>``; unknown words -> ``<unk>``.

        ``max_len`` truncates to that many words; ``<end>`` is always kept.
        """
        if max_len is not None:
            if max_len < 0:
                raise ValueError(f"max_len must be >= 0 or None, got {max_len}")
            tokens = tokens[:max_len]
        unk = self.unk_id
        ids = [self._stoi.get(t, unk) for t in tokens]
        if add_special:
            return [self.start_id, *ids, self.end_id]
        return ids

    def decode(self, ids: Iterable[int], *, strip_special: bool = True) -> list[str]:
        """Map ids back to words.

        With ``strip_special`` (default) decoding stops at ``<end>`` and
        ``<pad>``/``<start>`` are skipped; otherwise every id is mapped.
        """
        words: list[str] = []
        size = len(self.itos)
        for raw in ids:
            i = int(raw)
            if not 0 <= i < size:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {size}")
            if strip_special:
                if i == self.end_id:
                    break
                if i in (self.pad_id, self.start_id):
                    continue
            words.append(self.itos[i])
        return words

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready representation (the vocab.json content)."""
        return {
            "format": VOCAB_FORMAT,
            "version": VOCAB_VERSION,
            "itos": list(self.itos),
            "min_freq": self.min_freq,
            "max_size": self.max_size,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write vocab.json (atomically)."""
        write_json_atomic(Path(path), self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocab:
        """Read and validate a vocab.json; ValueError names the file and the problem."""
        path = Path(path)
        data = read_json_file(path, what="vocabulary", max_bytes=METADATA_BYTES)

        def fail(problem: str) -> ValueError:
            return ValueError(f"{path}: not a valid vocabulary file: {problem}")

        if not isinstance(data, dict):
            raise fail("expected a JSON object")
        if data.get("format") != VOCAB_FORMAT:
            raise fail(f"'format' is {data.get('format')!r}, expected {VOCAB_FORMAT!r}")
        if data.get("version") != VOCAB_VERSION:
            raise fail(
                f"'version' is {data.get('version')!r}, this code reads version {VOCAB_VERSION}"
            )
        itos = data.get("itos")
        problem = _itos_problem(itos) or _unprintable_word(itos)
        if problem:
            raise fail(problem)
        min_freq = data.get("min_freq", 1)
        if not is_int(min_freq) or min_freq < 1:
            raise fail(f"'min_freq' must be an integer >= 1, got {min_freq!r}")
        max_size = data.get("max_size")
        if max_size is not None and (not is_int(max_size) or max_size < 0):
            raise fail(f"'max_size' must be null or an integer >= 0, got {max_size!r}")
        return cls(list(itos), min_freq=min_freq, max_size=max_size)  # type: ignore[arg-type]


# A word is printed as it is (`captioner caption` writes one line per image): a newline in it would make
# a fake output line. Whitespace, control characters (Unicode Cc) and lone surrogates are never in a word;
# format characters (zero-width joiners of Persian, Indic scripts and emoji) are.
_UNPRINTABLE = re.compile("[\\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _unprintable_word(itos: list[str]) -> str | None:
    """The first vocabulary word holding whitespace or a control character, described; or None."""
    for i, word in enumerate(itos):
        if _UNPRINTABLE.search(word):
            return (f"'itos' entry {i} ({word!r}) holds a control character or whitespace; a word is printed in "
                    "captions as it is, so it must be one word of printable characters")
    return None


def _itos_problem(itos: object) -> str | None:
    """Describe what is wrong with an ``itos`` list, or None if it is fine."""
    if not isinstance(itos, list) or not all(isinstance(w, str) for w in itos):
        return "'itos' must be a list of strings"
    if tuple(itos[: len(SPECIALS)]) != SPECIALS:
        return f"'itos' must start with {list(SPECIALS)}"
    seen: set[str] = set()
    for i, word in enumerate(itos):
        if not word:
            return f"'itos' entry {i} is an empty string"
        if word in seen:
            return f"'itos' entry {i} ({word!r}) is a duplicate"
        seen.add(word)
    return None


def vocabulary_warnings(token_lists: Iterable[Sequence[str]]) -> list[str]:
    """What looks wrong in the tokens of a corpus's train captions, one message per problem (none: []):
    most token occurrences seen once, most captions one token long (a language written without
    spaces, in a script the tokenizer does not split), or many tokens longer than LONG_TOKEN
    characters. Fewer than 50 tokens are too few to judge."""
    lists = [list(t) for t in token_lists]
    counts = Counter(t for tokens in lists for t in tokens)
    total = sum(counts.values())
    if total < 50:
        return []
    hint = ("is the language written without spaces? The tokenizer splits Chinese, Japanese, Thai, Lao, Khmer "
            "and Myanmar into characters; put spaces between the words of another such language before prepare")
    problems = []
    once = sum(1 for n in counts.values() if n == 1)
    if 2 * once > total:
        problems.append(f"{once} of the {total} tokens of the train captions are seen once (rarer than "
                        f"--min-freq, they become <unk>); {hint}")
    one_token = sum(1 for tokens in lists if len(tokens) <= 1)
    if 2 * one_token > len(lists):
        problems.append(f"{one_token} of the {len(lists)} train captions are one token long: {hint}")
    long = sorted((t for t in counts if len(t) > LONG_TOKEN), key=lambda t: (-counts[t], t))
    if 100 * sum(counts[t] for t in long) > total:
        problems.append(f"{sum(counts[t] for t in long)} of the {total} tokens are longer than {LONG_TOKEN} "
                        f"characters (e.g. {long[0][:60]!r}): {hint}")
    return problems


def length_report(token_lists: Iterable[Sequence[str]], max_len: int) -> dict[str, Any]:
    """Caption length statistics against a word limit ``max_len``.

    Returns ``{"captions", "max_len", "truncated", "longest", "p95"}``;
    ``p95`` is the nearest-rank 95th percentile of caption lengths in words.
    """
    lengths = sorted(len(t) for t in token_lists)
    n = len(lengths)
    p95 = lengths[max(0, math.ceil(0.95 * n) - 1)] if n else 0
    return {
        "captions": n,
        "max_len": max_len,
        "truncated": sum(1 for x in lengths if x > max_len),
        "longest": lengths[-1] if n else 0,
        "p95": p95,
    }


def read_json_file(path: Path, *, what: str, max_bytes: int = DATA_BYTES) -> Any:
    """Load JSON from a regular file of at most ``max_bytes``, turning I/O and syntax errors into
    ValueError naming the file."""
    text = read_text(path, f"{what} file", max_bytes)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}:{e.lineno}: {what} file is not valid JSON ({e.msg}, column {e.colno})"
        ) from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder: the file is complete or
    absent, and a failed write (a full disk) leaves no temporary file and names ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None:  # a failed write(): name the file being written
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def write_json_atomic(path: Path, data: Any, *, indent: int | None = None) -> None:
    """Write JSON to ``path`` via a temporary file in the same folder."""
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n")

