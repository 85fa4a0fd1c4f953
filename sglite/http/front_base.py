"""What HttpFront's routes share (sglite.http.server): the runtime client and the state of the
front, one HTTP request's GenerateReqs and the replies that arrive for each (Choice), waiting for
them while watching for the client's disconnect, the sampling parameters and the constraint of an
OpenAI body, usage, and SSE framing."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from sglite import protocol
from sglite.http import tool_parsers
from sglite.http.errors import ApiError, ClientGone, error_body
from sglite.http.metrics import Metrics
from sglite.http.runtime_client import AsyncRuntimeClient

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def sse_event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class Choice:
    """One GenerateReq of an HTTP request and what arrived for it."""

    __slots__ = ("index", "rid", "text", "meta", "finished", "error", "held", "sent", "output_ids",
                 "lp_sent", "ended")

    def __init__(self, index: int, rid: str):
        self.index, self.rid = index, rid
        self.text, self.meta, self.finished, self.error = "", {}, False, None
        self.ended = False  # FrontBase._end ran: forgotten in the front (aborted if unfinished)
        self.output_ids: list[int] | None = None  # from the last GenerateOut
        self.lp_sent = 0  # (streams) output logprob entries already sent
        self.held = 0  # (chat streaming with tools) chars of text emitted as content so far
        self.sent = ""


class EndingStream(StreamingResponse):
    """A streamed response that ends its requests when it is over, however it is: `end` runs
    (once) after the body's generator is closed. Without this a client gone before the first write
    left them registered and running for good (Starlette then never iterates the body, and a
    generator that never started never runs its `finally`), and one gone between two writes left
    them until the suspended generator happened to be collected. SSE unless told otherwise."""

    def __init__(self, body, end, *, media_type: str = "text/event-stream", headers=SSE_HEADERS):
        super().__init__(body, media_type=media_type, headers=headers)
        self._end_choices = end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._end_choices()


class FrontBase:
    """The front's state and the request machinery its route mixins (openai_routes.py,
    native_routes.py) and sglite.http.server.HttpFront share."""

    def __init__(self, runtime_address: str, *, api_key: str | None = None,
                 served_model_name: str | None = None, tool_call_parser: str = "auto",
                 runtime_timeout: float = 600.0):
        self.client = AsyncRuntimeClient(runtime_address)
        self.api_key, self.served_model_name = api_key, served_model_name
        self.tool_call_parser_name = tool_call_parser
        self.runtime_timeout = runtime_timeout
        self.user_rids: dict[str, list[str]] = {}  # rid given by the user -> runtime rids
        self.model_name = served_model_name or "sglite"
        self.metrics: Metrics | None = None
        self.tool_parser: tool_parsers.ToolParser | None = None

    # ---- helpers
    async def _json(self, request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    @staticmethod
    def _validate(model, body: dict):
        try:
            return model.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err.get("loc", ())) or None
            raise ApiError(400, f"{param}: {err.get('msg')}" if param else str(e),
                           param=param) from None

    def _start(self, reqs: list[protocol.GenerateReq], user_rid: str | None = None,
               ) -> tuple[asyncio.Queue, dict[str, Choice]]:
        q: asyncio.Queue = asyncio.Queue()
        choices = {}
        for i, req in enumerate(reqs):
            self.client.register(req.rid, q)
            choices[req.rid] = Choice(i, req.rid)
        if user_rid is not None:
            self.user_rids[user_rid] = [r.rid for r in reqs]
        return q, choices

    async def _replies(self, request: Request, route: str, reqs: list[protocol.GenerateReq], q,
                       choices: dict[str, Choice], t0: float, *, stream: bool, user_rid: str | None):
        """Send the request's GenerateReqs and wait: for a whole answer until every choice has
        finished (recorded, the choices ended; returns None), for a stream for the first replies
        (returned; the stream ends the choices). A reply that is an error raises ApiError, a
        client that left ClientGone; the choices end then too."""
        try:
            for req in reqs:
                await self.client.send(req)
            if stream:
                first = await self._first(request, q, choices)
            else:
                first = await self._collect(request, q, choices)
            self._check_errors(choices)
        except BaseException:
            self._end(choices, user_rid)
            raise
        if not stream:
            self._record(route, choices, t0)
            self._end(choices, user_rid)  # all finished: the rids are forgotten (nothing to abort)
        return first

    def _end(self, choices: dict[str, Choice], user_rid: str | None) -> None:
        """Forget the choices' rids, abort the unfinished ones, release the user rid: by _replies
        (a whole answer, or a failure before the stream) or by the streamed response after its
        body (_stream_response). A second call changes nothing."""
        if all(c.ended for c in choices.values()):
            return
        unfinished = [c.rid for c in choices.values() if not (c.finished or c.error)]
        for c in choices.values():
            c.ended = True
            self.client.forget(c.rid)
        if unfinished:
            self.client.abort_soon(unfinished)
        if user_rid is not None:
            self.user_rids.pop(user_rid, None)

    def _absorb(self, choices: dict[str, Choice], items: list) -> set[str]:
        """Apply replies; return the rids that changed."""
        changed = set()
        for item in items:
            c = choices.get(item.rid)
            if c is None:
                continue
            changed.add(item.rid)
            if isinstance(item, protocol.ErrorOut):
                c.error = item.message
            else:
                c.text += item.text
                c.meta = item.meta_info
                c.finished = c.finished or item.finished
                if item.output_ids is not None:
                    c.output_ids = item.output_ids
        return changed

    async def _collect(self, request: Request, q, choices: dict[str, Choice]) -> None:
        """Wait until every choice finished; abort them all if the client disconnects first."""
        async def gather():
            pending = len(choices)
            while pending:
                items = [await self.client.recv(q)] + self.client.drain(q)
                for rid in self._absorb(choices, items):
                    c = choices[rid]
                    if c.finished or c.error:
                        pending -= 1
                # ErrorOut or finished chunk each end a choice exactly once
        await unless_disconnected(request, gather())

    async def _first(self, request: Request, q, choices) -> list:
        """The first replies of a stream (an error there becomes the HTTP status)."""
        items = [await unless_disconnected(request, self.client.recv(q))] + self.client.drain(q)
        self._absorb(choices, items)
        return items

    def _stream_response(self, route: str, q, choices: dict[str, Choice], first: list, t0: float, emit, *,
                         user_rid: str | None, **options) -> EndingStream:
        """The SSE response of a stream (see _stream, which options go to); the choices end (unfinished
        ones aborted) once it is over, however it stops."""
        events = self._stream(route, q, choices, first, t0, emit, **options)
        return EndingStream(events, lambda: self._end(choices, user_rid))

    async def _stream(self, route: str, q, choices: dict[str, Choice], first: list, t0: float,
                      emit, *, opening=(), closing=None, timed: bool = True):
        """A streamed response's SSE events: `opening` events, then for every choice that
        received replies the events of emit(choice) (an error there becomes an error event),
        until all have finished; then closing() (an event, or None) and [DONE]. With `timed`, the
        time to the first write and between writes go to the metrics. _stream_response ends the
        choices."""
        for event in opening:
            yield event
        changed = {item.rid for item in first}
        last, ttft_seen = time.perf_counter(), False
        while True:
            for rid in changed:
                c = choices[rid]
                if c.error is not None:
                    yield sse_event(error_body(400, c.error))
                    continue
                for event in emit(c):
                    yield event
            now = time.perf_counter()
            if timed and not ttft_seen:
                self.metrics.ttft.observe(now - t0)
                ttft_seen = True
            elif timed:
                self.metrics.itl.observe(now - last)
            last = now
            if all(c.finished or c.error for c in choices.values()):
                break
            items = [await self.client.recv(q)] + self.client.drain(q)
            changed = self._absorb(choices, items)
        self._record(route, choices, t0)
        if closing is not None and (event := closing()) is not None:
            yield event
        yield DONE

    def _check_errors(self, choices) -> None:
        for c in choices.values():
            if c.error is not None:
                raise ApiError(400, c.error)

    def _sampling(self, body, *, max_tokens, constraint: dict, index: int) -> dict:
        sp: dict[str, Any] = {
            "max_new_tokens": max_tokens if max_tokens is not None
            else int(self.client.info.get("context_length") or 4096),
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "top_k": body.top_k, "min_p": body.min_p,
            "frequency_penalty": body.frequency_penalty, "presence_penalty": body.presence_penalty,
            "repetition_penalty": body.repetition_penalty, "min_new_tokens": body.min_tokens,
            "ignore_eos": body.ignore_eos, "skip_special_tokens": body.skip_special_tokens,
        }
        if body.stop:
            sp["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
        if body.stop_token_ids:
            sp["stop_token_ids"] = list(body.stop_token_ids)
        if body.seed is not None:
            sp["seed"] = body.seed + index  # n choices with one seed still differ
        sp.update(constraint)
        return sp

    @staticmethod
    def _constraint(body, extra: dict | None = None) -> dict:
        c: dict[str, Any] = {}
        rf = body.response_format
        if rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ApiError(400, "response_format json_schema needs json_schema.schema",
                               param="response_format")
            c["json_schema"] = json.dumps(rf.json_schema.schema_)
        elif rf is not None and rf.type == "json_object":
            c["json_schema"] = json.dumps({"type": "object"})
        if body.regex is not None:
            c["regex"] = body.regex
        if body.ebnf is not None:
            c["grammar"] = body.ebnf
        if body.json_schema is not None:
            js = body.json_schema
            c["json_schema"] = js if isinstance(js, str) else json.dumps(js)
        if extra:
            c.update(extra)
        if len(c) > 1:
            raise ApiError(400, f"at most one constraint may be given, got {sorted(c)}")
        return c

    def _usage(self, choices, n_per_prompt: int = 1) -> dict:
        cs = sorted(choices.values(), key=lambda c: c.index)
        prompt = sum(c.meta.get("prompt_tokens", 0) for c in cs[::n_per_prompt])
        cached = sum(c.meta.get("cached_tokens", 0) for c in cs[::n_per_prompt])
        completion = sum(c.meta.get("completion_tokens", 0) for c in cs)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _record(self, route: str, choices, t0: float) -> None:
        e2e = time.perf_counter() - t0
        for c in choices.values():
            if c.error is None:
                self.metrics.finished(route, c.meta, e2e)
            else:
                self.metrics.failed(route, "error")


async def unless_disconnected(request: Request, coro):
    """coro's result, or ClientGone (coro cancelled) if the client disconnects first."""
    waiter = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if waiter not in done:
        waiter.cancel()
        raise ClientGone()
    return waiter.result()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
