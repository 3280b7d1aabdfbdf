"""Overload soak (issue 9): offer ten times the engine's measured capacity for a minute and check that
back-pressure holds. Three phases on one warmed-up in-process engine:

  1. unloaded: single requests one after another -> the unloaded end-to-end latency (p50);
     capacity: a closed loop keeping every batch slot busy -> completed requests per second;
  2. overload: seeded Poisson arrivals at --overload-factor x capacity for --duration-s; RSS (psutil),
     queue depth and running batch sampled every 0.2 s;
  3. recovery: probes one at a time after the arrivals stop, until three in a row are back within
     1.5x the unloaded p50 (or +20 ms) -> the recovery time, measured from the end of the overload.

Checks: the queue never exceeds --max-queue; RSS growth over the overload (median of its last fifth
minus median of its first fifth) stays under --rss-growth-limit-mb; every request sent has exactly one
outcome (ok, rejected_queue_full = HTTP 429 at `lab serve`, timed_out_in_queue = 503 queue_timeout);
latency recovers. Exit 0 when every check passes, 1 otherwise; DIR/soak.json carries the figures, the
time series and the environment fingerprint.

    python benchmarks/soak.py --out reports/examples/soak-cpu-tiny                       # CPU, tiny
    python benchmarks/soak.py --out DIR --preset llama-8b --device cuda --max-new-tokens 128  # an H100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

SAMPLE_S = 0.2


class Tally:
    """Outcomes by request, kept compact (the soak must not measure its own bookkeeping as growth)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = 0
        self.outcomes: dict[str, int] = {}
        self.done = threading.Condition(self.lock)
        self.finished = 0

    def callback(self, req, event: str) -> None:
        if event != "done":
            return
        with self.lock:
            self.outcomes[req.outcome] = self.outcomes.get(req.outcome, 0) + 1
            self.finished += 1
            self.done.notify_all()

    def wait_all(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while self.finished < self.sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.done.wait(left)
        return True


def _request(engine, rng, cfg: dict[str, Any], callback=None):
    from lab.engine.batching import Request

    n = int(rng.integers(cfg["prompt_len_min"], cfg["prompt_len_max"] + 1))
    ids = rng.integers(0, engine.vocab_size, n).tolist()
    return Request(ids, cfg["max_new_tokens"], ignore_eos=True, callback=callback)


def _one(engine, rng, cfg: dict[str, Any], timeout_s: float = 120.0) -> tuple[str, float]:
    """Submit one request and wait for it: (outcome, end-to-end seconds)."""
    ev = threading.Event()
    req = _request(engine, rng, cfg, lambda r, e: ev.set() if e == "done" else None)
    t0 = time.monotonic()
    engine.submit(req)
    if not ev.wait(timeout_s):
        return "lost", time.monotonic() - t0
    return req.outcome, req.t_done - t0


def measure_unloaded(engine, rng, cfg: dict[str, Any], n: int) -> dict[str, Any]:
    e2e = []
    for _ in range(n):
        outcome, s = _one(engine, rng, cfg)
        if outcome == "ok":
            e2e.append(s)
    return {"requests": n, "ok": len(e2e), "e2e_ms_p50": 1e3 * statistics.median(e2e) if e2e else None}


def measure_capacity(engine, rng, cfg: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Closed loop with every slot busy: completed requests per second at saturation."""
    slots = threading.Semaphore(cfg["max_batch_size"])
    ok = [0]
    lock = threading.Lock()

    def cb(req, event):
        if event == "done":
            with lock:
                ok[0] += req.outcome == "ok"
            slots.release()

    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < seconds:
        if slots.acquire(timeout=0.1):
            engine.submit(_request(engine, rng, cfg, cb))
            sent += 1
    for _ in range(cfg["max_batch_size"]):  # let the last ones finish
        slots.acquire(timeout=120)
    elapsed = time.monotonic() - t0
    return {"seconds": elapsed, "sent": sent, "ok": ok[0], "requests_per_s": ok[0] / elapsed}


class Sampler(threading.Thread):
    """RSS, queue depth and running batch every SAMPLE_S seconds (t relative to the overload start)."""

    def __init__(self, engine, t0: float):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.engine, self.t0 = psutil.Process(), engine, t0
        self.samples: list[dict[str, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        cuda = self.engine.device.type == "cuda"
        if cuda:
            import torch
        while not self.stop.is_set():
            s = self.engine.stats()
            row = {
                "t_s": round(time.monotonic() - self.t0, 3),
                "rss_mb": self.proc.memory_info().rss / 2**20,
                "waiting": s["waiting"] + s["waiting_long_context"],
                "running": s["running"],
            }
            if cuda:
                row["gpu_allocated_mb"] = torch.cuda.memory_allocated(self.engine.device) / 2**20
            self.samples.append(row)
            self.stop.wait(SAMPLE_S)


def overload(engine, rng, cfg: dict[str, Any], qps: float, seconds: float, tally: Tally) -> dict[str, Any]:
    """Open loop: Poisson arrivals precomputed from the seed, sent at absolute deadlines."""
    import numpy as np

    gaps = rng.exponential(1.0 / qps, size=int(qps * seconds * 1.5) + 16)
    arrivals = gaps.cumsum()
    arrivals = arrivals[arrivals < seconds].tolist()
    # Requests are built at send time and not kept: only the tally outlives them, so RSS measures the
    # engine and its queue, not this generator's bookkeeping.
    lag_ms = np.empty(len(arrivals))
    t0 = time.monotonic()
    for i, at in enumerate(arrivals):
        now = time.monotonic() - t0
        if at > now:
            time.sleep(at - now)
        req = _request(engine, rng, cfg, tally.callback)
        lag_ms[i] = 1e3 * (time.monotonic() - t0 - at)
        with tally.lock:
            tally.sent += 1
        engine.submit(req)
        del req
    return {
        "scheduled": len(arrivals),
        "offered_qps": len(arrivals) / seconds,
        "dispatch_lag_ms_p99": float(np.percentile(lag_ms, 99)) if len(arrivals) else None,
        "elapsed_s": time.monotonic() - t0,
    }


def recovery(
    engine, rng, cfg: dict[str, Any], unloaded_ms: float, t_end: float, limit_s: float
) -> dict[str, Any]:
    """Probe one request at a time until three in a row are within the unloaded envelope."""
    bound_ms = max(1.5 * unloaded_ms, unloaded_ms + 20.0)
    probes: list[dict[str, Any]] = []
    streak_start = None
    streak = 0
    while time.monotonic() - t_end < limit_s:
        t_sent = time.monotonic() - t_end
        outcome, s = _one(engine, rng, cfg)
        ms = 1e3 * s
        probes.append({"t_s": round(t_sent, 3), "outcome": outcome, "e2e_ms": round(ms, 3)})
        if outcome == "ok" and ms <= bound_ms:
            streak_start = t_sent if streak == 0 else streak_start
            streak += 1
            if streak == 3:
                return {"recovery_s": streak_start, "bound_ms": bound_ms, "probes": probes}
        else:
            streak = 0
        time.sleep(0.05)
    return {"recovery_s": None, "bound_ms": bound_ms, "probes": probes}


def run_soak(
    preset: str | None = "tiny",
    model_path: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    mode: str = "auto",
    seed: int = 0,
    duration_s: float = 60.0,
    overload_factor: float = 10.0,
    capacity_s: float = 10.0,
    unloaded_requests: int = 10,
    max_batch_size: int = 16,
    max_new_tokens: int = 64,
    prompt_len_min: int = 16,
    prompt_len_max: int = 64,
    max_queue: int = 64,
    queue_timeout_s: float = 5.0,
    rss_growth_limit_mb: float = 64.0,
    recovery_limit_s: float | None = None,
) -> dict[str, Any]:
    """Run the three phases; returns the result dict (figures, checks, time series)."""
    import torch

    from lab.model import resolve_device

    dev = resolve_device(device)
    if mode == "auto":
        mode = "compile-cudagraphs" if dev.type == "cuda" else "eager"
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(max(1, threads - 1))  # leave the load generator a core
    try:
        return _run(
            preset,
            model_path,
            device,
            dtype,
            mode,
            seed,
            duration_s,
            overload_factor,
            capacity_s,
            unloaded_requests,
            max_batch_size,
            max_new_tokens,
            prompt_len_min,
            prompt_len_max,
            max_queue,
            queue_timeout_s,
            rss_growth_limit_mb,
            recovery_limit_s,
        )
    finally:
        torch.set_num_threads(threads)


def _run(
    preset,
    model_path,
    device,
    dtype,
    mode,
    seed,
    duration_s,
    overload_factor,
    capacity_s,
    unloaded_requests,
    max_batch_size,
    max_new_tokens,
    prompt_len_min,
    prompt_len_max,
    max_queue,
    queue_timeout_s,
    rss_growth_limit_mb,
    recovery_limit_s,
) -> dict[str, Any]:
    import numpy as np

    from lab.engine.batching import EngineConfig
    from lab.loadtest.session import build_engine, wait_ready

    cfg = {
        "max_batch_size": max_batch_size,
        "max_new_tokens": max_new_tokens,
        "prompt_len_min": prompt_len_min,
        "prompt_len_max": prompt_len_max,
    }
    ecfg = EngineConfig(
        max_batch_size=max_batch_size,
        max_seq_len=prompt_len_max + max_new_tokens,
        max_new_tokens=max_new_tokens,
        max_queue=max_queue,
        queue_timeout_s=queue_timeout_s,
        mode=mode,
    )
    engine, prepared = build_engine(preset, model_path, device, dtype, seed, ecfg)
    rng = np.random.default_rng(seed)
    engine.start(warmup=True)
    try:
        if not wait_ready(engine):
            raise RuntimeError(f"the engine failed to warm up: {engine.crashed}")
        unloaded = measure_unloaded(engine, rng, cfg, unloaded_requests)
        capacity = measure_capacity(engine, rng, cfg, capacity_s)
        unloaded_ms = unloaded["e2e_ms_p50"]
        qps = overload_factor * capacity["requests_per_s"]
        tally = Tally()
        t0 = time.monotonic()
        sampler = Sampler(engine, t0)
        sampler.start()
        offered = overload(engine, rng, cfg, qps, duration_s, tally)
        t_end = time.monotonic()
        rec = recovery(engine, rng, cfg, unloaded_ms, t_end, recovery_limit_s or (queue_timeout_s + 30.0))
        settled = tally.wait_all(queue_timeout_s + 60.0)
        time.sleep(2 * SAMPLE_S)
        sampler.stop.set()
        sampler.join()
        stats = engine.stats()
    finally:
        engine.stop()

    samples = sampler.samples
    during = [s for s in samples if s["t_s"] <= duration_s]
    fifth = max(1, len(during) // 5)
    rss_first = statistics.median(s["rss_mb"] for s in during[:fifth]) if during else None
    rss_last = statistics.median(s["rss_mb"] for s in during[-fifth:]) if during else None
    growth = None if rss_first is None else rss_last - rss_first
    outcomes = dict(tally.outcomes)
    sent = tally.sent
    accounted = sum(outcomes.values())
    rejected = outcomes.get("rejected_queue_full", 0)
    timed_out = outcomes.get("timed_out_in_queue", 0)
    max_waiting = max((s["waiting"] for s in samples), default=0)
    figures = {
        "capacity_rps": capacity["requests_per_s"],
        "offered_qps": offered["offered_qps"],
        "overload_factor": offered["offered_qps"] / capacity["requests_per_s"],
        "unloaded_e2e_ms_p50": unloaded_ms,
        "requests_sent": sent,
        "requests_ok": outcomes.get("ok", 0),
        "requests_rejected_429": rejected,
        "requests_timed_out_in_queue": timed_out,
        "requests_other": accounted - outcomes.get("ok", 0) - rejected - timed_out,
        "rejected_share": rejected / sent if sent else None,
        "failed_share": (sent - outcomes.get("ok", 0)) / sent if sent else None,
        "served_rps_during_overload": outcomes.get("ok", 0) / duration_s,
        "served_share_of_capacity": outcomes.get("ok", 0) / duration_s / capacity["requests_per_s"],
        "max_queue_depth": max_waiting,
        "rss_mb_start": rss_first,
        "rss_mb_end": rss_last,
        "rss_mb_peak": max((s["rss_mb"] for s in samples), default=None),
        "rss_growth_mb": growth,
        "recovery_s": rec["recovery_s"],
        "dispatch_lag_ms_p99": offered["dispatch_lag_ms_p99"],
    }
    if samples and "gpu_allocated_mb" in samples[0]:
        figures["gpu_allocated_mb_peak"] = max(s["gpu_allocated_mb"] for s in samples)
    checks = {
        "queue_bounded": max_waiting <= max_queue,
        "rss_flat": growth is not None and growth < rss_growth_limit_mb,
        "every_request_accounted": settled and accounted == sent and figures["requests_other"] == 0,
        "overloaded": rejected + timed_out > 0,
        "latency_recovered": rec["recovery_s"] is not None,
    }
    return {
        "params": {
            "preset": prepared.spec.preset,
            "model_path": model_path,
            "device": str(prepared.device),
            "dtype": str(prepared.dtype).replace("torch.", ""),
            "mode": mode,
            "seed": seed,
            "duration_s": duration_s,
            "overload_factor": overload_factor,
            "capacity_s": capacity_s,
            "max_queue": max_queue,
            "queue_timeout_s": queue_timeout_s,
            "rss_growth_limit_mb": rss_growth_limit_mb,
            **cfg,
        },
        "status": "ok" if all(checks.values()) else "failed",
        "checks": checks,
        "figures": figures,
        "unloaded": unloaded,
        "capacity": capacity,
        "overload": offered,
        "outcomes": outcomes,
        "recovery": rec,
        "engine_outcomes_total": stats["outcomes"],
        "memory_plan": prepared.plan.to_dict(),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for soak.json")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model-path", default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--mode", default="auto", help="auto (compile-cudagraphs on a GPU, eager on CPU), eager, ..."
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration-s", type=float, default=60.0, help="seconds of overload (default 60)")
    p.add_argument("--overload-factor", type=float, default=10.0, help="x the measured capacity (default 10)")
    p.add_argument("--capacity-s", type=float, default=10.0, help="seconds of the capacity probe")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-len-min", type=int, default=16)
    p.add_argument("--prompt-len-max", type=int, default=64)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--queue-timeout-s", type=float, default=5.0)
    p.add_argument("--rss-growth-limit-mb", type=float, default=64.0)
    a = p.parse_args(argv)
    if min(a.duration_s, a.overload_factor, a.capacity_s, a.max_batch_size, a.max_new_tokens) <= 0:
        p.error("durations, factor, batch size and token counts must be > 0")
    if not 0 < a.prompt_len_min <= a.prompt_len_max:
        p.error("need 0 < --prompt-len-min <= --prompt-len-max")

    from lab.env import fingerprint
    from lab.results import utcnow, write_json

    started = utcnow()
    result = run_soak(
        a.preset,
        a.model_path,
        a.device,
        a.dtype,
        a.mode,
        a.seed,
        a.duration_s,
        a.overload_factor,
        a.capacity_s,
        10,
        a.max_batch_size,
        a.max_new_tokens,
        a.prompt_len_min,
        a.prompt_len_max,
        a.max_queue,
        a.queue_timeout_s,
        a.rss_growth_limit_mb,
    )
    result = {
        "kind": "soak",
        "schema_version": 1,
        "started_at": started.isoformat(),
        "finished_at": utcnow().isoformat(),
        "environment": fingerprint().model_dump(mode="json"),
        **result,
    }
    path = write_json(Path(a.out) / "soak.json", result)
    f = result["figures"]
    print(
        f"soak {result['status']}: capacity {f['capacity_rps']:.1f} req/s, offered {f['offered_qps']:.1f} req/s "
        f"({f['overload_factor']:.1f}x) for {a.duration_s:g} s; sent {f['requests_sent']}, ok {f['requests_ok']}, "
        f"429 {f['requests_rejected_429']}, queue timeout {f['requests_timed_out_in_queue']} "
        f"(rejected share {f['rejected_share']:.3f}); max queue {f['max_queue_depth']}/{a.max_queue}; "
        f"RSS start {f['rss_mb_start']:.0f} MB, peak {f['rss_mb_peak']:.0f} MB, growth {f['rss_growth_mb']:+.1f} MB; "
        f"unloaded e2e p50 {f['unloaded_e2e_ms_p50']:.1f} ms, recovered in "
        + (f"{f['recovery_s']:.2f} s" if f["recovery_s"] is not None else "NOT recovered")
        + f"\nchecks: {result['checks']}\nwrote {path}"
    )
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
