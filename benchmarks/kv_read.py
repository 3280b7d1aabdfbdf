"""What `--kv-buckets` buys: one decode step of the engine's shape (llama-8b bf16, 16 slots, the 4,096-token
cache `lab serve` allocates), captured in a CUDA graph (eager-cudagraphs: nothing to compile), reading the
whole static cache (kv_len None) or only its first 256 / 1,024 / 2,048 positions.

Per arm: median ms per step over CUDA-event-timed replays (p10/p90 beside it), tokens/s aggregate, and the
bytes the step must read (weights + the K/V it reads) over the copy bandwidth measured in the same run (MBU).

    python benchmarks/kv_read.py --out DIR        # on the GPU host; writes DIR/kv_read.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lab.bench.roofline import measure_copy_bandwidth
from lab.engine.cudagraph import CudaGraphDecode
from lab.env import fingerprint
from lab.model import prepare


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--lengths", default="256,1024,2048", help="bounded reads to time beside the full one")
    ap.add_argument("--steps", type=int, default=50)
    o = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kv_read.py needs a CUDA GPU (it times CUDA-graph replays)")
    bw = measure_copy_bandwidth("cuda")
    p = prepare(o.preset, None, "cuda", "bfloat16", 0, o.batch, o.max_seq_len)
    model, a = p.model, p.spec.args
    model.setup_caches(o.batch, o.max_seq_len)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    kv_per_pos = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 2 * o.batch  # K and V, bf16, every slot
    step = CudaGraphDecode()
    tok = torch.zeros(o.batch, 1, dtype=torch.long, device="cuda")
    pos = torch.full((o.batch, 1), 100, dtype=torch.long, device="cuda")  # every slot at position 100
    res: dict = {
        "benchmark": "kv_read",
        "card": torch.cuda.get_device_name(),
        "copy_bandwidth_tb_s": bw / 1e12,
        "params": vars(o),
        "environment": fingerprint().model_dump(mode="json"),
        "arms": {},
    }
    with torch.inference_mode():
        for kv_len in [None] + [int(x) for x in o.lengths.split(",")]:
            kw = {} if kv_len is None else {"kv_len": kv_len}
            for _ in range(3):
                step(model, tok, pos, None, 0.0, None, **kw)  # capture + settle
            times = []
            for _ in range(o.steps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                step(model, tok, pos, None, 0.0, None, **kw)
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            q = statistics.quantiles(times, n=10)
            ms = statistics.median(times)
            read = weights + kv_per_pos * (kv_len or o.max_seq_len)
            res["arms"][str(kv_len or "full")] = {
                "ms_per_step": ms,
                "p10_ms": q[0],
                "p90_ms": q[-1],
                "tok_s_aggregate": o.batch * 1e3 / ms,
                "bytes_per_step": read,
                "mbu": read / (ms / 1e3) / bw,
            }
    Path(o.out).mkdir(parents=True, exist_ok=True)
    (Path(o.out) / "kv_read.json").write_text(json.dumps(res, indent=1))
    print(f"{res['card']}, copy {bw / 1e12:.2f} TB/s, {o.preset} batch {o.batch}, cache {o.max_seq_len}")
    print(f"{'kv read':>8s} {'ms/step':>8s} {'tok/s':>8s} {'GB/step':>8s} {'MBU':>5s}")
    for k, v in res["arms"].items():
        print(
            f"{k:>8s} {v['ms_per_step']:8.2f} {v['tok_s_aggregate']:8.0f} {v['bytes_per_step'] / 1e9:8.2f} {v['mbu']:5.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
