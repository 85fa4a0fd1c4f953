"""The HTTP front of the runtime: an OpenAI-compatible API, SGLang's native routes and /metrics.

It runs in its own process (`python -m sglite.http --runtime ADDRESS`, or `python -m sglite serve
--port N`, which starts both), turns HTTP requests into the runtime's typed ZeroMQ messages
(sglite.protocol) and streams the replies back as JSON or server-sent events, so the scheduler's
loop never parses JSON or holds a socket to a browser. Nothing here imports torch.

    runtime_client.py   one asyncio DEALER, replies dispatched by rid; runtime liveness and info
    server.py           the FastAPI app: /v1/*, native routes, auth, errors, disconnect -> abort
    openai_protocol.py  pydantic models of the OpenAI request bodies (the fields we serve)
    chat.py             renders chat messages (and tools) with the model's jinja template
    tool_parsers.py     tool calls out of model text: Llama-3 JSON, Qwen/Hermes <tool_call>, Mistral
    metrics.py          the Prometheus registry (requests, tokens, TTFT/ITL/E2E, runtime gauges)
    launch.py           HttpServerProcess: spawn the HTTP process beside a runtime and wait for it
"""
