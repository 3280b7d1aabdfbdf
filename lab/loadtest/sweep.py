"""Sweeps: a list of QPS values, or a search for the highest QPS whose run meets the SLOs (the capacity
number planners need). Every point is a full open-loop run; the curve goes into the artifact."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lab.errors import LabError

CURVE_KEYS = (
    "target_qps",
    "achieved_qps",
    "output_tokens_per_s",
    "requests_sent",
    "requests_ok",
    "requests_rejected",
    "requests_timed_out",
    "requests_errored",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "tpot_ms_p99",
    "e2e_ms_p50",
    "e2e_ms_p99",
    "dispatch_lag_ms_p99",
    "goodput_rps",
    "slo_attainment",
    "valid",
)


def parse_sweep(text: str) -> str | list[float]:
    """`search` (or `max`) or a comma-separated list of positive QPS values."""
    t = text.strip().lower()
    if t in ("search", "max"):
        return "search"
    try:
        values = [float(x) for x in t.replace(" ", "").split(",") if x]
    except ValueError:
        raise LabError(f"--sweep '{text}': give 'search' or a list of QPS values like 1,2,4,8") from None
    if not values or any(not v > 0 for v in values):
        raise LabError(f"--sweep '{text}': QPS values must be positive, e.g. 1,2,4,8")
    return sorted(set(values))


def meets(summary: dict[str, Any], attainment_target: float) -> bool:
    att = summary.get("slo_attainment")
    return bool(summary.get("valid")) and att is not None and att >= attainment_target


def point(summary: dict[str, Any], attainment_target: float) -> dict[str, Any]:
    p = {k: summary.get(k) for k in CURVE_KEYS}
    p["meets_slo"] = meets(summary, attainment_target)
    return p


def search(
    run_at: Callable[[float], dict[str, Any]],
    start_qps: float,
    attainment_target: float,
    max_runs: int = 8,
    rel_tol: float = 0.1,
) -> list[tuple[float, dict[str, Any]]]:
    """Double from `start_qps` until a run misses the SLOs (halve if the first one misses), then bisect
    between the best passing and the lowest failing rate until they are within `rel_tol` or the run
    budget is spent. Returns every (qps, summary) in the order run."""
    if max_runs < 2:
        raise LabError("--sweep-max-runs must be >= 2 for a search")
    runs: list[tuple[float, dict[str, Any]]] = []
    passed: float | None = None
    failed: float | None = None

    def do(q: float) -> bool:
        s = run_at(q)
        runs.append((q, s))
        return meets(s, attainment_target)

    q = start_qps
    while len(runs) < max_runs:
        if do(q):
            passed = q
            if failed is not None:
                break
            q *= 2
        else:
            failed = q
            if passed is not None:
                break
            q /= 2
    while passed is not None and failed is not None and len(runs) < max_runs:
        if (failed - passed) / failed <= rel_tol:
            break
        mid = (passed + failed) / 2
        if do(mid):
            passed = mid
        else:
            failed = mid
    return runs


def best_passing(runs: list[tuple[float, dict[str, Any]]], attainment_target: float) -> float | None:
    ok = [q for q, s in runs if meets(s, attainment_target)]
    return max(ok) if ok else None
