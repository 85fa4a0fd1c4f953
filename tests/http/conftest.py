"""One HTTP front (python -m sglite.http, its own process) on the session's runtime
(tests/conftest.py's `runtime_process`, the embedded model), shared by every test here."""

import httpx
import pytest

API_KEY = "sk-sglite-test"


@pytest.fixture(scope="session")
def http_server(runtime_process):
    from sglite.http.launch import HttpServerProcess

    with HttpServerProcess(runtime_process.address, api_key=API_KEY, timeout=300) as srv:
        yield srv


@pytest.fixture(scope="session")
def http(http_server):
    """An httpx client with the API key, for the native routes and raw SSE checks."""
    with httpx.Client(base_url=http_server.url, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


@pytest.fixture(scope="session")
def oai(http_server):
    import openai

    return openai.OpenAI(base_url=http_server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)
