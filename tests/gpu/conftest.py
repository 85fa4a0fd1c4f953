"""GPU-only runtime tests: skipped as a whole without CUDA (CI has no GPU)."""

import pytest
import torch


def pytest_collection_modifyitems(items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "tests/gpu/" in str(item.fspath) and not torch.cuda.is_available():
            item.add_marker(skip)
