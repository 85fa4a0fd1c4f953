"""`python -m sglite.http --runtime ADDRESS [--host H] [--port P] [--api-key K]`: serve HTTP in
front of a runtime that runs already (`python -m sglite serve --port P` starts both)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglite.http",
                                description="OpenAI-compatible HTTP front of an sglite runtime.")
    add_http_args(p)
    p.add_argument("--runtime", required=True, help="the runtime's ZMQ address (ipc:// or tcp://)")
    return p


def add_http_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=30000, help="serve HTTP on this port")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every "
                   "route but /health")
    p.add_argument("--served-model-name", default=None,
                   help="the model name of /v1/models (default: the runtime's model path)")
    p.add_argument("--tool-call-parser", default="auto",
                   help="auto (from the chat template), hermes (Qwen), llama3 or mistral")
    p.add_argument("--runtime-timeout", type=float, default=900.0,
                   help="seconds to wait for the runtime to answer at start")


def http_argv(ns) -> list[str]:
    """The flags of add_http_args, back from parsed values."""
    argv = ["--host", ns.host, "--port", str(ns.port), "--tool-call-parser", ns.tool_call_parser,
            "--runtime-timeout", str(ns.runtime_timeout)]
    if ns.api_key:
        argv += ["--api-key", ns.api_key]
    if ns.served_model_name:
        argv += ["--served-model-name", ns.served_model_name]
    return argv


async def _watch_parent(server, parent_pid: int) -> None:
    while not server.should_exit:
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            logging.getLogger("sglite.http").info("the launching process is gone; shutting down")
            server.should_exit = True


def serve(ns) -> None:
    import resource

    import uvicorn

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one socket per client
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from sglite.http.server import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(ns.runtime, api_key=ns.api_key, served_model_name=ns.served_model_name,
                     tool_call_parser=ns.tool_call_parser, runtime_timeout=ns.runtime_timeout)
    loop = "uvloop" if _has("uvloop") else "asyncio"
    config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level="warning",
                            access_log=False, loop=loop, timeout_keep_alive=30,
                            backlog=4096)
    server = uvicorn.Server(config)
    parent = int(os.environ.get("SGLITE_PARENT_PID", "0")) or None

    async def main():
        if parent is not None:
            asyncio.ensure_future(_watch_parent(server, parent))
        await server.serve()

    asyncio.run(main()) if loop == "asyncio" else __import__("uvloop").run(main())


def _has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv=None) -> int:
    ns = make_parser().parse_args(argv)
    serve(ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
