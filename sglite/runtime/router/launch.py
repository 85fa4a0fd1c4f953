"""`sglite serve --dp-size N`: start N runtime replicas, then route to them from this process.

Each replica is a `sglite.launch.RuntimeProcess` (its own `python -m sglite serve`, dp size 1) on
a fresh ipc:// address, started in parallel; the router binds the address the clients were told
(args.address) only once every replica answered, so a client's first InfoReq waits for all of
them. The replicas watch this process (SGLITE_PARENT_PID) and exit when it is gone.

GPUs: with device "cuda" each replica gets its own slice of the visible GPUs through
CUDA_VISIBLE_DEVICES (tp_size of them, when tensor parallelism is on), so replica i runs on
GPUs [i * tp, (i + 1) * tp). An explicit "cuda:N" puts every replica on that GPU, as asked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

from sglite.runtime.router.router import Router
from sglite.runtime.server.args import ServerArgs, default_address

logger = logging.getLogger("sglite.router")


def serve(args: ServerArgs) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    processes = start_replicas(args)
    try:
        Router(args.bind_address, [p.address for p in processes], processes=processes).run()
    finally:
        for p in processes:
            p.shutdown()


def start_replicas(args: ServerArgs) -> list:
    """args.dp_size RuntimeProcesses, started in parallel; all are shut down if one fails."""
    from sglite.launch import RuntimeProcess

    envs = replica_envs(args)
    replica_args = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    replica_args.update(dp_size=1)
    started: list = [None] * args.dp_size
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            kw = {**replica_args, "address": default_address()}
            started[i] = RuntimeProcess(kw.pop("model_path"), env=envs[i], **kw)
        except BaseException as e:  # reported below, once all threads are done
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(args.dp_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for p in started:
            if p is not None:
                p.shutdown()
        raise errors[0]
    logger.info("started %d replicas: %s", len(started), ", ".join(p.address for p in started))
    return started


def replica_envs(args: ServerArgs) -> list[dict[str, str]]:
    """Extra environment per replica: its CUDA_VISIBLE_DEVICES slice when device is "cuda"."""
    if args.device != "cuda":
        return [{} for _ in range(args.dp_size)]
    per = getattr(args, "tp_size", 1)
    gpus = visible_gpus()
    if len(gpus) < args.dp_size * per:
        raise ValueError(f"dp_size {args.dp_size} x tp_size {per} needs {args.dp_size * per} "
                         f"GPUs; {len(gpus)} visible ({gpus}); pass --device cuda:N to put every "
                         f"replica on one GPU (then size --max-total-tokens for the share)")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per:(i + 1) * per])}
            for i in range(args.dp_size)]


def visible_gpus() -> list[str]:
    """GPU ids this process may use, without importing torch: CUDA_VISIBLE_DEVICES, else the
    driver's device nodes."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in (s.strip() for s in visible.split(",")) if g and g != "-1"]
    nodes = [n for n in os.listdir("/dev") if n.startswith("nvidia") and n[6:].isdigit()]
    return sorted((n[6:] for n in nodes), key=int)
