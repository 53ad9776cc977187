"""Settings declared once: a dataclass field is a setting's name, type, default, bounds and doc.

Configuration files (``agent.toml``, ``aggregator.toml``) and signed settings on the wire (a
round's announcement) are read by one loader derived from the dataclass itself, so nothing is
declared twice::

    @dataclass(frozen=True)
    class Rounds:
        rounds: int = setting(10, "planned rounds; 0 runs until stopped", min=0)
        deadline_seconds: float = setting(120.0, "a round closes at its deadline", positive=True)

    cfg = load_file(AggregatorConfig, "aggregator.toml")

The loader:

* checks every value against the field's type (``bool``, ``int``, ``float``, ``str``, ``Path``,
  a ``Literal`` of choices, a nested dataclass as a table, ``dict`` for a free table, and ``X |
  None`` for optional values) and bounds, and names the file, section and key in every error;
* refuses keys it does not know (a typo must not silently fall back to a default);
* resolves relative paths against the config file's own directory;
* leaves cross-field rules to the dataclass's ``__post_init__``, which raises the same error.

:func:`to_table` is the inverse (what is written into an announcement), :func:`describe` lists
every setting with its default and doc (``docs/configuration.md`` is checked against it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from bedside.errors import BedsideError, ConfigError

T = TypeVar("T")
ErrorFactory = Callable[[str], BedsideError]


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


def setting(default: Any = REQUIRED, doc: str = "", *, factory: Callable[[], Any] | None = None,
            min: float | None = None, max: float | None = None, positive: bool = False,
            false_is_none: bool = False, internal: bool = False, secret: bool = False,
            check: Callable[[Any, str], None] | None = None) -> Any:
    """A dataclass field that is also a setting.

    ``min``/``max``/``positive`` bound numbers; ``false_is_none`` lets ``key = false`` mean None
    (switching an optional feature off); ``internal`` fields are never read from a file;
    ``secret`` values never appear in a ``repr`` (logs); ``check(value, where)`` validates a
    value further (e.g. identifiers) and raises.
    """
    meta = {"doc": doc, "min": min, "max": max, "positive": positive,
            "false_is_none": false_is_none, "internal": internal, "check": check}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta, repr=not secret)
    if default is REQUIRED:
        return dataclasses.field(metadata=meta, repr=not secret)
    return dataclasses.field(default=default, metadata=meta, repr=not secret)


def _config_error(message: str) -> BedsideError:
    return ConfigError(message)


def _optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``; (tp, False) otherwise."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


class _Reader:
    def __init__(self, where: str, base: Path | None, error: ErrorFactory) -> None:
        self.where, self.base, self.error = where, base, error

    def fail(self, key: str, what: str) -> BedsideError:
        return self.error(f"{self.where}: '{key}' {what}")

    def value(self, key: str, tp: Any, v: Any, meta: Mapping[str, Any]) -> Any:
        inner, optional = _optional(tp)
        if optional and meta.get("false_is_none") and v is False:
            return None
        return self.convert(key, inner, v, meta)

    def convert(self, key: str, tp: Any, v: Any, meta: Mapping[str, Any]) -> Any:
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise self.fail(key, "must be a table")
            return read_table(typing.cast(type, tp), v, self.sub(key), self.base, self.error)
        if get_origin(tp) is Literal:
            choices = get_args(tp)
            if v not in choices:
                raise self.fail(key, f"must be one of {', '.join(map(str, choices))}; got "
                                     f"{_show(v)}")
            return v
        if tp is bool:
            if not isinstance(v, bool):
                raise self.fail(key, f"must be true or false, got {_show(v)}")
            return v
        if tp is int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.fail(key, f"must be an integer, got {_show(v)}")
            return self.bounded(key, v, meta)
        if tp is float:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise self.fail(key, f"must be a number, got {_show(v)}")
            try:
                f = float(v)
            except OverflowError:
                raise self.fail(key, "is too large") from None
            if not math.isfinite(f):
                raise self.fail(key, f"must be a finite number, got {_show(v)}")
            return self.bounded(key, f, meta)
        if tp is str:
            if not isinstance(v, str):
                raise self.fail(key, f"must be a string, got {_show(v)}")
            return v
        if tp is Path:
            if not isinstance(v, str):
                raise self.fail(key, f"must be a path (a string), got {_show(v)}")
            p = Path(v).expanduser()
            return p if p.is_absolute() or self.base is None else self.base / p
        if get_origin(tp) in (tuple, list):
            if not isinstance(v, list):
                raise self.fail(key, f"must be a list, got {_show(v)}")
            item = get_args(tp)[0]
            items = [self.convert(f"{key}[{i}]", item, x, meta) for i, x in enumerate(v)]
            return tuple(items) if get_origin(tp) is tuple else items
        if tp is dict or get_origin(tp) is dict:
            if not isinstance(v, dict):
                raise self.fail(key, "must be a table")
            return dict(v)
        raise TypeError(f"setting {key!r}: unsupported type {tp!r}")  # a programming error

    def bounded(self, key: str, v: float, meta: Mapping[str, Any]) -> Any:
        if meta.get("positive") and not v > 0:
            raise self.fail(key, f"must be > 0, got {v:g}")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and v < lo:
            raise self.fail(key, f"must be >= {lo:g}, got {v:g}")
        if hi is not None and v > hi:
            raise self.fail(key, f"must be <= {hi:g}, got {v:g}")
        return v

    def sub(self, key: str) -> str:
        return f"{self.where} [{key}]" if "[" not in self.where else f"{self.where[:-1]}.{key}]"


def settings_of(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
    """The (field, type) pairs of ``cls`` that are read from files or the wire."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init and not f.metadata.get("internal"):
            yield f, hints[f.name]


def read_table(cls: type[T], data: Mapping[str, Any], where: str, base: Path | None = None,
               error: ErrorFactory = _config_error,
               internal: Mapping[str, Any] | None = None) -> T:
    """Build ``cls`` from a table: types, bounds, required keys, no unknown keys.

    ``internal`` sets fields that are never read from the table (e.g. ``source``)."""
    r = _Reader(where, base, error)
    kwargs: dict[str, Any] = dict(internal or {})
    known = set()
    for f, tp in settings_of(cls):
        known.add(f.name)
        if f.name in data:
            kwargs[f.name] = r.value(f.name, tp, data[f.name], f.metadata)
            check = f.metadata.get("check")
            if check is not None and kwargs[f.name] is not None:
                try:
                    check(kwargs[f.name], f"{where}: '{f.name}'")
                except BedsideError as exc:
                    raise error(str(exc)) from None
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise r.fail(f.name, "is required")
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; check the "
                    "spelling (see docs/configuration.md)")
    try:
        return cls(**kwargs)
    except BedsideError as exc:
        raise error(f"{where}: {exc}") from None


def load_file(cls: type[T], path: str | Path) -> T:
    """Read a TOML file into ``cls`` (its ``source`` field, if any, is set to the path)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read ({exc})") from None
    has_source = any(f.name == "source" for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    internal = {"source": str(p)} if has_source else {}
    return read_table(cls, data, str(p), p.resolve().parent, internal=internal)


def to_table(obj: Any) -> dict[str, Any]:
    """The settings of a dataclass instance as plain data (nested tables; None values left out)."""
    out: dict[str, Any] = {}
    for f, _ in settings_of(type(obj)):
        v = getattr(obj, f.name)
        if v is None:
            continue
        if dataclasses.is_dataclass(v):
            v = to_table(v)
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def describe(cls: type, section: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) of every setting; keys of tables as ``[section] key``."""
    rows: list[tuple[str, str, str]] = []
    for f, tp in settings_of(cls):
        inner, _ = _optional(tp)
        if dataclasses.is_dataclass(inner) and isinstance(inner, type):
            rows += describe(inner, f"{section}.{f.name}" if section else f.name)
            continue
        if f.default is not dataclasses.MISSING:
            default = _show_default(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = "{}"
        else:
            default = "required"
        key = f"[{section}] {f.name}" if section else f.name
        rows.append((key, default, str(f.metadata.get("doc", ""))))
    return rows


def _show_default(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple | list):
        return "[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in v) + "]"
    return str(v)


def markdown_table(cls: type) -> str:
    """The settings of ``cls`` as the table docs/configuration.md shows (tests compare them)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | {d} | {doc} |" for k, d, doc in describe(cls)]
    return "\n".join(lines)


# -- a small TOML writer: config files Bedside writes (tables of strings, numbers, booleans, lists)
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):  # a TOML basic string: JSON's escapes, plus DEL; non-ASCII as is
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    """A bare key when it is one, else quoted: a key never starts a line or table of its own."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(str(k))


def to_toml(d: Mapping[str, Any], prefix: str = "") -> str:
    """``d`` as TOML: plain values first, then each nested table as ``[prefix.key]``."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.items()
             if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
            lines.append(f"\n[{name}]")
            lines.append(to_toml(v, name))
    return "\n".join(lines) + "\n"


__all__ = ["REQUIRED", "describe", "load_file", "markdown_table", "read_table", "setting",
           "settings_of", "to_table", "to_toml"]
