"""Data parallelism: a router process in front of N runtime replicas (`sglite serve --dp-size N`).

No torch here: the router only moves protocol messages. `prefix_tree` (what was sent where),
`policy` (cache-aware choice balanced against load), `router` (the ZeroMQ loop), `launch` (start
the replicas), `__main__` (attach to replicas that run already).
"""
