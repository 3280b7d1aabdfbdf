"""What `--kv-buckets` buys: one decode step of the engine's shape (llama-8b bf16, 16 slots, the 4,096-token
cache `lab serve` allocates), captured in a CUDA graph, reading the whole static cache (kv_len None) or only
its first 512 / 1,024 / 2,048 positions; per mode: eager-cudagraphs (serve's start mode, nothing to
compile) and regional-cudagraphs (serve's mode on a GPU; each length compiles the block once more).

Per arm: median ms per step over CUDA-event-timed replays (p10/p90 beside it), tokens/s aggregate, and the
bytes the step must read (lab.bench.roofline: weights but the embedding table, + the K/V it reads) over the
copy bandwidth measured in the same run (MBU).

Then the engine as `lab serve` runs it (regional-cudagraphs, 16 slots, 4,096 tokens) with `--kv-buckets 1`
and N: a closed batch of 16 short requests (64-token prompts, 256 new tokens) submitted at once, decode
tokens/s once every slot decodes, median of `--repeats`.

    python benchmarks/kv_read.py --out DIR        # on the GPU host; writes DIR/kv_read.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lab.bench.roofline import decode_bytes_per_step, measure_copy_bandwidth
from lab.engine.batching import Engine, EngineConfig
from lab.engine.generate import compile_fn, decode_step
from lab.env import fingerprint
from lab.loadtest.session import offline_batch
from lab.model import prepare


def save(out: str, res: dict) -> None:
    """Written after every arm, so a run cut short keeps what it measured."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "kv_read.json").write_text(json.dumps(res, indent=1))


def time_step(step, model, tok, pos, kv_len: int | None, steps: int) -> tuple[float, list[float]]:
    """Median ms of `steps` CUDA-event-timed calls (after 3 that capture and settle), and the deciles."""
    kw = {} if kv_len is None else {"kv_len": kv_len}
    for _ in range(3):
        step(model, tok, pos, None, 0.0, None, **kw)
    times = []
    for _ in range(steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step(model, tok, pos, None, 0.0, None, **kw)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times), statistics.quantiles(times, n=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--lengths", default="512,1024,2048", help="bounded reads to time beside the full one")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--modes", default="eager-cudagraphs,regional-cudagraphs")
    ap.add_argument(
        "--engine-buckets", default="1,4", help="the engine part's --kv-buckets values ('' skips it)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    o = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kv_read.py needs a CUDA GPU (it times CUDA-graph replays)")
    bw = measure_copy_bandwidth("cuda")
    p = prepare(o.preset, None, "cuda", "bfloat16", 0, o.batch, o.max_seq_len)
    model, a = p.model, p.spec.args
    model.setup_caches(o.batch, o.max_seq_len)
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
        for mode in o.modes.split(","):  # eager-cudagraphs first: regional compiles the blocks in place
            step = compile_fn(decode_step, mode)
            for kv_len in [None] + [int(x) for x in o.lengths.split(",")]:
                ms, q = time_step(step, model, tok, pos, kv_len, o.steps)
                # The roofline every lab figure uses: the weights but the embedding table (one row per
                # token is looked up), and the K/V the attention reads.
                read = decode_bytes_per_step(a, "bfloat16", o.batch, kv_len or o.max_seq_len)
                name = f"{mode} {kv_len or 'full'}"
                res["arms"][name] = {
                    "ms_per_step": ms,
                    "p10_ms": q[0],
                    "p90_ms": q[-1],
                    "tok_s_aggregate": o.batch * 1e3 / ms,
                    "bytes_per_step": read,
                    "mbu": read / (ms / 1e3) / bw,
                }
                print(f"{name}: {ms:.2f} ms/step", flush=True)
                save(o.out, res)
    res["engine"] = {}
    for buckets in [int(x) for x in o.engine_buckets.split(",") if x]:
        cfg = EngineConfig(
            max_batch_size=o.batch, max_seq_len=o.max_seq_len, mode="regional-cudagraphs", kv_buckets=buckets
        )
        engine = Engine(model, cfg).start()
        assert engine.ready.wait(900) and engine.crashed is None, engine.crashed
        rates = [
            offline_batch(engine, o.batch, 64, 256)["decode_tokens_per_s_aggregate"] for _ in range(o.repeats)
        ]
        engine.stop()
        res["engine"][f"kv_buckets {buckets}"] = {
            "kv_lengths": engine.kv_lengths,
            "decode_tok_s_aggregate": statistics.median(rates),
            "runs": rates,
            "warmup_s": engine.warmup_s,
        }
        print(f"engine kv_buckets {buckets}: {statistics.median(rates):.0f} tok/s", flush=True)
        save(o.out, res)
    save(o.out, res)
    print(f"{res['card']}, copy {bw / 1e12:.2f} TB/s, {o.preset} batch {o.batch}, cache {o.max_seq_len}")
    print(f"{'mode, kv read':>26s} {'ms/step':>8s} {'tok/s':>8s} {'GB/step':>8s} {'MBU':>5s}")
    for k, v in res["arms"].items():
        print(
            f"{k:>26s} {v['ms_per_step']:8.2f} {v['tok_s_aggregate']:8.0f} {v['bytes_per_step'] / 1e9:8.2f} {v['mbu']:5.2f}"
        )
    for k, v in res["engine"].items():
        print(f"engine {k}: {v['decode_tok_s_aggregate']:.0f} tok/s decode (16 x 64-token prompts, 256 new)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
