"""sgl.Engine: the offline face of the runtime, as SGLang's `sgl.Engine` (and vLLM's LLM).

    with sgl.Engine(dtype="float32") as llm:                 # spawns the runtime process
        out = llm.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 8})
        out["text"], out["output_ids"], out["meta_info"]["finish_reason"]
        outs = llm.generate(["a", "b"], [{"max_new_tokens": 4}, {"max_new_tokens": 2}])
        for chunk in llm.generate("Hi", stream=True): chunk["text"]   # the text so far
        await llm.async_generate("Hi")

The runtime runs in a child process (sglite.launch.RuntimeProcess) and this process holds one
ZmqClient; nothing here imports torch. Results are SGLang's dicts: `text`, `output_ids` and
`meta_info` (id, prompt_tokens, completion_tokens, cached_tokens, finish_reason, and the logprob
lists when return_logprob); the output ids come on the runtime's last GenerateOut. A batch is
sent at once, so the runtime batches it.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Iterator

from sglite import protocol
from sglite.lang.backend.base import RuntimeRequestError



class GenerateClient:
    """SGLang's generate API over a runtime client (ZmqClient or HttpClient): what `sgl.Engine`
    is beside the process it owns, and what `sgl.Runtime.generate(prompt, sampling_params)` uses."""

    def __init__(self, client):
        self.client = client

    # ---- SGLang's API
    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict | list[dict] | None = None, *,
                 input_ids: list[int] | list[list[int]] | None = None,
                 return_logprob: bool | list[bool] = False,
                 logprob_start_len: int | list[int] | None = None,
                 top_logprobs_num: int | list[int] | None = None, stream: bool = False,
                 ) -> dict | list[dict] | Iterator[dict]:
        reqs, batch = self._requests(prompt, sampling_params, input_ids, return_logprob,
                                     logprob_start_len, top_logprobs_num, stream)
        if stream:
            if batch:
                raise ValueError("stream=True takes one prompt, not a list")
            return self._stream(reqs[0])
        queues = [self.client.request(r) for r, _ in reqs]
        try:
            outs = [self._finish(r, wanted, self._collect(q)) for (r, wanted), q in zip(reqs, queues)]
        finally:
            for r, _ in reqs:
                self.client.forget(r.rid)
        return outs if batch else outs[0]

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict | list[dict] | None = None, *,
                             stream: bool = False, **kw) -> dict | list[dict] | AsyncIterator[dict]:
        """As generate; waits without blocking the event loop (stream=True: an async iterator)."""
        if stream:
            return self._astream(prompt, sampling_params, **kw)
        return await asyncio.to_thread(self.generate, prompt, sampling_params, **kw)

    def get_server_info(self) -> dict:
        return _check(self.client.call(protocol.InfoReq(rid=self.client.new_rid("info")))).info

    def flush_cache(self) -> None:
        _check(self.client.call(protocol.FlushCacheReq(rid=self.client.new_rid("flush"))))

    # ---- helpers
    def _requests(self, prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
                  top_logprobs_num, stream):
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt or input_ids")
        if prompt is not None:
            batch = isinstance(prompt, list)
            items = [{"text": p} for p in (prompt if batch else [prompt])]
        else:
            batch = bool(input_ids) and isinstance(input_ids[0], list)
            items = [{"input_ids": list(i)} for i in (input_ids if batch else [input_ids])]
        n = len(items)

        def per(value, default):
            if isinstance(value, list):
                if len(value) != n:
                    raise ValueError(f"{len(value)} values for {n} prompts")
                return [default if v is None else v for v in value]
            return [default if value is None else value] * n

        sps = per(sampling_params, {})
        lps, starts, tops = per(return_logprob, False), per(logprob_start_len, -1), \
            per(top_logprobs_num, 0)
        reqs = []
        for i, item in enumerate(items):
            reqs.append((protocol.GenerateReq(
                rid=self.client.new_rid("engine"), stream=stream, sampling_params=dict(sps[i]),
                return_logprob=bool(lps[i]), logprob_start_len=starts[i] if lps[i] else -1,
                top_logprobs_num=tops[i] if lps[i] else 0, **item), bool(lps[i])))
        return reqs, batch

    def _collect(self, q) -> tuple[str, dict, list[int]]:
        text = ""
        while True:
            out = _check(self.client.recv(q))
            text += out.text
            if out.finished:
                return text, out.meta_info, out.output_ids or []

    @staticmethod
    def _finish(req: protocol.GenerateReq, wanted_logprobs: bool,
                got: tuple[str, dict, list[int]]) -> dict:
        text, meta, ids = got
        return {"text": text, "output_ids": ids, "meta_info": dict(meta, id=req.rid)}

    def _stream(self, item) -> Iterator[dict]:
        req, wanted = item
        q = self.client.request(req)
        finished, text = False, ""
        try:
            while not finished:
                out = _check(self.client.recv(q))
                text += out.text
                finished = out.finished
                if finished:
                    yield self._finish(req, wanted, (text, out.meta_info, out.output_ids or []))
                else:
                    yield {"text": text, "output_ids": [], "meta_info": dict(out.meta_info,
                                                                            id=req.rid)}
        finally:
            self.client.forget(req.rid)
            if not finished:  # the caller stopped reading: free the runtime's slot
                self.client.send(protocol.AbortReq(rid=req.rid))

    async def _astream(self, prompt, sampling_params, **kw) -> AsyncIterator[dict]:
        it = self.generate(prompt, sampling_params, stream=True, **kw)
        done = object()
        try:
            while True:
                chunk = await asyncio.to_thread(next, it, done)
                if chunk is done:
                    return
                yield chunk
        finally:
            it.close()


class Engine(GenerateClient):
    def __init__(self, model_path: str | None = None, *, launch_timeout: float = 600.0,
                 **server_args):
        from sglite.lang.backend.client import ZmqClient
        from sglite.launch import RuntimeProcess

        self.process = RuntimeProcess(model_path, timeout=launch_timeout, **server_args)
        try:
            super().__init__(ZmqClient(self.process.address, is_alive=self.process.is_alive))
        except BaseException:
            self.process.shutdown()
            raise
        self.server_info = self.process.info

    def shutdown(self) -> None:
        self.client.close()
        self.process.shutdown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _check(msg):
    if isinstance(msg, protocol.ErrorOut):
        raise RuntimeRequestError(msg.message)
    return msg
