"""A Llama-architecture decoder in the style of gpt-fast: RMSNorm, rotary embeddings (HF's rotate-half
layout, so Hugging Face checkpoints load without permuting), SwiGLU, grouped-query attention, tied or
untied embeddings, and a static KV cache allocated once per (batch, max length).

Every row of a batch carries its own positions (`input_pos` is [batch, tokens]) and may write to any
cache row (`rows`), which is what continuous batching needs: requests of different lengths share one
fixed-shape decode step that CUDA graphs can capture.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None  # Llama 3 style: {"rope_type": "llama3", "factor": ...}
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        from lab.errors import LabError

        if self.dim % self.n_heads:
            raise LabError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise LabError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")

    def num_params(self) -> int:
        hd = self.head_dim
        attn = self.dim * (self.n_heads * hd) * 2 + self.dim * (self.n_kv_heads * hd) * 2
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim
        return self.n_layers * per_layer + emb * (1 if self.tie_embeddings else 2) + self.dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 as HF does, then cast back before the scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    def __init__(
        self, max_batch: int, max_seq: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device=None
    ):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        # Zeroed where it lives: built on the host and then moved, llama-8b's 9 GB cache (16 slots x 4,096)
        # cost a host memset and a host-to-device copy at every server start (in `model_built->engine_built`,
        # 2.0-2.4 s on an H100 host; this change is not yet timed there).
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        # k, v: [b, T, Hkv, D]; input_pos: [b, T]. Advanced indices split by a slice put the indexed
        # dims first, so the destination view is [b, T, Hkv, D]: the new keys as they are.
        b = k.shape[0]
        if rows is None:
            idx = torch.arange(b, device=k.device)[:, None]
            self.k[idx, :, input_pos] = k
            self.v[idx, :, input_pos] = v
            return self.k[:b], self.v[:b]
        self.k[rows[:, None], :, input_pos] = k
        self.v[rows[:, None], :, input_pos] = v
        return self.k[rows], self.v[rows]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


def rope_inv_freq(args: ModelArgs) -> Tensor:
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = args.rope_scaling or {}
    if sc.get("rope_type", sc.get("type")) == "llama3":
        factor = sc["factor"]
        low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_ctx = sc.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.float()


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor, rows) -> Tensor:
        b, t, _ = x.shape
        hd, h, hkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.wqkv(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q = apply_rope(q.view(b, t, h, hd), cos, sin)
        k = apply_rope(k.view(b, t, hkv, hd), cos, sin)
        v = v.view(b, t, hkv, hd)
        keys, values = self.kv_cache.update(input_pos, k, v, rows)
        if mask.shape[-1] < keys.shape[2]:  # a bounded read (Transformer.forward's kv_len): the filled prefix
            keys, values = keys[:, :, : mask.shape[-1]], values[:, :, : mask.shape[-1]]
        # Grouped-query attention without copying the cache: fold each KV head's group of query
        # heads into the query-length dimension, so keys/values are read once per KV head.
        g = h // hkv
        q = q.transpose(1, 2).reshape(b, hkv, g * t, hd)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.repeat(1, 1, g, 1))
        # reshape, not view: on CUDA the fused SDPA kernels may return a non-contiguous layout
        # (seen in float32 on an H200: "view size is not compatible with input tensor's size and stride").
        y = y.reshape(b, h, t, hd).transpose(1, 2).reshape(b, t, h * hd)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ffn_dim = args.ffn_dim
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split([self.ffn_dim, self.ffn_dim], dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask, input_pos, rows):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        # Given its weight, the embedding skips its default init: lab.model.build_model writes every weight
        # (checkpoint or seeded random), and on the meta device that init's normal_ runs a Python reference
        # that imports torch._dynamo, 1.7 s on the critical path of every `lab serve` start.
        self.tok_embeddings = nn.Embedding(
            args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim)
        )
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = 0
        self.max_seq_len = 0

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the static KV cache and rotary tables once, on the model's device and dtype."""
        a = self.args
        if max_seq_len > a.max_seq_len:
            from lab.errors import LabError

            raise LabError(f"sequence length {max_seq_len} exceeds the model's context {a.max_seq_len}")
        if (max_batch_size, max_seq_len) == (self.max_batch_size, self.max_seq_len):
            return
        dtype, device = self.output.weight.dtype, self.output.weight.device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        for layer in self.layers:
            # The module's own KV-head count: tensor parallel (lab.model.tp) keeps n_kv_heads / N per rank.
            layer.attention.kv_cache = KVCache(
                max_batch_size, max_seq_len, layer.attention.n_kv_heads, a.head_dim, dtype, device
            )
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), rope_inv_freq(a))
        emb = torch.cat((freqs, freqs), dim=-1).to(device)
        self.register_buffer("rope_cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(dtype), persistent=False)
        self.register_buffer("key_pos", torch.arange(max_seq_len, device=device), persistent=False)

    def forward(
        self,
        tokens: Tensor,
        input_pos: Tensor,
        rows: Tensor | None = None,
        last_only: bool = False,
        logits_at: Tensor | None = None,
        kv_len: int | None = None,
    ) -> Tensor:
        """tokens, input_pos: [b, T]; rows: which cache rows the b sequences use (None: 0..b-1).
        Returns logits [b, T, vocab] in float32 ([b, 1, vocab] with last_only, as prefill needs;
        with logits_at [b], the logits of that position of each row: right-padded batched prefill).
        kv_len: the attention reads only the first kv_len cache positions (every query position must be
        below it); None reads the whole static cache. New keys are written wherever input_pos says."""
        x = self.tok_embeddings(tokens)
        cos = self.rope_cos[input_pos].unsqueeze(2)  # [b, T, 1, D] broadcasts over heads
        sin = self.rope_sin[input_pos].unsqueeze(2)
        # Dense causal mask over the static cache: key j is visible to the query at position p iff j <= p.
        key_pos = self.key_pos if kv_len is None else self.key_pos[:kv_len]
        mask = (key_pos[None, None, None, :] <= input_pos[:, None, :, None]).contiguous()
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, rows)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]
        elif last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()


@torch.no_grad()
def init_random_weights(module: nn.Module, seed: int, n_layers: int) -> None:
    """Deterministic random weights (drills need no downloaded checkpoint), for a whole model or one
    block. Generated on the module's device so an 8B model initialises in seconds on a GPU."""
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            p.normal_(0.0, std, generator=gen)
