"""Server arguments: one frozen dataclass and the only argparse (its defaults come from the class).

`python -m sglite serve --model PATH ...` parses into `ServerArgs`; `sglite.launch.RuntimeProcess`
turns keyword arguments back into the same flags (`to_cli`), so a field added here is available
everywhere at once. This module imports no torch: the launcher reads it in the user's process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import uuid
from dataclasses import dataclass

from sglite.protocol import AUTH_TOKEN_ENV

SCHEDULE_POLICIES = ("lpm", "fcfs")
QUANTIZATIONS = ("fp8",)  # sglite.runtime.models.quant (not imported: no torch here)
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")  # sglite.runtime.mem.kv_cache


# Throughput knobs that depend on the device. CUDA (H200, Llama-3-8B, 1024 x (512 + 256) requests,
# bench/gpu_e2e.py part b): 4096-token extend forwards run near the matmul roof, and decode batches
# of 512 (CUDA graphs up to 512) gave 10558-10598 tok/s vs 10199-10222 at 256 (docs/benchmarks.md).
# Pages of 128 KV slots let decode attention read a split request's keys in bulk (TMA; bs 1 x 32k:
# 0.038 vs 0.040 ms gathering). The CPU executor is slow per token: small batches keep each
# request's latency bounded, and its attention gathers anyway (page_size 1).
DEVICE_DEFAULTS = {
    "cuda": dict(max_running_requests=512, chunked_prefill_size=4096, page_size=128),
    "cpu": dict(max_running_requests=128, chunked_prefill_size=512, page_size=1),
}


@dataclass(frozen=True)
class ServerArgs:
    model_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    quantization: str | None = None  # fp8 (weights); None: as the checkpoint is (FP8 checkpoints: fp8)
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8_e4m3 (twice the tokens)
    device: str = "auto"  # auto (CUDA when there is one) | cuda | cuda:N | cpu
    attention_backend: str = "auto"  # auto | torch | triton
    load_format: str = "auto"  # auto | dummy (random weights, for benchmarks)
    preset: str | None = None  # a ModelConfig preset name (with load_format=dummy)
    max_total_tokens: int | None = None  # KV pool size in tokens; None: sized by the runner
    max_running_requests: int | None = None  # None: 512 on CUDA, 128 on the CPU (DEVICE_DEFAULTS)
    chunked_prefill_size: int | None = None  # tokens per extend forward; -1: no chunking; None: as above
    context_length: int | None = None  # None: the model's max_position_embeddings
    page_size: int | None = None  # KV slots a request takes at once; None: 128 on CUDA, 1 on the CPU
    disable_radix_cache: bool = False
    schedule_policy: str = "lpm"
    log_interval: float = 10.0  # seconds between stats log lines (0: never)
    address: str | None = None  # ZMQ endpoint to bind; None: a fresh ipc:// path
    allow_remote: bool = False  # tcp:// on a host other than loopback (needs an auth token)
    # clients must present this token (ZMTP PLAIN, checked by a ZAP handler); None: the
    # SGLITE_AUTH_TOKEN environment variable, if set. Never put on a command line by to_cli.
    auth_token: str | None = None
    seed: int = 0
    # the most top logprobs a request may ask for per token (vLLM's --max-logprobs, OpenAI's 20):
    # each one costs every step of its batch an entry per token (49k made a batch crawl)
    max_top_logprobs: int = 20
    grammar_threads: int = 2
    disable_overlap: bool = False  # CUDA: read each decode's tokens before launching the next
    disable_window_free: bool = False  # keep out-of-window KV of windowed models (comparisons)
    disable_jump_forward: bool = False  # constrained decoding: no forced-text jumps (comparisons)
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None  # None: max_running_requests, at most 512
    num_threads: int | None = None  # torch CPU threads; None: torch's default
    dp_size: int = 1  # data parallelism: N replicas behind a cache-aware router (runtime/router)
    tp_size: int = 1  # tensor parallelism: one process per rank (runtime/distributed)

    def __post_init__(self):
        # unset knobs take the device's defaults; frozen, hence object.__setattr__
        if self.device == "auto":
            object.__setattr__(self, "device", detect_device())
        defaults = DEVICE_DEFAULTS["cuda" if self.device.startswith("cuda") else "cpu"]
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {SCHEDULE_POLICIES}, "
                             f"got {self.schedule_policy!r}")
        if self.max_top_logprobs < 0:
            raise ValueError(f"max_top_logprobs must be >= 0, got {self.max_top_logprobs}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ValueError("chunked_prefill_size must be -1 (off) or >= 1, "
                             f"got {self.chunked_prefill_size}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be >= 1, got {self.max_total_tokens}")
        if self.dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {self.dp_size}")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.address is not None and not self.address.startswith(("ipc://", "tcp://")):
            raise ValueError(f"address must be ipc://... or tcp://..., got {self.address!r}")
        if self.auth_token is None and os.environ.get(AUTH_TOKEN_ENV):
            object.__setattr__(self, "auth_token", os.environ[AUTH_TOKEN_ENV])
        if self.address is not None and not is_loopback(self.address):
            if not self.allow_remote:
                raise ValueError(f"address {self.address!r} is not a loopback or ipc:// address: "
                                 "pass --allow-remote (with --auth-token) to serve other machines")
            if not self.auth_token:
                raise ValueError("--allow-remote needs an auth token (--auth-token or "
                                 f"${AUTH_TOKEN_ENV}): anyone who reaches {self.address} could "
                                 "use the runtime")

    @property
    def bind_address(self) -> str:
        return self.address or default_address()

    def to_cli(self) -> list[str]:
        """Flags that reproduce these args through `parse_args` (non-default fields only)."""
        argv = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default or f.name == "auth_token":  # (secrets travel in the env)
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.name == "model_path":
                flag = "--model"
            if isinstance(value, bool):
                argv.append(flag)  # store_true flags; their default is False
            else:
                argv += [flag, str(value)]
        return argv


def is_loopback(address: str) -> bool:
    """ipc:// and tcp:// on 127.x.x.x, localhost or ::1 stay on this machine."""
    if not address.startswith("tcp://"):
        return True
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def default_address() -> str:
    # ipc:// keeps the runtime off the network; a short path (sockets have a ~100 byte limit)
    return f"ipc://{tempfile.gettempdir()}/sglite-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"


def make_parser() -> argparse.ArgumentParser:
    d = ServerArgs
    p = argparse.ArgumentParser(prog="sglite serve", description="Run the sglite runtime.")
    p.add_argument("--model", "--model-path", dest="model_path", default=d.model_path,
                   help="HF folder or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--quantization", default=d.quantization, choices=QUANTIZATIONS,
                   help="fp8: FP8 e4m3 weights (per-channel, quantized at load unless the checkpoint "
                   "is FP8 already)")
    p.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                   help="fp8_e4m3: the KV pool in FP8, twice the tokens in the same memory")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cuda, cuda:N or cpu")
    p.add_argument("--attention-backend", default=d.attention_backend)
    p.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"])
    p.add_argument("--preset", default=d.preset, help="ModelConfig preset (with --load-format dummy)")
    p.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens,
                   help="KV pool size in tokens")
    p.add_argument("--max-running-requests", type=int, default=d.max_running_requests,
                   help="requests decoding at once (default: 512 on CUDA, 128 on the CPU)")
    p.add_argument("--chunked-prefill-size", type=int, default=d.chunked_prefill_size,
                   help="token budget of one extend forward (-1: no chunking; default: 4096 on "
                   "CUDA, 512 on the CPU)")
    p.add_argument("--context-length", type=int, default=d.context_length)
    p.add_argument("--page-size", type=int, default=d.page_size,
                   help="KV slots a request takes at once, so that its keys lie in runs decode "
                   "attention reads in bulk (default: 128 on CUDA, 1 on the CPU)")
    p.add_argument("--disable-radix-cache", action="store_true", default=d.disable_radix_cache)
    p.add_argument("--schedule-policy", default=d.schedule_policy, choices=SCHEDULE_POLICIES)
    p.add_argument("--max-top-logprobs", type=int, default=d.max_top_logprobs,
                   help="most top logprobs per token a request may ask for (default 20)")
    p.add_argument("--log-interval", type=float, default=d.log_interval,
                   help="seconds between stats log lines (0: off)")
    p.add_argument("--address", default=d.address,
                   help="ZMQ endpoint to bind (default: a fresh ipc:// path; tcp://127.0.0.1:PORT)")
    p.add_argument("--allow-remote", action="store_true", default=d.allow_remote,
                   help="allow a tcp:// address on a non-loopback host (needs --auth-token)")
    p.add_argument("--auth-token", default=d.auth_token,
                   help=f"token clients must present (default: ${AUTH_TOKEN_ENV}); traffic is "
                   "authenticated, not encrypted")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--grammar-threads", type=int, default=d.grammar_threads)
    p.add_argument("--disable-overlap", action="store_true", default=d.disable_overlap,
                   help="no overlapped decode on CUDA (the host reads each step's tokens first; "
                   "the CPU never overlaps: its forwards run as they are launched)")
    p.add_argument("--disable-window-free", action="store_true", default=d.disable_window_free,
                   help="keep KV that left every sliding window (for comparisons)")
    p.add_argument("--disable-jump-forward", action="store_true", default=d.disable_jump_forward,
                   help="constrained decoding: decode forced text token by token")
    p.add_argument("--disable-cuda-graph", action="store_true", default=d.disable_cuda_graph)
    p.add_argument("--cuda-graph-max-bs", type=int, default=d.cuda_graph_max_bs,
                   help="largest decode batch captured in a CUDA graph")
    p.add_argument("--num-threads", type=int, default=d.num_threads,
                   help="torch CPU threads (on a busy machine 1 can beat 2: OpenMP spin-waits)")
    p.add_argument("--dp-size", type=int, default=d.dp_size,
                   help="data parallelism: N runtime replicas behind a router that sends each "
                   "request to the replica caching its longest prefix, balanced against load")
    p.add_argument("--tp-size", type=int, default=d.tp_size,
                   help="tensor parallelism: the model's heads, MLP and vocabulary split over N "
                   "ranks (one process each; NCCL on CUDA, gloo on the CPU)")
    return p


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    ns = make_parser().parse_args(argv)
    try:
        return ServerArgs(**vars(ns))
    except ValueError as e:
        raise SystemExit(f"sglite serve: {e}") from None


def detect_device() -> str:
    """"cuda" when a CUDA device is usable, else "cpu". Without torch loaded (the launcher in the
    user's process must not import it) the driver's device node and CUDA_VISIBLE_DEVICES decide;
    the runtime process, which has torch, asks torch."""
    import sys

    if "torch" in sys.modules:
        return "cuda" if sys.modules["torch"].cuda.is_available() else "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return "cpu"
    return "cuda" if os.path.exists("/dev/nvidiactl") else "cpu"
