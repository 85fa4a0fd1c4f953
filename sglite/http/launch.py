"""HttpServerProcess: the HTTP front in a child process beside a runtime (no torch here).

    with RuntimeProcess() as rt, HttpServerProcess(rt.address, api_key="k") as http:
        openai.OpenAI(base_url=http.url + "/v1", api_key="k")
"""

from __future__ import annotations

import socket
import sys
import time
import urllib.error
import urllib.request

from sglite.launch import ChildProcess


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HttpServerProcess(ChildProcess):
    def __init__(self, runtime_address: str, *, host: str = "127.0.0.1", port: int | None = None,
                 api_key: str | None = None, served_model_name: str | None = None,
                 tool_call_parser: str = "auto", timeout: float = 600.0):
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "sglite.http", "--runtime", runtime_address, "--host", host,
               "--port", str(self.port), "--tool-call-parser", tool_call_parser,
               "--runtime-timeout", str(timeout)]
        if api_key:
            cmd += ["--api-key", api_key]
        if served_model_name:
            cmd += ["--served-model-name", served_model_name]
        super().__init__(cmd, log_prefix="sglite-http-")
        try:
            wait_http_ready(self.url, timeout=timeout, alive=self.is_alive, log=self.log_tail)
        except BaseException:
            self.shutdown()
            raise

def wait_http_ready(url: str, *, timeout: float, alive=lambda: True, log=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if not alive():
            raise RuntimeError(f"the HTTP server exited before it was ready; its log:\n{log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the HTTP server at {url} was not ready after {timeout:.0f} s; "
                               f"its log:\n{log()}")
        time.sleep(0.2)

