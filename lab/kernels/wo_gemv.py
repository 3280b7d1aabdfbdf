"""Weight-only fp8/int8 decode GEMV in Triton: y[M, N] = (x[M, K] @ dequant(W[N, K])^T) * scale[N].

Decode is memory-bound: every weight byte must cross HBM once per step, so the kernel streams W exactly
once. Each program owns a BLOCK_N slice of output channels and walks K in BLOCK_K tiles, loading the W tile
as 8-bit and converting it to bf16 in registers; the per-channel float32 scale is applied once to the
float32 accumulator at the end (exact, since it is per output row). `F.linear(x, w.to(bf16)) * s` instead
materialises a bf16 copy of W (read 1 byte, write 2, read 2 back per weight): MBU 0.09 eager and 0.19 under
torch.compile on an H100 for gpt-40b at batch 16 (reports/examples/benchmarks/perf/perf_decode_quant_h100.json).

Two kernels, picked on the host by M:
- M == 1: an FMA reduction (acc[BLOCK_N, BLOCK_K] += w * x, summed over K at the end): no padding.
- 2 <= M <= 16: x padded to 16 rows and one tl.dot per tile, computed as W_tile @ x^T so the large N
  side is the MMA's M dimension ("swap AB"); the padding costs compute, not bytes.
Both are autotuned over 6 configs keyed on (N, K) (Triton adds the weight dtype to the key), so tuning
stays bounded; the kernel choice is the M bucket.

`wo_gemv` is a torch custom op (torch.library.triton_op, with a fake implementation for tracing):
torch.compile(fullgraph=True, mode="reduce-overhead") captures it inside CUDA graphs without a graph break.
"""

# No `from __future__ import annotations`: torch.library infers the op's schema from real annotations.
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from lab.kernels import MAX_M

# Bounded autotuning: 6 configs per kernel, keyed on (N, K). BLOCK_N 32-64 keeps >= 128 programs
# for the gpt-40b shapes (N >= 8192) on 132 SMs; num_stages keeps several W tiles in flight per SM.
_FMA_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (16, 512, 4, 3),
        (32, 256, 4, 3),
        (32, 512, 4, 2),
        (32, 512, 8, 3),
        (64, 256, 8, 3),
        (64, 128, 4, 4),
    ]
]
_DOT_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (32, 256, 4, 4),
        (32, 512, 4, 3),
        (64, 128, 4, 4),
        (64, 256, 4, 3),
        (64, 256, 8, 4),
        (128, 128, 8, 3),
    ]
]


# Triton's CPU interpreter (TRITON_INTERPRET=1, the CPU tests) has no benchmarker: one config there,
# and the tests run every config explicitly through `launch(config=...)`.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# bf16 MMA operands on the GPU (8-bit -> bf16 is exact for int8 and e4m3). The interpreter's bf16 tl.dot
# returns garbage (Triton 3.8), so there the same kernel multiplies in float32. An int flag, not a
# tl.dtype, so torch.compile's codegen for user kernels only ever sees plain constexprs.
_DOT_FP32 = 1 if _INTERPRET else 0


def _tuned(configs: list) -> list:
    return configs[:1] if _INTERPRET else configs


@triton.autotune(configs=_tuned(_FMA_CONFIGS), key=["N", "K"])
@triton.jit
def _wo_gemv_fma_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """M == 1: y[n] = sum_k x[k] * W[n, k] * s[n]."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_full = (K // BLOCK_K) * BLOCK_K
    # Rows past N are loaded masked without a fill value: each output row reads only its own W row, and
    # those rows are never stored.
    for k0 in range(0, k_full, BLOCK_K):  # full tiles: no K mask
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None])
        x = tl.load(x_ptr + k0 + offs_k)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    if k_full < K:  # ragged tail
        k_mask = (k_full + offs_k) < K
        w = tl.load(w_ptrs + k_full, mask=n_mask[:, None] & k_mask[None, :])
        x = tl.load(x_ptr + k_full + offs_k, mask=k_mask, other=0.0)
        # Zero the masked lanes after the cast (never 8-bit fill values; unfilled lanes may hold NaN bits).
        acc += tl.where(k_mask[None, :], w.to(tl.float32), 0.0) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _mma_operand(t, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return t.to(tl.float32)
    return t.to(tl.bfloat16)


@triton.autotune(configs=_tuned(_DOT_CONFIGS), key=["N", "K"])
@triton.jit
def _wo_gemv_dot_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """2 <= M <= 16: acc[n, m] = W[n, :] . x[m, :] with x padded to BLOCK_M rows."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # x^T tile [BLOCK_K, BLOCK_M]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_full = (K // BLOCK_K) * BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None])  # rows past N: never stored (see the fma kernel)
        xt = tl.load(xt_ptrs + k0, mask=m_mask[None, :], other=0.0)
        acc = tl.dot(_mma_operand(w, DOT_FP32), _mma_operand(xt, DOT_FP32), acc)
    if k_full < K:
        k_mask = (k_full + offs_k) < K
        w = tl.load(w_ptrs + k_full, mask=n_mask[:, None] & k_mask[None, :])
        w = _mma_operand(tl.where(k_mask[None, :], w.to(tl.float32), 0.0), DOT_FP32)
        xt = tl.load(xt_ptrs + k_full, mask=m_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(w, _mma_operand(xt, DOT_FP32), acc)
    acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def launch(
    x: Tensor,
    weight: Tensor,
    scales: Tensor,
    path: str = "auto",
    config: triton.Config | None = None,
    wrap=None,
) -> Tensor:
    """Run the kernel on x[M, K] (bf16, contiguous rows), weight[N, K] (fp8/int8, contiguous), scales[N]
    (float32). `path` forces "fma" (M must be 1) or "dot" for benchmarks; "auto" picks by M. `config`
    bypasses autotuning (tests, benchmarks). `wrap` is torch.library.wrap_triton inside the custom op (so
    torch.compile sees the kernel), None when eager."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    use_fma = m == 1 if path == "auto" else path == "fma"
    if use_fma and m != 1:
        raise ValueError("the fma path serves M == 1 only")

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    kernel = _wo_gemv_fma_kernel if use_fma else _wo_gemv_dot_kernel
    extra = {}
    if config is not None:
        kernel = kernel.fn  # the bare @triton.jit function under the autotuner
        extra = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if wrap is not None:
        kernel = wrap(kernel)
    if use_fma:
        kernel[grid](x, weight, scales, y, n, k, weight.stride(0), **extra)
    else:
        kernel[grid](
            x,
            weight,
            scales,
            y,
            m,
            n,
            k,
            x.stride(0),
            weight.stride(0),
            y.stride(0),
            BLOCK_M=MAX_M,
            DOT_FP32=_DOT_FP32,
            **extra,
        )
    return y


def _wo_gemv(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """y[M, N] = (x[M, K] @ dequant(weight[N, K])^T) * scales[N], M <= 16, out in x's dtype."""
    return launch(x.contiguous(), weight, scales, wrap=None if _INTERPRET else torch.library.wrap_triton)


# On the GPU a triton_op: torch.compile sees the kernel itself (wrap_triton) and inductor launches it from
# its own code, inside the CUDA graph. Under the CPU interpreter wrap_triton cannot trace an interpreted
# kernel, so there the same function is an opaque custom op (still one node, no graph break).
_register = torch.library.custom_op if _INTERPRET else torch.library.triton_op
wo_gemv = _register("lab::wo_gemv", mutates_args=())(_wo_gemv)


@wo_gemv.register_fake
def _wo_gemv_fake(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """Shape and dtype only (tracing, torch.compile), without running the kernel on fake tensors."""
    return x.new_empty((x.shape[0], weight.shape[0]))
