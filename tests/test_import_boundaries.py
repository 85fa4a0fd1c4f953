"""The import rules of docs/architecture.md, checked in a fresh interpreter each."""

import subprocess
import sys

import pytest


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    return set(out.split())


def test_frontend_imports_neither_torch_nor_the_runtime_core():
    mods = _loaded_after("import sglite as sgl\nimport sglite.lang.backend.runtime_endpoint\n"
                         "import sglite.launch")
    assert "torch" not in mods
    # the launcher reads only the CLI definitions (args.py, no torch) of the runtime package
    assert {m for m in mods if m.startswith("sglite.runtime")} <= {"sglite.runtime",
                                                                    "sglite.runtime.args"}


@pytest.mark.parametrize("module", ["decode_attention", "extend_attention", "store_kv", "norm",
                                    "rotary", "activation", "reference"])
def test_kernels_import_nothing_of_the_runtime(module):
    # (importing any submodule runs sglite/__init__.py, the public frontend names; that is all)
    mods = _loaded_after(f"import sglite.kernels.{module}")
    assert {m for m in mods if m.startswith("sglite.runtime")} == set()


def test_memory_never_imports_the_executor():
    mods = _loaded_after("import sglite.runtime.mem.radix_cache, sglite.runtime.mem.token_pool, "
                         "sglite.runtime.mem.req_to_token, sglite.runtime.mem.kv_cache")
    executor = ("sglite.runtime.model_runner", "sglite.runtime.models", "sglite.runtime.attention",
                "sglite.runtime.cuda_graph")
    assert not {m for m in mods if m.startswith(executor)}
