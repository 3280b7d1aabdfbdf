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
OUTCOME_COLORS = {
    "ok": "#2e7d32",
    "rejected_queue_full": "#f9a825",
    "rejected_draining": "#fbc02d",
    "timed_out_in_queue": "#ef6c00",
    "error": "#c62828",
    "cancelled": "#6d4c41",
}
SUMMARY_OUTCOMES = {
    "ok": "requests_ok",
    "rejected_queue_full": "requests_rejected_queue_full",
    "rejected_draining": "requests_rejected_draining",
    "timed_out_in_queue": "requests_timed_out",
    "error": "requests_errored",
    "cancelled": "requests_cancelled",
}


def cdf_figure(df: pd.DataFrame, slo: dict[str, float]) -> go.Figure:
    """Empirical CDF of each latency over the completed requests (log x: they span decades)."""
    fig = go.Figure()
    for m, label in LATENCIES.items():
        v = np.sort(df[f"{m}_ms"].dropna().astype(float).to_numpy())
        v = v[v > 0]
        if v.size == 0:
            continue
        fig.add_scatter(x=v, y=np.arange(1, v.size + 1) / v.size, mode="lines", name=f"{label} (n={v.size})")
        if m in slo:  # a trace, not a shape: shapes on a log axis take log10 coordinates
            fig.add_scatter(
                x=[slo[m], slo[m]],
                y=[0, 1],
                mode="lines",
                name=f"{label} SLO {slo[m]:g} ms",
                line={"dash": "dot", "width": 1},
            )
    fig.update_layout(
        title="Latency CDFs (completed requests in the measured window; from the scheduled time)",
        xaxis={"type": "log", "title": "ms (log)"},
        yaxis={"title": "fraction of requests", "range": [0, 1.02]},
        height=400,
    )
    return fig


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
    fig.update_xaxes(title_text="s since the run started", row=rows, col=1)
    fig.update_layout(title="Over the run (1 s bins)", height=170 * rows, showlegend=False)
    return fig


def outcome_figure(counts: dict[str, int]) -> go.Figure:
    fig = go.Figure(
        go.Bar(
            x=list(counts),
            y=list(counts.values()),
            text=list(counts.values()),
            name="requests",
            marker_color=[OUTCOME_COLORS.get(k, "#757575") for k in counts],
        )
    )
    fig.update_layout(title="Request outcomes (measured window)", yaxis_title="requests", height=320)
    return fig


def outcome_counts(lt: dict[str, Any], measured: pd.DataFrame | None) -> dict[str, int]:
    if measured is not None and not measured.empty:
        sent = measured[measured["outcome"] != "not_sent"]
        return {str(k): int(v) for k, v in sent["outcome"].value_counts().items()}
    s = lt.get("summary") or {}
    return {k: int(num(s.get(v)) or 0) for k, v in SUMMARY_OUTCOMES.items() if num(s.get(v))}


def _label(name: str, a: dict[str, Any]) -> str:
    tp = data.tensor_parallel_gpus(a)
    return f"{name} ({'single GPU' if tp == 1 else f'{tp}-GPU tensor parallel'})"


def _served_by(lt: dict) -> str | None:
    """What produced these numbers: the in-process engine's decode mode and shape, or the endpoint and the
    mode its `lab serve` said it ran in (after any switch from its start mode)."""
    eng = lt.get("engine") if isinstance(lt.get("engine"), dict) else {}
    cfg = eng.get("config") if isinstance(eng.get("config"), dict) else {}
    if eng.get("target") == "in-process" and cfg.get("mode"):
        buckets = num(cfg.get("kv_buckets"))
        return (
            f"Served by the in-process engine: {eng.get('preset') or 'model'} {eng.get('dtype') or ''}, mode "
            f"{cfg['mode']}, batch {cfg.get('max_batch_size')}, KV cache {cfg.get('max_seq_len')} tokens"
            + (f" read in {int(buckets)} lengths" if buckets and buckets > 1 else "")
        )
    if eng.get("target") == "http":
        server = eng.get("server") if isinstance(eng.get("server"), dict) else {}
        mode = f"; the server ran mode {server['mode']}" if server.get("mode") else ""
        up = server.get("upgrade") if isinstance(server.get("upgrade"), dict) else {}
        if up.get("state") == "failed":
            mode += f" (its compile of {up.get('to')} had failed)"
        return f"Served by {eng.get('endpoint')}{mode}"
    return None


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
            "lab loadtest --duration 20 --target-qps 3 --allow-smaller-world --output-json reports/<run-id>/load_test.json",
        )
        return
    labels = {_label(n, a): (n, a) for n, a in tests}
    choice = next(iter(labels))
    if len(labels) > 1:
        choice = st.selectbox("Load-test artifact", list(labels), key="loadtest-artifact")
    name, lt = labels.get(choice) or tests[0]
    ui.status_line(lt, name)
    ui.environment_caption(lt)
    served = _served_by(lt)
    if served:
        st.caption(served)
    s = lt.get("summary") or {}
    slo = data.slo_ms(lt)

    verdict = lt.get("verdict") if isinstance(lt.get("verdict"), dict) else {}
    valid = verdict.get("valid", s.get("valid"))
    if valid is False:
        st.error(
            "INVALID run: " + "; ".join(verdict.get("reasons") or [lt.get("reason") or "see the artifact"])
        )
    elif valid is True:
        st.success("VALID run: the generator kept its schedule and every request is accounted for.")
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
        st.caption(
            "SLO: "
            + ", ".join(f"{LATENCIES[k]} ≤ {v:g} ms" for k, v in slo.items())
            + f"; a load meets it when {data.slo_attainment_target(lt):.0%} of requests do"
        )
    excl = lt.get("exclusions") if isinstance(lt.get("exclusions"), dict) else {}
    if excl:
        parts = [
            f"{phase} {int(num((excl.get(phase) or {}).get('requests_scheduled')) or 0)} request(s)"
            for phase in ("warmup", "cooldown")
            if isinstance(excl.get(phase), dict)
        ]
        st.caption("Excluded from the metrics (and recorded): " + ", ".join(parts))
    ui.unavailable(lt)

    df, req_warnings = data.get_requests(run, name)
    for w in req_warnings:
        st.warning(w.message)
    tag = data.chosen_run_tag(lt)
    this_run = None
    if df is not None:
        this_run = df[df["run"] == tag] if tag is not None and (df["run"] == tag).any() else df
    measured = this_run[this_run["phase"] == "measure"] if this_run is not None else None

    st.subheader("Latency distributions")
    if measured is None:
        st.info("No per-request records (JSONL) beside this artifact: CDFs need them.")
    else:
        done = measured[measured["outcome"] == "ok"]
        st.plotly_chart(cdf_figure(done, slo), key="loadtest-cdf")
        failed = int((measured["outcome"] != "ok").sum())
        if failed:
            st.caption(
                f"{failed} request(s) did not complete: they count as SLO violations in goodput and attainment."
            )
        if tag:
            st.caption(f"Requests of the sweep's chosen run ({tag}); the table below holds every run.")

    st.subheader("Latency against offered load")
    curve = data.sweep_curve(lt)
    if not curve:
        st.info(
            "This run offered one load; `lab loadtest --sweep 1,2,4,8` (or `--sweep search`) draws the curve and finds the knee."
        )
    else:
        sw = pd.DataFrame(curve)
        if "target_qps" not in sw and "offered_qps" in sw:
            sw["target_qps"] = sw["offered_qps"]
        points = [p for p in (sweep_point(r, slo, data.slo_attainment_target(lt)) for r in curve) if p]
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

    if this_run is not None and not this_run.empty:
        st.subheader("Over time")
        timeline = lt.get("timeline") if isinstance(lt.get("timeline"), list) else None
        ts = data.time_series(this_run, timeline)
        st.plotly_chart(timeseries_figure(ts, data.telemetry_samples(lt)), key="loadtest-timeseries")

    st.subheader("Outcomes")
    counts = outcome_counts(lt, measured)
    if counts:
        st.plotly_chart(outcome_figure(counts), key="loadtest-outcomes")
    sent = num(s.get("requests_sent"))
    if sent is not None and counts:
        accounted = sum(counts.values())
        (st.caption if accounted == sent else st.warning)(
            f"Accounting: {accounted} outcomes for {int(sent)} requests sent in the measured window"
            + ("" if accounted == sent else " — requests are missing from the records")
        )

    if df is not None:
        st.subheader("Every request")
        view = df.drop(columns=["token_times_s"])
        runs = sorted(x for x in view["run"].dropna().unique())
        if runs:
            picked = st.multiselect(
                "Runs", runs, default=[tag] if tag in runs else runs, key="loadtest-run-filter"
            )
            view = view[view["run"].isin(picked)]
        outcomes = sorted(df["outcome"].unique())
        chosen = st.multiselect("Outcomes", outcomes, default=outcomes, key="loadtest-outcome-filter")
        phases = sorted(df["phase"].dropna().unique())
        chosen_phases = st.multiselect("Phases", phases, default=phases, key="loadtest-phase-filter")
        view = view[view["outcome"].isin(chosen) & view["phase"].isin(chosen_phases)]
        every = pd.to_numeric(df["prompt_tokens"], errors="coerce")  # the slider's range never moves
        if every.notna().any() and every.min() < every.max():
            lo, hi = int(every.min()), int(every.max())
            lo, hi = st.slider("Prompt tokens", lo, hi, (lo, hi), key="loadtest-prompt-filter")
            view = view[pd.to_numeric(view["prompt_tokens"], errors="coerce").between(lo, hi)]
        st.dataframe(view, hide_index=True)
        st.caption(f"{len(view)} of {len(df)} requests")
        ui.download_csv(view, f"{run.run_id}-{name}-requests.csv")
    ui.download_json(lt, f"{run.run_id}-{name}")


render()
