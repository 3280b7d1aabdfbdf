"""The collective probe on real child processes (gloo on CPU): a clean all_reduce measures bandwidth, a
rank that sleeps past the deadline and a rank that dies are both detected within the deadline, and no
process is left behind."""

from __future__ import annotations

import time

import psutil
import pytest

from lab.health.probe import run_collective_probe
from lab.results import read_artifact


def _assert_no_probe_left(pids: list[int]) -> None:
    assert pids, "the probe started no process"
    for pid in pids:
        if psutil.pid_exists(pid):
            try:
                status = psutil.Process(pid).status()
            except psutil.NoSuchProcess:
                continue
            assert status == psutil.STATUS_ZOMBIE, f"probe rank pid {pid} still alive ({status})"
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        assert "lab.health.probe_worker" not in cmd, f"leftover probe process {child.pid}: {cmd}"


def test_probe_ok_measures_bus_bandwidth():
    res = run_collective_probe(2, "gloo", timeout_s=120, size_bytes=1 << 20, iters=3)
    assert res.outcome == "ok", res.detail
    assert res.busbw_gbps is not None and res.busbw_gbps > 0
    assert res.algbw_gbps == pytest.approx(res.size_bytes / res.iter_s_median / 1e9, rel=1e-2)
    assert res.iter_s_min <= res.iter_s_median <= res.iter_s_max
    assert [r["rank"] for r in res.ranks] == [0, 1] and all(r["correct"] for r in res.ranks)
    _assert_no_probe_left(res.pids)


def test_rank_that_sleeps_past_the_deadline_is_a_hang(monkeypatch):
    monkeypatch.setenv("LAB_PROBE_FAULT", "hang:1")
    timeout_s = 12.0
    t0 = time.monotonic()
    res = run_collective_probe(2, "gloo", timeout_s=timeout_s, size_bytes=1 << 16, iters=2)
    elapsed = time.monotonic() - t0
    assert res.outcome == "hang", res.detail
    assert "did not finish within 12 s" in res.detail
    assert timeout_s <= elapsed < timeout_s + 8
    _assert_no_probe_left(res.pids)


def test_rank_that_dies_is_detected_before_the_deadline(monkeypatch):
    monkeypatch.setenv("LAB_PROBE_FAULT", "die:1")
    timeout_s = 90.0
    t0 = time.monotonic()
    res = run_collective_probe(2, "gloo", timeout_s=timeout_s, size_bytes=1 << 16, iters=2)
    elapsed = time.monotonic() - t0
    assert res.outcome == "rank_failed", res.detail
    assert "exited with code" in res.detail
    assert elapsed < timeout_s / 2
    _assert_no_probe_left(res.pids)


def test_cli_dead_rank_gives_nccl_hang_and_exit_3(lab_cli, tmp_path):
    out = tmp_path / "health.json"
    r = lab_cli(
        "health",
        "--world-size",
        "2",
        "--collective-timeout-s",
        "90",
        "--output-json",
        str(out),
        env={"LAB_PROBE_FAULT": "die:0"},
        timeout=200,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    art = read_artifact(out)
    assert art.decision.triggers == ["nccl_hang"]
    (c,) = [c for c in art.checks if c.name == "collective"]
    assert c.status == "fail" and c.trigger == "nccl_hang" and "rank" in c.detail
    assert art.collective["outcome"] == "rank_failed" and art.collective["backend"] == "gloo"
    assert "unset NCCL_P2P_DISABLE NCCL_P2P_LEVEL" in art.fix_commands
    _assert_no_probe_left(art.collective["pids"])
