"""The load generator alone: how late does it dispatch at a given rate? (MEASUREMENT.md: a run whose
generator lagged is INVALID, so the generator's own lag must be far below the threshold.)

Runs the real open-loop driver (lab.loadtest.runner.run_once) against a trivial in-process target that
answers at once, and writes the dispatch-lag distribution with the environment fingerprint.

    python benchmarks/loadgen_lag.py --qps 1000 --duration 10 --out reports/bench
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from lab.env import fingerprint
from lab.loadtest.client import RequestRecord
from lab.loadtest.runner import LoadTestConfig, run_once
from lab.results import write_json


class TrivialTarget:
    """Answers every request at once with one token: only the generator is measured."""

    name = "trivial"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def depth(self) -> dict:
        return {}

    async def send(self, prompt_ids: list[int], rec: RequestRecord) -> None:
        rec.t_sent = time.monotonic()
        await asyncio.sleep(0)
        now = time.monotonic()
        rec.t_admitted = rec.t_first_token = rec.t_done = now
        rec.token_times, rec.output_tokens, rec.outcome = [now], 1, "ok"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qps", type=float, default=1000.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--pattern", default="poisson")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/bench")
    args = ap.parse_args()
    cfg = LoadTestConfig(
        duration_s=args.duration,
        target_qps=args.qps,
        pattern=args.pattern,
        seed=args.seed,
        warmup_s=1.0,
        cooldown_s=1.0,
        max_new_tokens=1,
        prompt_len_min=8,
        prompt_len_max=8,
        progress=False,
        slo_e2e_ms=None,
        max_dispatch_lag_ms=2.0,
    )
    run = run_once(cfg, TrivialTarget(), args.qps, vocab_size=256, telemetry_device=None)
    lag = run.metrics["distributions"]["dispatch_lag_ms"]
    s = run.summary
    result = {
        "benchmark": "loadgen_lag",
        "qps": args.qps,
        "pattern": args.pattern,
        "duration_s": args.duration,
        "requests_sent": s["requests_sent"],
        "achieved_qps": s["achieved_qps"],
        "dispatch_lag_ms": lag,
        "goal": "dispatch lag p99 < 2 ms at 1,000 req/s",
        "meets_goal": lag["p99"] is not None and lag["p99"] < 2.0,
        "environment": fingerprint().model_dump(),
    }
    out = Path(args.out) / "loadgen_lag.json"
    write_json(out, result)
    print(
        f"loadgen @ {args.qps:g} req/s ({args.pattern}): sent {s['requests_sent']} in the window, achieved "
        f"{s['achieved_qps']:.1f} req/s; dispatch lag p50 {lag['p50']:.3f} ms, p99 {lag['p99']:.3f} ms, "
        f"max {lag['max']:.3f} ms -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
