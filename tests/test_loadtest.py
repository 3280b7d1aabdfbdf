"""The open-loop load test: seeded schedules, accounting under overload, coordinated omission made
impossible, statistics and SLOs, the sweep search, and the playbook's command under torchrun."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from lab.loadtest.client import RequestRecord
from lab.loadtest.runner import LoadTestConfig
from lab.loadtest.schedule import make_schedule
from lab.loadtest.stats import SLO, compute
from lab.loadtest.sweep import best_passing, parse_sweep, search


@pytest.fixture(scope="module")
def model():
    from lab.model import prepare

    return prepare("tiny", None, "cpu", "float32", 0, 4, 128).model


def engine(model, **kw):
    from lab.engine.batching import Engine, EngineConfig

    kw.setdefault("max_seq_len", 128)
    return Engine(model, EngineConfig(**kw)).start()


def quick(**kw) -> LoadTestConfig:
    base = dict(
        duration_s=3.0,
        target_qps=10,
        warmup_s=0.5,
        cooldown_s=0.5,
        prompt_len_min=4,
        prompt_len_max=16,
        max_new_tokens=4,
        progress=False,
        min_requests=1,
        max_dispatch_lag_ms=1000,  # CI machines are shared; lag itself is tested elsewhere
    )
    base.update(kw)
    return LoadTestConfig(**base)


# --- the schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["poisson", "constant", "bursty"])
def test_schedule_is_reproducible_from_the_seed(pattern):
    a = make_schedule(50, 20, seed=3, pattern=pattern, vocab_size=512)
    b = make_schedule(50, 20, seed=3, pattern=pattern, vocab_size=512)
    c = make_schedule(50, 20, seed=4, pattern=pattern, vocab_size=512)
    assert a.to_dict() == b.to_dict()
    assert a.prompt_ids(7) == b.prompt_ids(7) and len(a.prompt_ids(7)) == a.arrivals[7].prompt_len
    if pattern != "constant":
        assert a.to_dict()["arrivals"]["t_s"] != c.to_dict()["arrivals"]["t_s"]
    t = np.array(a.to_dict()["arrivals"]["t_s"])
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < 20
    assert 0.8 * 1000 < len(t) < 1.2 * 1000  # mean rate 50/s over 20 s
    gaps = np.diff(t)
    cv = gaps.std() / gaps.mean()
    assert {"constant": cv < 1e-6, "poisson": 0.85 < cv < 1.15, "bursty": cv > 1.5}[pattern]
    phases = a.to_dict()["arrivals"]["phase"]
    assert phases[0] == "warmup" and phases[-1] == "cooldown" and "measure" in phases


def test_schedule_rejects_bad_parameters():
    from lab.errors import LabError

    with pytest.raises(LabError, match="warmup"):
        make_schedule(3, 4, warmup_s=2, cooldown_s=2)
    with pytest.raises(LabError, match="burst-cv"):
        make_schedule(3, 20, pattern="bursty", burst_cv=0.5)
    with pytest.raises(LabError, match="pattern"):
        make_schedule(3, 20, pattern="zigzag")


# --- statistics ---------------------------------------------------------------------------------


def rec(i, outcome="ok", lag=0.0, ttft=0.1, n=5, step=0.01, phase="measure") -> RequestRecord:
    t = 1.0 + i * 0.1
    r = RequestRecord(i, phase, t, 8, n, t_sent=t + lag, outcome=outcome)
    if outcome == "ok":
        r.t_admitted = t + lag
        r.token_times = [t + ttft + k * step for k in range(n)]
        r.t_first_token, r.t_done, r.output_tokens = r.token_times[0], r.token_times[-1], n
    else:
        r.t_done = t + lag
    return r


def test_failures_count_as_slo_violations_and_accounting_adds_up():
    recs = [
        rec(0),
        rec(1),
        rec(2, ttft=0.9),
        rec(3, "rejected_queue_full"),
        rec(4, "timed_out_in_queue"),
        rec(5, "error"),
        rec(6, phase="warmup"),
    ]
    m = compute(recs, 0.0, (1.0, 3.0), 3.0, SLO(ttft_ms=500), max_dispatch_lag_ms=5, min_requests=1)
    s = m["summary"]
    assert s["requests_sent"] == 6 and s["accounted"] == 6
    assert (s["requests_ok"], s["requests_rejected"], s["requests_timed_out"], s["requests_errored"]) == (
        3,
        1,
        1,
        1,
    )
    assert s["slo_attainment"] == pytest.approx(2 / 6)
    assert s["goodput_rps"] == pytest.approx(2 / 2.0)
    assert s["ttft_ms_count"] == 3 and s["ttft_ms_max"] == pytest.approx(900)
    assert s["tpot_ms_p50"] == pytest.approx(10)
    assert m["distributions"]["itl_ms"]["count"] == 3 * 4
    assert s["valid"] is True


def test_generator_lag_makes_the_run_invalid():
    recs = [rec(i, lag=0.02) for i in range(20)]
    m = compute(recs, 0.0, (0.0, 5.0), 3.0, SLO(), max_dispatch_lag_ms=5, min_requests=10)
    assert m["verdict"]["valid"] is False
    assert "dispatch lag p99 20.00 ms" in m["verdict"]["reasons"][0]
    few = compute(recs[:3], 0.0, (0.0, 5.0), 3.0, SLO(), max_dispatch_lag_ms=50, min_requests=10)
    assert any("only 3 requests" in r for r in few["verdict"]["reasons"])


def test_sweep_search_finds_the_capacity_edge():
    capacity = 13.0
    calls = []

    def run_at(q):
        calls.append(q)
        return {"valid": True, "slo_attainment": 1.0 if q <= capacity else 0.5}

    runs = search(run_at, 2.0, 0.99, max_runs=10, rel_tol=0.05)
    best = best_passing(runs, 0.99)
    assert calls[:4] == [2.0, 4.0, 8.0, 16.0]
    assert 0.95 * capacity <= best <= capacity
    assert parse_sweep("search") == "search" and parse_sweep("4, 1,2") == [1.0, 2.0, 4.0]


# --- real runs against the in-process engine ----------------------------------------------------------


def test_overload_rejects_and_times_out_and_every_request_is_accounted(model, tmp_path):
    from lab.loadtest.session import run_loadtest

    eng = engine(model, max_batch_size=2, max_queue=3, queue_timeout_s=0.25, step_delay_s=0.02)
    try:
        out = tmp_path / "load_test.json"
        art = run_loadtest(quick(target_qps=40, max_new_tokens=8), eng, output_json=out)
    finally:
        eng.stop()
    s = art.summary
    assert s["requests_rejected_queue_full"] > 0 and s["requests_timed_out"] > 0 and s["requests_ok"] > 0
    assert (
        s["requests_ok"]
        + s["requests_rejected"]
        + s["requests_timed_out"]
        + s["requests_errored"]
        + s["requests_cancelled"]
        == s["requests_sent"]
    )
    assert s["slo_attainment"] < 1  # the failures are violations
    rows = [json.loads(x) for x in (tmp_path / "load_test.requests.jsonl").read_text().splitlines()]
    assert len(rows) == len(art.schedule["arrivals"]["t_s"])  # warm-up and cool-down too, marked
    assert {r["phase"] for r in rows} == {"warmup", "measure", "cooldown"}
    ex = art.exclusions
    assert ex["warmup"]["requests_sent"] + ex["cooldown"]["requests_sent"] + s["requests_sent"] == len(rows)
    assert all(r["outcome"] in ("ok", "rejected_queue_full", "timed_out_in_queue") for r in rows)
    assert any(r.get("waiting_max", 0) > 0 for r in art.timeline)


def test_latency_counts_from_the_scheduled_time_when_the_engine_is_slow(model, tmp_path):
    """One slot, >= 0.2 s of service per request (4 ticks of 50 ms), an arrival every 0.1 s: the queue
    grows. A closed-loop tester would report ~0.2 s for everyone; here the waiting shows."""
    from lab.loadtest.session import run_loadtest

    eng = engine(model, max_batch_size=1, max_queue=100, queue_timeout_s=60, step_delay_s=0.05)
    try:
        out = tmp_path / "lt.json"
        cfg = quick(
            duration_s=2.4, target_qps=10, pattern="constant", max_new_tokens=4, warmup_s=0.3, cooldown_s=0.3
        )
        art = run_loadtest(cfg, eng, output_json=out)
    finally:
        eng.stop()
    rows = [json.loads(x) for x in (tmp_path / "lt.requests.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["outcome"] == "ok" and r["phase"] == "measure"]
    for r in ok:
        assert r["e2e_ms"] == pytest.approx((r["t_done"] - r["t_scheduled"]) * 1e3, abs=0.01)
        assert r["e2e_ms"] >= r["queue_wait_ms"] >= r["dispatch_lag_ms"]
    # The generator kept sending on schedule (it did not wait for the slow engine) ...
    lags = sorted(r["dispatch_lag_ms"] for r in ok)
    waits = [r["queue_wait_ms"] for r in ok]
    assert lags[len(lags) // 2] < 50
    # ... so the backlog shows up as queue wait, growing request after request, inside the latency.
    assert waits[-1] > waits[0] + 200
    assert ok[-1]["e2e_ms"] >= waits[-1] + (ok[-1]["t_done"] - ok[-1]["t_admitted"]) * 1e3 - 0.01
    assert art.summary["e2e_ms_max"] >= ok[-1]["e2e_ms"] - 0.01


def test_sweep_list_records_the_curve(model, tmp_path):
    from lab.loadtest.session import run_loadtest

    eng = engine(model, max_batch_size=2, step_delay_s=0.01)
    try:
        art = run_loadtest(
            quick(duration_s=2.0, slo_e2e_ms=60_000), eng, sweep=[4.0, 8.0], output_json=tmp_path / "s.json"
        )
    finally:
        eng.stop()
    assert [p["target_qps"] for p in art.sweep["curve"]] == [4.0, 8.0]
    assert art.sweep["max_qps_meeting_slo"] == 8.0 and art.summary["max_qps_meeting_slo"] == 8.0
    rows = [json.loads(x) for x in (tmp_path / "s.requests.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == {"qps=4", "qps=8"}


# --- the CLI ------------------------------------------------------------------------------------------


def test_smaller_world_is_refused_without_the_flag(lab_cli, tmp_path):
    r = lab_cli("loadtest", "--duration", "2", "--output-json", str(tmp_path / "x.json"))
    assert r.returncode == 2
    assert (
        "smaller than the expected tensor-parallel world 8" in r.stderr
        and "--allow-smaller-world" in r.stderr
    )
    assert "Traceback" not in r.stderr and not (tmp_path / "x.json").exists()
    bad = lab_cli(
        "loadtest", "--allow-smaller-world", "--duration", "2", "--warmup-s", "1", "--cooldown-s", "1"
    )
    assert bad.returncode == 2 and "must be less than --duration" in bad.stderr


def test_playbook_command_under_torchrun(tmp_path, repo_root):
    """The playbook's command, `torchrun --nproc_per_node=1 -m lab loadtest ...` (shortened)."""
    import os
    import subprocess

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun ships with torch; the venv should have it"
    out = tmp_path / "single_gpu_fallback" / "load_test.json"
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    env.pop("MODEL_PATH", None)
    r = subprocess.run(
        [
            torchrun,
            "--nproc_per_node=1",
            "-m",
            "lab",
            "loadtest",
            "--duration",
            "4",
            "--target-qps",
            "3",
            "--max-new-tokens",
            "4",
            "--prompt-len-min",
            "32",
            "--prompt-len-max",
            "64",
            "--allow-smaller-world",
            "--warmup-s",
            "0.5",
            "--cooldown-s",
            "0.5",
            "--min-requests",
            "1",
            "--max-dispatch-lag-ms",
            "1000",
            "--output-json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=repo_root,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    from lab.results import read_artifact

    art = read_artifact(out)
    assert art.kind == "loadtest" and art.params["world_size"] == 1 and art.params["rank"] == 0
    for key in (
        "requests_sent",
        "requests_ok",
        "requests_rejected",
        "requests_timed_out",
        "requests_errored",
        "target_qps",
        "achieved_qps",
        "output_tokens_per_s",
        "ttft_ms_p50",
        "ttft_ms_p99",
        "tpot_ms_p50",
        "tpot_ms_p99",
        "e2e_ms_p50",
        "e2e_ms_p99",
        "dispatch_lag_ms_p99",
        "goodput_rps",
        "slo_attainment",
        "tokens_per_joule",
        "valid",
    ):
        assert key in art.summary
    assert art.summary["tokens_per_joule"] is None and "tokens_per_joule" in art.unavailable
    assert "load test: VALID" in r.stdout
    assert "load test @ 3 QPS" in r.stderr  # the progress bar


@pytest.mark.slow
def test_notebook_04_runs_under_papermill(repo_root, tmp_path):
    import papermill as pm

    from lab.results import read_artifact

    out = tmp_path / "report"
    pm.execute_notebook(
        str(repo_root / "notebooks" / "04_load_test.ipynb"),
        str(tmp_path / "04_out.ipynb"),
        parameters={
            "output_dir": str(out),
            "preset": "tiny",
            "device": "cpu",
            "duration": 3.0,
            "target_qps": 5.0,
            "prompt_len_min": 8,
            "prompt_len_max": 16,
            "max_dispatch_lag_ms": 1000.0,
        },
        kernel_name="python3",
        cwd=str(repo_root),
        progress_bar=False,
    )
    art = read_artifact(out / "load_test.json")
    assert art.kind == "loadtest" and art.status == "ok" and art.summary["requests_sent"] > 0
    assert (out / "load_test.requests.jsonl").exists()
    nb = json.loads((tmp_path / "04_out.ipynb").read_text())
    figures = [
        o
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if "application/vnd.plotly.v1+json" in o.get("data", {})
    ]
    assert len(figures) == 4  # CDFs, timeline, TTFT vs prompt length, outcomes
