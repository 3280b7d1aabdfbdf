"""Roofline arithmetic and the two ceilings measured on the card in the same run (MEASUREMENT.md).

Bytes per decode step = every weight read (all linears incl. the output head, norms, quant scales; only the
looked-up embedding rows) + the KV cache the attention reads + the KV written. MBU = bytes / step time /
measured copy bandwidth. Decode MFU = 2 x params x tokens/s / measured peak FLOP/s.
"""

from __future__ import annotations

from lab.model.llama import ModelArgs
from lab.model.plan import BYTES, weight_bytes


def _bytes(dtype: str | int) -> int:
    return dtype if isinstance(dtype, int) else BYTES[dtype]


def decode_bytes_per_step(
    args: ModelArgs,
    dtype: str | int,
    batch: int,
    kv_len: int,
    kv_dtype: str | int | None = None,
) -> float:
    """Bytes one decode step must move. `kv_len` is the number of cached positions the attention reads
    per row: the allocated cache length for a dense mask over a static cache, the filled length for a
    kernel that reads only what is filled."""
    wdt = dtype if isinstance(dtype, str) else {1: "fp8", 2: "bfloat16", 4: "float32"}[dtype]
    kv_b = _bytes(kv_dtype) if kv_dtype is not None else (2 if wdt in ("fp8", "int8") else _bytes(wdt))
    emb_b = 2 if wdt in ("fp8", "int8") else _bytes(wdt)
    weights = weight_bytes(args, wdt)
    if not args.tie_embeddings:
        # The embedding table is not read whole: only the batch's rows are looked up.
        weights -= args.vocab_size * args.dim * emb_b
        weights += batch * args.dim * emb_b
    kv_row = 2 * args.n_layers * args.n_kv_heads * args.head_dim * kv_b
    return weights + batch * kv_len * kv_row + batch * kv_row


def mbu(bytes_per_step: float, step_s: float, bandwidth_bytes_per_s: float) -> float:
    return bytes_per_step / step_s / bandwidth_bytes_per_s


def decode_mfu(n_params: int, tokens_per_s: float, peak_flops: float) -> float:
    return 2.0 * n_params * tokens_per_s / peak_flops


def measure_copy_bandwidth(device, size_bytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median of
    `iters` timed copies after warm-up, CUDA events)."""
    import statistics

    import torch

    if torch.device(device).type != "cuda":
        raise ValueError("copy bandwidth is measured on a CUDA device")
    n = size_bytes // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)  # random, never zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * n * 2 / statistics.median(times)


def measure_matmul_flops(device, n: int = 8192, iters: int = 10) -> float:
    """bf16 matrix-product FLOP/s on random data (median of timed products after warm-up)."""
    import statistics

    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n**3 / statistics.median(times)
