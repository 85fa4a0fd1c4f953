"""SglFunction (what @sgl.function returns): run, run_batch, bind, trace, compile.

Every way of running a program (run, run_batch, compiled programs) executes its Python body
exactly once, eagerly through the interpreter, as SGLang does. Prefix sharing across programs is
the runtime's radix cache's job. `trace()` records the program on placeholders for inspection
(tracer.py) and `cache()` prefills its constant prefix.
"""

from __future__ import annotations

import inspect
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from sglite.lang import ir
from sglite.lang.backend.base import BaseBackend
from sglite.lang.interpreter import StreamExecutor
from sglite.lang.state import ProgramState
from sglite.lang.chat_template import get_chat_template
from sglite.lang.global_config import global_config
from sglite.lang.tracer import TracerProgramState, current_tracer, trace_program

def set_default_backend(backend: BaseBackend | None) -> None:
    global_config.default_backend = backend


def resolve_backend(backend: BaseBackend | None) -> BaseBackend:
    backend = backend if backend is not None else global_config.default_backend
    if backend is None:
        raise RuntimeError("no backend: call sgl.set_default_backend(sgl.Runtime()) or pass "
                           "backend=... to run/run_batch")
    return backend


class SglFunction:
    def __init__(self, func, *, bind_arguments: dict[str, Any] | None = None):
        names = list(inspect.signature(func).parameters)
        if not names or names[0] != "s":
            raise TypeError(f"the first parameter of @sgl.function {func.__name__!r} must be `s`")
        self.func, self.arg_names = func, names[1:]
        self.bind_arguments = dict(bind_arguments or {})
        self.__name__, self.__doc__ = func.__name__, func.__doc__

    def bind(self, **kwargs) -> "SglFunction":
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.__name__}() has no arguments {sorted(unknown)}")
        return SglFunction(self.func, bind_arguments={**self.bind_arguments, **kwargs})

    def __call__(self, *args, **kwargs):
        """Inside another program, `helper(s, ...)` runs helper's body on the same state; while a
        program is traced, `helper(tip=...)` is traced too (SGLang's TracingScope)."""
        if args and isinstance(args[0], (ProgramState, TracerProgramState)):
            return self.func(args[0], *args[1:], **{**self.bind_arguments, **kwargs})
        tracer = current_tracer()
        if tracer is not None:
            return self._trace(tracer.chat_template, ir.GenParams(), dict(zip(self.arg_names, args)),
                               kwargs)
        return self.run(*args, **kwargs)

    def run(self, *args, stream: bool = False, backend: BaseBackend | None = None,
            **kwargs) -> ProgramState:
        """Start the program; returns at once (s[var] and text() wait). Keyword arguments that
        name GenParams fields (max_new_tokens, temperature, ...) are defaults for every gen."""
        defaults, kwargs = ir.GenParams.from_kwargs(kwargs, self.arg_names)
        defaults.validate(f"{self.__name__}.run")
        return run_program(self, resolve_backend(backend), args,
                           {**self.bind_arguments, **kwargs}, defaults=defaults, stream=stream)

    def run_batch(self, batch_kwargs: list, *, backend: BaseBackend | None = None,
                  num_threads: int | str = "auto", progress_bar: bool = False,
                  generator_style: bool = False, **sampling_defaults):
        """Run many programs concurrently (each body once, eagerly); returns the finished states
        in order, or with generator_style=True yields them in order as they finish (submitted in
        chunks of 200, as SGLang does). A failing program reports through its state.error()."""
        backend = resolve_backend(backend)
        defaults, unknown = ir.GenParams.from_kwargs(sampling_defaults)
        if unknown:
            raise TypeError(f"run_batch got unknown keyword arguments {sorted(unknown)}")
        defaults.validate("run_batch")
        calls = [{**self.bind_arguments, **self._normalize_call(item)} for item in batch_kwargs]
        if num_threads == "auto":
            num_threads = max(96, (os.cpu_count() or 1) * 16)
        num_threads = max(1, min(int(num_threads), len(calls)))
        run = partial(run_program, self, backend, (), defaults=defaults, catch=True, wait=True)
        states = _run_in_order(run, calls, num_threads, progress_bar,
                               chunk=200 if generator_style else len(calls))
        return states if generator_style else list(states)

    def trace(self, *, backend: BaseBackend | None = None, **kwargs) -> TracerProgramState:
        """Run the body once on placeholders (arguments not given, generated values) and return
        the tracer state: `.last_node.print_graph_dfs()`, `.nodes`, `.constant_prefix`. Needs no
        runtime: without a backend the "default" chat template frames roles."""
        backend = backend if backend is not None else global_config.default_backend
        template = backend.get_chat_template() if backend is not None \
            else get_chat_template("default")
        defaults, kwargs = ir.GenParams.from_kwargs(kwargs, self.arg_names)
        return self._trace(template, defaults, {}, kwargs)

    def cache(self, backend: BaseBackend | None = None) -> str:
        """Prefill the program's constant prefix (text before its first argument, gen, select or
        fork) into the runtime's radix cache; returns that prefix ("" caches nothing)."""
        backend = resolve_backend(backend)
        try:
            prefix = self._trace(backend.get_chat_template(), ir.GenParams(), {}, {}).constant_prefix
        except (ir.CannotTrace, TypeError, AttributeError, KeyError):
            # The body needs real values early (SGLang stops tracing there too); the nodes
            # recorded up to that point are lost with the exception, so nothing is cached.
            return ""
        if prefix:
            backend.cache_prefix(prefix)
        return prefix

    def _trace(self, template, defaults: ir.GenParams, given: dict, kwargs: dict):
        args = {n: ir.Argument(n) for n in self.arg_names}
        args.update(self.bind_arguments, **given, **kwargs)
        return trace_program(self, args, chat_template=template, defaults=defaults)

    def compile(self, *, backend: BaseBackend | None = None) -> "CompiledFunction":
        return CompiledFunction(self, backend)

    def _normalize_call(self, item) -> dict[str, Any]:
        if isinstance(item, dict):
            return item
        if isinstance(item, (tuple, list)):
            if len(item) > len(self.arg_names):
                raise TypeError(f"{self.__name__}() takes {len(self.arg_names)} arguments, "
                                f"got {len(item)}")
            return dict(zip(self.arg_names, item))
        raise TypeError(f"run_batch items must be dicts or tuples, got {type(item).__name__}")


class CompiledFunction:
    """SGLang's compiled program, kept for its API: runs are eager (each body once); the program
    is traced only when print_graph asks for it."""

    def __init__(self, function: SglFunction, backend: BaseBackend | None):
        self.function, self.backend = function, backend

    def run(self, *, backend: BaseBackend | None = None, **kwargs) -> ProgramState:
        return self.function.run(backend=backend or self.backend, **kwargs)

    def run_batch(self, batch_kwargs: list[dict], *, backend: BaseBackend | None = None,
                  num_threads: int | str = "auto", progress_bar: bool = False, **sampling_defaults):
        return self.function.run_batch(batch_kwargs, backend=backend or self.backend,
                                       num_threads=num_threads, progress_bar=progress_bar,
                                       **sampling_defaults)

    def print_graph(self) -> str:
        try:
            return self.function.trace(backend=self.backend).print_graph()
        except ir.CannotTrace as e:
            return f"(cannot trace: {e})"


def run_program(program: SglFunction, backend: BaseBackend, args: tuple, kwargs: dict, *,
                defaults: ir.GenParams, stream: bool = False, catch: bool = False,
                wait: bool = False) -> ProgramState:
    executor = StreamExecutor(backend, backend.get_chat_template(), defaults=defaults,
                              stream=stream)
    state = ProgramState(executor)

    def body():
        executor.body_thread = threading.get_ident()
        try:
            state.ret_value = program.func(state, *args, **kwargs)
        except Exception as e:
            executor.sync()
            executor._fail(e)
            if not (catch or stream):
                raise
        finally:
            executor.end()

    if stream:
        threading.Thread(target=body, daemon=True, name="sglite-stream-body").start()
    else:
        body()
        if wait or global_config.verbosity >= 2:
            executor.sync()
        if global_config.verbosity >= 2:
            print(executor.text_)
    return state


def _run_in_order(run, calls: list[dict], num_threads: int, progress_bar: bool, chunk: int):
    """Yield run(**call) results in call order; at most `chunk` calls are queued at a time."""
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(calls))
    with ThreadPoolExecutor(num_threads) as pool:
        for start in range(0, len(calls), max(chunk, 1)):
            futures = [pool.submit(run, kw) for kw in calls[start:start + chunk]]
            if bar is not None:
                for future in futures:
                    future.add_done_callback(lambda _: bar.update())
            for future in futures:
                yield future.result()
    if bar is not None:
        bar.close()
