"""Counters of the scheduler: one log line per interval and the same numbers in InfoOut.info."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

logger = logging.getLogger("sglite.runtime")


@dataclass
class Stats:
    log_interval: float = 10.0
    num_requests: int = 0
    num_finished: int = 0
    num_retractions: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of admitted requests (first admission)
    num_cached_tokens: int = 0  # ... of which found in the radix tree
    num_prefill_tokens: int = 0  # tokens run through extend forwards
    num_decode_tokens: int = 0
    prefill_time: float = 0.0  # seconds inside extend forwards
    decode_time: float = 0.0
    schedule_time: float = 0.0  # seconds in step() outside forwards (the scheduler's own cost)
    busy_time: float = 0.0  # seconds inside step() (the loop steps only while there is work)
    num_steps: int = 0
    # CUDA: seconds the device spent inside forwards (events around each launch, read once they
    # have completed): with busy_time, how much of the runtime's working time the GPU computes
    gpu_forward_time: float = 0.0
    # host seconds per phase of the loop (scheduler.step's parts, OutputProcessor.apply's): where
    # a host-bound step's time goes, without a profiler's distortion
    host_time: dict = field(default_factory=dict)
    host_time_max: dict = field(default_factory=dict)  # each phase's longest charge since the last read
    _gpu_events: list = field(default_factory=list)
    # SGLITE_TIMELINE=path: every host phase and every forward's host launch and GPU span, written
    # there as JSON at each counters() read (where the GPU idles inside busy time, and beside what)
    timeline: Timeline | None = field(
        default_factory=lambda: Timeline(os.environ["SGLITE_TIMELINE"]) if os.environ.get("SGLITE_TIMELINE") else None)
    _last_log: float = field(default_factory=time.monotonic)
    _window: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})

    def record_extend(self, num_tokens: int, seconds: float) -> None:
        self.num_prefill_tokens += num_tokens
        self.prefill_time += seconds
        self._window["prefill"] += num_tokens

    def record_decode(self, num_tokens: int, seconds: float) -> None:
        self.num_decode_tokens += num_tokens
        self.decode_time += seconds
        self._window["decode"] += num_tokens

    def record_step(self, schedule_seconds: float, step_seconds: float = 0.0) -> None:
        self.num_steps += 1
        self.schedule_time += schedule_seconds
        self.busy_time += step_seconds

    def watch_gc(self) -> None:
        """Charge each collection of Python's garbage collector to the host phase "gc" (it also
        counts inside whatever phase it interrupted): a full collection over a server's objects
        is a stall of the whole batch, invisible to the phases' own names."""
        import gc

        started = [0.0]

        def on_gc(event: str, info: dict) -> None:
            if event == "start":
                started[0] = time.perf_counter()
            else:
                self.add_host_time(f"gc{info.get('generation', '')}", started[0])

        gc.callbacks.append(on_gc)

    def add_host_time(self, phase: str, since: float) -> float:
        """Charge perf_counter() - since to phase; returns perf_counter() (the next phase's start)."""
        now = time.perf_counter()
        if self.timeline is not None:
            self.timeline.phases.append((phase, since, now))
        self.host_time[phase] = self.host_time.get(phase, 0.0) + now - since
        if now - since > self.host_time_max.get(phase, 0.0):
            self.host_time_max[phase] = now - since
        return now

    def forward_started(self, device):
        """A CUDA start event for the forward launched next (None elsewhere)."""
        if device is None or device.type != "cuda":
            return None
        import torch

        if self.timeline is not None:
            self.timeline.anchor()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        if self.timeline is not None:
            self.timeline.launches.append([time.perf_counter(), None, start, None])
        return start

    def forward_launched(self, start) -> None:
        """After the forward's launch: its end event; completed pairs are summed as they finish."""
        if start is None:
            return
        import torch

        end = torch.cuda.Event(enable_timing=True)
        end.record()
        if self.timeline is not None:
            self.timeline.launches[-1][1], self.timeline.launches[-1][3] = time.perf_counter(), end
        self._gpu_events.append((start, end))
        while self._gpu_events and self._gpu_events[0][1].query():
            first, last = self._gpu_events.pop(0)
            self.gpu_forward_time += first.elapsed_time(last) / 1e3

    @property
    def forward_time(self) -> float:
        return self.prefill_time + self.decode_time

    def record_admission(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        self.num_prompt_tokens += num_prompt_tokens
        self.num_cached_tokens += num_cached_tokens

    @property
    def cache_hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0

    def counters(self, scheduler) -> dict:
        c = {
            "num_running_reqs": len(scheduler.running),
            "num_waiting_reqs": len(scheduler.waiting) + len(scheduler.grammar_queue),
            "num_requests": self.num_requests, "num_finished": self.num_finished,
            "num_retractions": self.num_retractions,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_cached_tokens": self.num_cached_tokens,
            "cache_hit_rate": round(self.cache_hit_rate, 4),
            "num_prefill_tokens": self.num_prefill_tokens,
            "num_decode_tokens": self.num_decode_tokens,
            "prefill_time_s": round(self.prefill_time, 4),
            "decode_time_s": round(self.decode_time, 4),
            "schedule_time_s": round(self.schedule_time, 4), "num_steps": self.num_steps,
            "busy_time_s": round(self.busy_time, 4),
        }
        if self._gpu_events or self.gpu_forward_time:
            for first, last in self._gpu_events:
                last.synchronize()
                self.gpu_forward_time += first.elapsed_time(last) / 1e3
            self._gpu_events.clear()
            c["gpu_forward_time_s"] = round(self.gpu_forward_time, 4)
            c["allocator"] = allocator_counters()
        c["host_time_s"] = {k: round(v, 4) for k, v in self.host_time.items()}
        if self.timeline is not None:
            self.timeline.write()
        c.update(scheduler.cache.counters())
        c["kv_usage"] = round(1 - (c["kv_free"] + c["kv_evictable"]) / max(c["kv_total"], 1), 4)
        return c

    def take_host_time_max(self) -> dict:
        """Each phase's longest single charge since the last call (then forgotten): tells a spike
        (a compile, an allocation) from a steady cost, which the sums cannot."""
        out = {k: round(v, 4) for k, v in self.host_time_max.items()}
        self.host_time_max.clear()
        return out

    def maybe_log(self, scheduler) -> None:
        now = time.monotonic()
        elapsed = now - self._last_log
        if self.log_interval <= 0 or elapsed < self.log_interval:
            return
        if self._window["prefill"] or self._window["decode"] or scheduler.has_work:
            c = self.counters(scheduler)
            logger.info(
                "running %d, waiting %d, KV usage %.1f%% (evictable %d, free %d), cache hit "
                "rate %.1f%%, prefill %.0f tok/s, decode %.1f tok/s, retractions %d",
                c["num_running_reqs"], c["num_waiting_reqs"], 100 * c["kv_usage"],
                c["kv_evictable"], c["kv_free"], 100 * self.cache_hit_rate,
                self._window["prefill"] / elapsed, self._window["decode"] / elapsed,
                self.num_retractions)
        self._window = {"prefill": 0, "decode": 0}
        self._last_log = now


def allocator_counters() -> dict:
    """torch's caching allocator on the current CUDA device: segments taken from and given back
    to the driver (cudaMalloc / cudaFree wait for the GPU: a growth mid-run stalls a launch), the
    retries after an out-of-memory and the device-wide syncs they cost, and the bytes reserved."""
    import torch

    m = torch.cuda.memory_stats()
    return {"device_allocs": m.get("num_device_alloc", 0), "device_frees": m.get("num_device_free", 0),
            "alloc_retries": m.get("num_alloc_retries", 0), "syncs": m.get("num_sync_all_streams", 0),
            "reserved_gib": round(m.get("reserved_bytes.all.current", 0) / 2**30, 3)}


class Timeline:
    """The loop's host phases and its forwards' spans on one clock (host seconds): a GPU event
    recorded right after a synchronize anchors the device's clock to the host's."""

    def __init__(self, path: str):
        self.path = path.replace("{pid}", str(os.getpid()))
        self.phases: list[tuple[str, float, float]] = []
        self.launches: list[list] = []  # [host start, host end, start event, end event]
        self._base = None

    def anchor(self) -> None:
        if self._base is None:
            import torch

            torch.cuda.synchronize()
            self._base = (torch.cuda.Event(enable_timing=True), time.perf_counter())
            self._base[0].record()

    def write(self) -> None:
        if self._base is None:
            return
        base, host0 = self._base
        forwards = []
        for h0, h1, e0, e1 in self.launches:
            e1.synchronize()
            forwards.append([h0, h1, host0 + base.elapsed_time(e0) / 1e3,
                             host0 + base.elapsed_time(e1) / 1e3])
        with open(self.path, "w") as f:
            json.dump({"phases": self.phases, "forwards": forwards}, f)
