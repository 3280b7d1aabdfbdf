"""History: is the fallback getting better or worse across drills? Every drill against the
expectation band with regressions flagged, and any two runs side by side (base -> new)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data, ui

ALL = "all runs"
PREFERRED = ("warmup.decode_tokens_per_s", "loadtest.e2e_ms_p99", "warmup.ttft_ms_p99")


def history_figure(h: pd.DataFrame, key: str) -> go.Figure:
    rows = h[h["key"] == key].sort_values("started_at")
    fig = go.Figure()
    low, high = rows["band_low"], rows["band_high"]
    if high.notna().any():
        fig.add_scatter(
            x=rows["started_at"],
            y=high,
            mode="lines",
            name="expectation limit (upper)",
            line={"dash": "dash", "color": "#c62828"},
        )
    if low.notna().any():
        fig.add_scatter(
            x=rows["started_at"],
            y=low,
            mode="lines",
            name="expectation limit (lower)",
            line={"dash": "dash", "color": "#c62828"},
        )
    if rows["expected"].notna().any():
        fig.add_scatter(
            x=rows["started_at"],
            y=rows["expected"],
            mode="lines",
            name="expected",
            line={"dash": "dot", "color": "#757575"},
        )
    fig.add_scatter(
        x=rows["started_at"],
        y=rows["value"],
        mode="lines+markers",
        name="measured",
        text=rows["run_id"],
        hovertemplate="%{text}: %{y:.4g}<extra></extra>",
        line={"color": "#1565c0"},
    )
    reg = rows[rows["regression"]]
    if not reg.empty:
        fig.add_scatter(
            x=reg["started_at"],
            y=reg["value"],
            mode="markers",
            name="regression",
            text=reg["why"],
            marker={"symbol": "x", "size": 14, "color": "#c62828"},
            hovertemplate="%{text}<extra></extra>",
        )
    d = rows["direction"].dropna()
    better = f" ({d.iloc[0]} is better)" if not d.empty else ""
    fig.update_layout(
        title=f"{key} over drills{better}",
        xaxis_title="drill start (UTC)",
        yaxis_title=key.split(".", 1)[1],
        height=420,
    )
    return fig


def render() -> None:
    reports = data.get_reports()
    ui.header("History", "Is the fallback getting better or worse from drill to drill?")
    if not reports.runs:
        ui.no_reports(reports)
        return
    groups = {r.run_id: data.run_group(r) for r in reports.runs}
    names = sorted(set(groups.values()))
    selected = reports.get(st.session_state.get(ui.RUN_KEY)) or reports.latest
    default = groups.get(selected.run_id) if selected else names[0]
    group = st.selectbox(
        "Drills compared (same profile and card)",
        [*names, ALL],
        index=names.index(default) if default in names else 0,
        key="history-group",
    )
    runs = [r for r in reports.runs if group == ALL or groups[r.run_id] == group]
    for run in runs:
        ui.show_warnings(run)
    tol_pct = st.slider(
        "Flag a regression when a metric is this much worse than the previous drill (%)",
        1,
        100,
        10,
        key="history-tolerance",
    )
    h = data.flag_regressions(data.history_frame(runs), tol_pct / 100)
    if h.empty:
        st.info("No run has numeric summaries yet.")
        return
    keys = sorted(h["key"].unique())
    default = next((k for k in PREFERRED if k in keys), keys[0])
    key = st.selectbox("Metric", keys, index=keys.index(default), key="history-metric")
    st.plotly_chart(history_figure(h, key), key="history-chart")

    st.subheader("Regressions")
    reg = h[h["regression"]][["run_id", "started_at", "key", "value", "expected", "verdict", "why"]]
    if reg.empty:
        st.success("No regressions across these drills.")
    else:
        st.dataframe(reg.sort_values(["started_at", "key"]), hide_index=True)
        ui.download_csv(reg, "regressions.csv")
    ui.download_csv(h, "history.csv", label="Download the full history (CSV)")

    st.subheader("Compare two runs")
    ids = [r.run_id for r in runs]
    if len(ids) < 2:
        st.info("Only one drill so far: comparisons need two.")
        return
    c1, c2 = st.columns(2)
    base_id = c1.selectbox("Base", ids, index=len(ids) - 2, key="history-base")
    new_id = c2.selectbox("New", ids, index=len(ids) - 1, key="history-new")
    base, new = reports.get(base_id), reports.get(new_id)
    if base is None or new is None:
        st.info("Pick two runs.")
        return
    cmp = data.compare_runs(base, new)
    if cmp.empty:
        st.info("These runs share no numeric metrics.")
        return
    worse = int((cmp["change"] == "worse").sum())
    better = int((cmp["change"] == "better").sum())
    st.caption(f"{base_id} → {new_id}: {better} metric(s) better, {worse} worse")
    st.dataframe(cmp, hide_index=True)
    ui.download_csv(cmp, f"compare-{base_id}-to-{new_id}.csv")


render()
