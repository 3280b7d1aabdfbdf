"""Overview: is this drill a go? The fallback decision and its triggers, every metric against the
capacity-expectation profile, and the drill's step statuses."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from dashboard import data, ui


def expectations_figure(exp) -> go.Figure:
    """Measured / expected per metric (1 = exactly on profile), coloured by verdict."""
    rows = exp.dropna(subset=["measured", "expected"])
    rows = rows[rows["expected"] != 0]
    ratio = rows["measured"] / rows["expected"]
    fig = go.Figure(
        go.Bar(
            x=ratio,
            y=rows["metric"],
            orientation="h",
            name="measured / expected",
            marker_color=[ui.VERDICT_COLORS.get(v, "#757575") for v in rows["verdict"]],
            customdata=rows[["measured", "expected", "verdict", "direction"]].values,
            hovertemplate="%{y}: measured %{customdata[0]:.4g} vs expected %{customdata[1]:.4g}"
            " (%{customdata[2]}, %{customdata[3]} is better)<extra></extra>",
        )
    )
    fig.add_vline(x=1.0, line_dash="dash", annotation_text="on profile")
    fig.update_layout(
        title="Measured / expected (1 = on profile; colour = verdict)",
        height=120 + 32 * len(rows),
        margin={"l": 10, "r": 10, "t": 50, "b": 10},
        xaxis_title="measured / expected",
    )
    return fig


AS_EVALUATED = "as evaluated by the drill"


def choose_profile(run: data.Run) -> tuple[dict | None, str]:
    """The expectation profile to judge this run by: the drill's own evaluation, or any shipped
    profile evaluated now (read-only). Returns (an evaluation to use instead, or None; a caption)."""
    own = run.expectations or {}
    own_name = own.get("profile") or (own.get("params") or {}).get("profile")
    names = data.profiles()
    options = ([f"{AS_EVALUATED} ({own_name or 'unnamed'})"] if own else []) + names
    if not options:
        return None, "No expectations evaluated and no profiles found."
    choice = st.selectbox("Capacity-expectation profile", options, key="overview-profile")
    if choice.startswith(AS_EVALUATED):
        note = f"Profile `{own_name}`, as evaluated when the drill ran"
        if own.get("provisional"):
            note += " — provisional: " + (own.get("reason") or "expected values are estimates")
        return None, note
    doc, err = data.evaluate_profile(run.path, choice, data.signature([Path(run.path)]))
    if doc is None:
        st.warning(f"Could not evaluate profile {choice}: {err}")
        return None, f"Profile `{own_name}`, as evaluated when the drill ran"
    note = f"Profile `{choice}`, evaluated now against this run's artifacts"
    if doc.get("provisional"):
        note += " — provisional: " + (doc.get("reason") or "expected values are estimates")
    return doc, note


def render() -> None:
    run = ui.current_run()
    ui.header("Overview", "Is the single-GPU fallback ready to take traffic?", run)
    if run is None:
        return
    ui.show_warnings(run)

    exp_doc, profile_note = choose_profile(run)
    exp = data.expectations_frame(exp=exp_doc) if exp_doc else data.expectations_frame(run)
    verdict, reasons = data.go_no_go(run, exp)
    box = {"GO": st.success, "NO-GO": st.error}.get(verdict, st.info)
    box(f"**{verdict}** — " + "; ".join(reasons))

    health = run.step("health")
    steps = data.steps_frame(run)
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Go / no-go", verdict)
    decision = (health or {}).get("decision") or {}
    rec = decision.get("fallback_recommended")
    c2.metric("Fallback recommended", "n/a" if rec is None else ("yes" if rec else "no"))
    counts = exp["verdict"].value_counts() if not exp.empty else {}
    c3.metric(
        "Expectations pass / warn / fail",
        f"{counts.get('pass', 0)} / {counts.get('warn', 0)} / {counts.get('fail', 0)}"
        if not exp.empty
        else "n/a",
    )
    ok = int((steps["status"] == "ok").sum()) if not steps.empty else 0
    c4.metric("Drill steps ok", f"{ok} / {len(steps)}" if not steps.empty else "n/a")

    st.subheader("Fallback decision")
    if health is None:
        ui.missing(run, "health check (health.json)", "lab health --output-json reports/<run-id>/health.json")
    else:
        triggers = decision.get("triggers") or []
        if rec:
            st.error(
                "Fallback recommended. Triggers: " + (", ".join(f"`{t}`" for t in triggers) or "none named")
            )
        elif rec is False:
            st.success("No fallback trigger fired: the multi-GPU tier looks healthy.")
        else:
            st.info("The health artifact holds no decision.")
        for reason in decision.get("reasons") or []:
            st.markdown(f"- {reason}")

    st.subheader("Against the capacity expectations")
    if exp.empty:
        ui.missing(run, "expectations evaluation (expectations.json)", "lab drill --profile NAME")
    else:
        st.caption(profile_note)
        st.plotly_chart(expectations_figure(exp), key="overview-expectations")
        st.dataframe(exp, hide_index=True)
        ui.download_csv(exp, f"{run.run_id}-expectations.csv")

    st.subheader("Drill steps")
    if steps.empty:
        st.info("No manifest and no step artifacts in this run.")
    else:
        st.dataframe(steps, hide_index=True)
        ui.download_csv(steps, f"{run.run_id}-steps.csv")
    manifest = run.manifest
    if manifest:
        ui.environment_caption(manifest)
        ui.download_json(manifest, f"{run.run_id}-manifest.json")
        for rel in executed_notebooks(run):
            st.download_button(
                f"Download the executed {rel.name}",
                data=rel.read_bytes(),
                file_name=f"{run.run_id}-{rel.name}",
                mime="application/x-ipynb+json",
                key=f"dl-nb-{rel.name}",
            )


def executed_notebooks(run: data.Run) -> list[Path]:
    """The drill's executed notebooks the manifest lists, inside the run's folder."""
    out = []
    for s in (run.manifest or {}).get("steps") or []:
        rel = s.get("executed_notebook") if isinstance(s, dict) else None
        if isinstance(rel, str) and rel:
            p = data._inside(Path(run.path), rel)
            if p is not None and p.is_file():
                out.append(p)
    return out


render()
