"""How captions are tokenized before they are scored: the COCO way (Stanford's PTBTokenizer, a Java
program, or its pure-Python imitation :func:`ptb_tokenize_fallback`), which is English-only, or the
project's own tokenizer (:func:`captioner.tokenizer.tokenize`, any language), with which the model's
captions were trained.

``tokenizer="auto"`` (what :func:`captioner.evaluation.metrics.compute_metrics` does by default)
picks PTB when the references look English (:func:`looks_english`) and the project's tokenizer
otherwise: Chinese, Japanese or Thai references are then split into characters exactly as the
training captions were (BLEU and CIDEr-D count character n-grams), French "d'un" into "d" "un".
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_module

from captioner.tokenizer import tokenize

TOKENIZERS = ("auto", "ptb", "captioner")

PTB_JAR = Path(_ptb_module.__file__).parent / _ptb_module.STANFORD_CORENLP_3_4_1_JAR
PTB_PUNCTUATIONS = frozenset(_ptb_module.PUNCTUATIONS)

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def looks_english(captions: Iterable[str]) -> bool:
    """Whether captions look English: fewer than 1 in 1000 of their characters are letters or marks
    outside ASCII (English captions have a rare "café"; French, German, Spanish, Vietnamese, Chinese
    or Japanese ones have many more), and they are not 50 or more captions of which fewer than 5%
    hold "a", "an" or "the" (a language written in ASCII letters, such as Indonesian)."""
    count = with_article = chars = foreign = 0
    for caption in captions:
        text = caption.lower()
        count += 1
        with_article += _ARTICLES.search(text) is not None
        chars += len(text)
        if not text.isascii():
            foreign += sum(1 for c in text if ord(c) > 127 and (c.isalnum() or unicodedata.category(c)[0] == "M"))
    return 1000 * foreign < max(chars, 1) and not (count >= 50 and 20 * with_article < count)


def choose_tokenizer(tokenizer: str, references: Mapping[Any, Sequence[str]]) -> str:
    """"ptb" or "captioner": ``tokenizer`` itself, or for "auto" the one that suits the references."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(map(repr, TOKENIZERS))}, got {tokenizer!r}")
    if tokenizer != "auto":
        return tokenizer
    return "ptb" if looks_english(c for refs in references.values() for c in refs) else "captioner"


def tokenize_captions(captions: Mapping[Any, Sequence[str]], tokenizer: str,
                      java_exe: str | None) -> dict[Any, list[str]]:  # fmt: skip
    """Tokenized captions (tokens joined by spaces): with the project's tokenizer ("captioner"), or PTB's
    ("ptb"): Stanford's tokenizer with Java, else the pure-Python equivalent."""
    if tokenizer == "captioner":
        return {i: [" ".join(tokenize(c)) for c in caps] for i, caps in captions.items()}
    if java_exe is not None:
        return _tokenize_java(captions, java_exe)
    return {i: [ptb_tokenize_fallback(c) for c in caps] for i, caps in captions.items()}


# Characters Java's PTBLexer treats as line breaks; with -preserveLines one would split a
# caption in two and misalign every following caption, so they become spaces.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x85\u2028\u2029]")


def _drop_punctuation(tokenized_line: str) -> str:
    """What pycocoevalcap's PTBTokenizer does to each line the Java tokenizer outputs."""
    return " ".join(w for w in tokenized_line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS)


def _tokenize_java(captions: Mapping[Any, Sequence[str]], java_exe: str) -> dict[Any, list[str]]:
    """pycocoevalcap's ``PTBTokenizer().tokenize`` with a configurable java executable.

    Same command, same input file, same post-processing; differences: the temporary file
    goes to the system temp dir (not into site-packages), captions take plain strings, and
    a failing tokenizer raises instead of silently returning fewer captions.
    """
    ids = [image_id for image_id, caps in captions.items() for _ in caps]
    lines = [_LINE_BREAKS.sub(" ", caption) for caps in captions.values() for caption in caps]
    with tempfile.TemporaryDirectory(prefix="captioner-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_bytes("\n".join(lines).encode())
        cmd = [java_exe, "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", str(path)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, check=False)
    out_lines = proc.stdout.decode().split("\n")
    if proc.returncode != 0 or len(out_lines) < len(lines):
        stderr = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(
            f"PTBTokenizer failed (exit status {proc.returncode}, {len(out_lines)} lines out "
            f"for {len(lines)} captions): {stderr}"
        )
    tokenized: dict[Any, list[str]] = {image_id: [] for image_id in captions}
    for image_id, line in zip(ids, out_lines):
        tokenized[image_id].append(_drop_punctuation(line))
    return tokenized


_QUOTES = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "..."}
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}  # fmt: skip
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'m|'re|'ve|'d|'ll)$")
_FALLBACK_TOKEN = re.compile(
    r"""
      '(?:s|m|d|re|ve|ll|n')(?!\w)                  # detached clitics: dog 's, rock 'n' roll
    | (?:[^\W\d_]\.){2,}                            # initialisms: u.s. p.m. e.g.
    | (?:mr|mrs|ms|dr|st|jr|sr|vs|etc|prof)\.       # common abbreviations keep their period
    | [#@]?\w+(?:(?:[-'/]|[.,:](?=\d))\w+)*         # words, black-and-white, it's, 1,000, 3:30
    | \.{2,} | -{2,} | [!?]+                         # ellipses, dashes, !! and ?!
    | [^\w\s]                                       # any other symbol on its own
    """,
    re.VERBOSE,
)


def _fallback_tokens(word: str) -> list[str]:
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    if word in _BRACKETS:
        return [_BRACKETS[word]]
    if word == '"':
        return ["''"]
    if re.fullmatch(r"\.{2,}", word):
        return ["..."]
    if re.fullmatch(r"-{2,}", word):
        return ["--"]
    match = _CONTRACTION.match(word)
    return [match.group(1), match.group(2)] if match else [word]


def ptb_tokenize_fallback(caption: str) -> str:
    """Pure-Python stand-in for PTBTokenizer (-lowerCase) + pycocoevalcap's punctuation removal.

    Matches the Java tokenizer on ordinary captions: lower case; punctuation split off and
    the PUNCTUATIONS tokens dropped; "don't" -> "do n't", "dog's" -> "dog 's",
    "cannot" -> "can not"; brackets become -lrb- etc. (which pycocoevalcap keeps: its list
    has the upper-case forms only); hyphenated words, numbers such as 1,000 / 3:30 / 3.5 and
    initialisms such as u.s. stay whole. Rare constructs may tokenize differently.
    """
    text = caption.translate(_QUOTES).lower()
    tokens = [t for word in _FALLBACK_TOKEN.findall(text) for t in _fallback_tokens(word)]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATIONS)
