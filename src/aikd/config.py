"""Configuration: dataclasses loaded from YAML and overridden by dotted ``key=value`` arguments.

A config is a tree of dataclasses. Field help comes from ``field(metadata={"help": ...})`` and is shown by
``aikd train --help-config``. Unknown keys and values of the wrong type are errors that name the dotted key;
``__post_init__`` checks raise ``ValueError`` and get the section's dotted path added. No import strings:
every choice is a name the code knows.

Example::

    cfg = load_config(TrainConfig, "configs/tiny.yaml", ["optim.lr=0.01", "data.batch_size=16"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import reprlib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from aikd.io import atomic_write

__all__ = ["ConfigError", "config_to_dict", "describe_config", "from_dict", "load_config", "save_config"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the harmless cases (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {shown(value)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in args)}, got {shown(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {shown(value)}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {shown(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {shown(value)}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads `weights: 123` as a number; a path or name is still meant
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {shown(value)}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly nested) mapping, checking keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists), ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value

    return plain(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {shown(item)} is not of the form key=value (e.g. optim.lr=0.01)")
        try:
            value = yaml.load(text, Loader=_PlainLoader) if text.strip() else ""  # noqa: S506
        except yaml.YAMLError:
            value = text
        _set_dotted(tree, key.strip(), value)
    return tree


MAX_SHOWN = 120  # characters of a value quoted in an error message
MAX_YAML_DEPTH = 64  # nesting levels of a config or suite file (aikd's are 3 deep)


def shown(value: Any) -> str:
    """``repr(value)`` cut to :data:`MAX_SHOWN` characters, for messages: a value can be megabytes long."""
    short = reprlib.Repr()  # attributes, not keywords: Python 3.10 and 3.11 take none
    short.maxstring = short.maxother = MAX_SHOWN
    short.maxlist = short.maxdict = short.maxtuple = 8
    short.maxlevel = 3
    try:
        text = short.repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deep to show>"
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


class _PlainLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases and with bounded nesting: a few hundred bytes of ``&a [*a, *a, ...]``
    expand to gigabytes, and deep nesting exhausts the stack. aikd's files need neither."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: aliases (*{event.anchor}) are not accepted in "
                                 "aikd's YAML files; write the value out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str, source: str, what: str = "YAML file") -> Any:
    """``text`` parsed as YAML data (no aliases, bounded nesting).

    Raises:
        ConfigError: not valid YAML, an alias, or nesting too deep; the message names ``source``.
    """
    try:
        return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid {what} ({shown_error(err)})") from None


def shown_error(err: Exception) -> str:
    """An error's message cut to a few lines (YAML's errors quote the offending text)."""
    text = str(err)
    return text if len(text) <= 4 * MAX_SHOWN else text[:4 * MAX_SHOWN] + "..."


def load_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """The YAML file at ``path`` (:func:`parse_yaml`).

    Raises:
        ConfigError: unreadable, or not valid YAML (the message names the file).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text {what} (not UTF-8)") from None
    return parse_yaml(text, str(path), what)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path``, then by ``overrides``."""
    tree = config_to_dict(cls())
    if path is not None:
        loaded = load_yaml(path, "config") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(loaded).__name__}")
        _merge(tree, loaded, "")
    apply_overrides(tree, overrides)
    return from_dict(cls, tree)


def _merge(base: dict[str, Any], update: Mapping[str, Any], prefix: str) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value, f"{prefix}{key}.")
        else:
            base[key] = value


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), so a run records exactly what it ran with."""
    with atomic_write(path) as handle:
        yaml.safe_dump(config_to_dict(cfg), handle, sort_keys=False)


def describe_config(cls: type, prefix: str = "") -> list[str]:
    """Lines ``key (type, default): help`` for every field, nested sections included."""
    lines = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            lines.extend(describe_config(tp, f"{prefix}{f.name}."))
            continue
        help_text = f.metadata.get("help", "")
        lines.append(f"{prefix}{f.name} ({_type_name(tp)}, default {value!r}): {help_text}".rstrip(": "))
    return lines
