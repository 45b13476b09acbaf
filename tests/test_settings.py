"""Every decoding setting is defined once (captioner.decoding.settings) and reaches the command line,
Python, model-directory validation and training's config from that one definition (the REST API:
tests/test_serve.py). Settings are of five kinds: whole numbers, numbers, true/false, one of a few
words (``concepts``: auto/off) and a list of words (``mention``)."""

import dataclasses
import re

import pytest

from captioner.cli.args import decoding_overrides
from captioner.cli.main import build_parser
from captioner.decoding.settings import (DEFAULTS, MAX_MENTIONS, MAX_WORD_CHARS, SETTINGS, STORED,
                                         DecodingSettings)
from captioner.inference.modeldir import ModelDirError, _validate_decoding

NAMES = list(SETTINGS)
TOO_LONG = "w" * (MAX_WORD_CHARS + 1)


def a_value(name: str):
    """A value of the setting other than its default, within its bounds."""
    s = SETTINGS[name]
    if s.kind is bool:
        return True
    if s.kind is str:
        return next(c for c in s.choices if c != DEFAULTS[name])
    if s.kind is tuple:
        return ("giraffe", "dog")
    if s.high is None:
        return s.low + 2
    value = s.high if s.kind is int else (s.low + s.high) / 2
    return value if value != DEFAULTS[name] else s.low


def a_bad_value(name: str):
    s = SETTINGS[name]
    if s.kind is bool:
        return "yes"
    if s.kind is str:
        return "sometimes"
    if s.kind is tuple:  # one word more than a caption may be made to hold
        return tuple(f"w{i}" for i in range(int(s.high) + 1))
    return s.low - 1


def as_argument(value) -> str:
    """How a value is written on the command line (a list of words: comma-separated)."""
    return ",".join(value) if isinstance(value, tuple) else str(value)


def the_problem(name: str) -> str:
    """The start of what the message says of ``a_bad_value(name)``."""
    s = SETTINGS[name]
    if s.kind is tuple:
        return f"at most {int(s.high)} words"
    if s.kind is str:
        return f"must be one of {', '.join(s.choices)}"
    return "must be"


def valid_settings(name: str) -> DecodingSettings:
    """The defaults with ``name`` changed, plus what makes the change consistent (sampling, n-best)."""
    changes = {name: a_value(name)}
    if SETTINGS[name].applies == "sample":
        changes["sample"] = True
    if name == "n_best":
        changes["beam_size"] = changes["n_best"]
    return dataclasses.replace(DecodingSettings(), **changes)


def test_every_setting_has_a_flag_a_rest_name_and_a_default():
    assert NAMES == [f.name for f in dataclasses.fields(DecodingSettings)]
    flags = [s.flag for s in SETTINGS.values()]
    options = [s.option for s in SETTINGS.values()]
    assert len(set(flags)) == len(flags) and len(set(options)) == len(options)
    assert all(f.startswith("--") for f in flags)
    assert DecodingSettings().checked() == DecodingSettings(**DEFAULTS)
    assert set(STORED) == {"beam_size", "max_len", "length_penalty", "no_repeat_ngram", "allow_unk",
                           "concepts", "concept_threshold", "max_concepts", "concept_ban", "concept_margin"}
    assert "mention" not in STORED  # a request's own words, never a model's default


def test_concepts_are_off_and_no_word_is_asked_for_by_default():
    d = DecodingSettings()
    assert (d.concepts, d.mention, d.concept_threshold, d.max_concepts, d.concept_ban) == ("off", (), 0.5, 1, 0.0)
    assert not d.guided
    assert d.replace(concepts="auto").guided and d.replace(mention=("dog",)).guided
    assert d.replace(mention=["dog", "cat"]).mention == ("dog", "cat")  # a list from Python or JSON: a tuple


@pytest.mark.parametrize("name", NAMES)
def test_each_setting_is_checked_from_python(name):
    valid = valid_settings(name).checked()
    assert getattr(valid, name) == a_value(name)
    with pytest.raises(ValueError, match=re.escape(SETTINGS[name].label)):
        dataclasses.replace(valid, **{name: a_bad_value(name)}).checked()


@pytest.mark.parametrize("words, problem", [
    (("Dog",), "is not a word"), (("hot dog",), "is not a word"), (("",), "is not a word"),
    ((TOO_LONG,), "is not a word"), (("dog", "dog"), "a word is listed twice"), ("dog", "must be a list of words"),
    ((1,), "must be a list of words"), (tuple("abcd"), f"at most {MAX_MENTIONS} words")])
def test_mentioned_words_are_checked(words, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        DecodingSettings(mention=words).checked()
    with pytest.raises(ValueError, match=re.escape(problem)):
        DecodingSettings().replace(mention=words)
    assert DecodingSettings(mention=("dog", "x" * MAX_WORD_CHARS, "über")).checked()


@pytest.mark.parametrize("name", [n for n in NAMES if SETTINGS[n].applies == "beam" and n != "beam_size"])
def test_each_beam_setting_is_refused_with_sampling(name):
    with pytest.raises(ValueError, match=re.escape(f"{SETTINGS[name].label} applies to a beam search")):
        DecodingSettings(sample=True).replace(**{name: a_value(name)})


@pytest.mark.parametrize("name", NAMES)
def test_each_setting_reaches_the_caption_command(name):
    s = SETTINGS[name]
    value = a_value(name)
    args = build_parser().parse_args(["caption", "x.jpg", s.flag] + ([] if s.kind is bool else [as_argument(value)]))
    assert {k: v for k, v in decoding_overrides(args).items() if v is not None} == {name: value}
    assert getattr(valid_settings(name).replace(**decoding_overrides(args)), name) == value
    if s.kind in (int, float, tuple):  # parsed as its kind on the command line, checked with the other settings
        bad = build_parser().parse_args(["caption", "x.jpg", s.flag, as_argument(a_bad_value(name))])
        with pytest.raises(ValueError, match=re.escape(f"{s.label} {a_bad_value(name)!r}: {the_problem(name)}")):
            DecodingSettings().replace(**decoding_overrides(bad))


@pytest.mark.parametrize("name", [n for n in NAMES if SETTINGS[n].kind is str])
def test_a_setting_of_a_few_words_takes_only_those_on_the_command_line(name, capsys):
    s = SETTINGS[name]
    for text in s.choices:
        for written in (text, text.upper()):
            args = build_parser().parse_args(["caption", "x.jpg", s.flag, written])
            assert decoding_overrides(args)[name] == text
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["caption", "x.jpg", s.flag, "sometimes"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert s.flag in err and "sometimes" in err and all(c in err for c in s.choices)


@pytest.mark.parametrize("argv, words", [
    (["--mention", "dog"], ("dog",)),
    (["--mention", "dog", "--mention", "frisbee"], ("dog", "frisbee")),
    (["--mention", "dog,frisbee"], ("dog", "frisbee")),
    (["--mention", "Dog, frisbee", "--mention", "park"], ("dog", "frisbee", "park")),
    ([], None)])
def test_mention_is_repeated_or_comma_separated_on_the_command_line(argv, words):
    args = build_parser().parse_args(["caption", "x.jpg", *argv])
    assert decoding_overrides(args)["mention"] == words
    assert DecodingSettings().replace(**decoding_overrides(args)).mention == (words or ())


def test_too_many_mentions_on_the_command_line_are_refused_with_the_others():
    args = build_parser().parse_args(["caption", "x.jpg", "--mention", "a,b", "--mention", "c", "--mention", "d"])
    with pytest.raises(ValueError, match=re.escape(f"at most {MAX_MENTIONS} words")):
        DecodingSettings().replace(**decoding_overrides(args))


@pytest.mark.parametrize("name", NAMES)
def test_each_setting_is_validated_in_a_model_directory(name):
    value = a_value(name)
    _validate_decoding({name: list(value) if isinstance(value, tuple) else value}, ModelDirError)  # JSON: a list
    with pytest.raises(ModelDirError, match=re.escape(f"decoding.{name} must be {SETTINGS[name].described()}")):
        bad = a_bad_value(name)
        _validate_decoding({name: list(bad) if isinstance(bad, tuple) else bad}, ModelDirError)


@pytest.mark.parametrize("value", ["sometimes", "AUTO", 1, None, True])
def test_a_model_directory_stores_concepts_as_auto_or_off(value):
    _validate_decoding({"concepts": "auto"}, ModelDirError)
    _validate_decoding({"concepts": "off"}, ModelDirError)
    with pytest.raises(ModelDirError, match="decoding.concepts must be one of auto, off"):
        _validate_decoding({"concepts": value}, ModelDirError)


@pytest.mark.parametrize("name", NAMES)
def test_training_records_the_stored_settings_and_refuses_the_others(name):
    from captioner.training.config import DataConfig, TrainConfig

    cfg = TrainConfig(data=DataConfig(corpus="corpus.json", features="store"), decoding={name: a_value(name)})
    if name in STORED:
        assert getattr(DecodingSettings.for_training(cfg.decoding, cfg.data.max_len), name) == a_value(name)
    else:
        with pytest.raises(ValueError, match=f"decoding.{name}: not a decoding default a model records"):
            cfg.checked()
