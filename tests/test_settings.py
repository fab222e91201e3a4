"""Settings precedence (defaults < TOML < environment < flags) and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tgastream.core.settings import Settings, SettingsError, load_settings


def test_precedence_defaults_toml_env_flags(tmp_path: Path):
    cfg = tmp_path / "t.toml"
    cfg.write_text('[tgastream]\npartitions = 8\nbatch_size = 64\nlr = 0.01\n')
    s = load_settings(cfg, {"TGASTREAM_BATCH_SIZE": "128", "TGASTREAM_LR": "0.02", "OTHER": "x"}, {"lr": "0.5"})
    assert (s.partitions, s.batch_size, s.lr, s.dim) == (8, 128, 0.5, Settings().dim)


@pytest.mark.parametrize("overrides,match", [
    ({"partitions": "0"}, "partitions must be > 0"),
    ({"partitions": "four"}, "partitions must be int"),
    ({"dim": "65", "heads": "2"}, "divisible"),
    ({"bootstrap": "localhost"}, "HOST:PORT"),
    ({"device": "tpu"}, "device must be"),
    ({"replay_share": "1.5"}, "replay_share"),
    ({"sample_len": "500"}, "sample_len"),
])
def test_invalid_values_raise_one_line(overrides, match):
    with pytest.raises(SettingsError, match=match) as info:
        load_settings(None, {}, overrides)
    assert "\n" not in str(info.value)


def test_unknown_key_and_bad_toml_are_errors(tmp_path: Path):
    with pytest.raises(SettingsError, match="unknown setting 'colour'"):
        load_settings(None, {"TGASTREAM_COLOUR": "red"})
    bad = tmp_path / "bad.toml"
    bad.write_text("partitions = = 3")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
