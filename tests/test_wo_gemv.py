"""The weight-only fp8/int8 decode GEMV (lab.kernels.wo_gemv) on the CPU.

The kernels themselves run under Triton's CPU interpreter (TRITON_INTERPRET=1), which must be set before
triton is imported, so one subprocess runs every kernel check and reports JSON; the tests below assert on
it. The interpreter multiplies the dot path's tiles in float32 (its bf16 tl.dot is broken) and registers
the op as an opaque custom op (wrap_triton cannot trace interpreted kernels); everything else (tiling,
masks, tails, 8-bit loads and conversion, scales, dispatch, fake impl, torch.compile tracing) is the GPU code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab import kernels
from lab.model.quant import WeightOnlyLinear, quantize_weight

ROOT = Path(__file__).resolve().parent.parent
REL_TOL = 2e-2  # bf16 output against a float32 reference

CHECK = r"""
import json
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from lab import kernels
from lab.kernels import wo_gemv as mod
from lab.model.quant import WeightOnlyLinear, quantize_weight

out = {"loaded": kernels.wo_gemv_op is not None, "op": [], "configs": [], "route": {}}
g = torch.Generator().manual_seed(0)
N, K = 80, 600  # ragged against every BLOCK_N and BLOCK_K: full tiles plus a masked tail


def rel(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def case(kind, m):
    q, s = quantize_weight(torch.randn(N, K, generator=g), kind)
    x = torch.randn(m, K, generator=g).bfloat16()
    return x, q, s, (x.float() @ q.float().T) * s


for kind in ("fp8", "int8"):
    for m in (1, 5, 16):
        x, q, s, ref = case(kind, m)
        y = torch.ops.lab.wo_gemv(x, q, s)
        out["op"].append({"kind": kind, "m": m, "shape": list(y.shape), "dtype": str(y.dtype),
                          "rel": rel(y, ref)})
    for path, cfgs, m in (("fma", mod._FMA_CONFIGS, 1), ("dot", mod._DOT_CONFIGS, 5), ("dot", [], 1)):
        x, q, s, ref = case(kind, m)
        for c in cfgs or mod._DOT_CONFIGS[:1]:
            y = mod.launch(x, q, s, path=path, config=c)
            out["configs"].append({"kind": kind, "path": path, "m": m, "cfg": str(c), "rel": rel(y, ref)})

with FakeTensorMode():
    y = torch.ops.lab.wo_gemv(torch.empty(7, K, dtype=torch.bfloat16),
                              torch.empty(N, K, dtype=torch.float8_e4m3fn), torch.empty(N))
    out["fake"] = {"shape": list(y.shape), "dtype": str(y.dtype), "type": type(y).__name__}

calls = []
real = kernels.wo_gemv_op
kernels.wo_gemv_op = lambda *a: calls.append(a[0].shape[0]) or real(*a)
lin = WeightOnlyLinear(*quantize_weight(torch.randn(N, K, generator=g), "fp8"))
for rows in ((2, 1), (4, 4), (17, 1)):
    x = torch.randn(*rows, K, generator=g).bfloat16()
    n0 = len(calls)
    y = lin(x)
    ref = x.float() @ (lin.weight.float() * lin.scales[:, None]).T
    out["route"]["x".join(map(str, rows))] = {"kernel": len(calls) > n0, "shape": list(y.shape),
                                              "rel": rel(y, ref)}
kernels.wo_gemv_op = real

# fullgraph=True: a graph break (or an op dynamo cannot trace) raises instead of silently splitting.
cl = torch.compile(lin, fullgraph=True, backend="aot_eager")
x = torch.randn(3, 1, K, generator=g).bfloat16()
y = cl(x)
out["compiled"] = {"shape": list(y.shape), "rel_vs_eager": rel(y, lin(x).float())}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interp() -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    env.pop("LAB_WO_GEMV", None)
    p = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_op_matches_float32_reference(interp):
    assert interp["loaded"]
    seen = {(r["kind"], r["m"]) for r in interp["op"]}
    assert seen == {(k, m) for k in ("fp8", "int8") for m in (1, 5, 16)}
    for r in interp["op"]:
        assert r["shape"] == [r["m"], 80] and r["dtype"] == "torch.bfloat16", r
        assert r["rel"] < REL_TOL, r


def test_every_autotune_config_is_correct(interp):
    from_kernel = {(r["kind"], r["path"], r["m"]) for r in interp["configs"]}
    assert from_kernel == {
        (k, p, m) for k in ("fp8", "int8") for p, m in (("fma", 1), ("dot", 5), ("dot", 1))
    }
    assert len(interp["configs"]) == 2 * (6 + 6 + 1)
    for r in interp["configs"]:
        assert r["rel"] < REL_TOL, r


def test_fake_impl_gives_shape_and_dtype(interp):
    assert interp["fake"] == {"shape": [7, 80], "dtype": "torch.bfloat16", "type": "FakeTensor"}


def test_weight_only_linear_routes_decode_rows_to_the_kernel(interp):
    r = interp["route"]
    assert r["2x1"]["kernel"] and r["4x4"]["kernel"]  # 2 and 16 rows: decode
    assert not r["17x1"]["kernel"]  # more than 16 rows: the matmul path
    assert r["2x1"]["shape"] == [2, 1, 80] and r["4x4"]["shape"] == [4, 4, 80]
    for v in r.values():
        assert v["rel"] < REL_TOL


def test_compiles_fullgraph(interp):
    assert interp["compiled"]["shape"] == [3, 1, 80]
    assert interp["compiled"]["rel_vs_eager"] < 1e-6


def _w(dtype=torch.float8_e4m3fn, n=32, k=64) -> torch.Tensor:
    return torch.zeros(n, k).to(dtype)


@pytest.mark.parametrize(
    "device_type,x_dtype,m,k,weight,ok",
    [
        ("cuda", torch.bfloat16, 1, 64, _w(), True),
        ("cuda", torch.bfloat16, 16, 64, _w(torch.int8), True),
        ("cuda", torch.bfloat16, 17, 64, _w(), False),  # prefill-sized
        ("cuda", torch.bfloat16, 0, 64, _w(), False),
        ("cuda", torch.float16, 1, 64, _w(), False),
        ("cuda", torch.bfloat16, 1, 64, _w(torch.bfloat16), False),
        ("cuda", torch.bfloat16, 1, 32, _w(), False),  # K mismatch
        ("cuda", torch.bfloat16, 1, 32, _w(k=64).t(), False),  # not contiguous
        ("cpu", torch.bfloat16, 1, 64, _w(), False),  # CPU without the interpreter
    ],
)
def test_dispatch_rule(device_type, x_dtype, m, k, weight, ok):
    assert kernels.gemv_shape_ok(device_type, x_dtype, m, k, weight) is ok


def test_cpu_keeps_the_matmul_path():
    lin = WeightOnlyLinear(*quantize_weight(torch.randn(32, 64), "int8"))
    x = torch.randn(2, 64).bfloat16()
    assert not kernels.wo_gemv_applies(x, lin.weight, lin.scales)
    ref = torch.nn.functional.linear(x, lin.weight.to(x.dtype)) * lin.scales.to(x.dtype)
    assert torch.equal(lin(x), ref)


def test_can_be_turned_off():
    """LAB_WO_GEMV=0 keeps the op unloaded where it would otherwise load (A/B against the matmul)."""
    pytest.importorskip("triton")
    code = "from lab import kernels; print(kernels.wo_gemv_op is None)"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), LAB_WO_GEMV="0")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "True", p.stderr[-2000:]


AOT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lab.kernels import wo_gemv as mod

out = []
for kern, cfg, extra in (
    (mod._wo_gemv_fma_kernel.fn, mod._FMA_CONFIGS[0], {}),
    (mod._wo_gemv_dot_kernel.fn, mod._DOT_CONFIGS[3], {"BLOCK_M": 16, "DOT_FP32": 0}),
):
    for wdt in ("fp8e4nv", "i8"):
        ptrs = {"x_ptr": "*bf16", "w_ptr": f"*{wdt}", "s_ptr": "*fp32", "y_ptr": "*bf16"}
        sig = {a: ptrs.get(a, "i32") for a in kern.arg_names}
        consts = dict(extra, **cfg.kwargs)
        sig.update({k: "constexpr" for k in consts})
        src = ASTSource(fn=kern, signature=sig,
                        constexprs={(kern.arg_names.index(k),): v for k, v in consts.items()})
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        out.append({"kernel": kern.__name__, "w": wdt, "cubin": len(ck.asm["cubin"]),
                    "mma": "mma" in ck.asm["ptx"]})
print("RESULT " + json.dumps(out))
"""


def test_kernels_compile_for_h100(tmp_path):
    """The real GPU compile (sm_90 cubin, no GPU needed): catches what the interpreter does not check, e.g.
    8-bit conversions and dot operand types on the H100 code path."""
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(
        [sys.executable, "-c", AOT], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(
        next(x for x in p.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT ")
    )
    assert len(rows) == 4 and all(r["cubin"] > 0 for r in rows)
    assert all(r["mma"] for r in rows if r["kernel"] == "_wo_gemv_dot_kernel")
