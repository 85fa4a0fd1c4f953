"""`python -m sglite serve --port N --api-key K` starts the runtime plus the HTTP process; the
HTTP process goes when the runtime's process does. (Dummy weights of SmolLM2's shape: no
tokenizer, so the prompt goes as input_ids.)"""

import signal
import subprocess
import sys
import time

import httpx

from sglite.http.launch import free_port, wait_http_ready


def test_serve_with_port_starts_the_http_front(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglite", "serve", "--port", str(port), "--api-key", "k1",
         "--load-format", "dummy", "--preset", "smollm2-135m", "--device", "cpu",
         "--max-total-tokens", "512", "--log-interval", "0"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(url, timeout=300, alive=lambda: proc.poll() is None,
                        log=lambda: (tmp_path / "serve.log").read_text())
        auth = {"Authorization": "Bearer k1"}
        assert httpx.get(url + "/get_server_info").status_code == 401
        info = httpx.get(url + "/get_server_info", headers=auth).json()
        assert info["max_total_tokens"] == 512
        out = httpx.post(url + "/generate", headers=auth, timeout=120, json={
            "input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
        assert out.status_code == 200 and out.json()["meta_info"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while True:  # the HTTP process went with it
        try:
            httpx.get(url + "/health", timeout=1)
        except httpx.HTTPError:
            break
        assert time.monotonic() < deadline, "the HTTP process outlived `sglite serve`"
        time.sleep(0.2)
