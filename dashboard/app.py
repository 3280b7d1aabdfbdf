"""The drill dashboard: one page per question a reviewer asks about a fallback drill.

Start it with `lab dashboard [--reports DIR]` (or `make dashboard`); it reads reports/ and
reports/examples/ by default. Pages read artifacts only; nothing here writes a report.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import data, ui  # noqa: E402

PAGES = [
    ("views/overview.py", "Overview", "overview", ":material/fact_check:"),
    ("views/health.py", "Health", "health", ":material/monitor_heart:"),
    ("views/warmup.py", "Warm-up", "warmup", ":material/local_fire_department:"),
    ("views/compare.py", "Eager vs compiled", "compare", ":material/speed:"),
    ("views/loadtest.py", "Load test", "loadtest", ":material/stacked_line_chart:"),
    ("views/capacity.py", "Capacity planner", "capacity", ":material/calculate:"),
    ("views/history.py", "History", "history", ":material/history:"),
]

st.set_page_config(page_title="Fallback drill dashboard", page_icon=":material/fact_check:", layout="wide")
here = Path(__file__).resolve().parent
nav = st.navigation(
    [
        st.Page(str(here / path), title=title, url_path=url, icon=icon, default=(i == 0))
        for i, (path, title, url, icon) in enumerate(PAGES)
    ]
)
try:
    reports = data.get_reports()
    ui.sidebar(reports)
except Exception as e:  # the sidebar must never take the app down
    ui.page_failed(e)
try:
    nav.run()
except Exception as e:
    ui.page_failed(e)
