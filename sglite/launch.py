"""Start the runtime as a background process, or attach to one that runs already.

    with RuntimeProcess(max_total_tokens=4096) as rt:    # spawns `python -m sglite serve ...`
        client_socket.connect(rt.address)

No torch import here: this runs in the user's process next to the frontend.

How a client notices a dead runtime: ZeroMQ never reports a vanished peer on a DEALER by itself, so
a client must not block forever in recv. Poll the socket with a short timeout (e.g. 0.5 s) and, on
each timeout, call `RuntimeProcess.is_alive()` when it owns the process (a killed runtime is seen
within one poll), or send an `InfoReq` and give up after a deadline when it only has an address.
`wait_reply` below does the first.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import time
import uuid
import weakref

import zmq

from sglite import protocol
from sglite.lang.backend.client import apply_auth
from sglite.runtime.server.args import ServerArgs, default_address


class RuntimeDied(RuntimeError):
    """The runtime process exited while a client was waiting on it."""


class ChildProcess:
    """A child process of sglite (a runtime, the HTTP front): its output in a temporary log file,
    told this process's pid (it exits when this process is gone), stopped when this object goes
    away or at exit."""

    def __init__(self, cmd: list[str], *, log_prefix: str, env: dict[str, str] | None = None):
        self._log = tempfile.NamedTemporaryFile(prefix=log_prefix, suffix=".log", delete=False)
        env = {**os.environ, **(env or {}), "SGLITE_PARENT_PID": str(os.getpid())}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        # NOTE: a weakref finalizer, so the atexit hook does not keep this object alive
        self._finalizer = weakref.finalize(self, _terminate, self.proc)
        atexit.register(self._finalizer)

    @property
    def log_path(self) -> str:
        return self._log.name

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, num_chars: int = 4000) -> str:
        with open(self._log.name, "rb") as f:
            f.seek(max(0, os.path.getsize(self._log.name) - num_chars))
            return f.read().decode(errors="replace")

    def shutdown(self) -> None:
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class RuntimeProcess(ChildProcess):
    """A runtime in a child process. `.address` is its ZMQ endpoint; `.info` its InfoOut.info."""

    def __init__(self, model_path: str | None = None, *, timeout: float = 600.0,
                 env: dict[str, str] | None = None, **server_args):
        """env: variables set for the child on top of this process's (e.g. CUDA_VISIBLE_DEVICES);
        dp_size > 1 starts a router process that starts and owns the replicas."""
        args = ServerArgs(model_path=model_path, **server_args)
        if args.address is None:
            args = ServerArgs(**{**_fields(args), "address": default_address()})
        self.args = args
        self.address = args.address
        env = dict(env or {})
        if args.auth_token:  # through the environment: a command line is visible to everyone
            env[protocol.AUTH_TOKEN_ENV] = args.auth_token
        super().__init__([sys.executable, "-m", "sglite", "serve", *args.to_cli()],
                         log_prefix="sglite-runtime-", env=env)
        try:
            self.info = self._wait_ready(timeout)
        except BaseException:
            self.shutdown()
            raise

    def _wait_ready(self, timeout: float) -> dict:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        apply_auth(sock, self.args.auth_token)
        sock.connect(self.address)
        try:
            rid = "ready-" + uuid.uuid4().hex[:8]
            sock.send(protocol.encode(protocol.InfoReq(rid=rid)))
            reply = wait_reply(sock, alive=self.is_alive, timeout=timeout,
                               describe=lambda: self.log_tail())
            if isinstance(reply, protocol.ErrorOut):
                raise RuntimeError(f"runtime failed its first info request: {reply.message}")
            return reply.info
        except RuntimeDied as e:
            raise RuntimeError(f"the runtime exited with code {self.proc.returncode} before it was "
                               f"ready; its log ({self.log_path}) ends with:\n{e}") from None
        except TimeoutError:
            raise TimeoutError(f"the runtime was not ready after {timeout:.0f} s; log "
                               f"{self.log_path} ends with:\n{self.log_tail()}") from None
        finally:
            sock.close()


def wait_reply(sock: zmq.Socket, *, alive=lambda: True, timeout: float | None = None,
               poll_s: float = 0.5, describe=lambda: "") -> protocol.Reply:
    """Receive one reply; raise RuntimeDied when `alive()` turns False, TimeoutError past timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not sock.poll(int(poll_s * 1000)):
        if not alive():
            raise RuntimeDied(describe() or "the runtime process is gone")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no reply within {timeout} s")
    return protocol.decode_reply(sock.recv())


def _fields(args: ServerArgs) -> dict:
    return {k: getattr(args, k) for k in args.__dataclass_fields__}


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
