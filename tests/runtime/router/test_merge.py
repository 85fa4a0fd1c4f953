"""merge_infos: one info for the replica group (counters summed, ratios from the sums) and
routing_key: the prompt each routed request starts with."""

from sglite import protocol
from sglite.runtime.router.router import merge_infos, routing_key


def _info(pid, prompt, cached, free, evictable, total):
    return {"model_path": "m", "context_length": 2048, "pid": pid, "disable_radix_cache": False,
            "num_prompt_tokens": prompt, "num_cached_tokens": cached,
            "cache_hit_rate": round(cached / prompt, 4), "kv_free": free,
            "kv_evictable": evictable, "kv_total": total, "busy_time_s": 1.5,
            "kv_usage": round(1 - (free + evictable) / total, 4)}


def test_counters_are_summed_and_ratios_recomputed_from_the_sums():
    merged = merge_infos([_info(11, 100, 90, 500, 100, 1000), _info(12, 300, 30, 1000, 0, 1000)])
    assert merged["num_prompt_tokens"] == 400 and merged["num_cached_tokens"] == 120
    assert merged["cache_hit_rate"] == 0.3  # not 0.9 + 0.1
    assert merged["kv_total"] == 2000 and merged["kv_usage"] == 0.2
    assert merged["busy_time_s"] == 3.0
    # facts about the model or one process are the first replica's, not sums
    assert merged["context_length"] == 2048 and merged["pid"] == 11
    assert merged["disable_radix_cache"] is False and merged["model_path"] == "m"


def test_routing_key_is_the_prompt():
    assert routing_key(protocol.GenerateReq(rid="a", text="hello")) == "hello"
    assert routing_key(protocol.GenerateReq(rid="a", input_ids=[4, 5])) == (4, 5)
    assert routing_key(protocol.ScoreReq(rid="a", text="pick", choices=["x"])) == "pick"
