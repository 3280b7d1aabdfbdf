"""Capacity-planner arithmetic (lab/capacity.py): figures a planner can check by hand."""

from __future__ import annotations

import math

import pytest

from lab.capacity import (
    Knee,
    SweepPoint,
    TierMeasurement,
    compare_plans,
    find_knee,
    plan_capacity,
    sweep_point,
    tier_from_knee,
)
from lab.errors import LabError

FALLBACK = TierMeasurement(
    name="single-GPU",
    gpus_per_replica=1,
    capacity_qps=3.0,
    output_tokens_per_s=1800.0,
    tokens_per_joule=3.6,
    power_w=510.0,
    source="run-a",
)


def test_replicas_with_headroom_and_energy_by_hand() -> None:
    plan = plan_capacity(FALLBACK, target_qps=10.0, headroom=0.2)
    assert plan.usable_qps_per_replica == pytest.approx(2.4)
    assert plan.replicas == 5  # ceil(10 / 2.4) = ceil(4.17)
    assert plan.gpus == 5
    assert plan.utilisation == pytest.approx(10 / 15)
    assert plan.tokens_per_request == pytest.approx(600.0)
    assert plan.output_tokens_per_s == pytest.approx(6000.0)
    assert plan.power_w == pytest.approx(5 * 510.0)
    # 6000 tokens/s * 86400 s / 3.6 tokens/J = 1.44e8 J = 40 kWh
    assert plan.energy_kwh_per_day == pytest.approx(40.0)
    assert "tokens per joule" in plan.energy_basis
    # the inputs and measured figures travel with the answer
    d = plan.as_dict()
    assert d["capacity_qps_per_replica"] == 3.0 and d["headroom"] == 0.2 and d["source"] == "run-a"


def test_exact_fit_does_not_round_up_and_minimum_is_one_replica() -> None:
    tier = TierMeasurement("t", 1, capacity_qps=2.0)
    assert plan_capacity(tier, target_qps=4.0, headroom=0.0).replicas == 2
    assert plan_capacity(tier, target_qps=0.3 * 3, headroom=0.55).replicas == 1  # 0.9 / 0.9
    assert plan_capacity(tier, target_qps=0.01, headroom=0.0).replicas == 1


def test_target_in_tokens_per_second_converts_with_measured_tokens_per_request() -> None:
    plan = plan_capacity(FALLBACK, target_output_tokens_per_s=3600.0, headroom=0.2)
    assert plan.target_qps == pytest.approx(6.0)
    assert plan.replicas == 3  # ceil(6 / 2.4)
    assert any("tokens/request" in n for n in plan.notes)


def test_power_derived_from_throughput_and_efficiency_when_not_sampled() -> None:
    tier = TierMeasurement("t", 1, capacity_qps=3.0, output_tokens_per_s=1800.0, tokens_per_joule=3.6)
    plan = plan_capacity(tier, target_qps=3.0, headroom=0.0)
    assert plan.replica_power_w == pytest.approx(500.0)
    assert plan.power_w == pytest.approx(500.0)
    assert any("derived" in n for n in plan.notes)


def test_energy_falls_back_to_power_and_says_so_and_none_without_either() -> None:
    tier = TierMeasurement("t", 1, capacity_qps=1.0, power_w=400.0)
    plan = plan_capacity(tier, target_qps=2.0, headroom=0.0)
    assert plan.energy_kwh_per_day == pytest.approx(2 * 400.0 * 24 / 1000)
    assert "upper bound" in plan.energy_basis
    bare = plan_capacity(TierMeasurement("t", 1, capacity_qps=1.0), target_qps=1.0, headroom=0.0)
    assert bare.power_w is None and bare.energy_kwh_per_day is None
    assert bare.energy_basis.startswith("not available")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"target_qps": 1.0, "headroom": 1.0}, "headroom"),
        ({"target_qps": 1.0, "headroom": -0.1}, "headroom"),
        ({"target_qps": 0.0}, "target traffic"),
        ({"target_qps": float("nan")}, "target traffic"),
        ({}, "exactly one target"),
        ({"target_qps": 1.0, "target_output_tokens_per_s": 10.0}, "exactly one target"),
    ],
)
def test_bad_inputs_are_lab_errors_saying_what_to_change(kwargs: dict, fragment: str) -> None:
    with pytest.raises(LabError, match=fragment):
        plan_capacity(FALLBACK, **kwargs)


def test_zero_capacity_and_tokens_target_without_tokens_are_errors() -> None:
    with pytest.raises(LabError, match="capacity"):
        plan_capacity(TierMeasurement("t", 1, capacity_qps=0.0), target_qps=1.0)
    with pytest.raises(LabError, match="requests/s"):
        plan_capacity(TierMeasurement("t", 1, capacity_qps=1.0), target_output_tokens_per_s=10.0)
    with pytest.raises(LabError, match="GPUs per replica"):
        plan_capacity(TierMeasurement("t", 0, capacity_qps=1.0), target_qps=1.0)


def _pt(qps: float, ok: bool, achieved: float | None = None) -> SweepPoint:
    return SweepPoint(offered_qps=qps, achieved_qps=achieved if achieved is not None else qps, meets_slo=ok)


def test_knee_is_last_pass_before_first_violation_and_ignores_noise_above() -> None:
    knee = find_knee([_pt(4, True), _pt(1, True), _pt(3, False), _pt(2, True, achieved=1.9), _pt(5, False)])
    assert knee.point is not None and knee.point.offered_qps == 2
    assert knee.capacity_qps == pytest.approx(1.9)  # achieved, not offered
    assert knee.first_violation_qps == 3
    all_ok = find_knee([_pt(1, True), _pt(2, True)])
    assert all_ok.capacity_qps == 2 and all_ok.first_violation_qps is None
    none_ok = find_knee([_pt(1, False)])
    assert none_ok.point is None and none_ok.capacity_qps is None
    with pytest.raises(LabError, match="lower --target-qps"):
        tier_from_knee("fallback", none_ok)


def test_sweep_point_normalises_artifact_entries() -> None:
    explicit = sweep_point({"target_qps": 2, "achieved_qps": 1.95, "meets_slo": True, "e2e_ms_p99": 900})
    assert explicit is not None and explicit.meets_slo and explicit.p99_ms == {"e2e": 900.0}
    by_attainment = sweep_point({"target_qps": 2, "slo_attainment": 0.98}, min_attainment=0.99)
    assert by_attainment is not None and not by_attainment.meets_slo
    by_limits = sweep_point({"offered_qps": 3, "ttft_ms_p99": 400, "e2e_ms_p99": 2600}, {"e2e": 2500})
    assert by_limits is not None and not by_limits.meets_slo
    within = sweep_point(
        {"offered_qps": 3, "ttft_ms_p99": 400, "e2e_ms_p99": 2400}, {"e2e": 2500, "ttft": 500}
    )
    assert within is not None and within.meets_slo and within.achieved_qps == 3
    unknown = sweep_point({"target_qps": 1})
    assert unknown is not None and not unknown.meets_slo  # unknown is not a pass
    invalid = sweep_point({"target_qps": 1, "meets_slo": True, "valid": False})
    assert invalid is not None and not invalid.meets_slo
    assert sweep_point({"achieved_qps": 1}) is None


def test_tier_from_knee_fills_missing_figures_from_overrides() -> None:
    p = SweepPoint(2.0, 2.0, True, output_tokens_per_s=1000.0, power_w_mean=None)
    tier = tier_from_knee("fallback", Knee(p, 3.0), source="r1", tokens_per_joule=2.5, power_w=450.0)
    assert tier.capacity_qps == 2.0 and tier.output_tokens_per_s == 1000.0
    assert tier.tokens_per_joule == 2.5 and tier.power_w == 450.0 and tier.source == "r1"


def test_compare_plans_against_multi_gpu_tier() -> None:
    multi = TierMeasurement(
        "8-GPU TP", 8, capacity_qps=40.0, output_tokens_per_s=24000.0, tokens_per_joule=6.9, power_w=5600.0
    )
    fb = plan_capacity(FALLBACK, target_qps=40.0, headroom=0.0)
    mg = plan_capacity(multi, target_qps=40.0, headroom=0.0)
    assert fb.replicas == 14 and fb.gpus == 14  # ceil(40 / 3)
    assert mg.replicas == 1 and mg.gpus == 8
    r = compare_plans(fb, mg)
    assert r["gpus_ratio"] == pytest.approx(14 / 8)
    assert r["tokens_per_joule_ratio"] == pytest.approx(3.6 / 6.9)
    assert r["capacity_per_gpu_ratio"] == pytest.approx(3.0 / 5.0)
    assert r["power_ratio"] == pytest.approx(14 * 510 / 5600)
    assert math.isclose(r["energy_ratio"], fb.energy_kwh_per_day / mg.energy_kwh_per_day)
