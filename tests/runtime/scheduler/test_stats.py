"""Stats: host phases, each phase's longest charge, and garbage-collector pauses as phases."""

import gc

from sglite.runtime.scheduler.stats import Stats


def test_gc_pauses_are_charged_as_phases_by_generation():
    stats = Stats(log_interval=0)
    before = list(gc.callbacks)
    stats.watch_gc()
    try:
        gc.collect()  # a full collection: generation 2
        gc.collect(0)
    finally:
        gc.callbacks[:] = before
    assert stats.host_time["gc2"] > 0 and "gc0" in stats.host_time
    assert stats.take_host_time_max()["gc2"] >= 0 and stats.host_time_max == {}


def test_add_host_time_sums_and_keeps_the_longest_charge():
    stats = Stats(log_interval=0)
    t = stats.add_host_time("a", 0.0)  # since 0: a long charge
    stats.add_host_time("a", t)
    assert stats.host_time["a"] >= stats.host_time_max["a"] > 0
