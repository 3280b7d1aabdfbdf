"""The playbook's fallback triggers turned into checks, and the checks turned into one decision.

nvlink_degraded     fewer active NVLink links than --min-nvlink-links on any GPU
nccl_hang           the collective probe hung past its deadline or a rank died
pcie_only_qps_drop  no NVLink between the GPUs and achieved QPS fell by more than --qps-drop-threshold
                    against a baseline load test
fits_anywhere       asked for with --fits-anywhere (capacity planning)
gpu_fault           (lab's addition) uncorrected ECC errors or a failed row remap on a GPU
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError
from lab.health.report import Check, Decision, GpuHealth
from lab.results import read_json


@dataclass
class LoadTestNumbers:
    path: str
    qps: float  # served QPS (requests_ok / measure_window_s) when the artifact has both, else achieved_qps
    qps_metric: str
    achieved_qps: float
    target_qps: float | None
    output_tokens_per_s: float | None
    status: str | None
    valid: bool | None


def _num(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def read_load_test(path: str | Path, flag: str) -> LoadTestNumbers:
    """The numbers of a `lab loadtest` artifact (load_test.json, kind "loadtest"), read as plain JSON so
    it works whichever version of the load-test model wrote it."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("kind") != "loadtest":
        kind = data.get("kind") if isinstance(data, dict) else None
        raise LabError(
            f"{flag} {path}: is {'a ' + repr(kind) if kind else 'not a lab'} artifact, expected a "
            "'loadtest' artifact (load_test.json written by lab loadtest)"
        )
    summary = data.get("summary") if isinstance(data.get("summary"), dict) else {}
    qps = _num(summary.get("achieved_qps"))
    if qps is None:
        raise LabError(
            f"{flag} {path}: summary.achieved_qps is missing or not a number; pass a completed load test"
        )
    # In an open-loop test achieved_qps counts requests *sent* on the schedule; what the server sustained
    # is the rate of requests that completed ok over the same window.
    ok, window_s = _num(summary.get("requests_ok")), _num(summary.get("measure_window_s"))
    if ok is not None and window_s:
        served, metric = ok / window_s, "served QPS (requests_ok / measure_window_s)"
    else:
        served, metric = qps, "achieved QPS"
    valid = summary.get("valid")
    return LoadTestNumbers(
        path=str(path),
        qps=served,
        qps_metric=metric,
        valid=valid if isinstance(valid, bool) else None,
        achieved_qps=qps,
        target_qps=_num(summary.get("target_qps")),
        output_tokens_per_s=_num(summary.get("output_tokens_per_s")),
        status=data.get("status"),
    )


def pcie_only(gpus: list[GpuHealth]) -> bool | None:
    """True when no GPU has an active NVLink link; None when NVML could not say (no GPUs seen)."""
    if not gpus or any(g.nvlink_supported is None for g in gpus):
        return None
    return not any(g.nvlink_supported and (g.nvlink_active_links or 0) > 0 for g in gpus)


def qps_drop_check(
    baseline: LoadTestNumbers, current: LoadTestNumbers, threshold: float, pcie: bool | None
) -> Check:
    if current.qps_metric == baseline.qps_metric:
        metric, cur_q, base_q = current.qps_metric, current.qps, baseline.qps
    else:  # compare like with like
        metric, cur_q, base_q = "achieved QPS", current.achieved_qps, baseline.achieved_qps
    drop = round((base_q - cur_q) / base_q, 4) if base_q else 0.0
    txt = (
        f"{metric} {cur_q:.3g} vs baseline {base_q:.3g}: {'drop' if drop >= 0 else 'gain'} of {abs(drop):.0%}"
    )
    if baseline.output_tokens_per_s and current.output_tokens_per_s is not None:
        tdrop = 1 - current.output_tokens_per_s / baseline.output_tokens_per_s
        txt += f" (output tokens/s {'-' if tdrop >= 0 else '+'}{abs(tdrop):.0%})"
    if (
        baseline.target_qps is not None
        and current.target_qps is not None
        and not math.isclose(baseline.target_qps, current.target_qps, rel_tol=0.01)
    ):
        txt += (
            f"; target QPS differs ({current.target_qps:g} vs {baseline.target_qps:g}), so this is not a "
            "like-for-like comparison"
        )
    th = f"drop > {threshold:.0%} on PCIe-only hardware"
    if drop <= threshold:
        return Check(
            name="qps_drop", status="ok", detail=f"{txt}, within {threshold:.0%}", value=drop, threshold=th
        )
    untrusted = [x.path for x in (baseline, current) if x.valid is False or x.status not in (None, "ok")]
    if untrusted:
        return Check(
            name="qps_drop",
            status="warn",
            detail=f"{txt}, but {', '.join(untrusted)} is not a valid completed load test (the load generator "
            "lagged or the run failed): re-run it before deciding",
            value=drop,
            threshold=th,
        )
    if pcie is True:
        return Check(
            name="qps_drop",
            status="fail",
            detail=f"{txt} on PCIe-only GPUs (no active NVLink): over the {threshold:.0%} threshold",
            value=drop,
            threshold=th,
            trigger="pcie_only_qps_drop",
        )
    where = "the GPUs have NVLink" if pcie is False else "the interconnect is unknown here (no NVML)"
    return Check(
        name="qps_drop",
        status="warn",
        detail=f"{txt}, over {threshold:.0%}, but {where}: not the PCIe-only trigger",
        value=drop,
        threshold=th,
    )


def decide(checks: list[Check]) -> Decision:
    """Fallback is recommended when any check fired a trigger; the reasons are those checks' details."""
    triggers: list[str] = []
    reasons: list[str] = []
    for c in checks:
        if c.trigger:
            if c.trigger not in triggers:
                triggers.append(c.trigger)
            where = f"GPU {c.gpu} " if c.gpu is not None else ""
            reasons.append(f"{c.trigger}: {where}{c.detail}")
    return Decision(fallback_recommended=bool(triggers), triggers=triggers, reasons=reasons)
