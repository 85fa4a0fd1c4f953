"""Online serving in the manner of SGLang's bench_serving: N requests with random prompt and output
lengths, sent at a request rate (infinite: all at once; or Poisson arrivals), streamed, over the
HTTP front (/v1/completions, SSE) and over ZeroMQ (the protocol, straight to the runtime) in the
same call, on one runtime (its radix cache flushed between runs, so no path reuses another's KV).

Reported per path: request and output-token throughput, time to first token, inter-token latency
(an SSE event that carries k tokens counts as k gaps of dt/k; token counts come from
stream_options.continuous_usage_stats over HTTP, from meta_info over ZeroMQ), end-to-end latency,
p50 and p99; and the HTTP/ZMQ throughput ratio.

    python bench/make_bench_model.py .benchmodel      # once, on a machine with the embedded model
    python bench/serving.py --model .benchmodel --load-format dummy          # H100/H200
    python bench/serving.py --device cpu --num-prompts 16 --input-len 32 --output-len 8 \\
        --rates inf,4                                                        # a CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglite import protocol  # noqa: E402
from sglite.http.launch import HttpServerProcess  # noqa: E402
from sglite.http.runtime_client import AsyncRuntimeClient  # noqa: E402
from sglite.launch import RuntimeProcess  # noqa: E402


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def workload(args, vocab: int):
    rng = random.Random(args.seed)

    def length(n):
        return max(1, rng.randint(int(n * args.range_ratio), n))

    reqs = []
    for _ in range(args.num_prompts):
        ids = [rng.randrange(100, min(vocab, 40000)) for _ in range(length(args.input_len))]
        reqs.append((ids, length(args.output_len)))
    return reqs


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ---- the two paths: each sends one request and records its timings

async def one_http(session, url, ids, out_len, t_send) -> Result:
    r = Result()
    body = {"model": "bench", "prompt": ids, "max_tokens": out_len, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    last, tokens = t_send, 0
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return r
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                ev = json.loads(data)
                usage = ev.get("usage")
                if not ev["choices"] or usage is None:
                    continue
                now = time.perf_counter()
                k = usage["completion_tokens"] - tokens
                if k <= 0:
                    continue
                if tokens == 0:
                    r.ttft = now - t_send
                    if k > 1:
                        r.itl += [0.0] * (k - 1)
                else:
                    r.itl += [(now - last) / k] * k
                tokens, last = usage["completion_tokens"], now
        r.e2e, r.output_tokens, r.ok = time.perf_counter() - t_send, tokens, tokens == out_len
        if not r.ok:
            r.error = f"got {tokens} of {out_len} tokens"
    except Exception as e:  # noqa: BLE001 (a failed request is counted, the run goes on)
        r.error = f"{type(e).__name__}: {e}"
    return r


async def one_zmq(client: AsyncRuntimeClient, ids, out_len, t_send) -> Result:
    r = Result()
    rid = client.new_rid("bench")
    q = await client.request(protocol.GenerateReq(
        rid=rid, input_ids=ids, stream=True, sampling_params={
            "max_new_tokens": out_len, "temperature": 0, "ignore_eos": True}))
    last, tokens = t_send, 0
    try:
        while True:
            items = [await client.recv(q)] + client.drain(q)
            now = time.perf_counter()
            finished = False
            for item in items:
                if isinstance(item, protocol.ErrorOut):
                    r.error = item.message
                    return r
                finished = finished or item.finished
            n = items[-1].meta_info.get("completion_tokens", 0)
            k = n - tokens
            if k > 0:
                if tokens == 0:
                    r.ttft = now - t_send
                    r.itl += [0.0] * (k - 1)
                else:
                    r.itl += [(now - last) / k] * k
                tokens, last = n, now
            if finished:
                break
        r.e2e, r.output_tokens, r.ok = time.perf_counter() - t_send, tokens, tokens == out_len
    finally:
        client.forget(rid)
    return r


async def run_path(path: str, reqs, times, *, url: str, address: str, api_key: str | None):
    results: list[Result] = [Result() for _ in reqs]

    async def fire(i, send):
        t_send = time.perf_counter()
        results[i] = await send(*reqs[i], t_send)

    if path == "http":
        import aiohttp

        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        session = aiohttp.ClientSession(connector=conn, headers=headers, timeout=timeout)

        async def send(ids, n, t):
            return await one_http(session, url, ids, n, t)
    else:
        client = AsyncRuntimeClient(address)
        await client.start(60)
        session = None

        async def send(ids, n, t):
            return await one_zmq(client, ids, n, t)
    t0 = time.perf_counter()
    tasks = []
    for i, at in enumerate(times):
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(i, send)))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    if session is not None:
        await session.close()
    else:
        await client.close()
    return results, duration


def summarize(path, rate, results: list[Result], duration) -> dict:
    ok = [r for r in results if r.ok]
    itl = [x for r in ok for x in r.itl]

    def pct(xs, p):
        if not xs:
            return float("nan")
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    out_tokens = sum(r.output_tokens for r in ok)
    s = {"path": path, "rate": rate, "requests": len(results), "completed": len(ok),
         "duration_s": round(duration, 3), "req_per_s": round(len(ok) / duration, 3),
         "output_tok_per_s": round(out_tokens / duration, 1), "output_tokens": out_tokens}
    for name, xs in (("ttft_ms", [r.ttft for r in ok]), ("itl_ms", itl),
                     ("e2e_ms", [r.e2e for r in ok])):
        s[name + "_p50"] = round(pct(xs, 50) * 1000, 2)
        s[name + "_p99"] = round(pct(xs, 99) * 1000, 2)
        s[name + "_mean"] = round(statistics.fmean(xs) * 1000, 2) if xs else float("nan")
    errors = [r.error for r in results if not r.ok]
    if errors:
        s["first_error"] = errors[0]
    return s


def flush(address: str) -> None:
    async def go():
        c = AsyncRuntimeClient(address)
        await c.start(60)
        for _ in range(100):  # the runtime refuses while requests still finish
            reply = await c.call(protocol.FlushCacheReq(rid=c.new_rid("flush")), 30)
            if isinstance(reply, protocol.OkOut):
                break
            await asyncio.sleep(0.2)
        await c.close()
    asyncio.run(go())


def raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=1024)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in "
                   "[ratio * len, len]")
    p.add_argument("--rates", default="inf,16", help="request rates per second, comma-separated "
                   "(inf: all at once)")
    p.add_argument("--poisson-prompts", type=int, default=None,
                   help="requests of the finite-rate runs (default: --num-prompts)")
    p.add_argument("--paths", default="zmq,http")
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default="bench-key")
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    raise_fd_limit()  # 1024 streams hold 1024 sockets here and in the HTTP process
    kw = dict(load_format=args.load_format, device=args.device, dtype=args.dtype, log_interval=0)
    if args.max_running_requests:
        kw["max_running_requests"] = args.max_running_requests
    t = time.perf_counter()
    rt = RuntimeProcess(args.model, timeout=900, **kw)
    http = HttpServerProcess(rt.address, api_key=args.api_key, timeout=300)
    print(f"runtime + HTTP front ready in {time.perf_counter() - t:.1f} s "
          f"({rt.info.get('model_path')}, max_running_requests "
          f"{rt.info.get('max_running_requests')})", flush=True)
    rows = []
    try:
        vocab = int(rt.info.get("vocab_size") or 32000)
        reqs = workload(args, vocab)
        paths = args.paths.split(",")
        common = dict(url=http.url, address=rt.address, api_key=args.api_key)
        warm = [(ids, 8) for ids, _ in reqs[: args.warmup]]
        for path in paths:  # warm both paths (CUDA graphs, connections, the HTTP app)
            asyncio.run(run_path(path, warm, [0.0] * len(warm), **common))
        for rate_s in args.rates.split(","):
            rate = float(rate_s)
            n = args.num_prompts if rate == float("inf") else (args.poisson_prompts or
                                                               args.num_prompts)
            batch, times = reqs[:n], arrivals(n, rate, args.seed)
            for path in paths:
                flush(rt.address)
                results, duration = asyncio.run(run_path(path, batch, times, **common))
                rows.append(summarize(path, rate_s, results, duration))
                print(json.dumps(rows[-1]), flush=True)
    except BaseException:
        print("HTTP front log:\n" + http.log_tail(3000), flush=True)
        raise
    finally:
        http.shutdown()
        rt.shutdown()
    print(f"\n{'path':5} {'rate':>5} {'done':>5} {'tok/s':>9} {'req/s':>7} {'TTFT p50':>9} "
          f"{'p99':>8} {'ITL p50':>8} {'p99':>7} {'E2E p50':>8} {'p99':>8}  (ms)")
    for r in rows:
        print(f"{r['path']:5} {r['rate']:>5} {r['completed']:>5} {r['output_tok_per_s']:>9} "
              f"{r['req_per_s']:>7} {r['ttft_ms_p50']:>9} {r['ttft_ms_p99']:>8} "
              f"{r['itl_ms_p50']:>8} {r['itl_ms_p99']:>7} {r['e2e_ms_p50']:>8} "
              f"{r['e2e_ms_p99']:>8}")
    by = {(r["path"], r["rate"]): r for r in rows}
    for rate_s in args.rates.split(","):
        if ("http", rate_s) in by and ("zmq", rate_s) in by:
            ratio = by[("http", rate_s)]["output_tok_per_s"] / max(
                by[("zmq", rate_s)]["output_tok_per_s"], 1e-9)
            print(f"rate {rate_s}: HTTP / ZMQ output throughput = {ratio:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
