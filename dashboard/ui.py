"""Widgets every page shares: the sidebar (report directories, run picker, reload), file warnings,
downloads, the empty-reports guide and the one-line error a page shows instead of a traceback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import data

RUN_KEY = "run_id"
WATCH_S = 10  # how often an open dashboard looks for new or rewritten reports
log = logging.getLogger("lab.dashboard")

HOW_TO_RUN = """
No drill reports were found in: {dirs}

Run a drill, then press **Reload reports** in the sidebar (or just rerun: new reports appear on their own):

```bash
make drill                      # every step on the default preset (tiny on CPU, llama-8b on a GPU)
lab drill --output-dir reports  # the same through the CLI; --steps health,warmup,compare,loadtest
lab dashboard --reports DIR     # read another reports directory
```

Single steps write the same artifacts: `lab health`, `lab warmup`, `lab compare`, `lab loadtest`
(each with `--output-json reports/<run-id>/<step>.json`).
"""


def sidebar(reports: data.Reports) -> data.Run | None:
    """Render the sidebar; return the selected run (the latest by default)."""
    with st.sidebar:
        st.caption("Reports from: " + ", ".join(f"`{d}`" for d in reports.dirs))
        for note in reports.notes:
            st.caption(note)
        if st.button("Reload reports", help="Re-read every report now (new files also appear on any rerun)"):
            data.reload()
            st.rerun()
        if st.toggle("Watch for new reports", value=True, key="watch", help=f"Check every {WATCH_S} s"):
            _watch(tuple(reports.dirs))
        if not reports.runs:
            return None
        ids = [r.run_id for r in reversed(reports.runs)]  # newest first
        if st.session_state.get(RUN_KEY) not in ids:
            wanted = st.query_params.get("run")  # a shared link: ?run=<run-id>
            st.session_state[RUN_KEY] = wanted if wanted in ids else ids[0]
        run_id = st.selectbox(
            "Drill run",
            ids,
            key=RUN_KEY,
            format_func=lambda i: i + ("  (latest)" if i == ids[0] else ""),
        )
        if st.query_params.get("run") != run_id:
            st.query_params["run"] = run_id  # the address bar names the run, so a link reopens it
        run = reports.get(run_id)
        if run is not None:
            st.caption(f"{len(run.artifacts)} artifact(s) in `{run.path}`")
            if run.warnings:
                st.caption(f"⚠ {len(run.warnings)} file(s) could not be read: see the page warnings")
        return run


@st.fragment(run_every=WATCH_S)
def _watch(dirs: tuple[str, ...]) -> None:
    """Rerun the whole app when any report file appears, changes or goes (stats only, no reads)."""
    sig = data.signature([Path(d) for d in dirs])
    last = st.session_state.get("_lab_report_signature")
    st.session_state["_lab_report_signature"] = sig
    if last is not None and last != sig:
        st.rerun(scope="app")


def no_reports(reports: data.Reports) -> None:
    st.info(HOW_TO_RUN.format(dirs=", ".join(f"`{d}`" for d in reports.dirs)))


def show_warnings(run: data.Run, *files: str | None) -> None:
    """A warning per unreadable file of this run (all files, or only `files`)."""
    for w in run.warnings_for(*files):
        st.warning(f"Skipped {Path(w.path).name}: {w.message}")


def missing(run: data.Run, what: str, command: str) -> None:
    st.info(f"Run `{run.run_id}` has no {what}. Produce it with `{command}`.")


def page_failed(exc: BaseException) -> None:
    """Shown instead of a traceback; the details go to the server log."""
    log.exception("dashboard page failed")
    st.error(
        f"This page could not render this report ({type(exc).__name__}: {exc}). "
        "The other pages still work; the server log has the details."
    )


def download_json(obj: Any, file_name: str, label: str | None = None, key: str | None = None) -> None:
    st.download_button(
        label or f"Download {file_name}",
        data=data.to_json_bytes(obj),
        file_name=file_name,
        mime="application/json",
        key=key or f"dl-json-{file_name}",
    )


def download_csv(df: pd.DataFrame, file_name: str, label: str | None = None, key: str | None = None) -> None:
    st.download_button(
        label or f"Download {file_name}",
        data=data.to_csv_bytes(df),
        file_name=file_name,
        mime="text/csv",
        key=key or f"dl-csv-{file_name}",
    )


def unavailable(artifact: dict[str, Any]) -> None:
    """The artifact's own account of what it could not measure."""
    for metric, why in (artifact.get("unavailable") or {}).items():
        st.caption(f"Not measured — {metric}: {why}")


def status_line(artifact: dict[str, Any], file_name: str) -> None:
    status = artifact.get("status", "ok")
    if status == "failed":
        st.error(f"{file_name}: step failed — {artifact.get('reason') or 'no reason recorded'}")
    elif status == "skipped":
        st.info(f"{file_name}: step skipped — {artifact.get('reason') or 'no reason recorded'}")


def fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    """A short display number: 3 significant digits, thousands as whole numbers, 'n/a' when missing."""
    x = data._num(value)
    if x is None:
        return "n/a"
    text = f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"
    return f"{text} {unit}".strip()


def environment_caption(artifact: dict[str, Any]) -> None:
    env = artifact.get("environment") or {}
    gpus = env.get("gpus") or []
    card = f"{len(gpus)}× {gpus[0].get('name')}" if gpus else "no GPU"
    st.caption(
        f"{card} · host {env.get('hostname', '?')} · torch {env.get('torch', '?')} · CUDA {env.get('cuda') or 'n/a'}"
        f" · driver {env.get('driver') or 'n/a'} · lab {env.get('lab_version', '?')}"
        f" @ {(env.get('git_commit') or '?')[:10]} · started {artifact.get('started_at', '?')}"
    )


def current_run() -> data.Run | None:
    """The run picked in the sidebar; None (after showing how to run a drill) when there are none."""
    reports = data.get_reports()
    if not reports.runs:
        no_reports(reports)
        return None
    return reports.get(st.session_state.get(RUN_KEY)) or reports.latest


def header(title: str, question: str, run: data.Run | None = None) -> None:
    st.title(title)
    st.caption(question + (f" — run `{run.run_id}`" if run else ""))


VERDICT_COLORS = {
    "pass": "#2e7d32",
    "ok": "#2e7d32",
    "warn": "#f9a825",
    "fail": "#c62828",
    "failed": "#c62828",
}
