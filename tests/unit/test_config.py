"""meanablate.config: option table, TOML config files, precedence, validation, round trip."""

from __future__ import annotations

import sys

import pytest

from meanablate.config import (
    OPTIONS,
    ConfigError,
    InputError,
    dump_toml,
    load_config,
    resolve,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_when_nothing_is_given():
    cfg = resolve({})
    assert cfg["algorithm"] == "acdc" and cfg["threshold"] == 0.01
    assert cfg["batch_size"] == 128 and cfg["organism"] is None
    assert all(cfg.sources[k] == "default" for k in OPTIONS)


def test_precedence_defaults_config_flags(tmp_path):
    path = _write(tmp_path, 'organism = "tracr-reverse"\nthreshold = 0.5\nn-examples = 64\n')
    config = load_config(path)
    cfg = resolve({"threshold": 0.25}, config, defaults={"organism": "tracr-sort", "seed": 3})
    assert cfg["organism"] == "tracr-reverse"  # config beats a command's default
    assert cfg["threshold"] == 0.25 and cfg.sources["threshold"] == "--threshold"  # flag wins
    assert cfg["n_examples"] == 64 and cfg.sources["n_examples"] == f"{path}, line 3"
    assert cfg["seed"] == 3 and cfg["batch_size"] == 128


def test_keys_with_dashes_or_underscores(tmp_path):
    config = load_config(_write(tmp_path, "batch_size = 8\ntarget-faithfulness = 0.9\n"))
    cfg = resolve({}, config)
    assert cfg["batch_size"] == 8 and cfg["target_faithfulness"] == 0.9


def test_unknown_key_names_the_line_and_the_closest_key(tmp_path):
    path = _write(tmp_path, 'organism = "tracr-sort"\n\ntreshold = 0.01\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"{path}, line 3" in msg and "'treshold'" in msg and "did you mean 'threshold'" in msg
    assert "\n" not in msg and isinstance(info.value, InputError)


def test_unknown_key_without_a_close_match_lists_the_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match="valid keys: organism, model"):
        load_config(_write(tmp_path, "zzzzzz = 1\n"))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 1"):
        load_config(_write(tmp_path, "threshold = = 1\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('threshold = "big"', r"line 2: threshold must be a number, got 'big'"),
        ("n-examples = 1.5", r"n-examples must be an integer"),
        ("attribution = 1", r"attribution must be true or false"),
        ("threshold = -1", r"threshold must be >= 0"),
        ("target-faithfulness = 0", r"target-faithfulness must be > 0"),
        ("target-faithfulness = 1.5", r"target-faithfulness must be <= 1"),
        ('algorithm = "acdcc"', r"unknown value 'acdcc' \(did you mean 'acdc'\?\)"),
        ("units = [1, 2]", r"units must be a list of strings"),
        ("units = []", r"units must not be empty"),
    ],
)
def test_bad_values_name_the_file_and_line(tmp_path, text, pattern):
    path = _write(tmp_path, "seed = 1\n" + text + "\n")
    with pytest.raises(ConfigError, match=pattern) as info:
        resolve({}, load_config(path))
    assert f"{path}, line 2" in str(info.value)


def test_bad_flag_values_name_the_flag():
    with pytest.raises(ConfigError, match=r"^--batch-size must be >= 1, got 0$"):
        resolve({"batch_size": 0})
    with pytest.raises(ConfigError, match=r"^--metric: unknown value 'kll'"):
        resolve({"metric": "kll"})


def test_options_a_command_does_not_take_are_ignored_and_listed(tmp_path):
    path = _write(tmp_path, 'organism = "tracr-sort"\nalgorithm = "sweep"\n')
    cfg = resolve({"organism": None, "seed": 1}, load_config(path), accepted=["organism", "seed"])
    assert cfg["organism"] == "tracr-sort" and cfg["algorithm"] is None
    assert cfg.ignored == [f"{path}, line 2: algorithm"]
    assert cfg.saved() == {"organism": "tracr-sort", "seed": 1}


def test_units_string_becomes_a_list(tmp_path):
    cfg = resolve({}, load_config(_write(tmp_path, 'units = "heads"\n')))
    assert cfg["units"] == ["heads"]


def test_saved_config_round_trips_through_toml(tmp_path):
    flags = {
        "organism": "tracr-sort",
        "units": ["blocks.0.attn.hook_z[heads=0]", 'odd "name"\\'],
        "threshold": 0.001,
        "per_position": True,
        "out": str(tmp_path),
        "quiet": True,
    }
    cfg = resolve(flags)
    saved = cfg.saved()
    assert "out" not in saved and "quiet" not in saved and "prompts" not in saved
    text = dump_toml(saved, header="a header\nsecond line")
    assert text.startswith("# a header\n# second line\n")
    path = _write(tmp_path, text)
    assert tomllib.loads(text)["n-examples" if "n_examples" in saved else "organism"]
    again = resolve({}, load_config(path))
    assert again.saved() == saved
