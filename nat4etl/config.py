"""Typed settings: ``configs/default.toml`` (shipped as ``nat4etl/default.toml``), then an
optional ``--config FILE``, then the environment (``$NAT4ETL_CACHE``), then command-line
flags, each overriding the one before."""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from nat4etl.errors import ConfigError
from nat4etl.nat4 import AREAS

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")
#: the download cache's environment variable: over a config file's ``cache_dir``, under
#: ``--cache``
CACHE_ENV = "NAT4ETL_CACHE"
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


#: every key a config file may set, by section, with what its value must be
_KEYS: dict[str, dict[str, str]] = {
    "zenodo": {
        "record_id": "int",
        "url": "str",
        "jobs": "int",
        "timeout_s": "float",
        "max_attempts": "int",
        "cache_dir": "str",
    },
    "build": {
        "areas": "list of str",
        "wav": "bool",
        "dt_ms": "float",
        "audio_fs_hz": "int",
        "norm": "str",
    },
}
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "list of str": 'a list of strings, e.g. ["A1"]',
}


def file_sets(config_file: str | os.PathLike | None, section: str, key: str) -> bool:
    """Does ``config_file`` itself set ``[section] key`` (not merely inherit the default)?"""
    if config_file is None:
        return False
    table = _read_toml(Path(config_file)).get(section)
    return isinstance(table, dict) and key in table


def load_settings(config_file: str | os.PathLike | None = None) -> Settings:
    raw = _read_toml(DEFAULT_CONFIG)
    if config_file is not None:
        over = _read_toml(Path(config_file))
        _check_keys(over, config_file)
        raw = _merge(raw, over)
    z, b = raw.get("zenodo", {}), raw.get("build", {})
    try:
        s = Settings(
            record_id=int(z["record_id"]),
            zenodo_url=str(z["url"]).rstrip("/"),
            jobs=int(z["jobs"]),
            timeout_s=float(z["timeout_s"]),
            max_attempts=int(z["max_attempts"]),
            cache_dir=_cache_dir(z.get("cache_dir")),
            areas=tuple(b["areas"]),
            wav=bool(b["wav"]),
            dt_ms=float(b["dt_ms"]),
            audio_fs_hz=int(b["audio_fs_hz"]),
            norm=str(b["norm"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"bad or missing setting: {err}", path=config_file) from err
    check_url(str(z["url"]), "zenodo.url", path=config_file)  # as written, not rstripped
    try:
        return _checked(s)
    except ConfigError as err:  # the defaults pass: the value is the file's, so name it
        if config_file is None or err.path is not None:
            raise
        raise ConfigError(err.msg, path=config_file) from None


def check_url(url: str, name: str = "zenodo_url", *, path=None) -> None:
    """A Zenodo base URL is http(s)://HOST[:PORT][/PATH]: anything else is a configuration
    error naming ``name`` (the key or option) and the value, raised before a build starts,
    not a network failure once it has."""
    problem = url_problem(url)
    if problem:
        raise ConfigError(f"{name}: {url!r} is not a Zenodo base URL ({problem})", path=path)


def url_problem(url: str) -> str | None:
    """What makes ``url`` unusable as a base URL, or None when it is fine."""
    from urllib.parse import urlsplit

    example = "e.g. https://zenodo.org"
    if not url or any(c.isspace() for c in url):
        return f"empty or has white space; {example}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number)
    except ValueError as err:
        return f"{err}; {example}"
    if parts.scheme not in ("http", "https"):
        return f"it must start with http:// or https://, {example}"
    if not parts.hostname:
        return f"it names no host, {example}"
    if parts.query or parts.fragment:
        return "a base URL has no ?query or #fragment: the API paths are appended to it"
    return None


def _cache_dir(configured: str | None) -> Path | None:
    """``$NAT4ETL_CACHE`` when set, else the config's ``cache_dir``; None: the platform's."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path(configured).expanduser() if configured else None


def _check_keys(over: dict, path) -> None:
    """A config file's sections and keys are known and of the right type: a typo
    (``dtms``) or ``wav = "no"`` is an error naming the key, never silently ignored."""
    for section, values in over.items():
        known = _KEYS.get(section)
        if known is None:
            raise ConfigError(
                f"unknown section [{section}]; known: {', '.join(f'[{k}]' for k in _KEYS)}",
                path=path,
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a [{section}] table", path=path)
        for key, value in values.items():
            kind = known.get(key)
            if kind is None:
                raise ConfigError(
                    f"unknown setting {section}.{key}; known in [{section}]: " + ", ".join(known),
                    path=path,
                )
            if not _is(kind, value):
                raise ConfigError(
                    f"{section}.{key}: expected {_EXPECTED[kind]}, got {value!r}", path=path
                )


def _is(kind: str, value: object) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


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
    check_url(s.zenodo_url)
    if s.zenodo_url.endswith("/"):  # one spelling, as the config file's: same fingerprint
        s = replace(s, zenodo_url=s.zenodo_url.rstrip("/"))
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
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config: {err.strerror}", path=path) from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
            "a TOML file must be saved as UTF-8",
            path=path,
        ) from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"not valid TOML: {err}", path=path) from err


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def check_audio_bins(audio_fs_hz: int, dt_ms: float) -> int:
    """Audio samples per bin; a ConfigError saying what would work when it is not whole
    (waveforms are cut into the response bins). Checked before a build runs anything."""
    exact = audio_fs_hz * dt_ms / 1000.0
    hop = round(exact)
    if hop >= 1 and abs(exact - hop) <= 1e-9:
        return hop
    ways = []
    step_hz = 1000.0 / dt_ms
    if step_hz == int(step_hz):
        below = int(audio_fs_hz // step_hz * step_hz)
        near = " or ".join(str(f) for f in (below, below + int(step_hz)) if f > 0)
        ways.append(f"--audio-fs a multiple of {step_hz:g} Hz ({near})")
    if audio_fs_hz == int(audio_fs_hz):
        unit_ms = 1000 // math.gcd(int(audio_fs_hz), 1000)
        ways.append(f"--dt-ms a multiple of {unit_ms} ms")
    ways.append("--no-wav (no waveforms)")
    raise ConfigError(
        f"audio_fs_hz={audio_fs_hz} and dt_ms={dt_ms:g} give {exact:g} audio samples per bin; "
        f"waveforms are cut into the response bins only when that is whole. Hint: choose "
        f"{', or '.join(ways)}"
    )
