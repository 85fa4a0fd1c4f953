"""Tracing: run a program once without the runtime and record its request graph.

RecordingExecutor is a StreamExecutor that executes synchronously and, instead of sending
requests, turns the appended text into "text" nodes and each gen/select into a node whose parent
is the node its prompt extends; a fork's branches share the fork point as their parent. Anything
that needs a generated value while the program runs (s[var], s.text(), join, logprobs) raises
CannotTrace, and the caller runs the program eagerly instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sglite import protocol
from sglite.lang import ir
from sglite.lang.backend.base import BaseBackend
from sglite.lang.chat_template import get_chat_template
from sglite.lang.interpreter import StreamExecutor


@dataclass
class Trace:
    nodes: list[protocol.GraphNode] = field(default_factory=list)
    node_ids: dict[tuple[str, int], int] = field(default_factory=dict)
    # Constant text before the first argument, gen, select or fork (run_batch prefills it once).
    constant_prefix: str = ""
    prefix_open: bool = True

    @property
    def num_generations(self) -> int:
        return len(self.node_ids)

    def add(self, kind: str, parent: int | None, *, key=None, **fields) -> int:
        node = protocol.GraphNode(id=len(self.nodes), kind=kind, parent=parent, **fields)
        self.nodes.append(node)
        if key is not None:
            self.node_ids[key] = node.id
        return node.id

    def print_graph(self) -> str:
        lines = []
        for n in self.nodes:
            what = {"text": repr(n.text[:60]), "gen": f"gen {n.name!r} {n.sampling_params}",
                    "select": f"select {n.name!r} {n.choices} ({n.choices_method})"}[n.kind]
            lines.append(f"#{n.id} <- {n.parent}: {what}")
        print("\n".join(lines))
        return "\n".join(lines)


class RecordingExecutor(StreamExecutor):
    sends_requests = False

    def __init__(self, backend, chat_template, *, defaults: ir.GenParams, trace: Trace,
                 stream_key: str = "0", parent_node: int | None = None):
        super().__init__(backend, chat_template, defaults=defaults, stream_key=stream_key,
                         use_thread=False)
        self.trace, self.node, self.pending = trace, parent_node, ""

    def _execute_guarded(self, expr: ir.Expr) -> None:
        self._execute(expr)  # no catching: a failed trace falls back to eager

    def _append(self, text: str, var: str | None = None) -> None:
        self.text_ += text
        self.pending += text
        if self.trace.prefix_open:
            self.trace.constant_prefix += text

    def _execute_argument(self, expr: ir.Argument) -> None:
        self.trace.prefix_open = False
        self._append("{" + expr.name + "}")

    def _execute_gen(self, expr: ir.Gen) -> None:
        params = expr.params.merge(self.defaults)
        if params.needs_logprobs:
            raise ir.CannotTrace("a request graph carries no logprob options")
        self._add_node("gen", name=expr.name, sampling_params=params.to_sampling_params())
        self._set_result(expr.name, "", {})

    def _execute_select(self, expr: ir.Select) -> None:
        self._add_node("select", name=expr.name, choices=expr.choices,
                       choices_method=expr.choices_method.name)
        self._set_result(expr.name, "", {})

    def get_var(self, name: str):
        raise ir.CannotTrace(f"the program reads s[{name!r}] while it runs")

    def get_text(self) -> str:
        raise ir.CannotTrace("the program reads s.text() while it runs")

    def get_messages(self):
        raise ir.CannotTrace("the program reads s.messages() while it runs")

    def join(self, children, mode: str) -> None:
        raise ir.CannotTrace("a request graph cannot join forks")

    def fork(self, size: int):
        self._flush()  # the fork point: a node every branch extends
        self.trace.prefix_open = False
        return super().fork(size)

    def _add_node(self, kind: str, **fields) -> None:
        self._flush()
        self.trace.prefix_open = False
        key = (self.stream_key, self.num_gens)
        self.num_gens += 1
        self.node = self.trace.add(kind, self.node, key=key, **fields)

    def _flush(self) -> None:
        if self.pending:
            self.node = self.trace.add("text", self.node, text=self.pending)
            self.pending = ""

    def _spawn(self, stream_key: str) -> "RecordingExecutor":
        return RecordingExecutor(self.backend, self.chat_template, defaults=self.defaults,
                                 trace=self.trace, stream_key=stream_key, parent_node=self.node)


def trace_program(program, args: tuple, kwargs: dict, *, backend: BaseBackend | None,
                  defaults: ir.GenParams) -> Trace:
    """Raises CannotTrace (or the program's own error) when the program cannot become a graph."""
    from sglite.lang.state import ProgramState

    template = backend.get_chat_template() if backend is not None else get_chat_template("default")
    trace = Trace()
    executor = RecordingExecutor(backend, template, defaults=defaults, trace=trace)
    program.func(ProgramState(executor), *args, **kwargs)
    return trace
