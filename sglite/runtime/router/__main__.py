"""`python -m sglite.runtime.router --address ADDR --replica A --replica B ...`: route to runtimes
that run already (started by hand, on other hosts over tcp://). `sglite serve --dp-size N` starts
its own replicas instead (sglite.runtime.router.launch)."""

from __future__ import annotations

import argparse
import logging

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
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = RoutingConfig(cache_threshold=ns.cache_threshold,
                           balance_abs_threshold=ns.balance_abs_threshold,
                           balance_rel_threshold=ns.balance_rel_threshold)
    Router(ns.address, ns.replica, config=config).run()


if __name__ == "__main__":
    main()
