"""Strict TOML configuration helpers shared by the agent and the aggregator.

Every value is read through :class:`Section`, which names the file, the section and the key in
its errors, rejects keys it does not know (a typo must not silently fall back to a default), and
resolves relative paths against the config file's own directory.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bedside.errors import ConfigError

if TYPE_CHECKING:
    from bedside.transport.mqtt import MqttConfig

T = TypeVar("T")


class Section:
    def __init__(self, data: dict[str, Any], where: str, base: Path) -> None:
        self.data = data
        self.where = where
        self.base = base
        self.used: set[str] = set()

    def _get(self, key: str, default: Any, required: bool) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise ConfigError(f"{self.where}: '{key}' is required")
            return default
        return self.data[key]

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        v = self._get(key, default, required)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{self.where}: '{key}' must be a string, got {v!r}")
        return v

    def integer(self, key: str, default: int | None = None, *, required: bool = False,
            min: int | None = None) -> Any:
        v = self._get(key, default, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.where}: '{key}' must be an integer, got {v!r}")
        if min is not None and v < min:
            raise ConfigError(f"{self.where}: '{key}' must be >= {min}, got {v}")
        return v

    def number(self, key: str, default: float | None = None, *, required: bool = False,
              min: float | None = None, max: float | None = None, positive: bool = False) -> Any:
        v = self._get(key, default, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{self.where}: '{key}' must be a number, got {v!r}")
        v = float(v)
        if math.isnan(v):
            raise ConfigError(f"{self.where}: '{key}' is NaN")
        if positive and not v > 0:
            raise ConfigError(f"{self.where}: '{key}' must be > 0, got {v}")
        if min is not None and v < min:
            raise ConfigError(f"{self.where}: '{key}' must be >= {min}, got {v}")
        if max is not None and v > max:
            raise ConfigError(f"{self.where}: '{key}' must be <= {max}, got {v}")
        return v

    def flag(self, key: str, default: bool | None = None, *, required: bool = False) -> Any:
        v = self._get(key, default, required)
        if v is not None and not isinstance(v, bool):
            raise ConfigError(f"{self.where}: '{key}' must be true or false, got {v!r}")
        return v

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> Any:
        v = self.text(key, default)
        if v not in choices:
            raise ConfigError(f"{self.where}: '{key}' must be one of {', '.join(choices)}; "
                              f"got {v!r}")
        return v

    def path(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        v = self.text(key, default, required=required)
        if v is None:
            return None
        p = Path(v).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def section(self, name: str) -> Section:
        self.used.add(name)
        v = self.data.get(name, {})
        if not isinstance(v, dict):
            raise ConfigError(f"{self.where}: [{name}] must be a table")
        where = f"{self.where} [{name}]" if "[" not in self.where else f"{self.where}.{name}"
        return Section(v, where, self.base)

    def table(self, key: str) -> dict[str, Any]:
        v = self._get(key, {}, False)
        if not isinstance(v, dict):
            raise ConfigError(f"{self.where}: '{key}' must be a table")
        return dict(v)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key(s) {', '.join(unknown)}; check the "
                              "spelling (see docs/configuration.md)")


def load(path: str | Path) -> Section:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    return Section(data, str(p), p.resolve().parent)


def mqtt_section(s: Section) -> MqttConfig:
    from bedside.transport.mqtt import DEFAULT_MAX_INBOX_BYTES, INBOX_MESSAGE_COST, MqttConfig

    cfg = MqttConfig(
        host=s.text("host", "127.0.0.1"),
        port=s.integer("port", 1883, min=1),
        ca_file=s.path("ca_file"),
        cert_file=s.path("cert_file"),
        key_file=s.path("key_file"),
        username=s.text("username"),
        password=s.text("password"),
        keepalive=s.integer("keepalive", 30, min=5),
        publish_timeout=s.number("publish_timeout", 10.0, positive=True),
        max_inbox_bytes=s.integer("max_inbox_bytes", DEFAULT_MAX_INBOX_BYTES,
                                  min=INBOX_MESSAGE_COST),
    )
    s.done()
    return cfg
