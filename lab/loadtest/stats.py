"""Load-test statistics from per-request records: accounting, latency distributions (from the scheduled
time), goodput and SLO attainment (failures count as violations), throughput, timeline, verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lab.loadtest.client import RequestRecord, derived_ms
from lab.stats import summarize

FAILED = ("rejected_queue_full", "rejected_draining", "timed_out_in_queue", "error", "cancelled")
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "queue_wait_ms", "dispatch_lag_ms")


@dataclass
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    attainment_target: float = 0.99  # a run "meets the SLO" when this fraction of requests does

    def given(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met_by(self, d: dict[str, Any], outcome: str) -> bool:
        if outcome != "ok":
            return False
        for key, limit in (("ttft_ms", self.ttft_ms), ("tpot_ms", self.tpot_ms), ("e2e_ms", self.e2e_ms)):
            if limit is not None and d[key] is not None and d[key] > limit:
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "e2e_ms": self.e2e_ms,
            "attainment_target": self.attainment_target,
        }


def accounting(records: list[RequestRecord]) -> dict[str, int]:
    sent = [r for r in records if r.t_sent is not None]
    c = {o: sum(r.outcome == o for r in sent) for o in ("ok", *FAILED)}
    out = {
        "requests_scheduled": len(records),
        "requests_sent": len(sent),
        "requests_ok": c["ok"],
        "requests_rejected": c["rejected_queue_full"] + c["rejected_draining"],
        "requests_rejected_queue_full": c["rejected_queue_full"],
        "requests_rejected_draining": c["rejected_draining"],
        "requests_timed_out": c["timed_out_in_queue"],
        "requests_errored": c["error"],
        "requests_cancelled": c["cancelled"],
    }
    out["accounted"] = (
        out["requests_ok"]
        + out["requests_rejected"]
        + out["requests_timed_out"]
        + out["requests_errored"]
        + out["requests_cancelled"]
    )
    return out


def compute(
    records: list[RequestRecord],
    t0: float,
    window: tuple[float, float],
    target_qps: float,
    slo: SLO,
    max_dispatch_lag_ms: float,
    min_requests: int,
) -> dict[str, Any]:
    """Metrics over the measured window. `window` is (start, end) in seconds from t0."""
    lo, hi = window
    span = hi - lo
    measured = [r for r in records if r.phase == "measure"]
    acc = accounting(measured)
    derived = [derived_ms(r) for r in measured if r.t_sent is not None]
    outcomes = [r.outcome for r in measured if r.t_sent is not None]
    dist: dict[str, Any] = {}
    for key in LATENCIES:
        if key == "itl_ms":
            vals = [x for d in derived for x in d["itl_ms"]]
        else:
            vals = [d[key] for d in derived if d[key] is not None]
        dist[key] = summarize(vals)
    met = [slo.met_by(d, o) for d, o in zip(derived, outcomes)]
    n_met = int(sum(met))
    # Tokens/s: every token (from any request, warm-up ones included) stamped inside the window.
    times = np.fromiter((t - t0 for r in records for t in r.token_times), dtype=float)
    tokens_in_window = int(((times >= lo) & (times < hi)).sum()) if times.size else 0
    summary: dict[str, Any] = dict(acc)
    summary.update(
        target_qps=target_qps,
        achieved_qps=acc["requests_sent"] / span if span > 0 else None,
        output_tokens_per_s=tokens_in_window / span if span > 0 else None,
        tokens_in_window=tokens_in_window,
        measure_window_s=span,
        goodput_rps=n_met / span if span > 0 else None,
        slo_attainment=(n_met / acc["requests_sent"]) if acc["requests_sent"] else None,
    )
    for key in LATENCIES:
        for q in ("p50", "p90", "p99", "max"):
            summary[f"{key}_{q}"] = dist[key][q]
        summary[f"{key}_count"] = dist[key]["count"]
    reasons = verdict_reasons(summary, dist, max_dispatch_lag_ms, min_requests)
    summary["valid"] = not reasons
    return {
        "summary": summary,
        "distributions": dist,
        "verdict": {"valid": not reasons, "reasons": reasons},
        "slo": slo.to_dict() | {"met": n_met, "violations": acc["requests_sent"] - n_met},
    }


def verdict_reasons(
    summary: dict[str, Any], dist: dict[str, Any], max_dispatch_lag_ms: float, min_requests: int
) -> list[str]:
    reasons = []
    lag = dist["dispatch_lag_ms"]["p99"]
    if lag is not None and lag > max_dispatch_lag_ms:
        reasons.append(
            f"dispatch lag p99 {lag:.2f} ms exceeds {max_dispatch_lag_ms:g} ms: the load generator could not "
            "keep the schedule (offered load was lower than the target)"
        )
    if summary["requests_sent"] < min_requests:
        reasons.append(
            f"only {summary['requests_sent']} requests in the measured window (< {min_requests}): "
            "lengthen --duration or raise --target-qps"
        )
    if summary["requests_sent"] and summary["requests_ok"] == 0:
        reasons.append("no request succeeded")
    if summary["requests_cancelled"]:
        reasons.append(f"{summary['requests_cancelled']} requests were still running at the drain timeout")
    if summary["accounted"] != summary["requests_sent"]:
        reasons.append(
            f"accounting mismatch: {summary['accounted']} outcomes for {summary['requests_sent']} sent"
        )
    return reasons


def timeline(
    records: list[RequestRecord], t0: float, depth_samples: list[dict[str, Any]], bin_s: float = 1.0
) -> list[dict[str, Any]]:
    """Per-bin output tokens/s, completions and failures, with the sampled queue depth."""
    ends = [r.t_done - t0 for r in records if r.t_done is not None]
    toks = [t - t0 for r in records for t in r.token_times]
    last = max([0.0, *ends, *toks, *(s["t_s"] for s in depth_samples)])
    n = int(np.ceil(last / bin_s)) + 1
    tok_hist = np.histogram(toks, bins=n, range=(0, n * bin_s))[0] if toks else np.zeros(n, int)
    rows = []
    for i in range(n):
        a, b = i * bin_s, (i + 1) * bin_s
        done = [r for r in records if r.t_done is not None and a <= r.t_done - t0 < b]
        depth = [s for s in depth_samples if a <= s["t_s"] < b]
        row = {
            "t_s": a,
            "output_tokens_per_s": float(tok_hist[i]) / bin_s,
            "completed_ok": sum(r.outcome == "ok" for r in done),
            "failed": sum(r.outcome != "ok" for r in done),
        }
        for key in ("waiting", "running", "in_flight"):
            vals = [s[key] for s in depth if key in s]
            if vals:
                row[f"{key}_max"] = max(vals)
        rows.append(row)
    return rows
