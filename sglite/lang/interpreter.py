"""StreamExecutor: runs one program stream (the root or a fork branch) on its own worker thread.

`s += expr` only enqueues (SGLang's model): the user's Python runs ahead while the worker sends
requests. One `_execute_<node>` method per IR class.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sglite.choices import decide
from sglite.lang import ir
from sglite.lang.backend.base import BaseBackend
from sglite.lang.chat_template import ChatTemplate
from sglite.lang.reasoning import get_reasoning_format


class StreamExecutor:
    sends_requests = True

    def __init__(self, backend: BaseBackend | None, chat_template: ChatTemplate, *,
                 defaults: ir.GenParams, stream: bool = False, stream_key: str = "0", use_thread: bool = True):
        self.backend, self.chat_template, self.defaults = backend, chat_template, defaults
        self.stream, self.stream_key = stream, stream_key
        self.text_ = ""
        self.variables: dict[str, Any] = {}
        self.variable_events: dict[str, threading.Event] = {}
        self.meta_info: dict[str, dict] = {}
        self.messages_: list[dict[str, str]] = []
        self.cur_role: str | None = None
        self.cur_role_begin_pos = 0
        self.var_scope_begin: dict[str, int] = {}
        self.gen_starts: dict[str, int] = {}  # where each gen's text starts in text_
        self.held_vars: set[str] = set()  # set, but readers wait for separate_reasoning
        self.fork_start_text_pos = 0
        self.new_var_names: list[str] = []  # set since this stream forked (join gathers these)
        self.error_: Exception | None = None
        self.num_gens = self.num_forks = 0
        self.children: list[StreamExecutor] = []
        # (variable or None, text, that gen's meta_info so far): for text_iter / text_async_iter
        self.chunks: list[tuple[str | None, str, dict | None]] = []
        self.cond = threading.Condition()
        self.is_ended = False  # the program body returned: no more submits
        self.body_thread: int | None = None  # the thread running the user's function
        self.is_finished = False  # ... and the worker executed everything
        self.queue: queue.Queue | None = None
        if use_thread:
            self.queue = queue.Queue()
            threading.Thread(target=self._worker, daemon=True, name="sglite-program").start()

    # ---- called from the user's thread -----------------------------------------------------

    def submit(self, expr: ir.Expr) -> None:
        with self.cond:  # get_var may be waiting for a stream=True body to declare the name
            for name in _var_names(expr):
                self.variable_events[name] = threading.Event()
            self.held_vars.update(_separated_names(expr))
            self.cond.notify_all()
        if self.queue is None:
            self._execute_guarded(expr)
        else:
            self.queue.put(expr)

    def sync(self) -> None:
        if self.queue is not None:
            self.queue.join()

    def end(self) -> None:
        """No more expressions will come: the worker (and those of un-joined forks) exit."""
        for child in self.children:
            child.end()
        with self.cond:
            self.is_ended = True
            self.cond.notify_all()
        if self.queue is not None:
            self.queue.put(None)
        else:
            self._mark_finished()

    def get_var(self, name: str) -> Any:
        with self.cond:  # another thread may read before a stream=True body declared `name`
            while name not in self.variable_events and name not in self.variables \
                    and not self.is_ended and threading.get_ident() != self.body_thread:
                self.cond.wait()
        event = self.variable_events.get(name)
        if event is not None:
            event.wait()
        if name not in self.variables and self.error_ is not None:
            raise RuntimeError(f"the program failed before {name!r} was set: {self.error_}") \
                from self.error_
        if name not in self.variables:
            raise KeyError(f"no variable {name!r} in this program state")
        return self.variables[name]

    def set_var(self, name: str, value: Any) -> None:
        self.variables[name] = value
        if name not in self.new_var_names:
            self.new_var_names.append(name)
        if name in self.held_vars:
            return
        self.variable_events.setdefault(name, threading.Event()).set()
        with self.cond:  # wake text_iter(name) readers
            self.cond.notify_all()

    def get_text(self) -> str:
        self.sync()
        return self.text_

    def get_messages(self) -> list[dict[str, str]]:
        self.sync()
        return list(self.messages_)

    def fork(self, size: int) -> list["StreamExecutor"]:
        self.sync()
        if self.sends_requests and size > 1 and self.text_:
            # Prefill the shared prefix once, so the branches find it in the radix cache instead
            # of racing to prefill it size times.
            self.backend.cache_prefix(self.text_)
        children = [self._spawn(f"{self.stream_key}.{self.num_forks}.{i}") for i in range(size)]
        self.num_forks += 1
        for child in children:
            child.body_thread = self.body_thread
            child.text_, child.fork_start_text_pos = self.text_, len(self.text_)
            child.variables, child.meta_info = dict(self.variables), dict(self.meta_info)
            child.messages_, child.cur_role = list(self.messages_), self.cur_role
            child.cur_role_begin_pos = self.cur_role_begin_pos
            child.var_scope_begin = dict(self.var_scope_begin)
            for name in self.variables:
                child.variable_events[name] = _set_event()
        self.children += children
        return children

    def join(self, children: list["StreamExecutor"], mode: str) -> None:
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"unknown join mode {mode!r}; use gather_variable or concate_and_append")
        for child in children:
            child.sync()
        self.sync()
        if mode == "gather_variable":
            names = list(dict.fromkeys(n for c in children for n in c.new_var_names))
            for name in names:
                self.set_var(name, [c.variables.get(name) for c in children])
        else:
            for child in children:
                self._append(child.text_[child.fork_start_text_pos:])
        errors = [c.error_ for c in children if c.error_ is not None]
        if errors and self.error_ is None:
            self._fail(errors[0])

    # ---- the worker ------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            expr = self.queue.get()
            if expr is None:
                self.queue.task_done()
                break
            self._execute_guarded(expr)
            self.queue.task_done()
        self._mark_finished()

    def _execute_guarded(self, expr: ir.Expr) -> None:
        if self.error_ is not None:
            return  # a failed program skips the rest; waiters already raise
        try:
            self._execute(expr)
        except Exception as e:
            self._fail(e)

    def _fail(self, error: Exception) -> None:
        self.error_ = error
        for event in self.variable_events.values():
            event.set()
        with self.cond:
            self.cond.notify_all()

    def _mark_finished(self) -> None:
        with self.cond:
            self.is_finished = True
            self.cond.notify_all()

    def _execute(self, expr: ir.Expr) -> None:
        getattr(self, "_execute_" + type(expr).__name__.lower())(expr)

    def _execute_exprlist(self, expr: ir.ExprList) -> None:
        for sub in expr.exprs:
            self._execute(sub)

    def _execute_text(self, expr: ir.Text) -> None:
        self._append(expr.value)

    def _execute_argument(self, expr: ir.Argument) -> None:
        raise TypeError(f"placeholder {expr.name!r} (from trace()) reached a running program")

    _execute_variable = _execute_argument

    def _execute_gen(self, expr: ir.Gen) -> None:
        params = self._resolve(expr.params)
        start = len(self.text_)
        if (params.n or 1) > 1:
            values, metas = self._sample_n(params)
            self._append(values[0], expr.name)  # the text continues with the first sample
            self._set_result(expr.name, values, metas)
        else:
            value, meta = "", {}
            for delta, meta in self.backend.generate(self.text_, params, stream=self.stream):
                value += delta
                self._append(delta, expr.name, _logprob_texts(meta, params))
            self._set_result(expr.name, value, _logprob_texts(meta, params))
        if expr.name is not None:
            self.gen_starts[expr.name] = start

    def _resolve(self, params: ir.GenParams) -> ir.GenParams:
        """gen's values over the run(...) defaults, plus the chat template's stop strings."""
        params = params.merge(self.defaults)
        if self.chat_template.stop_str:
            stop = ir._as_list(params.stop)
            params = dataclasses.replace(params, stop=stop + [
                x for x in self.chat_template.stop_str if x not in stop])
        return params

    def _sample_n(self, params: ir.GenParams) -> tuple[list[str], list[dict]]:
        """gen(n=k): k requests for the same prompt at once (the runtime batches them and shares
        the prompt's KV through its radix cache)."""
        one = dataclasses.replace(params, n=None)

        def sample(_):
            text, meta = "", {}
            for delta, meta in self.backend.generate(self.text_, one):
                text += delta
            return text, _logprob_texts(meta, one)

        with ThreadPoolExecutor(params.n) as pool:
            results = list(pool.map(sample, range(params.n)))
        return [r[0] for r in results], [r[1] for r in results]

    def _execute_separatereasoning(self, expr: ir.SeparateReasoning) -> None:
        """Split the named gen's text (see reasoning.py): the variable and the program text keep
        the answer, `<name>_reasoning_content` gets the reasoning. SGLang cuts the text back to
        the start of the current role instead, which drops text written before the gen in the
        same role (and repeats the whole text outside a role); here only the gen's span is
        replaced. With stream=True the chunks already streamed held the raw text."""
        fmt = get_reasoning_format(expr.model_type)
        for sub in expr.expr.exprs if isinstance(expr.expr, ir.ExprList) else [expr.expr]:
            if not isinstance(sub, (ir.Gen, ir.Select)) or sub.name is None:
                continue
            raw = self.variables[sub.name]
            reasoning, answer = fmt.parse(raw) if isinstance(raw, str) else ("", raw)
            start = self.gen_starts.get(sub.name, len(self.text_) - len(raw))
            if self.text_[start:start + len(raw)] == raw:
                self.text_ = self.text_[:start] + answer + self.text_[start + len(raw):]
            self.held_vars.discard(sub.name)
            self.set_var(sub.name, answer)
            self.set_var(expr.process_name_for_reasoning(sub.name), reasoning)

    def _execute_image(self, expr: ir.Image) -> None:
        model = self.backend.get_server_info().get("model_path", "the served model")
        raise ValueError(f"sgl.image/sgl.video: this model takes no images ({model} is a "
                         f"text-only model; sglite serves no vision models yet)")

    def _execute_select(self, expr: ir.Select) -> None:
        method = expr.choices_method
        out = self.backend.score(self.text_, expr.choices,
                                 unconditional=method.requires_unconditional_logprobs)
        decision = decide(method, prefix_text=self.text_, choices=expr.choices,
                          token_logprobs=out.token_logprobs, token_ids=out.token_ids,
                          token_texts=out.token_texts,
                          unconditional_token_logprobs=out.unconditional_token_logprobs)
        choice, meta = decision.decision, {**out.meta_info, **decision.meta_info}
        self._append(choice, expr.name)
        self._set_result(expr.name, choice, meta)

    def _execute_rolebegin(self, expr: ir.RoleBegin) -> None:
        if self.cur_role is not None:
            raise ValueError(f"cannot begin role {expr.role!r} inside role {self.cur_role!r}")
        template = self.chat_template
        if not self.messages_ and expr.role != "system" and template.default_system_text:
            # The model's template adds its default system prompt here (SmolLM2 does); keep it.
            self._append(template.default_system_text)
            self.messages_.append({"role": "system", "content": template.default_system_prompt or ""})
        self._append(template.get_prefix_and_suffix(expr.role, self.messages_)[0])
        self.cur_role, self.cur_role_begin_pos = expr.role, len(self.text_)

    def _execute_roleend(self, expr: ir.RoleEnd) -> None:
        if self.cur_role != expr.role:
            raise ValueError(f"role end {expr.role!r} does not match the open role {self.cur_role!r}")
        content = self.text_[self.cur_role_begin_pos:]
        self._append(self.chat_template.get_prefix_and_suffix(expr.role, self.messages_)[1])
        self.messages_.append({"role": expr.role, "content": content})
        self.cur_role = None

    def _execute_varscopebegin(self, expr: ir.VarScopeBegin) -> None:
        self.var_scope_begin[expr.name] = len(self.text_)

    def _execute_varscopeend(self, expr: ir.VarScopeEnd) -> None:
        self.set_var(expr.name, self.text_[self.var_scope_begin.pop(expr.name):])

    # ---- helpers ---------------------------------------------------------------------------

    def _append(self, text: str, var: str | None = None, meta: dict | None = None) -> None:
        self.text_ += text
        with self.cond:
            self.chunks.append((var, text, meta))
            self.cond.notify_all()

    def _set_result(self, name: str | None, value: str, meta: dict) -> None:
        if name is not None:
            self.meta_info[name] = meta
            self.set_var(name, value)

    def _spawn(self, stream_key: str) -> "StreamExecutor":
        return StreamExecutor(self.backend, self.chat_template, defaults=self.defaults,
                              stream=self.stream, stream_key=stream_key)


_LOGPROB_KEYS = ("input_token_logprobs", "output_token_logprobs")
_TOP_KEYS = ("input_top_logprobs", "output_top_logprobs")


def _logprob_texts(meta: dict, params: ir.GenParams) -> dict:
    """SGLang's logprob entries are (logprob, token_id, text) with text None unless the gen asked
    for return_text_in_logprobs; the runtime always sends the text."""
    if params.return_text_in_logprobs or not any(k in meta for k in _LOGPROB_KEYS + _TOP_KEYS):
        return meta
    meta = dict(meta)
    for key in _LOGPROB_KEYS:
        if meta.get(key) is not None:
            meta[key] = [_no_text(e) for e in meta[key]]
    for key in _TOP_KEYS:
        if meta.get(key) is not None:
            meta[key] = [None if row is None else [_no_text(e) for e in row] for row in meta[key]]
    return meta


def _no_text(entry):
    return (entry[0], entry[1], None) if entry is not None and len(entry) == 3 else entry


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


def _var_names(expr: ir.Expr) -> list[str]:
    if isinstance(expr, ir.ExprList):
        return [n for e in expr.exprs for n in _var_names(e)]
    if isinstance(expr, (ir.Gen, ir.Select, ir.VarScopeEnd, ir.SeparateReasoning)) \
            and expr.name is not None:
        return [expr.name]
    return []


def _separated_names(expr: ir.Expr) -> list[str]:
    """Variables that a separate_reasoning in expr rewrites: readers wait for the rewrite."""
    if isinstance(expr, ir.ExprList):
        return [n for e in expr.exprs for n in _separated_names(e)]
    if isinstance(expr, ir.SeparateReasoning):
        subs = expr.expr.exprs if isinstance(expr.expr, ir.ExprList) else [expr.expr]
        return [e.name for e in subs if isinstance(e, (ir.Gen, ir.Select)) and e.name]
    return []
