"""`endpoint`: the frontend attached (RuntimeEndpoint) to the session's runtime process on the
embedded model (tests/conftest.py's `runtime_process`), with its liveness check wired in."""

import pytest

import sglite as sgl


@pytest.fixture(scope="session")
def endpoint(runtime_process):
    backend = sgl.RuntimeEndpoint(runtime_process.address, _is_alive=runtime_process.is_alive)
    yield backend
    backend.shutdown()


@pytest.fixture
def default_backend(endpoint):
    sgl.set_default_backend(endpoint)
    yield endpoint
    sgl.set_default_backend(None)
