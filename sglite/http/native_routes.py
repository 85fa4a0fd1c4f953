"""SGLang's native /generate and the protocol over HTTP (/sglite/request, /sglite/send, for
sglite.lang.backend.http_client.HttpClient): HttpFront's routes on FrontBase's request machinery."""

from __future__ import annotations

import struct
import time
from typing import AsyncIterator

import msgspec
from fastapi import Request
from fastapi.responses import Response

from sglite import protocol
from sglite.http.errors import ApiError, ClientGone
from sglite.http.front_base import Choice, EndingStream, FrontBase, sse_event
from sglite.http.runtime_client import RuntimeUnavailable


class NativeRoutes(FrontBase):
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

        def result(c: Choice, cumulative: str) -> dict:
            meta = dict(c.meta, id=names[c.index] if c.index < len(names) else c.rid)
            d = {"text": cumulative, "meta_info": meta}
            if c.output_ids is not None:
                d["output_ids"] = c.output_ids
            if batch and stream:
                d["index"] = c.index
            return d

        try:
            first = await self._replies(request, "generate", reqs, q, choices, t0, stream=stream,
                                        user_rid=key)
        except ClientGone:
            return Response(status_code=499)
        if not stream:
            outs = [result(c, c.text) for c in sorted(choices.values(), key=lambda c: c.index)]
            return outs if batch else outs[0]

        def emit(c: Choice):
            yield sse_event(result(c, c.text))

        return self._stream_response("generate", q, choices, first, t0, emit, user_rid=key, timed=False)

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
        q = await self.client.request(msg)  # a send that fails leaves no route behind
        terminal = _terminal_for(msg)
        done = False

        async def frames() -> AsyncIterator[bytes]:
            nonlocal done
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

        def end() -> None:  # EndingStream runs it once the response is over, however it ended
            self.client.forget(rid)
            if not done:
                self.client.abort_soon([rid])

        return EndingStream(frames(), end, media_type="application/x-msgpack")

    async def native_send(self, request: Request):
        msg = _decode_native(await request.body())
        if not isinstance(msg, protocol.AbortReq):
            raise ApiError(400, "only AbortReq may be sent without waiting for replies")
        await self.client.send(protocol.AbortReq(rid="n-" + msg.rid))
        return Response(status_code=204)


def _decode_native(data: bytes):
    try:
        return protocol.decode_request(data)
    except Exception as e:
        raise ApiError(400, f"undecodable message: {type(e).__name__}: {e}") from None


def _terminal_for(msg):
    if isinstance(msg, protocol.GenerateReq):
        return lambda r: not isinstance(r, protocol.GenerateOut) or r.finished
    return lambda r: True
