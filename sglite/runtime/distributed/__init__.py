"""Tensor parallelism (issue 21): process groups, sharded layers, the rank-0-decides worker loop.

Sits beside the executor: imports the models and (in a worker process) the executor's ModelRunner,
never the scheduler or the server.
"""

from sglite.runtime.distributed.group import TPGroup, make_store
from sglite.runtime.distributed.layers import head_shard, shard_config, shard_model
from sglite.runtime.distributed.runner import TensorParallel, serve_worker, start_tensor_parallel

__all__ = ["TPGroup", "TensorParallel", "head_shard", "make_store", "serve_worker", "shard_config",
           "shard_model", "start_tensor_parallel"]
