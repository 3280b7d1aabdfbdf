"""Health: what state are the GPUs in? Per-GPU inventory, NVLink active links against the threshold,
NCCL environment findings with the lines that fix them, ECC, row remaps, clock events and XIDs."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data, ui

STATUS_ORDER = {"fail": 0, "warn": 1, "ok": 2, "skipped": 3}
CHECK_COLS = ["name", "status", "gpu", "detail", "value", "threshold", "trigger"]
NCCL = "nccl|cuda_visible|collective|peer"
ERRORS = "ecc|remap|clock|xid|thermal|pcie"


def checks_frame(health: dict[str, Any]) -> pd.DataFrame:
    rows = [c for c in health.get("checks") or [] if isinstance(c, dict)]
    text = ("value", "threshold", "gpu", "trigger")  # mixed types (and gaps) display as text
    df = pd.DataFrame(
        [
            {k: ("" if c.get(k) is None else str(c.get(k))) if k in text else c.get(k) for k in CHECK_COLS}
            for c in rows
        ],
        columns=CHECK_COLS,
    )
    return df.sort_values("status", key=lambda s: s.map(lambda v: STATUS_ORDER.get(v, 9)), kind="stable")


def gpus_frame(health: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for g in health.get("gpus") or []:
        if isinstance(g, dict):
            rows.append(
                {
                    k: ", ".join(map(str, v))
                    if isinstance(v, list)
                    else (str(v) if isinstance(v, dict) else v)
                    for k, v in g.items()
                }
            )
    return pd.DataFrame(rows)


def nvlink_threshold(health: dict[str, Any]) -> float | None:
    for c in health.get("checks") or []:
        if (
            isinstance(c, dict)
            and "nvlink" in str(c.get("name", ""))
            and data._num(c.get("threshold")) is not None
        ):
            return data._num(c.get("threshold"))
    return data._num((health.get("params") or {}).get("min_nvlink_links"))


def nvlink_figure(gpus: list[dict[str, Any]], threshold: float | None) -> go.Figure:
    labels = [f"GPU {g.get('index', i)}" for i, g in enumerate(gpus)]
    active = [data._num(g.get("nvlink_active_links")) for g in gpus]
    total = [data._num(g.get("nvlink_links_reported", g.get("nvlink_links"))) for g in gpus]
    fig = go.Figure()
    if any(t is not None for t in total):
        fig.add_bar(x=labels, y=total, name="links on the device", marker_color="#cfd8dc")
    fig.add_bar(
        x=labels,
        y=active,
        name="active links",
        marker_color=[
            "#c62828" if threshold is not None and (v or 0) < threshold else "#2e7d32" for v in active
        ],
    )
    if threshold is not None:
        fig.add_hline(
            y=threshold, line_dash="dash", line_color="#c62828", annotation_text=f"threshold {threshold:g}"
        )
    fig.update_layout(title="NVLink active links per GPU", barmode="overlay", yaxis_title="links", height=360)
    return fig


def _table(df: pd.DataFrame, pattern: str, empty: str) -> None:
    rows = df[df["name"].str.contains(pattern, case=False, na=False)]
    if rows.empty:
        st.info(empty)
    else:
        st.dataframe(rows, hide_index=True)


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
        st.error(
            "Fallback recommended — triggers: "
            + (", ".join(f"`{t}`" for t in decision.get("triggers") or []) or "none named")
        )
    elif decision:
        st.success("No fallback trigger fired.")
    for reason in decision.get("reasons") or []:
        st.markdown(f"- {reason}")
    if decision.get("fallback_gpu") is not None or decision.get("fallback_viable") is not None:
        viable = decision.get("fallback_viable")
        st.caption(
            f"Fallback GPU: {decision.get('fallback_gpu', 'n/a')} · can the single-GPU pool serve: "
            + ("yes" if viable else "no" if viable is False else "unknown")
        )
    for b in decision.get("blockers") or []:
        st.warning(f"Blocker: {b}")

    checks = checks_frame(health)
    gpu_list = [g for g in health.get("gpus") or [] if isinstance(g, dict)]

    st.subheader("GPUs")
    if not gpu_list:
        st.info("No GPU inventory in this artifact (no NVIDIA GPU visible, or NVML unavailable).")
    else:
        gpus = gpus_frame(health)
        st.dataframe(gpus, hide_index=True)
        ui.download_csv(gpus, f"{run.run_id}-gpus.csv")

    st.subheader("NVLink")
    threshold = nvlink_threshold(health)
    if any(data._num(g.get("nvlink_active_links")) is not None for g in gpu_list):
        st.plotly_chart(nvlink_figure(gpu_list, threshold), key="health-nvlink")
    _table(checks, "nvlink", "No NVLink check in this artifact.")

    st.subheader("NCCL environment and peers")
    _table(checks, NCCL, "No NCCL findings in this artifact.")
    fixes = [f for f in health.get("fix_commands") or [] if isinstance(f, str)]
    if fixes:
        st.caption("Run these in the serving shell (the playbook's step 2):")
        st.code("\n".join(dict.fromkeys(fixes)), language="bash")

    st.subheader("ECC, row remaps, clock events, XIDs, PCIe")
    _table(checks, ERRORS, "No error or slowdown checks in this artifact.")

    st.subheader("Every check")
    st.dataframe(checks, hide_index=True)
    ui.download_csv(checks, f"{run.run_id}-health-checks.csv")
    ui.unavailable(health)
    ui.download_json(health, f"{run.run_id}-{name}")


render()
