"""Typed settings: ``configs/default.toml`` (shipped as ``nat4etl/default.toml``), then an
optional ``--config FILE``, then command-line flags, each overriding the one before."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from nat4etl.errors import ConfigError
from nat4etl.nat4 import AREAS

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")
NORMS = ("deepstrf", "nems")


@dataclass(frozen=True)
class Settings:
    record_id: int
    zenodo_url: str
    jobs: int
    timeout_s: float
    max_attempts: int
    cache_dir: Path | None
    areas: tuple[str, ...]
    wav: bool
    dt_ms: float
    audio_fs_hz: int
    norm: str
    source_dir: Path | None = None

    def with_overrides(self, **flags) -> Settings:
        """Apply CLI flags; ``None`` means "not given"."""
        given = {k: v for k, v in flags.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        return _checked(replace(self, **given))


def load_settings(config_file: str | os.PathLike | None = None) -> Settings:
    raw = _read_toml(DEFAULT_CONFIG)
    if config_file is not None:
        raw = _merge(raw, _read_toml(Path(config_file)))
    z, b = raw.get("zenodo", {}), raw.get("build", {})
    try:
        s = Settings(
            record_id=int(z["record_id"]),
            zenodo_url=str(z["url"]).rstrip("/"),
            jobs=int(z["jobs"]),
            timeout_s=float(z["timeout_s"]),
            max_attempts=int(z["max_attempts"]),
            cache_dir=Path(z["cache_dir"]) if z.get("cache_dir") else None,
            areas=tuple(b["areas"]),
            wav=bool(b["wav"]),
            dt_ms=float(b["dt_ms"]),
            audio_fs_hz=int(b["audio_fs_hz"]),
            norm=str(b["norm"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"bad or missing setting: {err}", path=config_file) from err
    return _checked(s)


def parse_areas(area: str | None, settings: Settings) -> tuple[str, ...] | None:
    """`--area A1|PEG|all` -> a tuple of areas; None when the flag was not given."""
    if area is None:
        return None
    if area.lower() == "all":
        return settings.areas
    if area not in AREAS:
        raise ConfigError(f"unknown area {area!r}; choose A1, PEG or all")
    return (area,)


def _checked(s: Settings) -> Settings:
    bad = [a for a in s.areas if a not in AREAS]
    if bad:
        raise ConfigError(f"unknown areas {bad}; known: {list(AREAS)}")
    if s.norm not in NORMS:
        raise ConfigError(f"unknown norm {s.norm!r}; choose one of {list(NORMS)}")
    if s.dt_ms <= 0 or s.jobs < 1 or s.max_attempts < 1 or s.audio_fs_hz <= 0:
        raise ConfigError("dt_ms, audio_fs_hz, jobs and max_attempts must be positive")
    return s


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config: {err.strerror}", path=path) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"not valid TOML: {err}", path=path) from err


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
