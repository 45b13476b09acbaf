"""Every decoding setting is defined once (captioner.decoding.settings) and reaches the command line,
Python, model-directory validation and training's config from that one definition (the REST API:
tests/test_serve.py)."""

import dataclasses
import re

import pytest

from captioner.cli.args import decoding_overrides
from captioner.cli.main import build_parser
from captioner.decoding.settings import DEFAULTS, SETTINGS, STORED, DecodingSettings
from captioner.inference.modeldir import ModelDirError, _validate_decoding

NAMES = list(SETTINGS)


def a_value(name: str):
    """A value of the setting other than its default, within its bounds."""
    s = SETTINGS[name]
    if s.kind is bool:
        return True
    if s.high is None:
        return s.low + 2
    value = s.high if s.kind is int else (s.low + s.high) / 2
    return value if value != DEFAULTS[name] else s.low


def a_bad_value(name: str):
    s = SETTINGS[name]
    return "yes" if s.kind is bool else s.low - 1


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
    assert set(STORED) == {"beam_size", "max_len", "length_penalty", "no_repeat_ngram", "allow_unk"}


@pytest.mark.parametrize("name", NAMES)
def test_each_setting_is_checked_from_python(name):
    valid = valid_settings(name).checked()
    assert getattr(valid, name) == a_value(name)
    with pytest.raises(ValueError, match=re.escape(SETTINGS[name].label)):
        dataclasses.replace(valid, **{name: a_bad_value(name)}).checked()


@pytest.mark.parametrize("name", NAMES)
def test_each_setting_reaches_the_caption_command(name):
    s = SETTINGS[name]
    value = a_value(name)
    args = build_parser().parse_args(["caption", "x.jpg", s.flag] + ([] if s.kind is bool else [str(value)]))
    assert {k: v for k, v in decoding_overrides(args).items() if v is not None} == {name: value}
    assert getattr(valid_settings(name).replace(**decoding_overrides(args)), name) == value
    if s.kind is not bool:  # parsed as its kind on the command line, checked with the other settings
        bad = build_parser().parse_args(["caption", "x.jpg", s.flag, str(a_bad_value(name))])
        with pytest.raises(ValueError, match=re.escape(f"{s.label} {a_bad_value(name)!r}: must be")):
            DecodingSettings().replace(**decoding_overrides(bad))


@pytest.mark.parametrize("name", NAMES)
def test_each_setting_is_validated_in_a_model_directory(name):
    _validate_decoding({name: a_value(name)}, ModelDirError)
    with pytest.raises(ModelDirError, match=f"decoding.{name} must be"):
        _validate_decoding({name: a_bad_value(name)}, ModelDirError)


@pytest.mark.parametrize("name", NAMES)
def test_training_records_the_stored_settings_and_refuses_the_others(name):
    from captioner.training.config import DataConfig, TrainConfig

    cfg = TrainConfig(data=DataConfig(corpus="corpus.json", features="store"), decoding={name: a_value(name)})
    if name in STORED:
        assert getattr(DecodingSettings.for_training(cfg.decoding, cfg.data.max_len), name) == a_value(name)
    else:
        with pytest.raises(ValueError, match=f"decoding.{name}: not a decoding default a model records"):
            cfg.checked()
