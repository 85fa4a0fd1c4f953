"""ProgramState (the user's `s`) and ProgramStateGroup (what `s.fork(n)` returns): thin views
over a StreamExecutor."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from sglite.lang import ir
from sglite.lang.interpreter import StreamExecutor


class ProgramState:
    def __init__(self, executor: StreamExecutor):
        self.executor = executor
        self.ret_value: Any = None

    def __iadd__(self, other) -> "ProgramState":
        self.executor.submit(ir.as_expr(other))
        return self

    def __getitem__(self, name: str) -> Any:
        return self.executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.executor.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.executor.variable_events or name in self.executor.variables

    get_var = __getitem__
    set_var = __setitem__

    def text(self) -> str:
        return self.executor.get_text()

    def messages(self) -> list[dict[str, str]]:
        return self.executor.get_messages()

    def get_meta_info(self, name: str) -> dict[str, Any]:
        self.executor.get_var(name)
        return self.executor.meta_info.get(name, {})

    def sync(self) -> None:
        self.executor.sync()

    def error(self) -> Exception | None:
        self.executor.sync()
        return self.executor.error_

    # ---- roles, scopes, forks --------------------------------------------------------------

    def _role(self, role: str, expr=None):
        if expr is not None:
            self += ir.RoleBegin(role) + expr + ir.RoleEnd(role)
            return None
        return scope(self, ir.RoleBegin(role), ir.RoleEnd(role))

    def system(self, expr=None):
        return self._role("system", expr)

    def user(self, expr=None):
        return self._role("user", expr)

    def assistant(self, expr=None):
        return self._role("assistant", expr)

    def var_scope(self, name: str):
        return scope(self, ir.VarScopeBegin(name), ir.VarScopeEnd(name))

    def fork(self, size: int = 1, position_ids_offset=None) -> "ProgramStateGroup":
        del position_ids_offset  # accepted for SGLang compatibility; SGLang ignores it too
        if size < 1:
            raise ValueError(f"fork size must be >= 1, got {size}")
        return ProgramStateGroup([ProgramState(e) for e in self.executor.fork(size)], self)

    def copy(self):
        return copy_scope(self)

    def _join(self, states: list["ProgramState"], mode: str) -> None:
        self.executor.join([s.executor for s in states], mode)

    # ---- streaming -------------------------------------------------------------------------

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """With stream=True: the text (or one variable's text) as it arrives; else the final value."""
        for chunk, _ in self._chunks(var_name):
            yield chunk

    async def text_async_iter(self, var_name: str | None = None, return_meta_data: bool = False):
        """text_iter for asyncio; with return_meta_data, (chunk, meta_info) pairs: the meta info
        that arrived with the chunk (the last one is complete). SGLang yields bare values when not
        streaming even with return_meta_data; here the pairs come either way."""
        loop, end = asyncio.get_running_loop(), object()
        it = self._chunks(var_name)
        while (item := await loop.run_in_executor(None, next, it, end)) is not end:
            yield item if return_meta_data else item[0]

    def _chunks(self, var_name: str | None):
        ex = self.executor
        if not ex.stream:
            if var_name is None:
                yield self.text(), None
            else:
                yield self[var_name], ex.meta_info.get(var_name)
            return
        pos = 0
        while True:
            with ex.cond:
                while pos >= len(ex.chunks) and not ex.is_finished and not _var_done(ex, var_name):
                    ex.cond.wait(timeout=1.0)
                new, pos = ex.chunks[pos:], len(ex.chunks)
                done = ex.is_finished or _var_done(ex, var_name)
            for var, text, meta in new:
                if text and (var_name is None or var == var_name):
                    yield text, meta
            if done and pos >= len(ex.chunks):
                break
        if ex.error_ is not None:
            raise RuntimeError(f"the program failed: {ex.error_}") from ex.error_

    def __repr__(self) -> str:
        return f"ProgramState({self.executor.text_!r})"


@contextmanager
def scope(state, begin: ir.Expr, end: ir.Expr):
    """`with s.user():` / `with s.var_scope(name):` (also used by the tracer's state)."""
    state += begin
    yield state
    state += end


@contextmanager
def copy_scope(state):
    group = state.fork(1)
    try:
        yield group[0]
    finally:
        group.join()


def _var_done(ex: StreamExecutor, var_name: str | None) -> bool:
    if var_name is None:
        return ex.error_ is not None
    event = ex.variable_events.get(var_name)
    return ex.error_ is not None or (event is not None and event.is_set())


class ProgramStateGroup:
    def __init__(self, states: list[ProgramState], parent: ProgramState):
        self.states, self.parent = states, parent

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, state: ProgramState) -> None:
        # `forks[i] += expr` is `forks[i] = forks[i].__iadd__(expr)`: the same state comes back.
        if state is not self.states[i]:
            raise TypeError("a fork's state can only be extended in place (forks[i] += ...)")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self):
        return iter(self.states)

    def __iadd__(self, other: ir.Expr | str | list | Callable[[int], Any]) -> "ProgramStateGroup":
        if callable(other) and not isinstance(other, ir.Expr):
            for i, state in enumerate(self.states):
                state += other(i)
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} expressions for {len(self.states)} forks")
            for state, expr in zip(self.states, other):
                state += expr
        else:
            for state in self.states:
                state += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        self.parent._join(self.states, mode)
