"""Quantized weights, chosen by name (`--quantization`): "fp8" (sglite.runtime.models.quant.fp8).

`load_quantized(model, weights, method=..., checkpoint_config=...)` replaces a model's plain
`load_weights`: FP8 checkpoints (config.json `quantization_config`) load as published, bf16/fp16
ones load as usual and are quantized right after. `checkpoint_quantization(folder)` reads what a
checkpoint says about itself, so that an FP8 checkpoint is served in FP8 without the flag.
"""

from __future__ import annotations

import json
from pathlib import Path

from sglite.runtime.models.quant.fp8 import Fp8LinearMethod, load_fp8, quantize_model

QUANTIZATIONS = ("fp8",)


def checkpoint_quantization(folder: str | None) -> dict | None:
    """The folder's config.json `quantization_config` (None without one)."""
    if folder is None or not (Path(folder) / "config.json").is_file():
        return None
    return json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")


def resolve_quantization(requested: str | None, checkpoint_config: dict | None) -> str | None:
    """The method to run: the requested one, or the checkpoint's own; they must agree."""
    published = None
    if checkpoint_config is not None:
        published = checkpoint_config.get("quant_method")
        if published not in QUANTIZATIONS:
            raise ValueError(f"checkpoint quantization {published!r} is not supported "
                             f"(supported: {', '.join(QUANTIZATIONS)})")
    if requested is not None and requested not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {requested!r}; choose from {', '.join(QUANTIZATIONS)}")
    if requested is not None and published is not None and requested != published:
        raise ValueError(f"quantization={requested!r} but the checkpoint is {published!r}")
    return requested or published


def load_quantized(model, weights, *, method: str, checkpoint_config: dict | None) -> None:
    """Load `weights` (name, tensor) pairs into `model` quantized by `method`; weights None:
    the model already holds its (dummy) weights, quantize them in place."""
    assert method == "fp8", method
    if weights is None:
        quantize_model(model)
    elif checkpoint_config is not None:
        load_fp8(model, weights, checkpoint_config)
    else:
        model.load_weights(weights)
        quantize_model(model)


__all__ = ["Fp8LinearMethod", "QUANTIZATIONS", "checkpoint_quantization", "load_quantized",
           "resolve_quantization"]
