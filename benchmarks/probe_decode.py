"""Quick probe (lead's scratch for issue 10): decode tokens/s of the engine per mode on the GPU."""

import argparse
import json
import statistics
import time

import torch

from lab.bench.roofline import decode_bytes_per_step, mbu, measure_copy_bandwidth
from lab.engine.generate import Generator, no_recompile
from lab.env import fingerprint
from lab.model import prepare

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="llama-8b")
ap.add_argument("--batches", default="1,16")
ap.add_argument("--modes", default="eager,compile,compile-cudagraphs")
ap.add_argument("--prompt-len", type=int, default=32)
ap.add_argument("--new-tokens", type=int, default=256)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--out", default=".")
a = ap.parse_args()

dev = torch.device("cuda")
bw = measure_copy_bandwidth(dev)
rows = []
seq = a.prompt_len + a.new_tokens
maxb = max(int(b) for b in a.batches.split(","))
p = prepare(a.preset, None, "cuda", "bfloat16", 0, maxb, seq)
for mode in a.modes.split(","):
    for b in [int(x) for x in a.batches.split(",")]:
        torch._dynamo.reset()
        p.model.max_batch_size = 0
        gen = Generator(p.model, mode, b, seq)
        prompt = torch.randint(0, p.spec.args.vocab_size, (b, a.prompt_len))
        t0 = time.perf_counter()
        for _ in range(3):
            gen.generate(prompt, 8)
        compile_s = time.perf_counter() - t0
        tps = []
        with no_recompile():
            for _ in range(a.repeats):
                r = gen.generate(prompt, a.new_tokens)
                tps.append(len(r.decode_step_s) / r.decode_s)
        med = statistics.median(tps)
        step_s = 1 / med
        byts = decode_bytes_per_step(p.spec.args, "bfloat16", b, seq)
        rows.append(
            dict(
                mode=mode,
                batch=b,
                tok_s_user=med,
                tok_s_agg=med * b,
                mbu=mbu(byts, step_s, bw),
                compile_s=compile_s,
                ttft_ms=r.prefill_s * 1e3,
                peak_gb=torch.cuda.max_memory_allocated() / 1e9,
            )
        )
        print(rows[-1], flush=True)
out = dict(fingerprint=fingerprint().model_dump(), copy_bw_tb_s=bw / 1e12, rows=rows)
with open(f"{a.out}/probe_decode.json", "w") as f:
    json.dump(out, f, indent=1)
print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
print(f"{'mode':20s} {'b':>3s} {'tok/s/user':>10s} {'agg':>8s} {'MBU':>6s} {'compile_s':>9s}")
for r in rows:
    print(
        f"{r['mode']:20s} {r['batch']:3d} {r['tok_s_user']:10.1f} {r['tok_s_agg']:8.1f} {r['mbu']:6.2f} {r['compile_s']:9.1f}"
    )
