"""OpenAI's /v1/completions and /v1/chat/completions (HttpFront's routes, on FrontBase's request
machinery): bodies validated by openai_protocol.py, one GenerateReq per choice, the answer whole
or streamed as SSE chunks (deltas that queued up since the last write merged into one event),
logprobs and tool calls in OpenAI's shapes."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import Response

from sglite import protocol
from sglite.http import tool_parsers
from sglite.http.chat import ChatTemplateError, render_chat
from sglite.http.errors import ApiError, ClientGone
from sglite.http.front_base import Choice, FrontBase, sse_event
from sglite.http.openai_protocol import ChatCompletionRequest, CompletionRequest


class OpenAIRoutes(FrontBase):
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
            first = await self._replies(request, "completions", reqs, q, choices, t0, stream=body.stream,
                                        user_rid=body.rid)
        except ClientGone:
            return Response(status_code=499)
        if not body.stream:
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
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

        def chunk(c: Choice, text: str, finish=None, logprobs=None) -> dict:
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

        sent = {rid: 0 for rid in choices}

        def emit(c: Choice):
            new = c.text[sent[c.rid]:]
            sent[c.rid] = len(c.text)
            if new or c.finished:
                lp = None
                if want_lp:  # the entries that arrived since the last chunk
                    lp = _completion_logprobs(c.meta, len(echo[c.index]), c.lp_sent)
                    c.lp_sent += len(lp["tokens"])
                yield sse_event(chunk(c, new, _finish(c.meta) if c.finished else None, lp))

        def closing():
            if include_usage:
                return sse_event({"id": cid, "object": "text_completion", "created": created,
                                  "model": self.model_name, "choices": [], "usage": self._usage(choices, body.n)})
            return None

        opening = [sse_event(chunk(c, echo[c.index])) for c in choices.values() if echo[c.index]]
        return self._stream_response("completions", q, choices, first, t0, emit, user_rid=body.rid,
                                     opening=opening, closing=closing)

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
            first = await self._replies(request, "chat", reqs, q, choices, t0, stream=body.stream,
                                        user_rid=body.rid)
        except ClientGone:
            return Response(status_code=499)
        if not body.stream:
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
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(c: Choice, delta: dict, finish=None, logprobs=None) -> dict:
            d = {"id": cid, "object": "chat.completion.chunk", "created": created,
                 "model": self.model_name, "choices": [{
                     "index": c.index, "delta": delta, "logprobs": logprobs,
                     "finish_reason": finish}]}
            if include_usage:
                d["usage"] = None
            return d

        def emit(c: Choice):
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
                    yield sse_event(chunk(c, {"content": rest}))
                if calls:
                    yield sse_event(chunk(c, {"tool_calls": [call.to_openai(k) for k, call in enumerate(calls)]}))
                c.held = len(c.text)
                yield sse_event(chunk(c, {}, "tool_calls" if calls else _finish(c.meta),
                                      _chat_logprobs(c.meta, c.lp_sent) if body.logprobs else None))
            elif upto > c.held:
                lp = None
                if body.logprobs:  # the entries that arrived since the last chunk
                    lp = _chat_logprobs(c.meta, c.lp_sent)
                    c.lp_sent += len(lp["content"])
                yield sse_event(chunk(c, {"content": c.text[c.held:upto]}, None, lp))
                c.held = upto

        def closing():
            if include_usage:
                return sse_event({"id": cid, "object": "chat.completion.chunk", "created": created,
                                  "model": self.model_name, "choices": [], "usage": self._usage(choices)})
            return None

        opening = [sse_event(chunk(c, {"role": "assistant", "content": ""}))
                   for c in sorted(choices.values(), key=lambda c: c.index)]
        return self._stream_response("chat", q, choices, first, t0, emit, user_rid=body.rid, opening=opening,
                                     closing=closing)


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
