"""Eager vs compiled: which inference method should serve, how much faster than eager, at what memory
cost, and does it still produce the same tokens?"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data, ui

num = data._num
COLS = [
    "method",
    "status",
    "reason",
    "speedup_vs_eager",
    "decode_ms_per_token_p50",
    "decode_ms_per_token_p99",
    "decode_tokens_per_s",
    "ttft_ms_p50",
    "peak_memory_gb",
    "compile_s",
    "cache_state",
    "max_logit_diff",
    "greedy_agreement",
    "forced_argmax_agreement",
    "correct",
]


def _p(v: Any, q: str) -> float | None:
    """A percentile from a summarize() dict, or the number itself."""
    return num(v.get(q)) if isinstance(v, dict) else num(v)


def methods_frame(compare: dict[str, Any]) -> pd.DataFrame:
    raw = compare.get("methods") or compare.get("results") or []
    if isinstance(raw, dict):
        raw = [{"name": k, **v} for k, v in raw.items() if isinstance(v, dict)]
    rows = []
    for m in raw:
        if not isinstance(m, dict):
            continue
        dec = m.get("decode_ms_per_token", m.get("decode_ms_per_token_p50"))
        ttft = m.get("ttft_ms", m.get("ttft_ms_p50"))
        rows.append(
            {
                "method": m.get("name") or m.get("method"),
                "status": m.get("status", "ok"),
                "reason": m.get("reason"),
                "speedup_vs_eager": num(m.get("speedup_vs_eager")),
                "decode_ms_per_token_p50": _p(dec, "p50"),
                "decode_ms_per_token_p99": _p(dec, "p99")
                if isinstance(dec, dict)
                else num(m.get("decode_ms_per_token_p99")),
                "decode_tokens_per_s": num(
                    m.get(
                        "decode_tokens_per_s_aggregate",
                        m.get("decode_tokens_per_s", m.get("decode_tokens_per_s_per_user")),
                    )
                ),
                "ttft_ms_p50": _p(ttft, "p50"),
                "peak_memory_gb": num(m.get("peak_memory_gb")),
                "compile_s": num(m.get("compile_s")),
                "cache_state": m.get("cache_state"),
                "max_logit_diff": num(m.get("max_logit_diff")),
                "greedy_agreement": num(m.get("greedy_token_agreement", m.get("greedy_agreement"))),
                "forced_argmax_agreement": num(m.get("forced_argmax_agreement")),
                "correct": m.get("correct"),
            }
        )
    df = pd.DataFrame(rows, columns=COLS)
    # speedup normalised to eager = 1x when the artifact did not say it
    eager = df[(df["method"] == "eager") & (df["status"] == "ok")]
    if not eager.empty and df["speedup_vs_eager"].isna().any():
        base = num(eager["decode_ms_per_token_p50"].iloc[0])
        if base:
            fill = df["decode_ms_per_token_p50"].map(lambda v: base / v if num(v) else None)
            df["speedup_vs_eager"] = df["speedup_vs_eager"].where(df["speedup_vs_eager"].notna(), fill)
    df["speedup_vs_eager"] = pd.to_numeric(df["speedup_vs_eager"], errors="coerce")
    return df


def speedup_figure(ok: pd.DataFrame) -> go.Figure:
    fig = go.Figure(
        go.Bar(
            x=ok["method"],
            y=ok["speedup_vs_eager"],
            name="speedup vs eager",
            text=[f"{v:.2f}×" for v in ok["speedup_vs_eager"]],
            marker_color=["#90a4ae" if m == "eager" else "#1565c0" for m in ok["method"]],
        )
    )
    fig.add_hline(y=1.0, line_dash="dash", annotation_text="eager = 1×")
    fig.update_layout(title="Decode speedup, normalised to eager = 1×", yaxis_title="× eager", height=360)
    return fig


def memory_figure(ok: pd.DataFrame) -> go.Figure:
    fig = go.Figure(go.Bar(x=ok["method"], y=ok["peak_memory_gb"], name="peak memory GB"))
    fig.update_layout(title="Peak memory per method", yaxis_title="GB", height=320)
    return fig


def render() -> None:
    run = ui.current_run()
    ui.header("Eager vs compiled", "Which inference method should serve, and is it still correct?", run)
    if run is None:
        return
    name = run.file_of("compare")
    ui.show_warnings(run, name or "compare.json")
    compare = run.step("compare")
    if compare is None:
        ui.missing(
            run,
            "eager-vs-compiled comparison (compare.json)",
            "lab compare --output-json reports/<run-id>/compare.json",
        )
        return
    ui.status_line(compare, name)
    ui.environment_caption(compare)
    df = methods_frame(compare)
    if df.empty:
        st.info("No methods in this artifact.")
        return
    ok = df[(df["status"] == "ok") & df["speedup_vs_eager"].notna()]
    if not ok.empty:
        best = ok.loc[ok["speedup_vs_eager"].astype(float).idxmax()]
        c1, c2, c3 = st.columns(3)
        c1.metric("Fastest method", str(best["method"]))
        c2.metric("Speedup vs eager", f"{float(best['speedup_vs_eager']):.2f}×")
        agree = num(best["greedy_agreement"])
        c3.metric("Greedy-token agreement", "n/a" if agree is None else f"{agree:.1%}")
        st.plotly_chart(speedup_figure(ok), key="compare-speedup")
        if ok["peak_memory_gb"].notna().any():
            st.plotly_chart(memory_figure(ok), key="compare-memory")
    st.subheader("Correctness against eager")
    corr = df[
        ["method", "status", "correct", "max_logit_diff", "greedy_agreement", "forced_argmax_agreement"]
    ]
    st.dataframe(corr, hide_index=True)
    bad = df[
        (df["status"] == "ok") & (df["greedy_agreement"].map(lambda v: num(v) is not None and num(v) < 1.0))
    ]
    for _, r in bad.iterrows():
        st.warning(f"{r['method']}: greedy tokens agree with eager on {num(r['greedy_agreement']):.1%} only")
    failed = df[df["status"] != "ok"]
    if not failed.empty:
        st.subheader("Methods that did not run")
        for _, r in failed.iterrows():
            st.markdown(f"- **{r['method']}** — {r['status']}: {r['reason'] or 'no reason recorded'}")
    st.subheader("Every method")
    st.dataframe(df, hide_index=True)
    ui.download_csv(df, f"{run.run_id}-compare-methods.csv")
    ui.download_json(compare, f"{run.run_id}-{name}")


render()
