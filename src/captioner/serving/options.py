"""The options of a caption request (form or query fields, as text): every decoding setting, derived from
its one definition (:data:`captioner.decoding.settings.SETTINGS`), and the serving-only ``attention``.

An option is named as in :attr:`Setting.option` ("beam" for ``beam_size``, else the field's name) and
parsed and checked by its :class:`Setting`, its upper bound lowered on a server by the
:class:`captioner.serving.config.ServeConfig` limit it names (``server_limit``: --max-beam bounds beam,
n_best and num_captions; --max-len bounds max_len). A message names the option as the client sent it.
"""

import dataclasses
from typing import Any, Mapping

from captioner.decoding.settings import SETTINGS, Setting
from captioner.serving.config import LIMITS, ServeConfig


class OptionError(ValueError):
    """An unknown option or a bad value: the request's 400."""


# the one option that is not a decoding setting; a Setting, so that it is parsed and described as the others are
ATTENTION = Setting(name="attention", kind=bool, low=None, high=None, label="attention", flag="",
                    help="each result carries its words' attention over the grid", stored=False)

_LISTED_FIRST = ("beam", "n_best", "max_len", "attention")  # the API's first options, as it has always listed them


def _options() -> dict[str, Setting]:
    """Every option by its name: those listed first, then the other decoding settings in their order."""
    every = {s.option: s for s in [*SETTINGS.values(), ATTENTION]}
    rank = {name: k for k, name in enumerate(_LISTED_FIRST)}
    return {name: every[name] for name in sorted(every, key=lambda name: rank.get(name, len(rank)))}


OPTIONS: dict[str, Setting] = _options()


def describe(s: Setting) -> str:
    """An option's description in the API docs."""
    when = "with sample: " if s.applies == "sample" else ""
    default = " (default: the model's)" if s.stored and s.kind is not bool else ""
    if s.kind is tuple:  # the command line's "(repeat the flag or separate with commas; ...)" said for HTTP
        return (f"{s.help.split(' (', 1)[0]}: {s.described()}, comma-separated (bicycle,dog) or the field "
                "repeated; a word the model cannot say is a 400")
    return f"{when}{'true: ' if s.kind is bool else ''}{s.help}{default}"


def schema(s: Setting) -> dict:
    """An option's OpenAPI schema: a string (every field of a form is), with its choices where it has them."""
    return {"type": "string", "enum": list(s.choices)} if s.choices else {"type": "string"}


def _on_server(s: Setting, cfg: ServeConfig) -> tuple[Setting, str]:
    """``s`` named by its option, its upper bound lowered to the server's limit where that is lower;
    and what a message about its bounds adds then (" on this server (--max-beam 10)")."""
    named = dataclasses.replace(s, label=s.option)
    cap = getattr(cfg, s.server_limit) if s.server_limit else None
    if cap is None or (s.high is not None and cap >= s.high):
        return named, ""
    return dataclasses.replace(named, high=cap), f" on this server ({LIMITS[s.server_limit].flag} {cap})"


def parse_option(s: Setting, text: str, cfg: ServeConfig) -> Any:
    """The value of one option's ``text``, checked against its bounds on this server; OptionError if bad."""
    bounded, note = _on_server(s, cfg)
    try:
        value = bounded.parse(text, check=False)  # a bool, a whole or a finite number; bounds below
    except ValueError as e:
        raise OptionError(str(e)) from None
    problem = bounded.problem(value)
    if problem is not None:  # words are named as the client sent them ("mention 'a,b,c,d': at most 3 words")
        shown = repr(text.strip()) if s.kind is tuple else repr(value)
        raise OptionError(f"{bounded.label} {shown}: {problem}{note}")
    return value


def joined(s: Setting | None, texts: list[str]) -> str | None:
    """One text for the values an option was sent as in one place (the form, or the query): a list of words
    (``mention``) may be sent as several fields, its words joined as if comma-separated; any other option
    once, or repeated with the same value (None: different values)."""
    if s is not None and s.kind is tuple:
        return ",".join(texts)
    return texts[0] if len(set(texts)) == 1 else None


def parse_options(values: Mapping[str, str], cfg: ServeConfig) -> tuple[dict[str, Any], bool]:
    """Decoding overrides (by DecodingSettings field) and the attention flag from a request's fields
    (raw strings); OptionError for an unknown option or a bad value."""
    overrides: dict[str, Any] = {}
    attention = False
    for name, text in values.items():
        if name not in OPTIONS:
            raise OptionError(f"unknown option {name!r}; options: {', '.join(OPTIONS)}")
        value = parse_option(OPTIONS[name], text, cfg)
        if OPTIONS[name] is ATTENTION:
            attention = value
        else:
            overrides[OPTIONS[name].name] = value
    return overrides, attention
