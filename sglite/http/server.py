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
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sglite import protocol
from sglite.http import tool_parsers
from sglite.http.errors import ApiError, error_body, error_response
from sglite.http.metrics import CONTENT_TYPE, Metrics
from sglite.http.native_routes import NativeRoutes
from sglite.http.openai_routes import OpenAIRoutes
from sglite.http.runtime_client import RuntimeUnavailable

logger = logging.getLogger("sglite.http")


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


class HttpFront(OpenAIRoutes, NativeRoutes):
    """The app: OpenAI's routes (openai_routes.py), SGLang's and the protocol's (native_routes.py),
    and here the small ones (models, health, model / server info, cache flush, abort, metrics)."""

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
                    runtime_address=self.client.address, http_requests_in_flight=self.client.in_flight())
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


def create_app(runtime_address: str, **kw) -> FastAPI:
    return HttpFront(runtime_address, **kw).build()
