"""Hand-written Triton kernels for the decode hot path, each registered as a torch custom op so eager,
torch.compile and CUDA graphs all call the same code.

`wo_gemv` (lab.kernels.wo_gemv): the weight-only fp8/int8 decode GEMV behind `WeightOnlyLinear`. It is
loaded when triton is importable and a CUDA device is present (or Triton's CPU interpreter is on,
TRITON_INTERPRET=1, for tests); LAB_WO_GEMV=0 turns it off (A/B runs against the dequantising matmul).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

MAX_M = 16  # rows (batch x tokens) the GEMV serves: decode; prefill keeps the matmul path
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.int8)


def _wanted() -> bool:
    if os.environ.get("LAB_WO_GEMV", "1") == "0" or importlib.util.find_spec("triton") is None:
        return False
    return _INTERPRET or torch.cuda.is_available()


wo_gemv_op = None  # torch.ops.lab.wo_gemv once registered
if _wanted():
    from lab.kernels.wo_gemv import wo_gemv as wo_gemv_op  # registers the custom op


def gemv_shape_ok(device_type: str, x_dtype: torch.dtype, m: int, k: int, weight: Tensor) -> bool:
    """The dispatch rule, free of a loaded kernel: CUDA (or the interpreter on CPU), bf16 activations,
    1 <= M <= 16 rows, a contiguous fp8/int8 weight whose K matches."""
    return (
        (device_type == "cuda" or (_INTERPRET and device_type == "cpu"))
        and x_dtype == torch.bfloat16
        and 1 <= m <= MAX_M
        and weight.dtype in _WEIGHT_DTYPES
        and weight.dim() == 2
        and weight.shape[1] == k
        and weight.is_contiguous()
    )


def wo_gemv_applies(x: Tensor, weight: Tensor, scales: Tensor) -> bool:
    """Whether `WeightOnlyLinear` should call the Triton GEMV for this input (else F.linear + scale)."""
    if wo_gemv_op is None or x.dim() == 0 or scales.dtype != torch.float32:
        return False
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    return gemv_shape_ok(x.device.type, x.dtype, m, k, weight)
