"""Warm-up: what latency envelope do alerts pin to? Per-iteration TTFT and decode, compile time cold
vs warm cache, energy and tokens/joule, and MBU against the measured memory-bandwidth roofline."""

from __future__ import annotations

import statistics
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data, ui

num = data._num


def iterations_frame(warmup: dict[str, Any]) -> pd.DataFrame:
    """One row per timed iteration: TTFT, decode ms/token p50 with its min/max, decode total."""
    cols = [
        "iteration",
        "ttft_ms",
        "decode_ms_per_token_p50",
        "decode_ms_min",
        "decode_ms_max",
        "decode_total_ms",
    ]
    raw = warmup.get("iterations") or warmup.get("per_iteration") or []
    rows = []
    for i, it in enumerate(r for r in raw if isinstance(r, dict)):
        steps = it.get("decode_step_ms")
        if not isinstance(steps, list):
            steps = it.get("decode_ms_per_token") if isinstance(it.get("decode_ms_per_token"), list) else []
        per_token = [x for x in (num(v) for v in steps) if x is not None]
        p50 = (
            statistics.median(per_token)
            if per_token
            else num(it.get("decode_ms_per_token_p50", it.get("decode_ms_per_token")))
        )
        total = sum(per_token) if per_token else num(it.get("decode_total_ms"))
        rows.append(
            {
                "iteration": it.get("iteration", i),
                "ttft_ms": num(it.get("ttft_ms")),
                "decode_ms_per_token_p50": p50,
                "decode_ms_min": min(per_token) if per_token else p50,
                "decode_ms_max": max(per_token) if per_token else p50,
                "decode_total_ms": total,
            }
        )
    return pd.DataFrame(rows, columns=cols)


def envelope_figure(its: pd.DataFrame, summary: dict[str, Any]) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=its["iteration"], y=its["ttft_ms"], mode="lines+markers", name="TTFT (prefill) ms")
    fig.add_scatter(
        x=its["iteration"],
        y=its["decode_ms_per_token_p50"],
        mode="lines+markers",
        name="decode ms/token (p50, bars = min..max)",
        error_y={
            "type": "data",
            "symmetric": False,
            "array": (its["decode_ms_max"] - its["decode_ms_per_token_p50"]).tolist(),
            "arrayminus": (its["decode_ms_per_token_p50"] - its["decode_ms_min"]).tolist(),
        },
    )
    for key, label in (("ttft_ms_p99", "TTFT p99"), ("decode_ms_per_token_p99", "decode p99")):
        v = num(summary.get(key))
        if v is not None:
            fig.add_hline(y=v, line_dash="dot", annotation_text=f"{label} {v:.3g} ms")
    fig.update_layout(
        title="Latency envelope per iteration", xaxis_title="iteration", yaxis_title="ms", height=380
    )
    return fig


def ttft_vs_decode_figure(its: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    fig.add_bar(x=its["iteration"], y=its["ttft_ms"], name="prefill (TTFT) ms")
    fig.add_bar(x=its["iteration"], y=its["decode_total_ms"], name="decode, all tokens ms")
    fig.update_layout(
        title="Where a request's time goes: prefill vs decode",
        barmode="stack",
        xaxis_title="iteration",
        yaxis_title="ms",
        height=340,
    )
    return fig


def compile_times(warmup: dict[str, Any]) -> dict[str, float]:
    """Compile / capture time with a cold and with a warm compile cache (the cache's own history)."""
    comp = warmup.get("compile") if isinstance(warmup.get("compile"), dict) else {}
    s = warmup.get("summary") or {}
    cold = num(comp.get("cold_s", s.get("compile_s_cold")))
    warm = num(comp.get("warm_s", comp.get("warm_cache_s", s.get("compile_s_warm"))))
    if cold is None and warm is None:
        cold = num(s.get("compile_s"))
    return {k: v for k, v in (("cold compile cache", cold), ("warm compile cache", warm)) if v is not None}


def compile_figure(times: dict[str, float]) -> go.Figure:
    fig = go.Figure(
        go.Bar(
            x=list(times),
            y=list(times.values()),
            name="compile s",
            text=[f"{v:.3g} s" for v in times.values()],
        )
    )
    fig.update_layout(title="Compile / graph-capture time", yaxis_title="s", height=320)
    return fig


def roofline(warmup: dict[str, Any]) -> dict[str, float | None]:
    """Decode bandwidth against the copy bandwidth measured in the same run (MEASUREMENT.md)."""
    r = warmup.get("roofline") if isinstance(warmup.get("roofline"), dict) else {}
    s = warmup.get("summary") or {}
    copy_bw = num(r.get("copy_bandwidth_gb_s", r.get("copy_bandwidth_gb_per_s")))
    mbu = num(r.get("mbu", s.get("mbu")))
    achieved = num(r.get("achieved_gb_per_s"))
    step_s = num(r.get("decode_step_s_p50"))
    bytes_per_step = num(r.get("bytes_per_step"))
    if achieved is None and bytes_per_step and step_s:
        achieved = bytes_per_step / step_s / 1e9
    if achieved is None and mbu is not None and copy_bw is not None:
        achieved = mbu * copy_bw
    return {
        "copy_bandwidth_gb_per_s": copy_bw,
        "achieved_gb_per_s": achieved,
        "mbu": mbu,
        "mfu": num(r.get("decode_mfu")),
    }


def roofline_figure(r: dict[str, float | None]) -> go.Figure:
    fig = go.Figure(
        go.Bar(
            x=["decode (achieved)", "device copy (measured roofline)"],
            y=[r["achieved_gb_per_s"], r["copy_bandwidth_gb_per_s"]],
            marker_color=["#1565c0", "#90a4ae"],
            name="GB/s",
        )
    )
    title = "Memory bandwidth: decode vs the measured roofline"
    if r["mbu"] is not None:
        title += f" (MBU {r['mbu']:.0%})"
    if r.get("mfu") is not None:
        title += f"; decode MFU {r['mfu']:.1%}"
    fig.update_layout(title=title, yaxis_title="GB/s", height=340)
    return fig


def power_figure(samples: list[dict[str, Any]]) -> go.Figure | None:
    pts = [(num(s.get("t_s")), num(s.get("power_w"))) for s in samples if isinstance(s, dict)]
    pts = [(t, p) for t, p in pts if t is not None and p is not None]
    if not pts:
        return None
    fig = go.Figure(go.Scatter(x=[t for t, _ in pts], y=[p for _, p in pts], mode="lines", name="power W"))
    fig.update_layout(title="GPU power over the timed window", xaxis_title="s", yaxis_title="W", height=300)
    return fig


def serving_prime_caption(warmup: dict[str, Any]) -> str:
    """Whether this warm-up also compiled the server's steps (so `lab serve` starts from the cache)."""
    comp = warmup.get("compile") if isinstance(warmup.get("compile"), dict) else {}
    p = comp.get("serving") if isinstance(comp.get("serving"), dict) else None
    if p is None:
        return "Server steps: not primed by this warm-up (older artifact, or priming not available)."
    shape = f"batch {p.get('max_batch_size')} x {p.get('max_seq_len')} tokens"
    if p.get("status") == "ok":
        return (
            f"Server steps primed: {shape} in {ui.fmt(num(p.get('prime_s')))} s (compile cache "
            f"{p.get('cache_state')}); `lab serve` with these shapes and the same cache directory loads them."
        )
    return f"Server steps {p.get('status')} ({shape}): {p.get('reason')}"


def render() -> None:
    run = ui.current_run()
    ui.header(
        "Warm-up", "What latency envelope, compile cost and efficiency does the warmed model give?", run
    )
    if run is None:
        return
    found = run.by_kind("warmup")
    ui.show_warnings(run, *([n for n, _ in found] or ["warmup.json"]))
    name, warmup = found[0] if found else (None, None)
    if len(found) > 1:  # e.g. lab compare-tiers: tp1/ and tpN/
        name = st.selectbox("Warm-up artifact", [n for n, _ in found], key="warmup-artifact")
        warmup = dict(found)[name]
    if warmup is None:
        ui.missing(
            run,
            "warm-up (warmup.json)",
            "lab warmup --iters 3 --warmup 1 --output-json reports/<run-id>/warmup.json",
        )
        return
    ui.status_line(warmup, name)
    ui.environment_caption(warmup)
    s = warmup.get("summary") or {}
    figures = [
        ("TTFT p50 (ms)", "ttft_ms_p50"),
        ("TTFT p99 (ms)", "ttft_ms_p99"),
        ("Decode p50 (ms/token)", "decode_ms_per_token_p50"),
        ("Decode p99 (ms/token)", "decode_ms_per_token_p99"),
        ("Decode tokens/s", "decode_tokens_per_s"),
        ("Peak memory (GB)", "peak_memory_gb"),
        ("Compile (s)", "compile_s"),
        ("Power, mean (W)", "power_w_mean"),
        ("Energy (J)", "energy_j"),
        ("Tokens / joule", "tokens_per_joule"),
    ]
    for row in (figures[:5], figures[5:]):
        for col, (label, key) in zip(st.columns(5), row):
            col.metric(label, ui.fmt(s.get(key)))
    ui.unavailable(warmup)

    its = iterations_frame(warmup)
    if its.empty:
        st.info("No per-iteration data in this artifact.")
    else:
        st.plotly_chart(envelope_figure(its, s), key="warmup-envelope")
        st.plotly_chart(ttft_vs_decode_figure(its), key="warmup-ttft-decode")
        st.dataframe(its, hide_index=True)
        ui.download_csv(its, f"{run.run_id}-warmup-iterations.csv")

    c1, c2 = st.columns(2)
    with c1:
        times = compile_times(warmup)
        if times:
            st.plotly_chart(compile_figure(times), key="warmup-compile")
        else:
            st.info("Compile time was not recorded (eager mode, or not measured).")
        st.caption(serving_prime_caption(warmup))
    with c2:
        r = roofline(warmup)
        if r["achieved_gb_per_s"] is not None and r["copy_bandwidth_gb_per_s"] is not None:
            st.plotly_chart(roofline_figure(r), key="warmup-roofline")
        elif r["mbu"] is not None:
            st.metric("MBU", f"{r['mbu']:.0%}")
        else:
            st.info("MBU was not measured in this run.")
    fig = power_figure(data.telemetry_samples(warmup))
    if fig is not None:
        st.plotly_chart(fig, key="warmup-power")
    ui.download_json(warmup, f"{run.run_id}-{name}")


render()
