"""`python -m sglite.runtime.router --address ADDR --replica A --replica B ...`: route to runtimes
that run already (started by hand, on other hosts over tcp://). `sglite serve --dp-size N` starts
its own replicas instead (sglite.runtime.router.launch)."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid

import zmq

from sglite import protocol
from sglite.launch import wait_reply
from sglite.runtime.router.policy import RoutingConfig
from sglite.runtime.router.router import Router


def main(argv: list[str] | None = None) -> None:
    d = RoutingConfig
    p = argparse.ArgumentParser(prog="python -m sglite.runtime.router")
    p.add_argument("--address", required=True, help="endpoint the clients connect to")
    p.add_argument("--replica", action="append", required=True, help="a runtime's address")
    p.add_argument("--cache-threshold", type=float, default=d.cache_threshold)
    p.add_argument("--balance-abs-threshold", type=int, default=d.balance_abs_threshold)
    p.add_argument("--balance-rel-threshold", type=float, default=d.balance_rel_threshold)
    p.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds each replica has to answer a first InfoReq")
    ns = p.parse_args(argv)
    for address in ns.replica:
        error = check_replica(address, ns.ready_timeout)
        if error:
            sys.exit(f"sglite router: replica {address}: {error}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = RoutingConfig(cache_threshold=ns.cache_threshold,
                           balance_abs_threshold=ns.balance_abs_threshold,
                           balance_rel_threshold=ns.balance_rel_threshold)
    Router(ns.address, ns.replica, config=config).run()


def check_replica(address: str, timeout: float) -> str | None:
    """None when a runtime answers at `address` (an ipc:// path nothing binds would otherwise
    take requests and never answer them), else what went wrong."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(protocol.encode(protocol.InfoReq(rid="ready-" + uuid.uuid4().hex[:8])))
        reply = wait_reply(sock, timeout=timeout)
        return reply.message if isinstance(reply, protocol.ErrorOut) else None
    except TimeoutError:
        return f"no answer to an info request within {timeout:.0f} s"
    except zmq.ZMQError as e:
        return str(e)
    finally:
        sock.close()


if __name__ == "__main__":
    main()
