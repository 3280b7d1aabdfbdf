"""Capacity planner: how many single-GPU fallback replicas carry a target traffic with headroom, what
they draw and use per day, and (where measured) the same for the multi-GPU tier. The arithmetic is
lab.capacity's; this page collects inputs and shows the measured figures beside the answer."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data, ui
from lab.capacity import (
    CapacityPlan,
    TierMeasurement,
    compare_plans,
    find_knee,
    plan_capacity,
    sweep_point,
    tier_from_knee,
)
from lab.errors import LabError

num = data._num


def measure_tier(
    run: data.Run, name: str, lt: dict[str, Any], min_attainment: float | None
) -> tuple[TierMeasurement | None, list[dict[str, Any]], str | None]:
    """The tier's measured figures from a load-test artifact: the sweep's knee, else its one load."""
    slo = data.slo_ms(lt)
    s = lt.get("summary") or {}
    target = data.slo_attainment_target(lt) if min_attainment is None else min_attainment
    raw = data.sweep_curve(lt)
    basis = "sweep knee"
    if not raw:
        raw, basis = [s], "the run's single offered load (no sweep)"
    if (
        min_attainment is not None
    ):  # the planner's own bar: judge each load by its attainment, not the run's verdict
        raw = [{k: v for k, v in r.items() if k not in ("meets_slo", "slo_met")} for r in raw]
    points = [p for p in (sweep_point(r, slo, target) for r in raw) if p]
    knee = find_knee(points)
    tp = data.tensor_parallel_gpus(lt)
    tier_name = "single-GPU fallback" if tp == 1 else f"{tp}-GPU tensor parallel"
    try:
        tier = tier_from_knee(
            tier_name,
            knee,
            gpus_per_replica=tp,
            source=f"{run.run_id}/{name}",
            tokens_per_joule=s.get("tokens_per_joule"),
            power_w=s.get("power_w_mean"),
        )
    except LabError as e:
        return None, [], str(e)
    p = knee.point
    assert p is not None  # tier_from_knee raised otherwise
    at = f"{basis} at {p.offered_qps:g} QPS offered"
    summary_at = f"run summary at {ui.fmt(s.get('target_qps'))} QPS"
    rows = [
        {"figure": "capacity (requests/s within the SLO)", "value": tier.capacity_qps, "from": at},
        {"figure": "GPUs per replica", "value": tp, "from": "tensor-parallel world of the run"},
        {
            "figure": "output tokens/s",
            "value": tier.output_tokens_per_s,
            "from": at if p.output_tokens_per_s is not None else summary_at,
        },
        {
            "figure": "tokens per request",
            "value": tier.tokens_per_request,
            "from": "output tokens/s ÷ capacity",
        },
        {
            "figure": "tokens/joule",
            "value": tier.tokens_per_joule,
            "from": at if p.tokens_per_joule is not None else summary_at,
        },
        {
            "figure": "power per replica (W)",
            "value": tier.replica_power_w,
            "from": at
            if p.power_w_mean is not None
            else (summary_at if tier.power_w is not None else "tokens/s ÷ tokens/joule"),
        },
        {
            "figure": "SLO",
            "value": None,
            "from": (
                "each request " + ", ".join(f"{k} ≤ {v:g} ms" for k, v in slo.items())
                if slo
                else "the sweep's meets_slo"
            )
            + f"; {target:.0%} of requests",
        },
    ]
    return tier, rows, None


def plan_block(plan: CapacityPlan) -> None:
    c = st.columns(5)
    c[0].metric("Replicas", plan.replicas)
    c[1].metric("GPUs", plan.gpus)
    c[2].metric("Power (kW)", "n/a" if plan.power_w is None else ui.fmt(plan.power_w / 1000))
    c[3].metric("Energy / day (kWh)", ui.fmt(plan.energy_kwh_per_day))
    c[4].metric("Utilisation", f"{plan.utilisation:.0%}")
    st.caption(
        f"{plan.target_qps:,.3g} req/s ÷ ({plan.capacity_qps_per_replica:,.3g} req/s × (1 − {plan.headroom:.0%} headroom)"
        f" = {plan.usable_qps_per_replica:,.3g}) → {plan.replicas} replica(s). Energy: {plan.energy_basis}."
    )
    for n in plan.notes:
        st.caption("• " + n)


def tiers_frame(tiers: dict[str, Any]) -> pd.DataFrame:
    cols = ["metric", "meaning", "fallback", "multi", "ratio"]
    rows = []
    for name, r in (tiers.get("ratios") or {}).items():
        if isinstance(r, dict):
            rows.append(
                {
                    "metric": name,
                    "meaning": r.get("meaning"),
                    "fallback": num(r.get("fallback")),
                    "multi": num(r.get("multi")),
                    "ratio": num(r.get("ratio")),
                }
            )
    return pd.DataFrame(rows, columns=cols)


def tiers_figure(df: pd.DataFrame, playbook_tpj_ratio: float | None) -> go.Figure:
    rows = df.dropna(subset=["ratio"])
    fig = go.Figure(go.Bar(x=rows["ratio"], y=rows["metric"], orientation="h", name="fallback ÷ multi-GPU"))
    fig.add_vline(x=1.0, line_dash="dash", annotation_text="equal")
    if playbook_tpj_ratio is not None:
        fig.add_vline(
            x=playbook_tpj_ratio,
            line_dash="dot",
            line_color="#6a1b9a",
            annotation_text=f"playbook tokens/joule {playbook_tpj_ratio:.0%}",
        )
    fig.update_layout(
        title="Measured: the fallback as a fraction of the multi-GPU tier (same warm-up, same load)",
        xaxis_title="fallback ÷ multi-GPU (latency: >1 is slower)",
        height=140 + 34 * len(rows),
    )
    return fig


def tiers_block(run: data.Run) -> None:
    """`lab compare-tiers` measured both tiers under the same load: show its ratios."""
    tiers = run.step("tiers")
    if tiers is None:
        return
    st.subheader("Measured tier comparison (tiers.json)")
    ui.status_line(tiers, run.file_of("tiers") or "tiers.json")
    df = tiers_frame(tiers)
    if df.empty:
        st.info("tiers.json holds no ratios.")
        return
    s = tiers.get("summary") or {}
    st.plotly_chart(tiers_figure(df, num(s.get("playbook_tokens_per_joule_ratio"))), key="capacity-tiers")
    st.dataframe(df, hide_index=True)
    for side in ("multi", "fallback"):
        t = (tiers.get("tiers") or {}).get(side) or {}
        lt = t.get("loadtest") if isinstance(t.get("loadtest"), dict) else {}
        if lt.get("valid") is False:
            st.warning(
                f"The {side} tier's load test was INVALID: " + "; ".join(lt.get("invalid_reasons") or [])
            )
    ui.unavailable(tiers)
    ui.download_csv(df, f"{run.run_id}-tiers.csv")


def render() -> None:
    run = ui.current_run()
    ui.header(
        "Capacity planner", "How many fallback GPUs carry the target traffic, at what power and energy?", run
    )
    if run is None:
        return
    tests = run.by_kind("loadtest")
    ui.show_warnings(run, *([n for n, _ in tests] or ["load_test.json"]))
    if not tests:
        ui.missing(
            run,
            "load test to plan from",
            "lab loadtest --sweep 1,2,4,8 --output-json reports/<run-id>/load_test.json",
        )
        return

    with st.container(border=True):
        st.markdown("**Inputs**")
        c = st.columns(4)
        unit = c[0].radio("Target traffic in", ["requests/s", "output tokens/s"], key="cap-unit")
        target = c[1].number_input(
            f"Target ({unit})",
            min_value=0.0,
            value=10.0 if unit == "requests/s" else 2000.0,
            key=f"cap-target-{unit}",
        )
        headroom_pct = c[2].slider("Headroom (% of capacity kept spare)", 0, 90, 20, key="cap-headroom")
        min_att = c[3].number_input(
            "SLO attainment a load must reach",
            min_value=0.5,
            max_value=1.0,
            value=None,
            step=0.01,
            key="cap-attainment",
            placeholder="the run's own target",
            help="Empty: each run's own attainment target decides which swept loads met the SLO",
        )

    singles = [(n, a) for n, a in tests if data.tensor_parallel_gpus(a) == 1]
    multis = [(n, a) for n, a in tests if data.tensor_parallel_gpus(a) > 1]
    plans: dict[str, CapacityPlan] = {}
    for title, group in (("Single-GPU fallback", singles), ("Multi-GPU tier", multis)):
        st.subheader(title)
        if not group:
            st.info(
                "Not measured in this run"
                + (" (run the drill's tier comparison under torchrun)." if group is multis else ".")
            )
            continue
        name, lt = group[0]
        tier, rows, err = measure_tier(run, name, lt, None if min_att is None else float(min_att))
        if tier is None:
            st.warning(err)
            continue
        try:
            kwargs = (
                {"target_qps": target} if unit == "requests/s" else {"target_output_tokens_per_s": target}
            )
            plan = plan_capacity(tier, headroom=headroom_pct / 100, **kwargs)
        except LabError as e:
            st.error(str(e))
        else:
            plans[title] = plan
            plan_block(plan)
        st.caption(f"Measured figures used (`{name}`)")
        shown = [{**r, "value": "" if r["value"] is None else ui.fmt(r["value"], digits=4)} for r in rows]
        st.dataframe(pd.DataFrame(shown), hide_index=True)

    if len(plans) == 2:
        st.subheader("Fallback against the multi-GPU tier")
        r = compare_plans(plans["Single-GPU fallback"], plans["Multi-GPU tier"])
        labels = {
            "gpus_ratio": "GPUs needed (fallback ÷ multi-GPU)",
            "power_ratio": "power (fallback ÷ multi-GPU)",
            "energy_ratio": "energy per day (fallback ÷ multi-GPU)",
            "tokens_per_joule_ratio": "tokens/joule (fallback as a fraction of multi-GPU)",
            "capacity_per_gpu_ratio": "capacity per GPU (fallback ÷ multi-GPU)",
        }
        st.dataframe(pd.DataFrame([{"ratio": labels[k], "value": v} for k, v in r.items()]), hide_index=True)
    tiers_block(run)
    if plans:
        table = pd.DataFrame([p.as_dict() for p in plans.values()])
        ui.download_csv(table, f"{run.run_id}-capacity-plan.csv")
        ui.download_json([p.as_dict() for p in plans.values()], f"{run.run_id}-capacity-plan.json")


render()
