from __future__ import annotations

from pathlib import Path

import pytest

from nat4etl.config import DEFAULT_CONFIG, load_settings, parse_areas
from nat4etl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_configs_default_is_the_packaged_default():
    assert (REPO / "configs" / "default.toml").read_bytes() == DEFAULT_CONFIG.read_bytes()


def test_defaults():
    s = load_settings()
    assert s.record_id == 8044773
    assert s.zenodo_url == "https://zenodo.org"
    assert s.areas == ("A1", "PEG")
    assert s.dt_ms == 10 and s.audio_fs_hz == 44100 and s.norm == "deepstrf"


def test_config_file_then_flags_win(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[build]\ndt_ms = 20\nnorm = "nems"\n[zenodo]\nurl = "http://127.0.0.1:9/"\n')
    s = load_settings(cfg)
    assert (s.dt_ms, s.norm, s.zenodo_url) == (20, "nems", "http://127.0.0.1:9")
    assert s.record_id == 8044773  # untouched keys keep their defaults
    s2 = s.with_overrides(dt_ms=5.0, norm=None)
    assert (s2.dt_ms, s2.norm) == (5.0, "nems")


def test_bad_config_is_a_config_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[build\n")
    with pytest.raises(ConfigError, match="c.toml"):
        load_settings(cfg)
    cfg.write_text('[build]\nnorm = "zscore"\n')
    with pytest.raises(ConfigError, match="zscore"):
        load_settings(cfg)


@pytest.mark.parametrize(
    "body",
    ['[build]\nnorm = "zscore"\n', '[build]\nareas = ["V1"]\n', "[build]\ndt_ms = 0\n"],
)
def test_a_bad_value_in_a_config_file_names_the_file(tmp_path, body):
    """A value of the right type that is still wrong names its file, as every error does."""
    cfg = tmp_path / "mine.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert str(info.value).startswith("mine.toml: ") and info.value.exit_code == 2


def test_parse_areas():
    s = load_settings()
    assert parse_areas("all", s) == ("A1", "PEG")
    assert parse_areas("PEG", s) == ("PEG",)
    assert parse_areas(None, s) is None


def test_every_default_key_is_one_a_config_file_may_set():
    """The checked keys and the shipped defaults are one list: a key added to
    default.toml must be settable from --config, and none checked may be unknown there."""
    import tomllib

    from nat4etl import config

    defaults = tomllib.loads(config.DEFAULT_CONFIG.read_text())
    assert {s: set(keys) for s, keys in defaults.items()} == {
        s: set(keys) for s, keys in config._KEYS.items()
    }
    for section, keys in defaults.items():
        for key, value in keys.items():
            assert config._is(config._KEYS[section][key], value), (section, key, value)


def test_cache_dir_precedence_is_flag_then_env_then_file(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[zenodo]\ncache_dir = "/from/file"\n')
    monkeypatch.delenv("NAT4ETL_CACHE", raising=False)
    assert load_settings(cfg).cache_dir == Path("/from/file")
    assert load_settings().cache_dir is None  # the platform's, chosen by fetch
    monkeypatch.setenv("NAT4ETL_CACHE", "/from/env")
    assert load_settings(cfg).cache_dir == Path("/from/env")
    assert load_settings().cache_dir == Path("/from/env")
    flagged = load_settings(cfg).with_overrides(cache_dir=Path("/from/flag"))
    assert flagged.cache_dir == Path("/from/flag")


def test_config_that_is_not_utf8_is_a_config_error(tmp_path):
    """TOML is UTF-8: other bytes are the file's fault (exit 2 naming it), not a traceback."""
    cfg = tmp_path / "latin.toml"
    cfg.write_bytes(b'[build]\nnorm = "d\xe9epstrf"\n')
    with pytest.raises(ConfigError, match="latin.toml") as err:
        load_settings(cfg)
    assert "UTF-8" in str(err.value) and "line 2" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "url", ["not-a-url", "zenodo.org", "ftp://zenodo.org", "https://", "http://:80", "http://h:x"]
)
def test_zenodo_url_must_be_http_with_a_host(tmp_path, url):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[zenodo]\nurl = "{url}"\n')
    with pytest.raises(ConfigError, match="zenodo.url") as err:
        load_settings(cfg)
    assert "c.toml" in str(err.value) and repr(url) in str(err.value)
    with pytest.raises(ConfigError, match="zenodo_url") as err:
        load_settings().with_overrides(zenodo_url=url)
    assert repr(url) in str(err.value)


def test_zenodo_urls_that_are_fine():
    for url in ("https://zenodo.org", "http://127.0.0.1:9", "https://sandbox.zenodo.org/x/"):
        assert load_settings().with_overrides(zenodo_url=url).zenodo_url == url.rstrip("/")


def test_a_trailing_slash_on_the_zenodo_url_is_one_setting_either_way():
    plain = load_settings().with_overrides(zenodo_url="https://zenodo.example")
    slashed = load_settings().with_overrides(zenodo_url="https://zenodo.example/")
    assert plain == slashed and plain.zenodo_url == "https://zenodo.example"
