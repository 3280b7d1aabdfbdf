"""Capacity-planner arithmetic: from a load-test sweep's measured capacity under the SLO, how many
serving replicas carry a target traffic with a stated headroom, their power draw and energy per day,
and the same for the multi-GPU tier where it was measured.

The dashboard's Capacity planner page only collects inputs and shows the answer; every number is
computed here so it is tested once and reused by notebooks and scripts.

Definitions (stated so a planner can check them by hand):
- capacity of one replica = achieved QPS at the *knee*: the highest offered QPS of a sweep such that
  it and every lower offered QPS met the SLO. A passing point above the first violation is noise and
  is not counted.
- usable QPS per replica = capacity x (1 - headroom); replicas = ceil(target QPS / usable QPS).
- fleet power = replicas x the mean power one replica drew at the measured load: a provisioning
  figure (an upper bound when replicas run below their measured load).
- energy per day = output tokens per day / measured tokens per joule when measured (the efficiency
  at the measured load), else fleet power x 24 h.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lab.errors import LabError

SECONDS_PER_DAY = 86_400.0
J_PER_KWH = 3.6e6


def _finite(value: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / inf (booleans are not numbers here)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _positive(name: str, value: float | None, unit: str = "") -> float:
    x = _finite(value)
    if x is None or x <= 0:
        raise LabError(f"{name} must be a positive number{(' ' + unit) if unit else ''}, got {value!r}")
    return x


# --- the sweep: capacity under the SLO --------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    """One offered load of a load-test sweep and whether it met the SLO."""

    offered_qps: float
    achieved_qps: float
    meets_slo: bool
    output_tokens_per_s: float | None = None
    tokens_per_joule: float | None = None
    power_w_mean: float | None = None
    p99_ms: dict[str, float] = field(default_factory=dict)  # e.g. {"ttft": 812.0, "e2e": 2400.0}


SLO_METRICS = ("ttft", "tpot", "e2e")


def sweep_point(
    d: Mapping[str, Any], slo_ms: Mapping[str, float] | None = None, min_attainment: float = 0.99
) -> SweepPoint | None:
    """Normalise one sweep entry from a load-test artifact; None if it has no offered QPS.

    Whether it met the SLO: an explicit `meets_slo` (or `slo_met`), else `slo_attainment` against
    `min_attainment`, else every p99 in `slo_ms` (keys ttft/tpot/e2e) within its limit. A point with
    none of these is treated as not meeting the SLO (unknown is not a pass)."""
    offered = _finite(d.get("target_qps", d.get("offered_qps")))
    if offered is None:
        return None
    achieved = _finite(d.get("achieved_qps"))
    p99 = {m: v for m in SLO_METRICS if (v := _finite(d.get(f"{m}_ms_p99"))) is not None}
    explicit = d.get("meets_slo", d.get("slo_met"))
    attainment = _finite(d.get("slo_attainment"))
    if isinstance(explicit, bool):
        ok = explicit
    elif attainment is not None:
        ok = attainment >= min_attainment
    elif slo_ms:
        limits = {m: _finite(v) for m, v in slo_ms.items() if _finite(v) is not None}
        ok = bool(limits) and all(m in p99 and p99[m] <= lim for m, lim in limits.items())
    else:
        ok = False
    if d.get("valid") is False:  # an INVALID run (generator lagged) cannot certify capacity
        ok = False
    return SweepPoint(
        offered_qps=offered,
        achieved_qps=achieved if achieved is not None else offered,
        meets_slo=ok,
        output_tokens_per_s=_finite(d.get("output_tokens_per_s")),
        tokens_per_joule=_finite(d.get("tokens_per_joule")),
        power_w_mean=_finite(d.get("power_w_mean")),
        p99_ms=p99,
    )


@dataclass(frozen=True)
class Knee:
    """The capacity knee of a sweep: the last point before the SLO is first violated."""

    point: SweepPoint | None  # None: even the lowest offered load violated the SLO
    first_violation_qps: float | None  # offered QPS where the SLO first failed; None if it never did

    @property
    def capacity_qps(self) -> float | None:
        if self.point is None:
            return None
        return min(self.point.achieved_qps, self.point.offered_qps)


def find_knee(points: Iterable[SweepPoint]) -> Knee:
    """Walk the sweep in increasing offered QPS; stop at the first point that misses the SLO."""
    ordered = sorted(points, key=lambda p: p.offered_qps)
    last_ok: SweepPoint | None = None
    for p in ordered:
        if not p.meets_slo:
            return Knee(point=last_ok, first_violation_qps=p.offered_qps)
        last_ok = p
    return Knee(point=last_ok, first_violation_qps=None)


# --- one tier's measured figures and the plan ---------------------------------------------------


@dataclass(frozen=True)
class TierMeasurement:
    """What one serving replica of a tier was measured to do (per replica, all its GPUs together)."""

    name: str
    gpus_per_replica: int
    capacity_qps: float  # requests/s one replica carries within the SLO (the knee)
    output_tokens_per_s: float | None = None  # at that load
    tokens_per_joule: float | None = None  # at that load
    power_w: float | None = None  # mean power of the whole replica at that load
    source: str = ""  # the run / file the figures came from

    @property
    def tokens_per_request(self) -> float | None:
        if self.output_tokens_per_s is None or self.capacity_qps <= 0:
            return None
        return self.output_tokens_per_s / self.capacity_qps

    @property
    def replica_power_w(self) -> float | None:
        """Measured power, else derived from throughput and efficiency (W = (tokens/s) / (tokens/J))."""
        if self.power_w is not None:
            return self.power_w
        if self.output_tokens_per_s and self.tokens_per_joule:
            return self.output_tokens_per_s / self.tokens_per_joule
        return None


def tier_from_knee(
    name: str, knee: Knee, gpus_per_replica: int = 1, source: str = "", **overrides: float | None
) -> TierMeasurement:
    """A tier measurement from a sweep's knee; `overrides` fill figures the sweep point lacks
    (e.g. tokens_per_joule from the run's summary)."""
    if knee.point is None or knee.capacity_qps is None:
        raise LabError(
            f"{name}: no offered load met the SLO (or the run was INVALID); "
            "rerun the load test (or its --sweep) from a lower --target-qps"
        )
    p = knee.point
    figures: dict[str, float | None] = {
        "output_tokens_per_s": p.output_tokens_per_s,
        "tokens_per_joule": p.tokens_per_joule,
        "power_w": p.power_w_mean,
    }
    for k, v in overrides.items():
        if figures.get(k) is None:
            figures[k] = _finite(v)
    return TierMeasurement(
        name=name,
        gpus_per_replica=gpus_per_replica,
        capacity_qps=knee.capacity_qps,
        source=source,
        **figures,
    )


@dataclass(frozen=True)
class CapacityPlan:
    """The answer for one tier, with the inputs and the measured figures it used."""

    tier: str
    source: str
    # inputs
    target_qps: float
    headroom: float
    # measured figures used
    capacity_qps_per_replica: float
    gpus_per_replica: int
    tokens_per_request: float | None
    tokens_per_joule: float | None
    replica_power_w: float | None
    # the answer
    usable_qps_per_replica: float
    replicas: int
    gpus: int
    utilisation: float  # target load / measured capacity of the fleet
    output_tokens_per_s: float | None
    power_w: float | None
    energy_kwh_per_day: float | None
    energy_basis: str
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def plan_capacity(
    tier: TierMeasurement,
    target_qps: float | None = None,
    headroom: float = 0.2,
    target_output_tokens_per_s: float | None = None,
) -> CapacityPlan:
    """Replicas of `tier` that carry the target traffic with `headroom` (a fraction of each
    replica's measured capacity kept spare), their GPUs, power and energy per day.

    Give the target as requests/s (`target_qps`) or as output tokens/s (converted with the measured
    tokens per request)."""
    h = _finite(headroom)
    if h is None or not 0 <= h < 1:
        raise LabError(f"headroom must be a fraction in [0, 1), e.g. 0.2 for 20% spare; got {headroom!r}")
    capacity = _positive(f"{tier.name}: measured capacity", tier.capacity_qps, "requests/s")
    if tier.gpus_per_replica < 1:
        raise LabError(f"{tier.name}: GPUs per replica must be >= 1, got {tier.gpus_per_replica}")
    tpr = tier.tokens_per_request
    notes: list[str] = []
    if (target_qps is None) == (target_output_tokens_per_s is None):
        raise LabError("give exactly one target: requests/s or output tokens/s")
    if target_qps is not None:
        target = _positive("target traffic", target_qps, "requests/s")
    else:
        tokens = _positive("target traffic", target_output_tokens_per_s, "output tokens/s")
        if tpr is None:
            raise LabError(
                f"{tier.name}: output tokens/s was not measured, so a tokens/s target cannot be converted; "
                "give the target in requests/s"
            )
        target = tokens / tpr
        notes.append(
            f"target {tokens:,.0f} output tokens/s = {target:,.3g} requests/s at {tpr:,.1f} tokens/request"
        )
    usable = capacity * (1 - h)
    replicas = max(1, math.ceil(target / usable - 1e-9))
    gpus = replicas * tier.gpus_per_replica
    out_tps = target * tpr if tpr is not None else None
    replica_w = tier.replica_power_w
    power_w = replicas * replica_w if replica_w is not None else None
    if tier.power_w is None and replica_w is not None:
        notes.append("replica power derived as measured tokens/s / tokens/joule (no power sample)")
    if out_tps is not None and tier.tokens_per_joule:
        energy_kwh = out_tps * SECONDS_PER_DAY / tier.tokens_per_joule / J_PER_KWH
        basis = "output tokens per day / measured tokens per joule"
    elif power_w is not None:
        energy_kwh = power_w * SECONDS_PER_DAY / J_PER_KWH
        basis = "fleet power x 24 h (tokens/joule not measured): an upper bound"
    else:
        energy_kwh = None
        basis = "not available: neither power nor tokens/joule was measured for this tier"
    if power_w is not None:
        notes.append(
            "power assumes each replica draws what it drew at its measured load: an upper bound when it runs below"
        )
    return CapacityPlan(
        tier=tier.name,
        source=tier.source,
        target_qps=target,
        headroom=h,
        capacity_qps_per_replica=capacity,
        gpus_per_replica=tier.gpus_per_replica,
        tokens_per_request=tpr,
        tokens_per_joule=tier.tokens_per_joule,
        replica_power_w=replica_w,
        usable_qps_per_replica=usable,
        replicas=replicas,
        gpus=gpus,
        utilisation=target / (replicas * capacity),
        output_tokens_per_s=out_tps,
        power_w=power_w,
        energy_kwh_per_day=energy_kwh,
        energy_basis=basis,
        notes=tuple(notes),
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compare_plans(fallback: CapacityPlan, multi: CapacityPlan) -> dict[str, float | None]:
    """Fallback as a fraction (or multiple) of the multi-GPU tier for the same target traffic."""
    return {
        "gpus_ratio": _ratio(fallback.gpus, multi.gpus),
        "power_ratio": _ratio(fallback.power_w, multi.power_w),
        "energy_ratio": _ratio(fallback.energy_kwh_per_day, multi.energy_kwh_per_day),
        "tokens_per_joule_ratio": _ratio(fallback.tokens_per_joule, multi.tokens_per_joule),
        "capacity_per_gpu_ratio": _ratio(
            fallback.capacity_qps_per_replica / fallback.gpus_per_replica,
            multi.capacity_qps_per_replica / multi.gpus_per_replica,
        ),
    }


def plans_table(plans: Sequence[CapacityPlan]) -> list[dict[str, Any]]:
    """Rows for display / CSV download: one per tier."""
    return [p.as_dict() for p in plans]
