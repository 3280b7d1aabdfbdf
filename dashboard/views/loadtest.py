"""Load test: how does the fallback behave under open-loop load? Latency CDFs, p50/p99 against
offered QPS with the SLO and the capacity knee, time series, outcomes, and every request."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard import data, ui
from lab.capacity import find_knee, sweep_point

num = data._num
LATENCIES = {"ttft": "TTFT", "tpot": "TPOT", "e2e": "end-to-end"}


def cdf_figure(df: pd.DataFrame, slo: dict[str, float]) -> go.Figure:
    """Empirical CDF of each latency over the requests that completed (log x: they span decades)."""
    fig = go.Figure()
    for m, label in LATENCIES.items():
        v = np.sort(df[f"{m}_ms"].dropna().astype(float).to_numpy())
        if v.size == 0:
            continue
        fig.add_scatter(x=v, y=np.arange(1, v.size + 1) / v.size, mode="lines", name=f"{label} (n={v.size})")
        if m in slo:
            # a trace, not a shape: shapes on a log axis take log10 coordinates
            fig.add_scatter(
                x=[slo[m], slo[m]],
                y=[0, 1],
                mode="lines",
                name=f"{label} SLO {slo[m]:g} ms",
                line={"dash": "dot", "width": 1},
            )
    fig.update_layout(
        title="Latency CDFs (completed requests; from the scheduled time)",
        xaxis={"type": "log", "title": "ms (log)"},
        yaxis={"title": "fraction of requests", "range": [0, 1.02]},
        height=400,
    )
    return fig


def sweep_frame(lt: dict[str, Any]) -> pd.DataFrame:
    rows = [p for p in lt.get("sweep") or lt.get("curve") or [] if isinstance(p, dict)]
    df = pd.DataFrame(rows)
    if not df.empty and "target_qps" not in df and "offered_qps" in df:
        df["target_qps"] = df["offered_qps"]
    return df.sort_values("target_qps") if "target_qps" in df else pd.DataFrame()


def sweep_figure(sw: pd.DataFrame, metric: str, slo: dict[str, float], knee_qps: float | None) -> go.Figure:
    fig = go.Figure()
    for q in ("p50", "p99"):
        col = f"{metric}_ms_{q}"
        if col in sw:
            fig.add_scatter(
                x=sw["target_qps"], y=sw[col], mode="lines+markers", name=f"{LATENCIES[metric]} {q}"
            )
    if metric in slo:
        fig.add_hline(
            y=slo[metric], line_dash="dash", line_color="#c62828", annotation_text=f"SLO {slo[metric]:g} ms"
        )
    if knee_qps is not None:
        fig.add_vline(
            x=knee_qps, line_dash="dot", line_color="#2e7d32", annotation_text=f"knee {knee_qps:g} QPS"
        )
    fig.update_layout(
        title=f"{LATENCIES[metric]} p50 / p99 against offered load",
        xaxis_title="offered QPS",
        yaxis_title="ms",
        height=400,
    )
    return fig


def timeseries_figure(ts: pd.DataFrame, samples: list[dict[str, Any]]) -> go.Figure:
    power = [(num(s.get("t_s")), num(s.get("power_w"))) for s in samples if isinstance(s, dict)]
    power = [(t, p) for t, p in power if t is not None and p is not None]
    panels = [
        ("arrivals_per_s", "arrivals/s"),
        ("completions_per_s", "completions/s"),
        ("queue_depth", "queue depth"),
        ("output_tokens_per_s", "output tokens/s"),
    ]
    rows = len(panels) + (1 if power else 0)
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.03)
    for i, (col, label) in enumerate(panels, 1):
        fig.add_scatter(x=ts["t_s"], y=ts[col], mode="lines", name=label, row=i, col=1, line_shape="hv")
        fig.update_yaxes(title_text=label, row=i, col=1)
    if power:
        fig.add_scatter(
            x=[t for t, _ in power], y=[p for _, p in power], mode="lines", name="power W", row=rows, col=1
        )
        fig.update_yaxes(title_text="power W", row=rows, col=1)
    fig.update_xaxes(title_text="s since the first scheduled arrival", row=rows, col=1)
    fig.update_layout(title="Over the run (1 s bins)", height=170 * rows, showlegend=False)
    return fig


def outcome_figure(counts: dict[str, int]) -> go.Figure:
    colors = {
        "ok": "#2e7d32",
        "rejected_queue_full": "#f9a825",
        "timed_out_in_queue": "#ef6c00",
        "error": "#c62828",
    }
    fig = go.Figure(
        go.Bar(
            x=list(counts),
            y=list(counts.values()),
            text=list(counts.values()),
            name="requests",
            marker_color=[colors.get(k, "#757575") for k in counts],
        )
    )
    fig.update_layout(title="Request outcomes", yaxis_title="requests", height=320)
    return fig


def outcome_counts(lt: dict[str, Any], df: pd.DataFrame | None) -> dict[str, int]:
    if df is not None and not df.empty:
        return {str(k): int(v) for k, v in df["outcome"].value_counts().items()}
    s = lt.get("summary") or {}
    keys = {
        "ok": "requests_ok",
        "rejected_queue_full": "requests_rejected",
        "timed_out_in_queue": "requests_timed_out",
        "error": "requests_errored",
    }
    return {k: int(num(s.get(v)) or 0) for k, v in keys.items() if num(s.get(v)) is not None}


def _label(name: str, a: dict[str, Any]) -> str:
    tp = data.tensor_parallel_gpus(a)
    return f"{name} ({'single GPU' if tp == 1 else f'{tp}-GPU tensor parallel'})"


def render() -> None:
    run = ui.current_run()
    ui.header("Load test", "How does the fallback behave under open-loop load, and where is its knee?", run)
    if run is None:
        return
    tests = run.by_kind("loadtest")
    ui.show_warnings(run, *([n for n, _ in tests] or ["load_test.json"]))
    if not tests:
        ui.missing(
            run,
            "load test (load_test.json)",
            "lab loadtest --duration 20 --target-qps 3 --output-json reports/<run-id>/load_test.json",
        )
        return
    labels = {_label(n, a): (n, a) for n, a in tests}
    choice = (
        st.selectbox("Load-test artifact", list(labels), key="loadtest-artifact")
        if len(labels) > 1
        else next(iter(labels))
    )
    name, lt = labels.get(choice) or tests[0]
    ui.status_line(lt, name)
    ui.environment_caption(lt)
    s = lt.get("summary") or {}
    slo = data.slo_ms(lt)

    valid = s.get("valid")
    if valid is False:
        st.error(
            "INVALID run: "
            + "; ".join(
                lt.get("invalid_reasons") or lt.get("reasons") or [lt.get("reason") or "see artifact"]
            )
        )
    elif valid is True:
        st.success("VALID run: the generator kept its schedule (dispatch lag within bounds).")
    att = num(s.get("slo_attainment"))
    figures = [
        ("Target QPS", ui.fmt(s.get("target_qps"))),
        ("Achieved QPS", ui.fmt(s.get("achieved_qps"))),
        ("Output tokens/s", ui.fmt(s.get("output_tokens_per_s"))),
        ("Goodput (req/s)", ui.fmt(s.get("goodput_rps"))),
        ("SLO attainment", "n/a" if att is None else f"{att:.1%}"),
        ("TTFT p99 (ms)", ui.fmt(s.get("ttft_ms_p99"))),
        ("TPOT p99 (ms)", ui.fmt(s.get("tpot_ms_p99"))),
        ("E2E p50 (ms)", ui.fmt(s.get("e2e_ms_p50"))),
        ("E2E p99 (ms)", ui.fmt(s.get("e2e_ms_p99"))),
        ("Dispatch lag p99 (ms)", ui.fmt(s.get("dispatch_lag_ms_p99"))),
    ]
    for row in (figures[:5], figures[5:]):
        for col, (label, value) in zip(st.columns(5), row):
            col.metric(label, value)
    if slo:
        st.caption("SLO: " + ", ".join(f"{LATENCIES[k]} ≤ {v:g} ms" for k, v in slo.items()))
    ui.unavailable(lt)

    df, req_warnings = data.get_requests(run, name)
    for w in req_warnings:
        st.warning(w.message)

    st.subheader("Latency distributions")
    if df is None:
        st.info("No per-request records (JSONL) beside this artifact: CDFs need them.")
    else:
        done = df[df["outcome"] == "ok"]
        failed = len(df) - len(done)
        st.plotly_chart(cdf_figure(done, slo), key="loadtest-cdf")
        if failed:
            st.caption(
                f"{failed} request(s) did not complete: they count as SLO violations in goodput and attainment."
            )

    st.subheader("Latency against offered load")
    sw = sweep_frame(lt)
    if sw.empty:
        st.info(
            "This run offered one load; run `lab loadtest --sweep 1,2,4,8` (or a search) for the curve and the knee."
        )
    else:
        points = [p for p in (sweep_point(r, slo) for r in sw.to_dict("records")) if p]
        knee = find_knee(points)
        knee_qps = knee.point.offered_qps if knee.point else None
        options = [m for m in LATENCIES if f"{m}_ms_p99" in sw] or ["e2e"]
        metric = st.selectbox(
            "Latency",
            options,
            index=options.index("e2e") if "e2e" in options else 0,  # the playbook pins alerts to e2e p99
            key="loadtest-sweep-metric",
            format_func=LATENCIES.get,
        )
        st.plotly_chart(sweep_figure(sw, metric, slo, knee_qps), key="loadtest-sweep")
        if knee.point is None:
            st.warning("Even the lowest offered load missed the SLO: no capacity under this SLO.")
        else:
            st.caption(
                f"Knee: {knee.point.offered_qps:g} QPS offered, {knee.capacity_qps:.3g} achieved within the SLO"
                + (
                    f"; first violation at {knee.first_violation_qps:g} QPS."
                    if knee.first_violation_qps
                    else "; never violated in this sweep."
                )
            )
        st.dataframe(sw, hide_index=True)
        ui.download_csv(sw, f"{run.run_id}-{name}-sweep.csv")

    if df is not None and not df.empty:
        st.subheader("Over time")
        st.plotly_chart(
            timeseries_figure(data.time_series(df), data.telemetry_samples(lt)), key="loadtest-timeseries"
        )

    st.subheader("Outcomes")
    counts = outcome_counts(lt, df)
    if counts:
        st.plotly_chart(outcome_figure(counts), key="loadtest-outcomes")
    sent = num(s.get("requests_sent"))
    if sent is not None and counts:
        accounted = sum(counts.values())
        (st.caption if accounted == sent else st.warning)(
            f"Accounting: {accounted} outcomes for {int(sent)} requests sent"
            + ("" if accounted == sent else " — requests are missing from the records")
        )

    if df is not None:
        st.subheader("Every request")
        outcomes = sorted(df["outcome"].unique())
        chosen = st.multiselect("Outcomes", outcomes, default=outcomes, key="loadtest-outcome-filter")
        view = df[df["outcome"].isin(chosen)].drop(columns=["token_times_s"])
        if view["prompt_tokens"].notna().any():
            lo, hi = int(view["prompt_tokens"].min()), int(view["prompt_tokens"].max())
            if lo < hi:
                lo, hi = st.slider("Prompt tokens", lo, hi, (lo, hi), key="loadtest-prompt-filter")
                view = view[view["prompt_tokens"].between(lo, hi)]
        st.dataframe(view, hide_index=True)
        st.caption(f"{len(view)} of {len(df)} requests")
        ui.download_csv(view, f"{run.run_id}-{name}-requests.csv")
    ui.download_json(lt, f"{run.run_id}-{name}")


render()
