"""A real browser against a real server: `lab dashboard` (streamlit run) on 127.0.0.1, headless
Chromium driven by Playwright, every page opened, no error element, a screenshot of each under
test-artifacts/. Skipped only where /usr/bin/chromium is absent outside CI (.ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "reports"
CHROMIUM = "/usr/bin/chromium"
LATEST = "20261126T020000Z-fixture-host"  # the synthetic GPU-like drill: every figure has data
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# (url path, the page's title) — url paths are dashboard/app.py's PAGES
PAGES = [
    ("", "Overview"),
    ("health", "Health"),
    ("warmup", "Warm-up"),
    ("compare", "Eager vs compiled"),
    ("loadtest", "Load test"),
    ("capacity", "Capacity planner"),
    ("history", "History"),
]

pytestmark = pytest.mark.slow
if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=f"{CHROMIUM} absent (apt-get install chromium)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"lab dashboard exited with {proc.returncode}: {out[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("the dashboard did not become healthy within 60 s")


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab", "dashboard", "--reports", str(FIXTURES), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, port, proc
    finally:
        # `lab dashboard` execs into the server, so this is its process group: nothing is left behind
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue


def test_lab_dashboard_is_the_server_process(server) -> None:
    import psutil

    proc = psutil.Process(server[2].pid)
    assert "streamlit" in " ".join(proc.cmdline())  # exec'd: a signal to `lab dashboard` reaches the server
    assert not proc.children()


def test_server_binds_loopback_only(server) -> None:
    import psutil

    proc, port = server[2], server[1]
    family = psutil.Process(proc.pid)
    listening = [
        c.laddr
        for p in [family, *family.children(recursive=True)]
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listening, f"nothing listens on port {port}"
    assert {a.ip for a in listening} == {"127.0.0.1"}


def test_every_page_in_a_real_browser(server) -> None:
    from playwright.sync_api import sync_playwright

    url = server[0]
    shots = ROOT / "test-artifacts" / "dashboard"
    if shots.exists():
        shutil.rmtree(shots)
    shots.mkdir(parents=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2600})
            for path, title in PAGES:
                page.goto(f"{url}/{path}?run={LATEST}", wait_until="domcontentloaded")
                page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=30_000)
                # wait for the script run to finish (the status widget shows while it runs)
                page.wait_for_function(
                    "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=30_000
                )
                if path != "capacity":  # every other page draws figures for this run
                    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
                if path != "history":  # the page names the run (waited for: the script may still be running)
                    page.get_by_text(f"run {LATEST}").first.wait_for(timeout=30_000)
                page.screenshot(path=str(shots / f"{path or 'overview'}.png"), full_page=True)
                assert page.locator('[data-testid="stException"]').count() == 0, f"traceback on /{path}"
                errors = page.locator('[data-testid="stAlertContentError"]').all_inner_texts()
                assert not any("could not render" in e for e in errors), f"/{path}: {errors}"
        finally:
            browser.close()
    assert sorted(p.name for p in shots.iterdir()) == sorted(f"{p or 'overview'}.png" for p, _ in PAGES)
