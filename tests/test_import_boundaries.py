"""The import rules of docs/architecture.md, checked in a fresh interpreter each.

Layers, top to bottom: server → scheduler → (executor, sampling) → models → mem; kernels import
nothing of sglite. A package may import the layers below it, never the ones above."""

import pkgutil
import subprocess
import sys

import pytest

import sglite.runtime

RT = "sglite.runtime"


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    return set(out.split())


def _modules_of(package: str) -> list[str]:
    root = sys.modules[RT].__path__[0] + "/" + package.replace(".", "/")
    found = [f"{RT}.{package}"]
    for info in pkgutil.walk_packages([root], prefix=f"{RT}.{package}."):
        found.append(info.name)
    return found


def _runtime_loaded(package: str, skip: tuple[str, ...] = ()) -> set[str]:
    mods = [m for m in _modules_of(package) if not m.endswith(skip)]
    return {m for m in _loaded_after("import " + ", ".join(mods)) if m.startswith(RT + ".")}


def _under(mods: set[str], *packages: str) -> set[str]:
    return {m for m in mods if any(m == f"{RT}.{p}" or m.startswith(f"{RT}.{p}.") for p in packages)}


def test_frontend_imports_neither_torch_nor_the_runtime_core():
    mods = _loaded_after("import sglite as sgl\nimport sglite.lang.backend.runtime_endpoint\n"
                         "import sglite.launch")
    assert "torch" not in mods
    # the launcher reads only the CLI definitions (server/args.py, no torch) of the runtime package
    assert {m for m in mods if m.startswith(RT)} <= {RT, f"{RT}.server", f"{RT}.server.args"}


@pytest.mark.parametrize("module", ["decode_attention", "extend_attention", "store_kv", "norm",
                                    "rotary", "activation", "reference", "decode_batch",
                                    "top_k_top_p"])
def test_kernels_import_nothing_of_the_runtime(module):
    # (importing any submodule runs sglite/__init__.py, the public frontend names; that is all)
    mods = _loaded_after(f"import sglite.kernels.{module}")
    assert {m for m in mods if m.startswith(RT)} == set()


def test_memory_imports_only_the_model_config():
    # (the config checks the architecture against the registry, which names modules, loads none)
    mods = _runtime_loaded("mem")
    assert not _under(mods, "executor", "scheduler", "server", "sampling")
    assert _under(mods, "models") <= {f"{RT}.models", f"{RT}.models.config", f"{RT}.models.registry"}


def test_models_see_only_the_attention_contract_of_the_executor():
    mods = _runtime_loaded("models")
    assert not _under(mods, "scheduler", "server", "sampling")
    # and the copies that never wait for the GPU (a pageable one in a forward waits for the last)
    assert _under(mods, "executor") <= {f"{RT}.executor", f"{RT}.executor.attention",
                                        f"{RT}.executor.attention.base", f"{RT}.executor.transfer"}


def test_executor_never_imports_the_scheduler_or_the_server():
    # triton_backend and cuda_graph import triton kernels; they follow the same rule
    assert not _under(_runtime_loaded("executor"), "scheduler", "server", "sampling")


def test_sampling_never_imports_the_scheduler_or_the_server():
    mods = _runtime_loaded("sampling")
    assert not _under(mods, "scheduler", "server")
    assert _under(mods, "executor") <= {f"{RT}.executor", f"{RT}.executor.transfer"}


def test_scheduler_never_imports_the_server():
    assert not _under(_runtime_loaded("scheduler"), "server")
