"""The FastAPI app: OpenAI's /v1 routes, SGLang's native routes, /metrics, and /sglite/* (the
protocol messages over HTTP, for sglite.lang.backend.http_client.HttpClient).

One HTTP request becomes one GenerateReq per choice (n, or a list of prompts), all of whose
replies land in one asyncio queue. A streamed response merges the runtime's deltas that queued up
since the last write into one SSE event. A client that goes away (a failed write, or
http.disconnect while it waits for a whole answer) gets its requests aborted, which frees their
KV in the runtime. Errors are OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sglite import protocol
from sglite.http import tool_parsers
from sglite.http.chat import ChatTemplateError, render_chat
from sglite.http.metrics import CONTENT_TYPE, Metrics
from sglite.http.openai_protocol import ChatCompletionRequest, CompletionRequest
from sglite.http.runtime_client import AsyncRuntimeClient, RuntimeUnavailable

logger = logging.getLogger("sglite.http")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 499: "client_closed_request",
                500: "internal_server_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code if code is not None else status


class ClientGone(Exception):
    pass


def error_body(status: int, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else status}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class _AuthMiddleware:
    """Bearer api_key on every route but /health (pure ASGI: streaming passes straight through)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, b"Bearer " + api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if auth != self.expected:
                body = json.dumps(error_body(401, "Incorrect API key provided (send it as "
                                             "'Authorization: Bearer KEY').",
                                             code="invalid_api_key")).encode()
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class _Choice:
    """One GenerateReq of an HTTP request and what arrived for it."""

    __slots__ = ("index", "rid", "text", "meta", "finished", "error", "held", "sent", "output_ids",
                 "lp_sent")

    def __init__(self, index: int, rid: str):
        self.index, self.rid = index, rid
        self.text, self.meta, self.finished, self.error = "", {}, False, None
        self.output_ids: list[int] | None = None  # from the last GenerateOut
        self.lp_sent = 0  # (streams) output logprob entries already sent
        self.held = 0  # (chat streaming with tools) chars of text emitted as content so far
        self.sent = ""


class HttpFront:
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

    # ---- app
    def build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app):
            info = await self.client.start(self.runtime_timeout)
            self.model_name = self.served_model_name or str(info.get("model_path") or "sglite")
            self.metrics = Metrics(self.model_name)
            name = self.tool_call_parser_name
            if name == "auto":
                name = tool_parsers.detect_parser(info.get("chat_template"))
            self.tool_parser = tool_parsers.get_parser(name) if name else None
            logger.info("HTTP front ready: model %s, tool-call parser %s", self.model_name, name)
            yield
            await self.client.close()

        app = FastAPI(title="sglite", lifespan=lifespan, docs_url=None, redoc_url=None,
                      openapi_url=None)
        if self.api_key:
            app.add_middleware(_AuthMiddleware, api_key=self.api_key)

        @app.exception_handler(ApiError)
        async def _api_error(request, e: ApiError):
            return error_response(e)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request, e: StarletteHTTPException):
            return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

        @app.exception_handler(RuntimeUnavailable)
        async def _unavailable(request, e):
            return JSONResponse(error_body(503, str(e)), status_code=503)

        @app.exception_handler(Exception)
        async def _internal(request, e):
            logger.exception("request failed")
            return JSONResponse(error_body(500, f"{type(e).__name__}: {e}"), status_code=500)

        r = app.add_api_route
        r("/v1/models", self.models, methods=["GET"])
        r("/v1/completions", self.completions, methods=["POST"])
        r("/v1/chat/completions", self.chat_completions, methods=["POST"])
        r("/generate", self.generate, methods=["POST", "PUT"])
        r("/health", self.health, methods=["GET"])
        r("/health_generate", self.health_generate, methods=["GET"])
        r("/get_model_info", self.get_model_info, methods=["GET"])
        r("/get_server_info", self.get_server_info, methods=["GET"])
        r("/flush_cache", self.flush_cache, methods=["GET", "POST"])
        r("/abort_request", self.abort_request, methods=["POST"])
        r("/metrics", self.metrics_route, methods=["GET"])
        r("/sglite/request", self.native_request, methods=["POST"])
        r("/sglite/send", self.native_send, methods=["POST"])
        return app

    # ---- small routes
    async def models(self):
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "sglite", "root": self.model_name,
            "max_model_len": self.client.info.get("context_length")}]}

    async def health(self):
        if self.client.healthy:
            return Response(status_code=200)
        return Response(status_code=503)

    async def health_generate(self, request: Request):
        rid = self.client.new_rid("health")
        q = asyncio.Queue()
        self.client.register(rid, q)
        await self.client.send(protocol.GenerateReq(
            rid=rid, input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0}))
        try:
            reply = await asyncio.wait_for(self.client.recv(q), 20.0)
        except (asyncio.TimeoutError, RuntimeUnavailable):
            self.client.abort_soon([rid])
            return Response(status_code=503)
        finally:
            self.client.forget(rid)
        return Response(status_code=200 if isinstance(reply, protocol.GenerateOut) else 503)

    async def get_model_info(self):
        info = await self.client.fresh_info()
        return {"model_path": info.get("model_path"), "tokenizer_path": info.get("model_path"),
                "is_generation": True, "served_model_name": self.model_name,
                "context_length": info.get("context_length"), "vocab_size": info.get("vocab_size")}

    async def get_server_info(self):
        info = dict(await self.client.fresh_info(max_age=0))
        info.update(served_model_name=self.model_name, api_key_required=bool(self.api_key),
                    tool_call_parser=self.tool_parser.name if self.tool_parser else None,
                    runtime_address=self.client.address)
        return info

    async def flush_cache(self):
        reply = await self.client.call(protocol.FlushCacheReq(rid=self.client.new_rid("flush")),
                                       timeout=60)
        if isinstance(reply, protocol.ErrorOut):
            raise ApiError(400, reply.message)
        return PlainTextResponse("Cache flushed.\n")

    async def abort_request(self, request: Request):
        body = await self._json(request)
        rids = []
        if body.get("abort_all"):
            rids = [r for rs in self.user_rids.values() for r in rs]
        elif isinstance(body.get("rid"), str):
            rids = self.user_rids.get(body["rid"], [])
        else:
            raise ApiError(400, "give 'rid' (a string) or 'abort_all': true", param="rid")
        for rid in rids:
            await self.client.send(protocol.AbortReq(rid=rid))
        return {"aborted": len(rids)}

    async def metrics_route(self):
        try:
            info = await self.client.fresh_info(timeout=5.0)
        except RuntimeUnavailable:
            info = self.client.info
        return Response(self.metrics.render(info), media_type=CONTENT_TYPE)

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
               ) -> tuple[asyncio.Queue, dict[str, _Choice]]:
        q: asyncio.Queue = asyncio.Queue()
        choices = {}
        for i, req in enumerate(reqs):
            self.client.register(req.rid, q)
            choices[req.rid] = _Choice(i, req.rid)
        if user_rid is not None:
            self.user_rids[user_rid] = [r.rid for r in reqs]
        return q, choices

    async def _send_all(self, reqs) -> None:
        for req in reqs:
            await self.client.send(req)

    def _end(self, choices: dict[str, _Choice], user_rid: str | None) -> None:
        unfinished = [c.rid for c in choices.values() if not (c.finished or c.error)]
        for c in choices.values():
            self.client.forget(c.rid)
        if unfinished:
            self.client.abort_soon(unfinished)
        if user_rid is not None:
            self.user_rids.pop(user_rid, None)

    def _absorb(self, choices: dict[str, _Choice], items: list) -> set[str]:
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

    async def _collect(self, request: Request, q, choices: dict[str, _Choice]) -> None:
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
        waiter = asyncio.ensure_future(gather())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if waiter not in done:
            waiter.cancel()
            raise ClientGone()
        waiter.result()

    async def _first(self, request: Request, q, choices) -> list:
        """The first replies of a stream (an error there becomes the HTTP status)."""
        waiter = asyncio.ensure_future(self.client.recv(q))
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if waiter not in done:
            waiter.cancel()
            raise ClientGone()
        items = [waiter.result()] + self.client.drain(q)
        self._absorb(choices, items)
        return items

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

    # ---- /v1/completions
    async def completions(self, request: Request):
        t0 = time.perf_counter()
        body = self._validate(CompletionRequest, await self._json(request))
        prompts = _prompts(body.prompt)
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        constraint = self._constraint(body)
        want_lp = body.logprobs is not None
        reqs, echo = [], []
        for p in prompts:
            for j in range(body.n):
                i = len(reqs)
                kw = {"text": p} if isinstance(p, str) else {"input_ids": p}
                reqs.append(protocol.GenerateReq(
                    rid=self.client.new_rid("cmpl"), stream=body.stream, **kw,
                    sampling_params=self._sampling(body, max_tokens=body.max_tokens if
                                                   body.max_tokens is not None else 16,
                                                   constraint=constraint, index=i),
                    return_logprob=want_lp, top_logprobs_num=body.logprobs or 0))
                echo.append(p if body.echo and isinstance(p, str) else "")
        cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        q, choices = self._start(reqs, body.rid)
        try:
            await self._send_all(reqs)
            if not body.stream:
                await self._collect(request, q, choices)
                self._check_errors(choices)
                self._record("completions", choices, t0)
                out = []
                for c in sorted(choices.values(), key=lambda c: c.index):
                    out.append({"index": c.index, "text": echo[c.index] + c.text,
                                "logprobs": _completion_logprobs(c.meta, len(echo[c.index]))
                                if want_lp else None,
                                "finish_reason": _finish(c.meta),
                                "matched_stop": (c.meta.get("finish_reason") or {}).get("matched")})
                return {"id": cid, "object": "text_completion", "created": created,
                        "model": self.model_name, "choices": out,
                        "usage": self._usage(choices, body.n)}
            first = await self._first(request, q, choices)
            self._check_errors(choices)
        except ClientGone:
            self._end(choices, body.rid)
            return Response(status_code=499)
        except BaseException:
            self._end(choices, body.rid)
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

        def chunk(c: _Choice, text: str, finish=None, logprobs=None) -> dict:
            d = {"id": cid, "object": "text_completion", "created": created,
                 "model": self.model_name, "choices": [{
                     "index": c.index, "text": text, "logprobs": logprobs,
                     "finish_reason": finish}]}
            if continuous:
                p, k = c.meta.get("prompt_tokens", 0), c.meta.get("completion_tokens", 0)
                d["usage"] = {"prompt_tokens": p, "completion_tokens": k, "total_tokens": p + k}
            elif include_usage:
                d["usage"] = None
            return d

        async def events() -> AsyncIterator[bytes]:
            try:
                sent = {rid: 0 for rid in choices}
                for c in choices.values():
                    if echo[c.index]:
                        yield _sse(chunk(c, echo[c.index]))
                changed = {item.rid for item in first}
                last = time.perf_counter()
                ttft_seen = False
                while True:
                    for rid in changed:
                        c = choices[rid]
                        if c.error is not None:
                            yield _sse(error_body(400, c.error))
                            continue
                        new = c.text[sent[rid]:]
                        sent[rid] = len(c.text)
                        if new or c.finished:
                            lp = None
                            if want_lp:  # the entries that arrived since the last chunk
                                lp = _completion_logprobs(c.meta, len(echo[c.index]), c.lp_sent)
                                c.lp_sent += len(lp["tokens"])
                            yield _sse(chunk(c, new, _finish(c.meta) if c.finished else None, lp))
                    now = time.perf_counter()
                    if not ttft_seen:
                        self.metrics.ttft.observe(now - t0)
                        ttft_seen = True
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                    if all(c.finished or c.error for c in choices.values()):
                        break
                    items = [await self.client.recv(q)] + self.client.drain(q)
                    changed = self._absorb(choices, items)
                self._record("completions", choices, t0)
                if include_usage:
                    yield _sse({"id": cid, "object": "text_completion", "created": created,
                                "model": self.model_name, "choices": [],
                                "usage": self._usage(choices, body.n)})
                yield DONE
            finally:
                self._end(choices, body.rid)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # ---- /v1/chat/completions
    async def chat_completions(self, request: Request):
        t0 = time.perf_counter()
        body = self._validate(ChatCompletionRequest, await self._json(request))
        info = self.client.info
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
        if choice != "none" and not tools:
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        forced_name = None
        extra = None
        if tools and (choice == "required" or not isinstance(choice, str)):
            forced_name = None if choice == "required" else choice.function.name
            try:
                schema = tool_parsers.forced_schema(tools, forced_name)
            except ValueError as e:
                raise ApiError(400, str(e), param="tool_choice") from None
            if body.response_format is not None and body.response_format.type != "text":
                raise ApiError(400, "a forced tool_choice cannot be combined with response_format",
                               param="response_format")
            extra = {"json_schema": json.dumps(schema)}
        forced = extra is not None
        parser = self.tool_parser if tools and choice == "auto" else None
        try:
            prompt = render_chat(
                info.get("chat_template"), [m.model_dump(exclude_none=True) for m in body.messages],
                tools=tools if choice != "none" else None, eos_token=info.get("eos_token") or "",
                continue_final_message=body.continue_final_message,
                extra=body.chat_template_kwargs)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        constraint = self._constraint(body, extra)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        top_lp = body.top_logprobs or 0
        if top_lp and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        reqs = [protocol.GenerateReq(
            rid=self.client.new_rid("chat"), text=prompt, stream=body.stream,
            sampling_params=self._sampling(body, max_tokens=max_tokens, constraint=constraint,
                                           index=i),
            return_logprob=body.logprobs, top_logprobs_num=top_lp) for i in range(body.n)]
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        q, choices = self._start(reqs, body.rid)
        try:
            await self._send_all(reqs)
            if not body.stream:
                await self._collect(request, q, choices)
                self._check_errors(choices)
                self._record("chat", choices, t0)
                out = []
                for c in sorted(choices.values(), key=lambda c: c.index):
                    content, calls = c.text, []
                    if forced:
                        calls = _forced_calls(c.text, forced_name)
                        content = None if calls else c.text
                    elif parser is not None:
                        content, calls = parser.parse(c.text)
                        content = content or None if calls else c.text
                    msg = {"role": "assistant", "content": content}
                    if calls:
                        msg["tool_calls"] = [call.to_openai() for call in calls]
                    out.append({"index": c.index, "message": msg,
                                "logprobs": _chat_logprobs(c.meta) if body.logprobs else None,
                                "finish_reason": "tool_calls" if calls else _finish(c.meta),
                                "matched_stop": (c.meta.get("finish_reason") or {}).get("matched")})
                return {"id": cid, "object": "chat.completion", "created": created,
                        "model": self.model_name, "choices": out, "usage": self._usage(choices)}
            first = await self._first(request, q, choices)
            self._check_errors(choices)
        except ClientGone:
            self._end(choices, body.rid)
            return Response(status_code=499)
        except BaseException:
            self._end(choices, body.rid)
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(c: _Choice, delta: dict, finish=None, logprobs=None) -> dict:
            d = {"id": cid, "object": "chat.completion.chunk", "created": created,
                 "model": self.model_name, "choices": [{
                     "index": c.index, "delta": delta, "logprobs": logprobs,
                     "finish_reason": finish}]}
            if include_usage:
                d["usage"] = None
            return d

        async def events() -> AsyncIterator[bytes]:
            try:
                for c in sorted(choices.values(), key=lambda c: c.index):
                    yield _sse(chunk(c, {"role": "assistant", "content": ""}))
                changed = {item.rid for item in first}
                last, ttft_seen = time.perf_counter(), False
                while True:
                    for rid in changed:
                        c = choices[rid]
                        if c.error is not None:
                            yield _sse(error_body(400, c.error))
                            continue
                        # content up to where a tool call may start; all of it when forced
                        upto = len(c.text)
                        if forced:
                            upto = 0
                        elif parser is not None:
                            upto = min(upto, max(c.held, parser.hold_from(c.text)))
                        if c.finished:
                            calls = []
                            if forced:
                                calls = _forced_calls(c.text, forced_name)
                                rest = "" if calls else c.text
                            elif parser is not None:
                                content, calls = parser.parse(c.text[c.held:])
                                rest = content if calls else c.text[c.held:]
                            else:
                                rest = c.text[c.held:]
                            if rest:
                                yield _sse(chunk(c, {"content": rest}))
                            if calls:
                                yield _sse(chunk(c, {"tool_calls": [
                                    call.to_openai(k) for k, call in enumerate(calls)]}))
                            c.held = len(c.text)
                            yield _sse(chunk(c, {}, "tool_calls" if calls else _finish(c.meta),
                                             _chat_logprobs(c.meta, c.lp_sent) if body.logprobs else None))
                        elif upto > c.held:
                            lp = None
                            if body.logprobs:  # the entries that arrived since the last chunk
                                lp = _chat_logprobs(c.meta, c.lp_sent)
                                c.lp_sent += len(lp["content"])
                            yield _sse(chunk(c, {"content": c.text[c.held:upto]}, None, lp))
                            c.held = upto
                    now = time.perf_counter()
                    if not ttft_seen:
                        self.metrics.ttft.observe(now - t0)
                        ttft_seen = True
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                    if all(c.finished or c.error for c in choices.values()):
                        break
                    items = [await self.client.recv(q)] + self.client.drain(q)
                    changed = self._absorb(choices, items)
                self._record("chat", choices, t0)
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": self.model_name, "choices": [],
                                "usage": self._usage(choices)})
                yield DONE
            finally:
                self._end(choices, body.rid)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # ---- SGLang's /generate
    async def generate(self, request: Request):
        t0 = time.perf_counter()
        body = await self._json(request)
        text, ids = body.get("text"), body.get("input_ids")
        if (text is None) == (ids is None):
            raise ApiError(400, "give exactly one of text or input_ids")
        batch = isinstance(text, list) or (isinstance(ids, list) and ids and isinstance(ids[0], list))
        prompts = (text if isinstance(text, list) else [text]) if text is not None else \
            (ids if batch else [ids])
        if not prompts:
            raise ApiError(400, "the batch is empty")
        n = len(prompts)

        def per(key, default):
            v = body.get(key, default)
            if isinstance(v, list) and key != "stop" and batch:
                if len(v) != n:
                    raise ApiError(400, f"{key} has {len(v)} entries for {n} prompts", param=key)
                return v
            return [v] * n

        sps, lps = per("sampling_params", None), per("return_logprob", False)
        starts, tops = per("logprob_start_len", -1), per("top_logprobs_num", 0)
        user_rids = body.get("rid")
        stream = bool(body.get("stream", False))
        reqs = []
        for i, p in enumerate(prompts):
            sp = sps[i] or {}
            if not isinstance(sp, dict):
                raise ApiError(400, "sampling_params must be an object", param="sampling_params")
            kw = {"text": p} if text is not None else {"input_ids": p}
            try:
                reqs.append(protocol.GenerateReq(
                    rid=self.client.new_rid("gen"), stream=stream, sampling_params=sp, **kw,
                    return_logprob=bool(lps[i]), logprob_start_len=int(starts[i]),
                    top_logprobs_num=int(tops[i])))
            except (TypeError, ValueError) as e:
                raise ApiError(400, str(e)) from None
        key = user_rids if isinstance(user_rids, str) else None
        q, choices = self._start(reqs, key)
        names = user_rids if isinstance(user_rids, list) else [key or r.rid for r in reqs]

        def result(c: _Choice, cumulative: str) -> dict:
            meta = dict(c.meta, id=names[c.index] if c.index < len(names) else c.rid)
            d = {"text": cumulative, "meta_info": meta}
            if c.output_ids is not None:
                d["output_ids"] = c.output_ids
            if batch and stream:
                d["index"] = c.index
            return d

        try:
            await self._send_all(reqs)
            if not stream:
                await self._collect(request, q, choices)
                self._check_errors(choices)
                self._record("generate", choices, t0)
                outs = [result(c, c.text) for c in sorted(choices.values(), key=lambda c: c.index)]
                return outs if batch else outs[0]
            first = await self._first(request, q, choices)
            self._check_errors(choices)
        except ClientGone:
            self._end(choices, key)
            return Response(status_code=499)
        except BaseException:
            self._end(choices, key)
            raise

        async def events() -> AsyncIterator[bytes]:
            try:
                changed = {item.rid for item in first}
                while True:
                    for rid in changed:
                        c = choices[rid]
                        if c.error is not None:
                            yield _sse(error_body(400, c.error))
                        else:
                            yield _sse(result(c, c.text))
                    if all(c.finished or c.error for c in choices.values()):
                        break
                    items = [await self.client.recv(q)] + self.client.drain(q)
                    changed = self._absorb(choices, items)
                self._record("generate", choices, t0)
                yield DONE
            finally:
                self._end(choices, key)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # ---- the protocol over HTTP (HttpClient)
    async def native_request(self, request: Request):
        """Body: one msgpack-encoded protocol request. Response: its replies, each framed as a
        4-byte big-endian length and the msgpack reply, until the last one."""
        msg = _decode_native(await request.body())
        if isinstance(msg, protocol.AbortReq):
            raise ApiError(400, "send AbortReq to /sglite/send")
        orig = msg.rid
        rid = "n-" + orig
        msg = msgspec.structs.replace(msg, rid=rid)
        q: asyncio.Queue = asyncio.Queue()
        self.client.register(rid, q)
        await self.client.send(msg)
        terminal = _terminal_for(msg)

        async def frames() -> AsyncIterator[bytes]:
            done = False
            try:
                while not done:
                    items = [await self.client.recv(q)] + self.client.drain(q)
                    parts = []
                    for item in items:
                        done = done or terminal(item)
                        data = protocol.encode(msgspec.structs.replace(item, rid=orig))
                        parts.append(struct.pack(">I", len(data)) + data)
                        if done:
                            break
                    yield b"".join(parts)
            except RuntimeUnavailable as e:
                data = protocol.encode(protocol.ErrorOut(rid=orig, message=f"runtime gone: {e}"))
                yield struct.pack(">I", len(data)) + data
                done = True
            finally:
                self.client.forget(rid)
                if not done:
                    self.client.abort_soon([rid])

        return StreamingResponse(frames(), media_type="application/x-msgpack")

    async def native_send(self, request: Request):
        msg = _decode_native(await request.body())
        if not isinstance(msg, protocol.AbortReq):
            raise ApiError(400, "only AbortReq may be sent without waiting for replies")
        await self.client.send(protocol.AbortReq(rid="n-" + msg.rid))
        return Response(status_code=204)


# ---- module helpers

async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _decode_native(data: bytes):
    try:
        return protocol.decode_request(data)
    except Exception as e:
        raise ApiError(400, f"undecodable message: {type(e).__name__}: {e}") from None


def _terminal_for(msg):
    if isinstance(msg, protocol.GenerateReq):
        return lambda r: not isinstance(r, protocol.GenerateOut) or r.finished
    return lambda r: True


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _finish(meta: dict) -> str | None:
    fr = meta.get("finish_reason")
    if not fr:
        return None
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(fr.get("type"), fr.get("type"))


def _completion_logprobs(meta: dict, offset0: int = 0, start: int = 0) -> dict:
    """OpenAI's completion logprobs of output entries [start:] (text offsets count from the
    whole output, after offset0 characters of echo)."""
    toks = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    tokens, lps, offsets, pos = [], [], [], offset0
    for lp, _tid, text in toks:
        text = text or ""
        tokens.append(text)
        lps.append(lp)
        offsets.append(pos)
        pos += len(text)
    top = [{(t or ""): lp for lp, _i, t in row} for row in tops[start:]] if tops else None
    return {"tokens": tokens[start:], "token_logprobs": lps[start:], "top_logprobs": top,
            "text_offset": offsets[start:]}


def _chat_logprobs(meta: dict, start: int = 0) -> dict:
    """OpenAI's chat logprobs of output entries [start:]."""
    toks = (meta.get("output_token_logprobs") or [])[start:]
    tops = (meta.get("output_top_logprobs") or [[] for _ in range(start + len(toks))])[start:]
    content = []
    for (lp, _tid, text), row in zip(toks, tops):
        text = text or ""
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": t or "", "logprob": l,
                                          "bytes": list((t or "").encode())} for l, _i, t in row]})
    return {"content": content, "refusal": None}


def _forced_calls(text: str, name: str | None) -> list[tool_parsers.ToolCall]:
    """The JSON a forced tool choice produced: the named function's arguments, or for
    "required" an array of {name, parameters}."""
    try:
        obj = json.loads(text)
    except ValueError:
        return []
    if name is not None:
        return [tool_parsers.ToolCall(name, json.dumps(obj, ensure_ascii=False))] \
            if isinstance(obj, dict) else []
    calls = []
    for item in obj if isinstance(obj, list) else []:
        call = tool_parsers._call_from_obj(item, ("parameters", "arguments"))
        if call is not None:
            calls.append(call)
    return calls


def create_app(runtime_address: str, **kw) -> FastAPI:
    return HttpFront(runtime_address, **kw).build()
