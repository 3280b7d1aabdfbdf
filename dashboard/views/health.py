"""Health: what state are the GPUs in? Per-GPU inventory, NVLink active links against the threshold,
NCCL environment findings with their fix, ECC and clock events."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data, ui

STATUS_ORDER = {"fail": 0, "warn": 1, "ok": 2, "skipped": 3}


def checks_frame(health: dict) -> pd.DataFrame:
    cols = ["name", "status", "detail", "value", "threshold"]
    rows = [c for c in health.get("checks") or [] if isinstance(c, dict)]
    df = pd.DataFrame([{k: c.get(k) for k in cols} for c in rows], columns=cols)
    for k in ("value", "threshold"):  # mixed types (numbers, strings) display as text
        df[k] = df[k].map(lambda v: "" if v is None else str(v))
    return df.sort_values("status", key=lambda s: s.map(lambda v: STATUS_ORDER.get(v, 9)), kind="stable")


def gpus_frame(health: dict) -> pd.DataFrame:
    gpus = [g for g in health.get("gpus") or [] if isinstance(g, dict)]
    rows = []
    for g in gpus:
        row = {}
        for k, v in g.items():
            row[k] = ", ".join(map(str, v)) if isinstance(v, list) else v
        rows.append(row)
    return pd.DataFrame(rows)


def nvlink_threshold(health: dict) -> float | None:
    params = health.get("params") or {}
    for c in health.get("checks") or []:
        if (
            isinstance(c, dict)
            and "nvlink" in str(c.get("name", ""))
            and data._num(c.get("threshold")) is not None
        ):
            return data._num(c.get("threshold"))
    return data._num(params.get("min_nvlink_links"))


def nvlink_figure(gpus: pd.DataFrame, threshold: float | None) -> go.Figure:
    active_col = next((c for c in ("nvlink_active_links", "nvlink_active") if c in gpus), None)
    total_col = next(
        (c for c in ("nvlink_links", "nvlink_total_links", "nvlink_link_count") if c in gpus), None
    )
    labels = [f"GPU {i}" for i in gpus.get("index", range(len(gpus)))]
    fig = go.Figure()
    if total_col:
        fig.add_bar(x=labels, y=gpus[total_col], name="links on the device", marker_color="#cfd8dc")
    fig.add_bar(
        x=labels,
        y=gpus[active_col],
        name="active links",
        marker_color=[
            "#c62828" if threshold is not None and (v or 0) < threshold else "#2e7d32"
            for v in gpus[active_col]
        ],
    )
    if threshold is not None:
        fig.add_hline(
            y=threshold, line_dash="dash", line_color="#c62828", annotation_text=f"threshold {threshold:g}"
        )
    fig.update_layout(
        title="NVLink active links per GPU",
        barmode="overlay",
        yaxis_title="links",
        height=360,
        showlegend=True,
    )
    return fig


def render() -> None:
    run = ui.current_run()
    ui.header("Health", "What state are the GPUs, links and NCCL environment in?", run)
    if run is None:
        return
    name = run.file_of("health")
    ui.show_warnings(run, name or "health.json")
    health = run.step("health")
    if health is None:
        ui.missing(run, "health check (health.json)", "lab health --output-json reports/<run-id>/health.json")
        return
    ui.status_line(health, name)
    ui.environment_caption(health)

    decision = health.get("decision") or {}
    if decision.get("fallback_recommended"):
        st.error("Fallback recommended: " + ", ".join(f"`{t}`" for t in decision.get("triggers") or []))
    elif decision:
        st.success("No fallback trigger fired.")
    for reason in decision.get("reasons") or []:
        st.markdown(f"- {reason}")

    checks = checks_frame(health)
    gpus = gpus_frame(health)

    st.subheader("GPUs")
    if gpus.empty:
        st.info("No GPU inventory in this artifact (no NVIDIA GPU visible, or NVML unavailable).")
    else:
        st.dataframe(gpus, hide_index=True)
        ui.download_csv(gpus, f"{run.run_id}-gpus.csv")

    st.subheader("NVLink")
    threshold = nvlink_threshold(health)
    if not gpus.empty and any(c in gpus for c in ("nvlink_active_links", "nvlink_active")):
        st.plotly_chart(nvlink_figure(gpus, threshold), key="health-nvlink")
    nv = checks[checks["name"].str.contains("nvlink", case=False, na=False)]
    if nv.empty and gpus.empty:
        st.info("No NVLink information in this artifact.")
    elif not nv.empty:
        st.dataframe(nv, hide_index=True)

    st.subheader("NCCL environment")
    nccl = checks[checks["name"].str.contains("nccl", case=False, na=False)]
    if nccl.empty:
        st.info("No NCCL findings in this artifact.")
    else:
        st.dataframe(nccl, hide_index=True)
    fixes = [c.get("fix") for c in health.get("checks") or [] if isinstance(c, dict) and c.get("fix")]
    fixes += [f for f in (health.get("nccl_env") or {}).get("fix_lines") or [] if isinstance(f, str)]
    if fixes:
        st.caption("Run these in the serving shell (the playbook's step 2):")
        st.code("\n".join(dict.fromkeys(fixes)), language="bash")

    st.subheader("ECC, remapped rows, clock events, XID")
    errs = checks[checks["name"].str.contains("ecc|clock|xid|remap|thermal|power", case=False, na=False)]
    if errs.empty:
        st.info("No error or slowdown checks in this artifact.")
    else:
        st.dataframe(errs, hide_index=True)

    st.subheader("Every check")
    st.dataframe(checks, hide_index=True)
    ui.download_csv(checks, f"{run.run_id}-health-checks.csv")
    ui.download_json(health, f"{run.run_id}-{name}")


render()
