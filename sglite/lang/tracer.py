"""Tracing (SGLang's `trace()` API): run a program's body once on placeholders, without a runtime,
and record what it appends as a graph of TraceNodes for inspection.

Nothing here is executed or sent: `run`, `run_batch` and compiled programs run each body once,
eagerly, through the interpreter. Arguments not given are ir.Argument placeholders; reading a
generated variable (`s["a"]`, `forks[0]["a"]`, or a nested program's variable) returns an
ir.Variable placeholder that can be appended like text, as in SGLang. `constant_prefix` (the text
before the first non-constant node) is what `SglFunction.cache()` prefills.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from sglite.lang import ir
from sglite.lang.chat_template import ChatTemplate

_node_ids = itertools.count()
_scope = threading.local()  # .tracer: the TracerProgramState whose body is running on this thread


class TraceNode:
    """One appended piece: kind is text, gen, select, argument, variable, fork, get_fork_item or
    join; prev_node is the node it extends (None at the start of the program)."""

    def __init__(self, kind: str, prev_node: "TraceNode | None", *, expr: ir.Expr | None = None,
                 text: str = "", name: str | None = None, sampling_params: dict | None = None,
                 source: "TraceNode | None" = None, detail: str = ""):
        self.node_id = next(_node_ids)
        self.kind, self.prev_node, self.expr = kind, prev_node, expr
        self.text, self.name, self.source, self.detail = text, name, source, detail
        self.sampling_params = sampling_params or {}

    @property
    def choices(self) -> list[str]:
        return self.expr.choices if isinstance(self.expr, ir.Select) else []

    def __repr__(self) -> str:
        what = {"text": repr(self.text[:60]), "gen": f"Gen({self.name!r}, {self.sampling_params})",
                "select": f"Select({self.name!r}, {self.choices})",
                "argument": f"Argument({self.name!r})", "variable": f"Variable({self.name!r})",
                }.get(self.kind)
        return what or f"{self.kind.capitalize()}({self.detail})"

    def print_graph_dfs(self) -> str:
        """Every node this one depends on (earlier text, variable sources), one line each, in
        dependency order: `%7 = %6 + Gen('answer', {...})`, as SGLang's print_graph_dfs."""
        lines: list[str] = []
        seen: set[int] = set()
        stack: list[tuple[TraceNode, bool]] = [(self, False)]
        while stack:  # iterative DFS: long programs make deep prev_node chains
            node, expanded = stack.pop()
            if expanded:
                prev = f"%{node.prev_node.node_id} + " if node.prev_node is not None else ""
                lines.append(f"%{node.node_id} = {prev}{node!r}")
                continue
            if node.node_id in seen:
                continue
            seen.add(node.node_id)
            stack.append((node, True))
            for dep in (node.source, node.prev_node):
                if dep is not None and dep.node_id not in seen:
                    stack.append((dep, False))
        return "\n".join(lines) + "\n"


class TracerProgramState:
    """The `s` a traced body sees, and what `trace()` returns: `last_node`, `nodes`, `variables`
    (name -> the node that produces it), `constant_prefix`, `print_graph()`."""

    def __init__(self, chat_template: ChatTemplate, defaults: ir.GenParams,
                 arguments: dict[str, Any], prev_node: TraceNode | None = None):
        self.chat_template, self.defaults, self.arguments = chat_template, defaults, arguments
        self.nodes: list[TraceNode] = []
        self.last_node = prev_node
        self.variables: dict[str, TraceNode] = {}
        self.messages_: list[dict[str, str]] = []
        self.cur_role: str | None = None
        self.text_ = ""  # appended text, with {placeholders} for arguments and generated values
        self.ret_value: Any = None

    # ---- the ProgramState surface ----------------------------------------------------------

    def __iadd__(self, other) -> "TracerProgramState":
        self._execute(ir.as_expr(other))
        return self

    def __getitem__(self, name: str) -> Any:
        if self.arguments.get(name) is not None:
            return self.arguments[name]
        if name not in self.variables:
            raise KeyError(f"no variable {name!r} in this program state")
        return ir.Variable(name, self.variables[name])

    def __setitem__(self, name: str, value: Any) -> None:
        self.arguments[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.arguments

    get_var = __getitem__
    set_var = __setitem__

    def text(self) -> str:
        return self.text_

    def messages(self) -> list[dict[str, str]]:
        return list(self.messages_)

    def get_meta_info(self, name: str) -> dict[str, Any]:
        self[name]
        return {}

    def sync(self) -> None:
        pass

    def error(self) -> None:
        return None

    def system(self, expr=None):
        return self._role("system", expr)

    def user(self, expr=None):
        return self._role("user", expr)

    def assistant(self, expr=None):
        return self._role("assistant", expr)

    def var_scope(self, name: str):
        from sglite.lang.state import scope

        return scope(self, ir.VarScopeBegin(name), ir.VarScopeEnd(name))

    def fork(self, size: int = 1, position_ids_offset=None):
        from sglite.lang.state import ProgramStateGroup

        del position_ids_offset
        if size < 1:
            raise ValueError(f"fork size must be >= 1, got {size}")
        fork = self._add("fork", detail=str(size))
        children = []
        for i in range(size):
            item = TraceNode("get_fork_item", fork, detail=str(i))
            child = TracerProgramState(self.chat_template, self.defaults, self.arguments, item)
            child.variables, child.messages_ = dict(self.variables), list(self.messages_)
            child.cur_role, child.text_ = self.cur_role, self.text_
            children.append(child)
        return ProgramStateGroup(children, self)

    def copy(self):
        from sglite.lang.state import copy_scope

        return copy_scope(self)

    def _join(self, children: list["TracerProgramState"], mode: str) -> None:
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"unknown join mode {mode!r}; use gather_variable or concate_and_append")
        node = self._add("join", detail=mode)
        if mode == "gather_variable":
            for child in children:
                for name, source in child.variables.items():
                    if self.variables.get(name) is not source:
                        self.variables[name] = node
        self.text_ += "{join}" if mode == "concate_and_append" else ""

    # ---- recording -------------------------------------------------------------------------

    def _role(self, role: str, expr=None):
        if expr is not None:
            self += ir.RoleBegin(role) + expr + ir.RoleEnd(role)
            return None
        from sglite.lang.state import scope

        return scope(self, ir.RoleBegin(role), ir.RoleEnd(role))

    def _add(self, kind: str, **fields) -> TraceNode:
        node = TraceNode(kind, self.last_node, **fields)
        self.nodes.append(node)
        self.last_node = node
        return node

    def _fill(self, text: str) -> None:
        if text:
            self._add("text", text=text)
            self.text_ += text

    def _execute(self, expr: ir.Expr) -> None:
        if isinstance(expr, ir.ExprList):
            for sub in expr.exprs:
                self._execute(sub)
        elif isinstance(expr, ir.Text):
            self._fill(expr.value)
        elif isinstance(expr, (ir.Gen, ir.Select)):
            kind = "gen" if isinstance(expr, ir.Gen) else "select"
            name = expr.name if expr.name is not None else f"{kind}_{len(self.variables)}"
            params = expr.params.merge(self.defaults).to_sampling_params() \
                if isinstance(expr, ir.Gen) else {}
            self.variables[name] = self._add(kind, expr=expr, name=name, sampling_params=params)
            self.text_ += "{" + name + "}"
        elif isinstance(expr, ir.Variable):
            self._add("variable", expr=expr, name=expr.name, source=expr.source)
            self.text_ += "{" + expr.name + "}"
        elif isinstance(expr, ir.Argument):
            self._add("argument", expr=expr, name=expr.name)
            self.text_ += "{" + expr.name + "}"
        elif isinstance(expr, ir.RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, ir.RoleEnd):
            self._fill(self.chat_template.get_prefix_and_suffix(expr.role, self.messages_)[1])
            self.messages_.append({"role": expr.role, "content": ""})
            self.cur_role = None
        elif isinstance(expr, ir.VarScopeEnd):
            self.variables[expr.name] = self.last_node
        elif isinstance(expr, ir.SeparateReasoning):
            node = self._add("separate_reasoning", expr=expr, detail=str(expr.model_type))
            if expr.name is not None:
                self.variables[expr.name] = node
        elif not isinstance(expr, ir.VarScopeBegin):
            self._add(type(expr).__name__.lower(), expr=expr)

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError(f"cannot begin role {role!r} inside role {self.cur_role!r}")
        template = self.chat_template
        if not self.messages_ and role != "system" and template.default_system_text:
            self._fill(template.default_system_text)
            self.messages_.append({"role": "system", "content": template.default_system_prompt or ""})
        self._fill(template.get_prefix_and_suffix(role, self.messages_)[0])
        self.cur_role = role

    # ---- inspection ------------------------------------------------------------------------

    @property
    def constant_prefix(self) -> str:
        """The text before the first argument, generated value or fork (what cache() prefills)."""
        prefix = ""
        for node in self.nodes:
            if node.kind != "text":
                break
            prefix += node.text
        return prefix

    def print_graph(self) -> str:
        graph = self.last_node.print_graph_dfs() if self.last_node is not None else ""
        print(graph, end="")
        return graph

    def __repr__(self) -> str:
        return f"TracerProgramState({self.text_!r})"


def current_tracer() -> TracerProgramState | None:
    return getattr(_scope, "tracer", None)


def trace_program(program, arguments: dict[str, Any], *, chat_template: ChatTemplate,
                  defaults: ir.GenParams) -> TracerProgramState:
    """Run program's body on a TracerProgramState; a nested program called while it runs is
    traced too (`helper(tip=s["tip"])` returns that helper's tracer)."""
    state = TracerProgramState(chat_template, defaults, dict(arguments))
    outer = current_tracer()
    _scope.tracer = state
    try:
        state.ret_value = program.func(state, **arguments)
    finally:
        _scope.tracer = outer
    return state
