"""Weight-only quantisation (float8_e4m3 or int8 weights, one float32 scale per output channel) for the
block linears; activations, embeddings, norms and the output head stay in bfloat16. This is how the
playbook's GPT-40B class model fits one 80 GB card (~40 GB of weights instead of ~79 GB).

Quantisation happens block by block while the model is materialised (`quantize_block`), so the bf16
model never has to exist whole on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lab import kernels

QUANT_KINDS = ("fp8", "int8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0


class WeightOnlyLinear(nn.Module):
    """y = (x @ dequant(W)^T) * scale. The dequantising cast sits next to the matmul so torch.compile
    can fuse it into the GEMV at decode; eager pays one cast per call."""

    def __init__(self, weight: Tensor, scales: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if kernels.wo_gemv_applies(x, self.weight, self.scales):
            # Decode (<= 16 rows on CUDA): the Triton GEMV reads each 8-bit weight once (lab.kernels).
            y = kernels.wo_gemv_op(x.reshape(-1, self.in_features), self.weight, self.scales)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


@torch.no_grad()
def quantize_weight(w: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric quantisation. Returns (q, scales float32 [out])."""
    amax = w.float().abs().amax(dim=1).clamp(min=1e-12)
    if kind == "fp8":
        scales = amax / FP8_MAX
        q = (w.float() / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    elif kind == "int8":
        scales = amax / INT8_MAX
        q = (w.float() / scales[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        raise ValueError(f"unknown quantisation {kind}")
    return q, scales


LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


@torch.no_grad()
def quantize_block(block: nn.Module, kind: str) -> None:
    """Replace the block's four linears with weight-only quantised ones, in place."""
    for path in LINEARS:
        parent_name, name = path.split(".")
        parent = getattr(block, parent_name)
        lin = getattr(parent, name)
        q, s = quantize_weight(lin.weight, kind)
        setattr(parent, name, WeightOnlyLinear(q, s))
        del lin


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    for block in model.layers:
        quantize_block(block, kind)
    return model
