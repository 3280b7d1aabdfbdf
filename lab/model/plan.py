"""Memory planning: weights + KV cache + activation workspace + the playbook's reserve, against the
device. Every command that builds a model runs this first, so a model that cannot fit fails before
anything is allocated, with the numbers and what would fit instead."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lab.errors import LabError
from lab.model.llama import ModelArgs

GB = 1e9
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1}
# Playbook: "leave 6-8 GB free for CUDA graphs and NCCL buffers". We reserve the upper end on a GPU.
GPU_RESERVE_GB = 8.0
CPU_RESERVE_GB = 1.0


@dataclass
class MemoryPlan:
    preset: str | None
    dtype: str
    batch_size: int
    max_seq_len: int
    params: int
    weights_gb: float
    kv_cache_gb: float
    activations_gb: float
    reserve_gb: float
    total_gb: float
    device_memory_gb: float | None
    device: str
    fits: bool | None
    headroom_gb: float | None
    suggestions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        verdict = "fits" if self.fits else ("does NOT fit" if self.fits is False else "unknown device size")
        dev = f"{self.device_memory_gb:.1f} GB" if self.device_memory_gb else "?"
        return (
            f"{self.preset or 'model'} {self.dtype} batch {self.batch_size} x {self.max_seq_len} tokens: "
            f"weights {self.weights_gb:.2f} + KV {self.kv_cache_gb:.2f} + activations {self.activations_gb:.2f}"
            f" + reserve {self.reserve_gb:.1f} = {self.total_gb:.2f} GB on {self.device} ({dev}): {verdict}"
        )


def weight_bytes(args: ModelArgs, dtype: str) -> float:
    if dtype not in ("fp8", "int8"):
        return args.num_params() * BYTES[dtype]
    # Weight-only quantisation: block linears at 1 byte plus a float32 scale per output channel;
    # embeddings, the output head and norms stay in bfloat16.
    emb = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    norms = (2 * args.n_layers + 1) * args.dim
    linear = args.num_params() - emb - norms
    scales = args.n_layers * (
        args.dim + (args.n_heads + 2 * args.n_kv_heads) * args.head_dim + 3 * args.ffn_dim
    )
    return linear * 1 + scales * 4 + (emb + norms) * 2


def kv_bytes(args: ModelArgs, batch: int, seq: int, dtype: str) -> float:
    per = 2 if dtype in ("fp8", "int8") else BYTES[dtype]
    return 2 * args.n_layers * batch * seq * args.n_kv_heads * args.head_dim * per


def activation_bytes(args: ModelArgs, batch: int, seq: int, dtype: str) -> float:
    """Upper estimate of the prefill workspace for one layer at a time: hidden states, the fused
    projections, attention scores for a dense mask (math/efficient backends), and float32 logits for the
    last position."""
    per = 2 if dtype in ("fp8", "int8") else BYTES[dtype]
    hd = args.head_dim
    proj = max(2 * args.ffn_dim, (args.n_heads + 2 * args.n_kv_heads) * hd) + 2 * args.dim
    hidden = batch * seq * proj * per * 2
    scores = batch * args.n_heads * seq * seq * per
    logits = batch * args.vocab_size * 4 * 2
    return hidden + scores + logits


def plan_memory(
    args: ModelArgs,
    dtype: str,
    batch_size: int,
    max_seq_len: int,
    device_memory_gb: float | None,
    device: str = "cuda",
    preset: str | None = None,
    reserve_gb: float | None = None,
) -> MemoryPlan:
    if batch_size < 1:
        raise LabError("batch size must be >= 1")
    if max_seq_len < 1:
        raise LabError("max sequence length must be >= 1")
    if dtype not in BYTES:
        raise LabError(f"unknown dtype '{dtype}'; choose one of {', '.join(BYTES)}")
    if reserve_gb is None:
        reserve_gb = GPU_RESERVE_GB if device.startswith("cuda") else CPU_RESERVE_GB
    w = weight_bytes(args, dtype) / GB
    kv = kv_bytes(args, batch_size, max_seq_len, dtype) / GB
    act = activation_bytes(args, batch_size, max_seq_len, dtype) / GB
    total = w + kv + act + reserve_gb
    fits = None if device_memory_gb is None else total <= device_memory_gb
    plan = MemoryPlan(
        preset=preset,
        dtype=dtype,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        params=args.num_params(),
        weights_gb=round(w, 3),
        kv_cache_gb=round(kv, 3),
        activations_gb=round(act, 3),
        reserve_gb=reserve_gb,
        total_gb=round(total, 3),
        device_memory_gb=device_memory_gb,
        device=device,
        fits=fits,
        headroom_gb=None if device_memory_gb is None else round(device_memory_gb - total, 3),
    )
    if fits is False:
        plan.suggestions = _suggest(
            args, dtype, batch_size, max_seq_len, device_memory_gb, device, reserve_gb
        )
    return plan


def _suggest(args, dtype, batch, seq, mem_gb, device, reserve_gb) -> list[str]:
    out: list[str] = []

    def fits(d=dtype, b=batch, s=seq) -> bool:
        return (
            weight_bytes(args, d) + kv_bytes(args, b, s, d) + activation_bytes(args, b, s, d)
        ) / GB + reserve_gb <= mem_gb

    b = batch
    while b > 1 and not fits(b=b):
        b //= 2
    if b < batch and fits(b=b):
        out.append(f"--batch-size {b}")
    s = seq
    while s > 64 and not fits(s=s):
        s //= 2
    if s < seq and fits(s=s):
        out.append(f"--max-seq-len {s} (shorter prompts + new tokens)")
    # int8 before fp8: on an H100 with the Triton weight-only GEMV, gpt-40b int8 decodes at batch 16 at MBU
    # 0.76 against fp8's 0.63, and stays closer to bf16 (reports/examples/benchmarks/perf-h100/).
    for d in ("bfloat16", "int8"):
        if BYTES[d] < BYTES[dtype] and fits(d=d):
            out.append(f"--dtype {d}")
            break
    if not out:
        from lab.model.presets import PRESETS

        smaller = [n for n, a in PRESETS.items() if a.num_params() < args.num_params()]
        for name in reversed(smaller):
            a = PRESETS[name]
            if (weight_bytes(a, dtype) + kv_bytes(a, batch, seq, dtype)) / GB + reserve_gb <= mem_gb:
                out.append(f"--preset {name}")
                break
    return out or ["a device with more memory"]


def device_memory_gb(device) -> float | None:
    """Total memory of the device: the GPU's, or the host's RAM for the CPU."""
    import torch

    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return round(total / GB, 2)
    try:
        import psutil

        return round(psutil.virtual_memory().total / GB, 2)
    except ImportError:
        return None


def check_fits(plan: MemoryPlan) -> None:
    """Raise before allocating when the plan does not fit."""
    if plan.fits is False:
        raise LabError(f"{plan.line()}; what would fit: {', '.join(plan.suggestions)}")
