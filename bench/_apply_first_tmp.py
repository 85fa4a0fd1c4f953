import time, torch, xgrammar as xgr
dev = torch.device("cuda")
for dt in (torch.bfloat16, torch.float32, torch.float32, torch.bfloat16):
    for n in (16, 256, 255, 256):
        logits = torch.randn(n, 49152, device=dev, dtype=dt)
        bm = torch.full((n, 1536), -1, dtype=torch.int32, device=dev)
        idx = torch.arange(n, dtype=torch.int32, device=dev)
        torch.cuda.synchronize(); t = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bm, vocab_size=49152, indices=idx)
        torch.cuda.synchronize(); print(dt, n, f"{(time.perf_counter()-t)*1e3:.1f} ms", flush=True)
