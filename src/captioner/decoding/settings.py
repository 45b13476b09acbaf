"""How captions are decoded: every decoding setting, its default, its bounds and its meaning, in one place.

:class:`DecodingSettings` is the one definition (like Hugging Face's ``GenerationConfig``). Each of its
fields carries a :class:`Setting` (in the field's metadata) that says what everything else derives:

- the command line: ``captioner caption`` and ``captioner evaluate`` build their flags from it
  (:func:`captioner.cli.args.decoding_flags`);
- the REST API: ``POST /v1/captions`` reads its options through
  :func:`captioner.serving.options.parse_option`;
- model directories: ``config.json`` "decoding" holds the defaults of the :data:`STORED` settings,
  checked by :meth:`DecodingSettings.checked` when the directory is loaded;
- training: the ``decoding`` section of a training config is those same stored defaults.

The search engine (:mod:`captioner.decoding.search`) takes a checked :class:`DecodingSettings`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from captioner.checks import is_int, is_number
from captioner.data.text import Vocab

# What one request may ask of the decoder: beam search keeps beam x vocabulary candidates per step and its
# history grows with the caption, so both are bounded (the CLI, the server and model directories share these).
MAX_BEAM, MAX_N_BEST, MAX_CAPTION_WORDS, MAX_SAMPLES = 50, 50, 100, 100
MAX_SEED = 2**63 - 1
# guided decoding keeps a beam for each subset of the words a caption must hold (2**words beams per image)
MAX_MENTIONS, MAX_CONCEPTS, MAX_WORD_CHARS = 3, 3, 40
CONCEPT_MODES = ("auto", "off")
MAX_MARGIN = 10.0  # concept_margin at this value keeps every caption searched again for its concepts
EVALUATION_BEAMS = (1, 3, 5)  # the beam sizes `captioner evaluate` scores by default (the papers' tables)


@dataclass(frozen=True)
class Setting:
    """What a decoding setting is: its bounds (inclusive; None: unbounded), how it is named on the
    command line and in the REST API, and when it applies."""

    name: str  # the DecodingSettings field
    kind: type  # int, float, bool, str (one of ``choices``) or tuple (of words; low/high bound their count)
    low: float | None
    high: float | None
    label: str  # in messages: "beam size 0: must be from 1 to 50"
    flag: str  # the command-line flag
    help: str
    applies: str = "both"  # "beam": beam search (greedy at beam 1) only; "sample": sampling only; "both"
    stored: bool = True  # a model directory (config.json "decoding") and a training config may set its default
    server_limit: str | None = None  # the ServeConfig field that bounds it further on a server
    nullable: bool = False  # None is a value (the seed: none, a fresh draw each time)
    choices: tuple[str, ...] = ()  # the values of a str setting

    @property
    def option(self) -> str:
        """Its name in the REST API (a form or query field)."""
        return {"beam_size": "beam"}.get(self.name, self.name)

    def check(self, value: Any) -> None:
        """ValueError unless ``value`` has this setting's type and lies within its bounds."""
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"{self.label} {value!r}: {problem}")

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this setting ("must be from 1 to 50"), or None."""
        if value is None and self.nullable:
            return None
        if self.kind is bool:
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind is str:
            return None if isinstance(value, str) and value in self.choices else f"must be one of {', '.join(self.choices)}"
        if self.kind is tuple:
            return _words_problem(value, int(self.high or 0))
        ok_type = is_int(value) if self.kind is int else is_number(value)
        if not ok_type or (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return f"must be >= {self.low}" if self.high is None else f"must be from {self.low} to {self.high}"
        return None

    def described(self) -> str:
        """The kind and bounds of the setting's values, in words: "a whole number from 1 to 50"."""
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return f"one of {', '.join(self.choices)}"
        if self.kind is tuple:
            return f"a list of up to {self.high} words"
        what = "a whole number" if self.kind is int else "a number"
        return f"{what} >= {self.low}" if self.high is None else f"{what} from {self.low} to {self.high}"

    def parse(self, text: str, *, check: bool = True) -> Any:
        """The value of ``text`` (a command-line argument or an HTTP field); ValueError if it is not one of
        this setting's kind or (``check``) not within its bounds."""
        t = text.strip()
        if self.kind is bool:
            low = t.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{self.label}: expected true or false, got {text!r}")
        if self.kind is str:
            value = t.lower()
        elif self.kind is tuple:  # "bicycle,dog" or "bicycle dog"
            value = tuple(w for w in t.replace(",", " ").lower().split())
        if self.kind in (str, tuple):
            if check:
                self.check(value)
            return value
        try:
            value = self.kind(t)
        except ValueError:
            raise ValueError(f"{self.label}: expected {'a whole number' if self.kind is int else 'a number'}, "
                             f"got {text!r}") from None
        if self.kind is float and not math.isfinite(value):
            raise ValueError(f"{self.label}: expected a finite number, got {text!r}")
        if check:
            self.check(value)
        return value


def _words_problem(value: Any, most: int) -> str | None:
    """What is wrong with a list of words a caption must hold, or None."""
    if not isinstance(value, (tuple, list)) or not all(isinstance(w, str) for w in value):
        return "must be a list of words"
    if len(value) > most:
        return f"at most {most} words"
    for w in value:
        if not w or len(w) > MAX_WORD_CHARS or any(c.isspace() or not c.isprintable() for c in w) or w != w.lower():
            return (f"{w!r} is not a word (one lower-case word of 1 to {MAX_WORD_CHARS} printable characters, no "
                    "spaces)")
    if len(set(value)) != len(value):
        return "a word is listed twice"
    return None


def _setting(default: Any, kind: type, low: float | None, high: float | None, label: str, flag: str, help: str,
             **more: Any):
    """A DecodingSettings field whose metadata is its :class:`Setting` (the name is filled in below)."""
    return field(default=default, metadata={"setting": dict(kind=kind, low=low, high=high, label=label, flag=flag,
                                                            help=help, **more)})


@dataclass(frozen=True)
class DecodingSettings:
    """How captions are decoded. ``sample=False``: beam search (greedy at beam 1), ranked by
    ``score / length ** length_penalty``, the ``n_best`` first returned. ``sample=True``:
    ``num_captions`` captions drawn (temperature, top-k, top-p), repeatable with ``seed``."""

    beam_size: int = _setting(3, int, 1, MAX_BEAM, "beam size", "--beam", "beam size", applies="beam",
                              server_limit="max_beam")
    max_len: int = _setting(30, int, 1, MAX_CAPTION_WORDS, "maximum caption length", "--max-len",
                            "longest caption, in words", server_limit="max_len")
    length_penalty: float = _setting(0.0, float, 0.0, 10.0, "length penalty", "--length-penalty",
                                     "rank beam hypotheses by score / length**P (0 = raw log-probability)",
                                     applies="beam")
    n_best: int = _setting(1, int, 1, MAX_N_BEST, "n-best", "--n-best", "also list the N best captions with scores",
                           applies="beam", stored=False, server_limit="max_beam")
    no_repeat_ngram: int = _setting(0, int, 0, MAX_CAPTION_WORDS, "no-repeat n-gram size", "--no-repeat-ngram",
                                    "never repeat an N-word sequence within a caption (0 = off)", applies="beam")
    allow_unk: bool = _setting(False, bool, None, None, "allow_unk", "--allow-unk",
                               "let captions contain <unk> (unknown word); never, by default")
    sample: bool = _setting(False, bool, None, None, "sample", "--sample",
                            "draw captions from the model's distribution instead of a beam search", stored=False)
    num_captions: int = _setting(1, int, 1, MAX_SAMPLES, "number of sampled captions", "--num-captions",
                                 "captions to draw per image", applies="sample", stored=False,
                                 server_limit="max_beam")
    temperature: float = _setting(1.0, float, 0.01, 100.0, "temperature", "--temperature",
                                  "below 1: safer; above 1: more varied", applies="sample", stored=False)
    top_k: int = _setting(0, int, 0, None, "top-k", "--top-k", "draw only from the K most likely words (0 = all)",
                          applies="sample", stored=False)
    top_p: float = _setting(1.0, float, 1e-6, 1.0, "top-p", "--top-p",
                            "draw only from the most likely words whose probabilities reach P (nucleus sampling)",
                            applies="sample", stored=False)
    seed: int | None = _setting(None, int, 0, MAX_SEED, "seed", "--seed", "the same seed gives the same captions",
                                applies="sample", stored=False, nullable=True)
    concepts: str = _setting("off", str, None, None, "concepts", "--concepts",
                             "auto: captions name what the encoder's ImageNet classifier sees in the photo (its "
                             "confident concepts); off: they do not", applies="beam", choices=CONCEPT_MODES)
    concept_threshold: float = _setting(0.5, float, 0.05, 1.0, "concept threshold", "--concept-threshold",
                                        "with concepts auto: the confidence a concept needs to be put in the "
                                        "caption", applies="beam")
    max_concepts: int = _setting(1, int, 1, MAX_CONCEPTS, "max concepts", "--max-concepts",
                                 "with concepts auto: at most this many concepts put in a caption", applies="beam")
    concept_ban: float = _setting(0.0, float, 0.0, 1.0, "concept ban", "--concept-ban",
                                  "with concepts auto: a caption searched again for its concepts may not hold the "
                                  "mapped words the classifier gives less than this confidence (0 = none banned)",
                                  applies="beam")
    concept_margin: float = _setting(MAX_MARGIN, float, 0.0, MAX_MARGIN, "concept margin", "--concept-margin",
                                     "with concepts auto: keep a caption searched again for its concepts only if "
                                     "its score is at most this much, times the confidence of its least confident "
                                     "concept, below the caption without them (10 = always)",
                                     applies="beam")
    mention: tuple[str, ...] = _setting((), tuple, 0, MAX_MENTIONS, "mention", "--mention",
                                        "words the caption must contain, placed by the search (repeat the flag or "
                                        "separate with commas; any word the word vectors know)", applies="beam",
                                        stored=False)

    @classmethod
    def from_model(cls, config: Mapping) -> "DecodingSettings":
        """The decoding defaults stored in a model directory's config.json ("decoding")."""
        stored = config.get("decoding") or {}
        # only the stored settings: a model directory cannot make every caption mention a word or sample
        return cls(**{k: v for k, v in stored.items() if k in STORED}).checked()

    @classmethod
    def for_training(cls, decoding: Mapping, max_len: int) -> "DecodingSettings":
        """The decoding defaults a trained model records: its training config's ``decoding``, and captions up
        to the training captions' length (at most the longest a model may decode)."""
        return cls(**{"max_len": min(max_len, MAX_CAPTION_WORDS), **decoding}).checked()

    def replace(self, **changes: Any) -> "DecodingSettings":
        """A copy with the given fields changed; ``None`` means "keep the default"."""
        kept = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items() if v is not None}
        for name, value in kept.items():  # each value in its bounds before any is adjusted to another
            if name in SETTINGS:
                SETTINGS[name].check(value)
        new = dataclasses.replace(self, **kept)
        beam_only = [k for k in kept if k in SETTINGS and SETTINGS[k].applies == "beam"]
        if new.sample and beam_only:
            raise ValueError(f"{_listed([SETTINGS[k].label for k in beam_only])} to a beam search, not to "
                             "sampling; when sampling ask for several captions with num_captions (--num-captions)")
        if new.sample:  # the model's beam-search defaults do not apply to sampling
            new = dataclasses.replace(new, **{s.name: DEFAULTS[s.name] for s in SETTINGS.values()
                                              if s.applies == "beam" and s.name != "beam_size"})
        if not new.sample and is_int(new.n_best) and is_int(new.beam_size) and new.n_best > new.beam_size:
            new = dataclasses.replace(new, beam_size=new.n_best)  # an n-best list needs at least n beams
        return new.checked()

    def checked(self) -> "DecodingSettings":
        """Refuse settings that are out of bounds, contradictory or would cost without bound (ValueError)."""
        for s in SETTINGS.values():
            value = getattr(self, s.name)
            s.check(value)
        if not self.sample and self.n_best > self.beam_size:
            raise ValueError(f"n-best {self.n_best} needs a beam of at least {self.n_best} (beam size "
                             f"{self.beam_size})")
        if self.sample:
            changed = [s.label for s in SETTINGS.values() if s.applies == "beam" and s.name != "beam_size"
                       and getattr(self, s.name) != DEFAULTS[s.name]]
            if changed:
                raise ValueError(f"{_listed(changed)} to a beam search, not to sampling; when sampling "
                                 "ask for several captions with num_captions (--num-captions)")
        else:
            changed = [s.label for s in SETTINGS.values() if s.applies == "sample" and getattr(self, s.name) !=
                       DEFAULTS[s.name]]
            if changed:
                raise ValueError(f"{', '.join(changed)} choose how captions are sampled: add sample=True (on the "
                                 "command line: add --sample)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def guided(self) -> bool:
        """Whether captions may be made to hold words (concepts or mentions): a beam search only."""
        return not self.sample and (self.concepts == "auto" or bool(self.mention))


def _listed(labels: list[str]) -> str:
    """ "a", "a and b", "a, b and c" with the verb that follows: "a applies", "a and b apply"."""
    if len(labels) == 1:
        return f"{labels[0]} applies"
    return f"{', '.join(labels[:-1])} and {labels[-1]} apply"


SETTINGS: dict[str, Setting] = {f.name: Setting(name=f.name, **f.metadata["setting"])
                                for f in dataclasses.fields(DecodingSettings)}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(DecodingSettings)}
STORED = tuple(name for name, s in SETTINGS.items() if s.stored)  # what a model directory records as its defaults


def banned_ids(vocab: Vocab, allow_unk: bool = False) -> tuple[int, ...]:
    """Words a caption never contains: <pad>, <start> and, unless allowed, <unk>."""
    return (vocab.pad_id, vocab.start_id) if allow_unk else (vocab.pad_id, vocab.start_id, vocab.unk_id)
