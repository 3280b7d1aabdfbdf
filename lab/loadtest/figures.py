"""Plotly figures for notebook 04 and the dashboard: latency CDFs, tokens/s and queue depth over time,
TTFT against prompt length, the outcome breakdown and the sweep's latency-throughput curve."""

from __future__ import annotations

from typing import Any

import numpy as np


def latency_cdfs(rows: list[dict[str, Any]]):
    """Empirical CDFs of TTFT, TPOT and E2E over measured, successful requests (from the scheduled time)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        vals = np.sort([r[key] for r in rows if r["phase"] == "measure" and r.get(key) is not None])
        if vals.size:
            fig.add_scatter(x=vals, y=np.arange(1, vals.size + 1) / vals.size, mode="lines", name=key)
    fig.update_layout(
        title="Latency CDFs (measured window, from the scheduled time)",
        xaxis_title="ms",
        yaxis_title="fraction of requests",
        xaxis_type="log",
    )
    return fig


def timeline_figure(timeline: list[dict[str, Any]], window: list[float] | None = None):
    """Output tokens/s and queue depth per second, with the measured window shaded."""
    from plotly.subplots import make_subplots

    t = [row["t_s"] for row in timeline]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=t, y=[row["output_tokens_per_s"] for row in timeline], name="output tokens/s")
    for key, label in (
        ("waiting_max", "waiting (max)"),
        ("running_max", "running (max)"),
        ("in_flight_max", "in flight (max)"),
    ):
        if any(key in row for row in timeline):
            fig.add_scatter(
                x=t, y=[row.get(key) for row in timeline], name=label, line={"dash": "dot"}, secondary_y=True
            )
    if window:
        fig.add_vrect(x0=window[0], x1=window[1], fillcolor="green", opacity=0.07, line_width=0)
    fig.update_layout(title="Tokens/s and queue depth over time (shaded: measured window)", xaxis_title="s")
    fig.update_yaxes(title_text="tokens/s", secondary_y=False)
    fig.update_yaxes(title_text="requests", secondary_y=True)
    return fig


def ttft_vs_prompt(rows: list[dict[str, Any]]):
    import plotly.graph_objects as go

    ok = [r for r in rows if r["phase"] == "measure" and r.get("ttft_ms") is not None]
    fig = go.Figure(
        go.Scatter(x=[r["prompt_tokens"] for r in ok], y=[r["ttft_ms"] for r in ok], mode="markers")
    )
    fig.update_layout(
        title="TTFT against prompt length", xaxis_title="prompt tokens", yaxis_title="TTFT (ms)"
    )
    return fig


def outcome_breakdown(summary: dict[str, Any], exclusions: dict[str, Any]):
    import plotly.graph_objects as go

    keys = (
        "requests_ok",
        "requests_rejected",
        "requests_timed_out",
        "requests_errored",
        "requests_cancelled",
    )
    labels = [k.removeprefix("requests_") for k in keys]
    fig = go.Figure()
    fig.add_bar(x=labels, y=[summary.get(k, 0) for k in keys], name="measured")
    for phase in ("warmup", "cooldown"):
        ph = exclusions.get(phase) or {}
        fig.add_bar(x=labels, y=[ph.get(k, 0) for k in keys], name=f"{phase} (excluded)")
    fig.update_layout(
        title="Outcomes (ok + rejected + timed out + errored + cancelled = sent)", barmode="group"
    )
    return fig


def sweep_curve(sweep: dict[str, Any] | None):
    """Latency against achieved throughput for every swept rate; None when there was no sweep."""
    if not sweep:
        return None
    import plotly.graph_objects as go

    pts = sweep["curve"]
    fig = go.Figure()
    for key in ("ttft_ms_p99", "e2e_ms_p99"):
        fig.add_scatter(
            x=[p["output_tokens_per_s"] for p in pts],
            y=[p[key] for p in pts],
            text=[f"{p['target_qps']:g} QPS{' (meets SLO)' if p['meets_slo'] else ''}" for p in pts],
            mode="lines+markers",
            name=key,
        )
    best = sweep.get("max_qps_meeting_slo")
    fig.update_layout(
        title=f"Latency vs throughput; max QPS meeting the SLOs: {best if best is not None else 'none'}",
        xaxis_title="output tokens/s",
        yaxis_title="ms",
    )
    return fig
