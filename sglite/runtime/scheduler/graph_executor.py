"""GraphReq: walk a traced program inside the runtime, without a client round trip per node.

A node's prompt is its parent's full text. Text nodes resolve at once; a gen node becomes an
internal request whose prompt is that text, and a select node a ScoreJob. A finished request's
prompt and output go into the radix tree (CacheManager.release), so the next node's prefill
matches them and only its own new text is computed. A node with several children (a fork) first
prefills its full text once (a prefill-only request), then starts all branches together; they
run concurrently in the scheduler's batches over the shared, cached prefix.
"""

from __future__ import annotations

from collections import defaultdict

from sglite import choices as choices_mod
from sglite import protocol
from sglite.runtime.scheduler.score import ScoreJob

_KINDS = ("text", "gen", "select")


class GraphJob:
    def __init__(self, handler, identity: bytes, msg: protocol.GraphReq):
        self.handler, self.identity, self.rid = handler, identity, msg.rid
        self.nodes = {n.id: n for n in msg.nodes}
        self.children: dict[int | None, list[int]] = defaultdict(list)
        self.params = {}
        self._validate(msg.nodes)
        self.full_text: dict[int, str] = {}
        self.num_pending = sum(n.kind != "text" for n in msg.nodes)
        self.done = False
        self._start_children(None, "")
        self._maybe_done()

    def abort(self) -> None:
        self.done = True
        self.handler.scheduler.abort(lambda r: r.client == self.identity and r.group == self.rid)
        for job in self.handler.jobs:
            if isinstance(job, ScoreJob) and job.group == self.rid:
                job.done = True

    # ---- walking
    def _resolve(self, node_id: int, full_text: str) -> None:
        self.full_text[node_id] = full_text
        kids = self.children[node_id]
        if len(kids) > 1 and full_text and self._has_work_below(node_id):
            self._submit(f"fork{node_id}", full_text, protocol.SamplingParams(max_new_tokens=0),
                         lambda _text, _meta: self._start_children(node_id, full_text))
        else:
            self._start_children(node_id, full_text)

    def _start_children(self, node_id: int | None, prompt: str) -> None:
        for child in self.children[node_id]:
            if self.done:
                return
            self._start(self.nodes[child], prompt)

    def _start(self, node: protocol.GraphNode, prompt: str) -> None:
        try:
            self._start_node(node, prompt)
        except ValueError as e:
            self._fail(node, str(e))

    def _start_node(self, node: protocol.GraphNode, prompt: str) -> None:
        if node.kind == "text":
            self._resolve(node.id, prompt + node.text)
        elif node.kind == "gen":
            self._submit(f"n{node.id}", prompt, self.params[node.id],
                         lambda text, meta: self._node_done(node, prompt, text, meta))
        else:
            method = choices_mod.get_choices_method(node.choices_method)
            score = protocol.ScoreReq(rid=f"{self.rid}/n{node.id}", text=prompt,
                                      choices=list(node.choices),
                                      unconditional=method.requires_unconditional_logprobs)
            job = ScoreJob(self.handler, self.identity, score, group=self.rid,
                           on_done=lambda out: self._select_done(node, prompt, out),
                           on_error=lambda m: self._fail(node, m))
            self.handler.jobs.append(job)

    def _select_done(self, node: protocol.GraphNode, prompt: str, out: protocol.ScoreOut) -> None:
        decision = choices_mod.decide(
            node.choices_method, prefix_text=prompt, choices=list(node.choices),
            token_logprobs=out.token_logprobs, token_ids=out.token_ids,
            token_texts=out.token_texts,
            unconditional_token_logprobs=out.unconditional_token_logprobs)
        meta = {**out.meta_info, "normalized_prompt_logprobs":
                decision.meta_info.get("normalized_prompt_logprobs")}
        self._node_done(node, prompt, decision.decision, meta)

    def _node_done(self, node: protocol.GraphNode, prompt: str, text: str, meta: dict) -> None:
        if self.done:
            return
        self.handler.server.send(self.identity, protocol.NodeOut(
            rid=self.rid, node_id=node.id, text=text, meta_info=meta))
        self.num_pending -= 1
        self._resolve(node.id, prompt + text)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.num_pending == 0 and not self.done:
            self.done = True
            self.handler.server.send(self.identity, protocol.GraphDone(rid=self.rid))

    def _submit(self, name: str, prompt: str, params, on_text) -> None:
        h = self.handler
        sink = _NodeSink(self, name, on_text)
        try:
            req = h.make_req(f"{self.rid}/{name}", h.prompt_ids(text=prompt), params, sink,
                             client=self.identity, group=self.rid)
            h.scheduler.add_request(req)
        except ValueError as e:
            sink.on_error(None, str(e))

    def _fail(self, node, message: str) -> None:
        if self.done:
            return
        self.abort()
        where = f"node {node.id} ({node.kind})" if hasattr(node, "id") else node
        self.handler.server.send(self.identity, protocol.ErrorOut(
            rid=self.rid, message=f"graph {where}: {message}"))

    def _has_work_below(self, node_id: int) -> bool:
        stack = list(self.children[node_id])
        while stack:
            n = self.nodes[stack.pop()]
            if n.kind != "text":
                return True
            stack += self.children[n.id]
        return False

    def _validate(self, nodes: list[protocol.GraphNode]) -> None:
        seen: set[int] = set()
        for n in nodes:
            if n.id in seen:
                raise ValueError(f"graph node id {n.id} appears twice")
            if n.kind not in _KINDS:
                raise ValueError(f"graph node {n.id}: unknown kind {n.kind!r} (one of {_KINDS})")
            if n.parent is not None and n.parent not in seen:
                raise ValueError(f"graph node {n.id}: parent {n.parent} must come before it")
            if n.kind == "gen":
                try:
                    self.params[n.id] = protocol.parse_sampling_params(n.sampling_params)
                except ValueError as e:
                    raise ValueError(f"graph node {n.id}: {e}") from None
            if n.kind == "select":
                if not n.choices:
                    raise ValueError(f"graph node {n.id}: select needs at least one choice")
                choices_mod.get_choices_method(n.choices_method)
            seen.add(n.id)
            self.children[n.parent].append(n.id)


class _NodeSink:
    """Collects an internal request's text; reports the node when it finishes."""

    def __init__(self, job: GraphJob, name: str, on_text):
        self.job, self.name, self.on_text = job, name, on_text

    def on_output(self, req, text: str, finished: bool, meta: dict) -> None:
        if not finished or self.job.done:
            return
        if meta["finish_reason"]["type"] == "abort":
            return self.job._fail(self.name, f"aborted: {meta['finish_reason']['matched']}")
        self.on_text(text, meta)

    def on_error(self, req, message: str) -> None:
        self.job._fail(self.name, message)
