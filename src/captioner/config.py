"""Configs are dataclasses, loadable from YAML and overridable with ``key.sub=value`` strings.

A config file is read as the files helper reads any file (a regular file of at most 1 MiB); its YAML may
not repeat a key (the last would silently win), and, with its aliases expanded, may hold at most
``MAX_VALUES`` values nested ``MAX_DEPTH`` deep and strings of ``MAX_CHARS`` characters: an alias bomb
(a few lines of aliases of aliases, billions of values once copied) is refused before anything copies it.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from captioner.checks import shown
from captioner.files import CONFIG_BYTES, read_text

T = TypeVar("T")

MAX_VALUES = 100_000  # values in a config with its aliases expanded (a real one holds a few hundred)
MAX_DEPTH = 40  # mappings and lists nested in each other
MAX_CHARS = 10_000  # characters of one value (a path is at most 4096)


class ConfigError(ValueError):
    pass


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        self.line = line
        super().__init__(f"duplicate key {shown(key)} (first at line {first}); the last one would silently "
                         "win: keep one")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (a merge key's values may be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _NotYaml(Exception):
    pass


def parse_yaml(text: str, where: str, *, key: str = "", plain_text_ok: bool = False) -> Any:
    """YAML ``text`` as Python values, checked to be of a config's size (see the module's docstring);
    ConfigError names ``where`` (the file, or the override). ``plain_text_ok``: text that is not YAML
    raises _NotYaml (an override's value is then the text itself)."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except _DuplicateKey as e:
        raise ConfigError(f"{where}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        if plain_text_ok:
            raise _NotYaml from None
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested too deeply") from None
    _check_size(data, where, key, 0, [0])
    return data


def _check_size(value: Any, where: str, key: str, depth: int, count: list[int]) -> None:
    """Walk ``value`` as a copy of it would, stopping at the first limit it passes."""
    count[0] += 1
    if count[0] > MAX_VALUES:
        raise ConfigError(f"{where}: expands to more than {MAX_VALUES} values (YAML aliases repeating lists or "
                          "mappings of aliases?); a config holds a few hundred: write the values out")
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where}: {key or 'the config'} is nested more than {MAX_DEPTH} levels deep (YAML "
                          "aliases of themselves?)")
    if isinstance(value, str) and len(value) > MAX_CHARS:
        raise ConfigError(f"{where}: {key or 'the value'} is {len(value)} characters long ({shown(value)}); a "
                          f"config value is at most {MAX_CHARS}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_size(k, where, key, depth + 1, count)
            _check_size(v, where, f"{key}.{k}" if key else str(k), depth + 1, count)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_size(v, where, f"{key}[{i}]", depth + 1, count)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: cannot read {shown(value)} as {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {shown(value)}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if value is None:  # a YAML key with every item commented out
            value = []
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, inner, where) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {shown(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {shown(value)}")
    if tp in (int, float, str):
        if value is None or isinstance(value, (list, dict)) or (isinstance(value, bool) and tp is not str):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {shown(value)}")
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {shown(value)}") from None
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {shown(sorted(map(str, unknown)))}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """``["optim.lr=1e-3", "epochs=5"]`` -> a new config with those fields changed."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {shown(item)}: expected key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        where = f"override {shown(item)}"
        try:
            value = parse_yaml(raw, where, key=key.strip(), plain_text_ok=True) if raw != "" else ""
        except _NotYaml:
            value = raw  # not a YAML value: the text itself (its type is checked below)
            _check_size(value, where, key.strip(), 0, [0])
        node, cls = data, type(cfg)
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"{where}: {shown(p)} is not a section of the config")
            node = node[p]
            hint = typing.get_type_hints(cls).get(p) if cls is not None else None
            cls = hint if dataclasses.is_dataclass(hint) else None  # None: a free-form dict
        if parts[-1] not in node and cls is not None:
            raise ConfigError(f"{where}: unknown key {shown(key)}")
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    cfg = cls()
    if path is not None:
        p = Path(path)
        try:
            text = read_text(p, "the config file", CONFIG_BYTES)  # a regular file: not a FIFO, not /dev/zero
        except ValueError as e:
            raise ConfigError(str(e)) from None
        data = parse_yaml(text, str(p)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of config keys")
        merged = to_dict(cfg)
        deep_update(merged, data)
        cfg = from_dict(cls, merged, where=str(p))
    return apply_overrides(cfg, overrides or [])


def deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
