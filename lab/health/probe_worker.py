"""One rank of the collective probe (`python -m lab.health.probe_worker ...`): join the process group,
all_reduce a buffer, check the sum, time each call, and write the result to --out as JSON.

`LAB_PROBE_FAULT=hang:R` or `die:R` makes rank R hang or exit before the collective: the way tests and
drill rehearsals exercise the parent's deadline and dead-rank handling on real processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta


def _fault(rank: int) -> str | None:
    spec = os.environ.get("LAB_PROBE_FAULT", "")
    kind, _, who = spec.partition(":")
    if kind in ("hang", "die") and who.isdigit() and int(who) == rank:
        return kind
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--backend", choices=["gloo", "nccl"], required=True)
    ap.add_argument("--init-file", required=True)
    ap.add_argument("--size-bytes", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--timeout-s", type=float, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import torch
    import torch.distributed as dist

    if a.backend == "nccl":
        torch.cuda.set_device(a.rank)
        device = torch.device("cuda", a.rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    dist.init_process_group(
        a.backend,
        init_method=f"file://{a.init_file}",
        rank=a.rank,
        world_size=a.world_size,
        timeout=timedelta(seconds=a.timeout_s),
    )
    init_s = time.perf_counter() - t0
    fault = _fault(a.rank)
    if fault == "die":
        os._exit(17)
    if fault == "hang":
        time.sleep(24 * 3600)

    n = max(1, a.size_bytes // 4)
    x = torch.empty(n, dtype=torch.float32, device=device)
    correct = True
    for _ in range(a.warmup):
        x.fill_(1.0)
        dist.all_reduce(x)
        sync()
        correct = correct and bool((x == a.world_size).all())
    iter_s = []
    for _ in range(a.iters):
        sync()
        t = time.perf_counter()
        dist.all_reduce(x)
        sync()
        iter_s.append(time.perf_counter() - t)
    dist.barrier()
    result = {
        "rank": a.rank,
        "pid": os.getpid(),
        "backend": a.backend,
        "world_size": a.world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size_bytes": n * 4,
        "init_s": init_s,
        "iter_s": iter_s,
        "correct": correct,
    }
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, a.out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
