"""SGLang's public frontend names with SGLang's semantics (issue 16), on the in-process fake
backend; the e2e counterparts run SGLang's test programs (test_sglang_programs.py)."""

import subprocess
import sys

import pytest

import sglite as sgl

from .fake_backend import FakeBackend


@pytest.fixture
def backend():
    return FakeBackend()


def test_engine_is_exported_lazily():
    code = "import sys, sglite; print('sglite.engine' in sys.modules, 'Engine' in sglite.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]  # `import sglite` does not load the engine
    engine = pytest.importorskip("sglite.engine")
    assert sgl.Engine is engine.Engine
