"""Issue 10: the Triton weight-only GEMV (lab.kernels.wo_gemv) against the dequantising matmul it replaces,
on the gpt-40b decode shapes, fp8 and int8, M = 1 and 16 rows.

Arms per (shape, kind, M):
  triton            torch.ops.lab.wo_gemv, eager (autotuned; the path WeightOnlyLinear takes at decode)
  triton_fma/_dot   M = 1 only: each kernel forced, to show which the M = 1 dispatch should pick
  triton_compiled   the op inside torch.compile(fullgraph=True)
  ref_eager         F.linear(x, w.to(bf16)) * s.to(bf16)  (WeightOnlyLinear's matmul path)
  ref_compiled      the same under torch.compile(fullgraph=True)
Achieved GB/s counts W bytes + scales + x + y; `frac_copy` divides by the device-to-device copy bandwidth
measured in the same run. Every arm is timed as replays of one CUDA graph of back-to-back calls (CUDA
events; the kernels' time, as in the engine's compile-cudagraphs decode, not Python dispatch): median
per-call time, p10/p90 beside it; each result is checked against a float32 reference (rel_err).

    python benchmarks/wo_gemv_bench.py --out DIR      # on the GPU host; writes DIR/wo_gemv_bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lab.bench.roofline import measure_copy_bandwidth
from lab.env import fingerprint

DEVICE = "cuda"  # the kernels' device; a CPU smoke run under TRITON_INTERPRET=1 may swap it
DIM, FFN, KV = 8192, 22016, 1024  # gpt-40b: d_model, ffn hidden, n_kv_heads * head_dim
SHAPES = {  # name: (N, K) of W[N, K]
    "wqkv": (DIM + 2 * KV, DIM),
    "wo": (DIM, DIM),
    "w13": (2 * FFN, DIM),
    "w2": (DIM, FFN),
}


def make_weight(kind: str, n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 8-bit weights straight on the device (no bf16 copy) and positive per-row scales."""
    if kind == "fp8":
        w = (torch.randn(n, k, device=DEVICE, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    else:
        w = torch.randint(-127, 128, (n, k), device=DEVICE, dtype=torch.int8, generator=gen)
    s = torch.rand(n, device=DEVICE, generator=gen) * 1e-3 + 1e-4
    return w, s


def time_calls(fn, calls: int, repeats: int) -> dict:
    """Per-call seconds: median and p10/p90 over `repeats` replays of one CUDA graph holding `calls`
    back-to-back calls, so the figure is the kernels' time, not Python dispatch (20-60 us per eager call
    through the custom op, as long as the small kernels themselves). Where capture fails, back-to-back
    eager calls instead, and `timing` says so."""
    for _ in range(3):  # autotuning and compilation happen here, never inside the capture
        fn()
    torch.cuda.synchronize()
    timing, note = "cuda_graph", None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run = graph.replay
        run()
    except Exception as e:  # recorded; the eager loop still gives a (dispatch-bound) figure
        timing, note = "eager_loop", f"{type(e).__name__}: {e}"[:300]
        torch.cuda.synchronize()

        def run():
            for _ in range(calls):
                fn()

    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        per_call.append(a.elapsed_time(b) / 1e3 / calls)
    per_call.sort()
    q = statistics.quantiles(per_call, n=10) if len(per_call) > 1 else per_call * 9
    out = {"s": statistics.median(per_call), "p10_s": q[0], "p90_s": q[-1], "timing": timing}
    if note:
        out["capture_error"] = note
    return out


def compiled(fn):
    # Default mode, captured by time_calls' own CUDA graph: reduce-overhead's graph trees would copy the
    # weight (a plain input here, not a module buffer) into a static buffer on every replay.
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


def run_case(name, n, k, kind, m, arms, bw, calls, repeats, gen) -> dict:
    from lab.kernels import wo_gemv as mod

    w, s = make_weight(kind, n, k, gen)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    ref = (x.float() @ w.float().T) * s
    nbytes = n * k * w.element_size() + n * 4 + m * k * 2 + m * n * 2
    s_bf = s.to(torch.bfloat16)

    def ref_fn(x, w, s_bf):
        return F.linear(x, w.to(x.dtype)) * s_bf

    def op_fn(x, w, s):
        return torch.ops.lab.wo_gemv(x, w, s)

    cands = {
        "triton": (lambda: op_fn(x, w, s)),
        "triton_compiled": None,
        "ref_eager": (lambda: ref_fn(x, w, s_bf)),
        "ref_compiled": None,
    }
    if m == 1:
        cands["triton_fma"] = lambda: mod.launch(x, w, s, path="fma")
        cands["triton_dot"] = lambda: mod.launch(x, w, s, path="dot")
    row = {"shape": name, "N": n, "K": k, "kind": kind, "M": m, "bytes": nbytes}
    for arm, fn in cands.items():
        if arm not in arms:
            continue
        try:
            t0 = time.perf_counter()
            if arm == "triton_compiled":
                c = compiled(op_fn)
                fn = lambda c=c: c(x, w, s)  # noqa: E731
            elif arm == "ref_compiled":
                c = compiled(ref_fn)
                fn = lambda c=c: c(x, w, s_bf)  # noqa: E731
            y = fn().clone()  # first call: autotune / compile
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            err = ((y.float() - ref).norm() / ref.norm()).item()
            t = time_calls(fn, calls, repeats)
            r = {
                "first_call_s": first_s,
                "us": t["s"] * 1e6,
                "p10_us": t["p10_s"] * 1e6,
                "p90_us": t["p90_s"] * 1e6,
                "gb_s": nbytes / t["s"] / 1e9,
                "frac_copy": nbytes / t["s"] / bw,
                "rel_err": err,
                "timing": t["timing"],
                **({"capture_error": t["capture_error"]} if "capture_error" in t else {}),
            }
            if arm.startswith("triton") and arm != "triton_compiled":
                kern = (
                    mod._wo_gemv_fma_kernel if (m == 1 and arm != "triton_dot") else mod._wo_gemv_dot_kernel
                )
                r["config"] = str(getattr(kern, "best_config", None))
        except Exception as e:  # recorded, the run goes on (int8 under inductor failed before)
            r = {"error": f"{type(e).__name__}: {e}"[:800]}
        row[arm] = r
        print(name, kind, f"M={m}", arm, {k: v for k, v in r.items() if k != "config"}, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--kinds", default="fp8,int8")
    ap.add_argument("--ms", default="1,16", help="rows (batch) per call")
    ap.add_argument("--arms", default="triton,triton_fma,triton_dot,triton_compiled,ref_eager,ref_compiled")
    ap.add_argument("--calls", type=int, default=20, help="back-to-back calls per timed window")
    ap.add_argument("--repeats", type=int, default=15, help="timed windows")
    o = ap.parse_args()
    import lab.kernels.wo_gemv  # noqa: F401  (registers torch.ops.lab.wo_gemv)

    bw = measure_copy_bandwidth("cuda")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    arms = o.arms.split(",")
    rows = []
    for name in o.shapes.split(","):
        n, k = SHAPES[name]
        for kind in o.kinds.split(","):
            for m in (int(v) for v in o.ms.split(",")):
                rows.append(run_case(name, n, k, kind, m, arms, bw, o.calls, o.repeats, gen))
                torch._dynamo.reset()  # drop the compiled closures that hold this case's weights
                torch.cuda.empty_cache()
    result = {
        "fingerprint": fingerprint().model_dump(mode="json"),
        "card": torch.cuda.get_device_name(),
        "copy_bandwidth_tb_s": bw / 1e12,
        "params": vars(o),
        "rows": rows,
    }
    Path(o.out).mkdir(parents=True, exist_ok=True)
    (Path(o.out) / "wo_gemv_bench.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"\ncard {result['card']}, copy bandwidth {bw / 1e12:.2f} TB/s; cells: us / fraction of copy bw")
    shown = [a for a in arms if any(a in r for r in rows)]
    print(f"{'shape':6s} {'kind':5s} {'M':>3s} " + " ".join(f"{a:>17s}" for a in shown))
    for r in rows:
        cells = []
        for a in shown:
            v = r.get(a)
            if v is None:
                cells.append(f"{'-':>17s}")
            elif "error" in v:
                cells.append(f"{'error':>17s}")
            else:
                cells.append(f"{v['us']:10.1f} {v['frac_copy']:6.2f}")
        print(f"{r['shape']:6s} {r['kind']:5s} {r['M']:3d} " + " ".join(cells))
    bad = [
        (r["shape"], r["kind"], r["M"], a)
        for r in rows
        for a in shown
        if isinstance(r.get(a), dict) and r[a].get("rel_err", 0) > 2e-2
    ]
    print("rel_err > 2e-2:", bad or "none")


if __name__ == "__main__":
    main()
