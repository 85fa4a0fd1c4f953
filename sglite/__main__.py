"""`python -m sglite serve [flags]` (also the `sglite` console script): run the runtime in the foreground.

With `--port N` (and optionally `--host`, `--api-key`, `--served-model-name`, `--tool-call-parser`)
it also serves HTTP (the OpenAI API, SGLang's native routes, /metrics) from a second process,
`python -m sglite.http`, which talks ZeroMQ to this runtime; without --port the runtime serves
ZeroMQ only.
"""

from __future__ import annotations

import sys

USAGE = ("usage: sglite serve [--model PATH] [--port N [--host H] [--api-key K]] [flags]   "
         "(sglite serve --help lists the flags)")
HTTP_FLAGS = ("--port", "--host", "--api-key", "--served-model-name", "--tool-call-parser")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "serve":
        print(f"sglite: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    from sglite.runtime.server.args import parse_args

    runtime_argv, http_ns = _split_http_args(argv[1:])
    args = parse_args(runtime_argv)
    http_proc = None
    if http_ns is not None:
        args, http_proc = _start_http(args, http_ns)
    if args.dp_size > 1:  # a router (no torch) in front of dp_size runtime processes
        from sglite.runtime.router.launch import serve
    else:
        from sglite.runtime.server.zmq_server import serve  # imports torch: after argument errors

    try:
        serve(args)
    finally:
        if http_proc is not None:
            http_proc.terminate()
            http_proc.wait(timeout=10)
    return 0


def _split_http_args(argv: list[str]):
    """(the runtime's flags, the HTTP flags parsed) or (argv, None) without --port."""
    import argparse

    from sglite.http.__main__ import add_http_args

    p = argparse.ArgumentParser(prog="sglite serve", add_help=False)
    add_http_args(p)
    if "-h" in argv or "--help" in argv:
        print("HTTP front (with --port; without it the runtime serves ZeroMQ only):\n"
              + p.format_help().partition("options:\n")[2])
    if not any(a == "--port" or a.startswith("--port=") for a in argv):
        return argv, None
    ns, rest = p.parse_known_args(argv)
    return rest, ns


def _start_http(args, http_ns):
    """Fix the runtime's address (the HTTP process must know it) and spawn the HTTP process."""
    import dataclasses
    import os
    import subprocess

    from sglite.http.__main__ import http_argv
    from sglite.runtime.server.args import default_address

    if args.address is None:
        args = dataclasses.replace(args, address=default_address())
    env = {**os.environ, "SGLITE_PARENT_PID": str(os.getpid())}
    cmd = [sys.executable, "-m", "sglite.http", "--runtime", args.address, *http_argv(http_ns)]
    print(f"sglite: serving HTTP on http://{http_ns.host}:{http_ns.port} (runtime at "
          f"{args.address})", file=sys.stderr, flush=True)
    return args, subprocess.Popen(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
