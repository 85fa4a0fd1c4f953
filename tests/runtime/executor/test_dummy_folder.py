"""load_format="dummy" with a model folder: the folder's config and tokenizer, random weights
(vLLM's meaning), so text programs run at a real model's shape from a config-only folder."""

import shutil
from pathlib import Path

from sglite.runtime.executor.model_runner import ModelRunner
from sglite.runtime.models.loader import resolve_model
from sglite.runtime.server.args import ServerArgs, detect_device


def test_dummy_weights_keep_the_folders_config_and_tokenizer(tmp_path):
    src = Path(resolve_model(None))  # the embedded model's converted folder
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy(f, tmp_path / f.name)
    runner = ModelRunner(model_path=str(tmp_path), load_format="dummy", device="cpu",
                         dtype="float32", max_total_tokens=64, max_running_requests=2,
                         config_overrides=dict(num_layers=1))
    assert runner.tokenizer is not None
    assert runner.tokenizer.encode("Paris") == runner.tokenizer.encode("Paris") != []
    assert runner.model_config.hidden_size == 576 and runner.model_config.num_layers == 1


def test_device_auto_picks_cpu_without_a_visible_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delitem(__import__("sys").modules, "torch", raising=False)
    assert detect_device() == "cpu"
    assert ServerArgs(device="cpu").device == "cpu"
