"""lab health through the real CLI entry point with an injected fake NVML: each fault gives the right
trigger, exit code, artifact and fix lines; usage errors write nothing."""

from __future__ import annotations

import json

import pytest

from lab.cli import main
from lab.health import check
from lab.health.fake_nvml import FakeGpu, FakeNvml, h100_node
from lab.health.nvml import NvmlUnavailable, parse_xids, read_nvlink
from lab.health.report import HealthArtifact
from lab.results import read_artifact

UNSET = "unset NCCL_P2P_DISABLE NCCL_P2P_LEVEL"


def _no_kernel_log() -> list[str]:
    raise PermissionError("dmesg: read kernel buffer failed: Operation not permitted")


def _run(monkeypatch, tmp_path, nv, *argv, env=None, cuda=0, kernel=_no_kernel_log, probe=None):
    def load():
        if isinstance(nv, Exception):
            raise nv
        return nv

    src = check.Sources(
        load_nvml=load,
        kernel_log=kernel,
        cuda_device_count=lambda: cuda,
        cuda_peer=lambda i, j: True,
        env=env or {},
    )
    if probe is not None:
        src.probe = probe
    monkeypatch.setattr(check, "default_sources", lambda: src)
    out = tmp_path / "health.json"
    rc = main(["health", "--output-json", str(out), *argv])
    art = read_artifact(out) if out.exists() else None
    return rc, art


def _checks(art: HealthArtifact, name: str) -> list:
    return [c for c in art.checks if c.name == name]


def test_healthy_node_exits_0(monkeypatch, tmp_path, capsys):
    rc, art = _run(monkeypatch, tmp_path, h100_node(8), "--world-size", "0")
    assert rc == 0
    assert isinstance(art, HealthArtifact) and art.kind == "health" and art.status == "ok"
    assert art.decision.fallback_recommended is False and art.decision.triggers == []
    assert art.fix_commands == []
    assert len(art.gpus) == 8 and all(g.nvlink_active_links == 18 for g in art.gpus)
    assert {c.status for c in _checks(art, "nvlink")} == {"ok"}
    assert art.summary["nvlink_active_links_min"] == 18 and art.summary["exit_code"] == 0
    assert art.gpus[0].memory_total_gb == 85.52 and art.gpus[0].compute_capability == "9.0"
    out = capsys.readouterr().out
    assert "HEALTHY (exit 0)" in out and "18 of 18 NVLink links active" in out


@pytest.mark.parametrize("count_field", [True, False])
def test_degraded_nvlink_12_of_18(monkeypatch, tmp_path, capsys, count_field):
    nv = h100_node(8, link_count_field=count_field)
    nv.gpus[3].nvlink_down = tuple(range(12, 18))
    rc, art = _run(monkeypatch, tmp_path, nv, "--world-size", "0")
    assert rc == 3
    assert art.decision.fallback_recommended and art.decision.triggers == ["nvlink_degraded"]
    (bad,) = [c for c in _checks(art, "nvlink") if c.status == "fail"]
    assert (bad.gpu, bad.value, bad.threshold, bad.trigger) == (3, 12, 18, "nvlink_degraded")
    assert "12 of 18" in bad.detail and "12 of 18" in art.decision.reasons[0]
    assert art.gpus[3].nvlink_links_reported == 18 and art.gpus[3].nvlink_inactive == list(range(12, 18))
    # The playbook's step 2, exactly.
    assert art.fix_commands == [UNSET, "export CUDA_VISIBLE_DEVICES=0"]
    out = capsys.readouterr().out
    assert "FALLBACK RECOMMENDED (exit 3)" in out and "export CUDA_VISIBLE_DEVICES=0" in out


def test_threshold_flag_and_device_with_fewer_links(monkeypatch, tmp_path):
    nv = h100_node(2)
    nv.gpus[1].nvlink_down = tuple(range(12, 18))
    rc, art = _run(monkeypatch, tmp_path, nv, "--world-size", "0", "--min-nvlink-links", "12")
    assert rc == 0 and art.decision.triggers == []
    # An A100-like device with 12 links against the default 18: the message says how to fix the threshold.
    rc, art = _run(monkeypatch, tmp_path, h100_node(1, nvlink_links=12), "--world-size", "0")
    assert rc == 3
    assert "this device has only 12 links" in _checks(art, "nvlink")[0].detail


def test_uncorrected_ecc_is_gpu_fault_and_moves_the_fallback_gpu(monkeypatch, tmp_path):
    nv = h100_node(4)
    nv.gpus[0].ecc_uncorrected_volatile = 3
    rc, art = _run(monkeypatch, tmp_path, nv, "--world-size", "0")
    assert rc == 3 and art.decision.triggers == ["gpu_fault"]
    (ecc,) = [c for c in _checks(art, "ecc") if c.status == "fail"]
    assert ecc.gpu == 0 and ecc.value == 3
    assert art.decision.fallback_gpu == 1 and art.decision.fallback_viable is True
    assert art.fix_commands[0] == UNSET
    assert art.fix_commands[-1] == "export CUDA_VISIBLE_DEVICES=1"
    assert any(c.startswith("export CUDA_DEVICE_ORDER=PCI_BUS_ID") for c in art.fix_commands)
    assert art.summary["ecc_uncorrected_volatile_total"] == 3


def test_lifetime_ecc_warns_only(monkeypatch, tmp_path):
    rc, art = _run(monkeypatch, tmp_path, h100_node(1, ecc_uncorrected_aggregate=5), "--world-size", "0")
    assert rc == 0 and _checks(art, "ecc")[0].status == "warn"


def test_remapped_rows_failure_and_pending(monkeypatch, tmp_path):
    nv = h100_node(3)
    nv.gpus[1].remapped_rows = (0, 2, 0, 1)
    nv.gpus[2].remapped_rows = (0, 1, 1, 0)
    rc, art = _run(monkeypatch, tmp_path, nv, "--world-size", "0")
    assert rc == 3 and art.decision.triggers == ["gpu_fault"]
    by_gpu = {c.gpu: c.status for c in _checks(art, "remapped_rows")}
    assert by_gpu == {0: "ok", 1: "fail", 2: "warn"}
    assert any(c.startswith("nvidia-smi --gpu-reset -i 2") for c in art.fix_commands)
    assert art.decision.fallback_gpu == 0


def test_all_gpus_faulty_blocks_the_fallback(monkeypatch, tmp_path, capsys):
    rc, art = _run(monkeypatch, tmp_path, h100_node(2, ecc_uncorrected_volatile=1), "--world-size", "0")
    assert rc == 3 and art.decision.fallback_viable is False and art.decision.fallback_gpu is None
    assert "no healthy GPU" in art.decision.blockers[0]
    assert "NOT viable" in capsys.readouterr().out


def test_thermal_slowdown_warns_without_trigger(monkeypatch, tmp_path):
    nv = h100_node(2)
    nv.gpus[1].clock_event_reasons = 0x40 | 0x4  # hw thermal slowdown + power cap
    nv.gpus[1].temperature_c = 91
    rc, art = _run(monkeypatch, tmp_path, nv, "--world-size", "0")
    assert rc == 0 and art.decision.triggers == []
    clocks = {c.gpu: c for c in _checks(art, "clocks")}
    assert clocks[0].status == "ok" and clocks[1].status == "warn"
    assert "hw_thermal_slowdown" in clocks[1].detail and "91 C" in clocks[1].detail
    assert art.gpus[1].clock_event_reasons == ["sw_power_cap", "hw_thermal_slowdown"]


def test_pcie_width_degraded_warns(monkeypatch, tmp_path):
    rc, art = _run(monkeypatch, tmp_path, h100_node(1, pcie=(5, 5, 8, 16)), "--world-size", "0")
    assert rc == 0 and _checks(art, "pcie")[0].status == "warn"


def _loadtest(path, qps, tokens=None, kind="loadtest", target=None, ok=None, window_s=None, valid=True):
    summary = {"achieved_qps": qps, "output_tokens_per_s": tokens, "valid": valid}
    if target is not None:
        summary["target_qps"] = target
    if ok is not None:
        summary.update(requests_ok=ok, measure_window_s=window_s)
    path.write_text(json.dumps({"schema_version": 1, "kind": kind, "status": "ok", "summary": summary}))
    return str(path)


def test_nvlink_not_supported_is_a_state_not_a_crash(monkeypatch, tmp_path, capsys):
    for count_field in (True, False):
        rc, art = _run(
            monkeypatch,
            tmp_path,
            h100_node(2, nvlink_links=None, link_count_field=count_field),
            "--world-size",
            "0",
        )
        assert rc == 0
        for c in _checks(art, "nvlink"):
            assert c.status == "skipped" and "NVLink not supported on this device" in c.detail
        assert art.gpus[0].nvlink_supported is False
    assert "NVLink not supported on this device" in capsys.readouterr().out


def test_pcie_only_qps_drop(monkeypatch, tmp_path):
    pcie = h100_node(2, nvlink_links=None, name="NVIDIA H100 PCIe")
    base = _loadtest(tmp_path / "base.json", 10.0, 1850.0, target=10)
    drop35 = _loadtest(tmp_path / "cur35.json", 6.5, 1200.0, target=10)
    drop30 = _loadtest(tmp_path / "cur30.json", 7.0, 1300.0, target=10)
    args = ("--world-size", "0", "--baseline", base)

    rc, art = _run(monkeypatch, tmp_path, pcie, *args, "--current", drop35)
    assert rc == 3 and art.decision.triggers == ["pcie_only_qps_drop"]
    (q,) = _checks(art, "qps_drop")
    assert (
        q.value == pytest.approx(0.35)
        and "35%" in q.detail
        and art.summary["qps_drop_fraction"] == pytest.approx(0.35)
    )

    rc, art = _run(monkeypatch, tmp_path, pcie, *args, "--current", drop30)  # exactly 30 %: not over it
    assert rc == 0 and _checks(art, "qps_drop")[0].status == "ok"

    rc, art = _run(monkeypatch, tmp_path, pcie, *args, "--current", drop30, "--qps-drop-threshold", "0.2")
    assert rc == 3 and art.decision.triggers == ["pcie_only_qps_drop"]

    # Same drop with NVLink up: a warning, not the PCIe-only trigger.
    rc, art = _run(monkeypatch, tmp_path, h100_node(2), *args, "--current", drop35)
    assert rc == 0 and _checks(art, "qps_drop")[0].status == "warn"
    assert "GPUs have NVLink" in _checks(art, "qps_drop")[0].detail


def test_fits_anywhere(monkeypatch, tmp_path):
    rc, art = _run(
        monkeypatch,
        tmp_path,
        h100_node(8),
        "--world-size",
        "0",
        "--fits-anywhere",
        "--preset",
        "gpt-40b",
        "--dtype",
        "fp8",
    )
    assert rc == 3 and art.decision.triggers == ["fits_anywhere"]
    assert art.decision.fallback_viable is True
    assert art.memory_plan["preset"] == "gpt-40b" and art.memory_plan["fits"] is True


def test_memory_that_does_not_fit_blocks_the_fallback(monkeypatch, tmp_path):
    rc, art = _run(
        monkeypatch,
        tmp_path,
        h100_node(2),
        "--world-size",
        "0",
        "--fits-anywhere",
        "--preset",
        "gpt-40b",
        "--dtype",
        "bfloat16",
    )
    assert rc == 3
    (m,) = _checks(art, "memory_headroom")
    assert m.status == "fail" and "what would fit" in m.detail
    assert art.decision.fallback_viable is False and art.decision.blockers


def test_nccl_env_hygiene(monkeypatch, tmp_path):
    env = {"NCCL_P2P_LEVEL": "LOC", "NCCL_DEBUG": "WARN", "CUDA_VISIBLE_DEVICES": "0"}
    rc, art = _run(monkeypatch, tmp_path, h100_node(2), "--world-size", "0", env=env)
    assert rc == 0
    (c,) = _checks(art, "nccl_env")
    assert c.status == "warn" and "NCCL_P2P_LEVEL=LOC" in c.detail and c.value["NCCL_DEBUG"] == "WARN"
    assert art.fix_commands == [UNSET]
    assert _checks(art, "cuda_visible_devices")[0].status == "ok"
    rc, art = _run(
        monkeypatch, tmp_path, h100_node(2), "--world-size", "0", env={"CUDA_VISIBLE_DEVICES": "5"}
    )
    assert _checks(art, "cuda_visible_devices")[0].status == "warn"


def test_xids_from_kernel_log(monkeypatch, tmp_path):
    lines = [
        "[  12.0] NVRM: Xid (PCI:0000:28:00): 74, pid=991, name=python, NVLink: fatal error",
        "unrelated",
    ]
    rc, art = _run(monkeypatch, tmp_path, h100_node(2), "--world-size", "0", kernel=lambda: lines)
    assert rc == 0
    xid = {c.gpu: c for c in _checks(art, "xid")}
    assert xid[0].status == "ok" and xid[1].status == "warn" and "XID 74" in xid[1].detail
    assert art.gpus[1].xids == [74]
    rc, art = _run(monkeypatch, tmp_path, h100_node(1), "--world-size", "0")
    (x,) = _checks(art, "xid")
    assert x.status == "skipped" and "not readable" in x.detail
    assert parse_xids(["NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus"]) == {(0, 0x3B, 0): [79]}


def test_nvml_broken_while_cuda_sees_gpus_exits_1(monkeypatch, tmp_path):
    err = NvmlUnavailable("NVML not available: Driver/library version mismatch")
    rc, art = _run(monkeypatch, tmp_path, err, "--world-size", "0", "--device", "cpu", cuda=1)
    assert rc == 1 and art.status == "failed" and "version mismatch" in art.reason
    assert _checks(art, "nvml")[0].could_not_run


def test_nvml_absent_skips_with_reason(monkeypatch, tmp_path):
    rc, art = _run(
        monkeypatch, tmp_path, NvmlUnavailable("NVML not available: NVML Shared Library Not Found")
    )
    assert rc == 0 and art.status == "ok"
    for name in ("nvml", "nvlink", "ecc", "remapped_rows", "clocks", "pcie", "xid"):
        (c,) = _checks(art, name)
        assert c.status == "skipped" and "Shared Library Not Found" in c.detail
    assert _checks(art, "collective")[0].status == "skipped"
    assert art.summary["nvlink_active_links_min"] is None and "nvlink_active_links_min" in art.unavailable


def test_dead_rank_from_probe_is_nccl_hang(monkeypatch, tmp_path):
    from lab.health.probe import ProbeResult

    def probe(world, backend, timeout_s):
        assert (world, backend) == (2, "nccl")
        return ProbeResult("rank_failed", backend, world, timeout_s, 1.2, "rank 1 exited with code 17")

    rc, art = _run(monkeypatch, tmp_path, h100_node(2), cuda=2, probe=probe)
    assert rc == 3 and art.decision.triggers == ["nccl_hang"]
    assert art.collective["outcome"] == "rank_failed"
    assert art.summary["collective_outcome"] == "rank_failed"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--baseline", "x.json"], "--baseline and --current go together"),
        (["--world-size", "4"], "needs one GPU per rank"),
        (["--preset", "nope"], "unknown preset"),
        (["--min-nvlink-links", "-1"], "--min-nvlink-links"),
        (["--qps-drop-threshold", "1"], "below 1"),
        (["--dtype", "int4"], "unknown --dtype"),
    ],
)
def test_usage_errors_exit_2_and_write_nothing(monkeypatch, tmp_path, capsys, argv, needle):
    rc, art = _run(monkeypatch, tmp_path, h100_node(2), *argv, cuda=2)
    assert rc == 2 and art is None
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_baseline_must_be_a_load_test(monkeypatch, tmp_path, capsys):
    health = _loadtest(tmp_path / "h.json", 1.0, kind="health")
    cur = _loadtest(tmp_path / "c.json", 1.0)
    rc, art = _run(monkeypatch, tmp_path, h100_node(1), "--baseline", health, "--current", cur)
    assert rc == 2 and art is None and "expected a 'loadtest' artifact" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    rc, art = _run(
        monkeypatch, tmp_path, h100_node(1), "--baseline", str(tmp_path / "bad.json"), "--current", cur
    )
    assert rc == 2 and art is None and "corrupt JSON" in capsys.readouterr().err


def test_read_nvlink_counts_what_the_device_reports():
    nv = FakeNvml(gpus=[FakeGpu(nvlink_links=4, link_count_field=False, nvlink_down=(2,))])
    st = read_nvlink(nv, 0)
    assert (st.supported, st.links_reported, st.active, st.inactive) == (True, 4, 3, [2])


def test_real_cli_on_this_machine(lab_cli, tmp_path):
    """No NVIDIA GPU here: NVML checks skipped with the reason, exit 0, a valid artifact; --json prints it."""
    out = tmp_path / "health.json"
    r = lab_cli("health", "--output-json", str(out), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    art = read_artifact(out)
    assert isinstance(art, HealthArtifact) and printed["decision"] == art.decision.model_dump()
    assert art.environment.hostname and art.params["min_nvlink_links"] == 18
    nvml = [c for c in art.checks if c.name == "nvml"][0]
    assert nvml.status == "skipped" and nvml.detail
    h = lab_cli("health", "--help", timeout=60)
    assert (
        h.returncode == 0 and "3  fallback recommended" in h.stdout and "1  a check could not run" in h.stdout
    )


def test_unexpected_driver_error_is_a_failed_artifact_exit_1(monkeypatch, tmp_path, capsys):
    nv = h100_node(2)

    def lost(h, link):
        raise RuntimeError("GPU is lost")

    nv.nvmlDeviceGetNvLinkState = lost
    rc, art = _run(monkeypatch, tmp_path, nv, "--world-size", "0")
    assert rc == 1 and art.status == "failed" and "GPU is lost" in art.reason and art.exit_code == 1
    assert "INCOMPLETE (exit 1)" in capsys.readouterr().out


def test_qps_drop_uses_served_rate_and_distrusts_invalid_runs(monkeypatch, tmp_path):
    """Open loop: achieved_qps counts requests sent on schedule; the served rate (ok / window) is what
    the server sustained. An INVALID run is not grounds for a fallback."""
    pcie = h100_node(1, nvlink_links=None)
    base = _loadtest(tmp_path / "b.json", 3.0, target=3, ok=60, window_s=20.0)  # 3.0 served
    cur = _loadtest(tmp_path / "c.json", 3.0, target=3, ok=36, window_s=20.0)  # 1.8 served: -40 %
    rc, art = _run(monkeypatch, tmp_path, pcie, "--world-size", "0", "--baseline", base, "--current", cur)
    (q,) = _checks(art, "qps_drop")
    assert rc == 3 and q.value == pytest.approx(0.4) and "served QPS" in q.detail
    lagged = _loadtest(tmp_path / "l.json", 1.8, target=3, ok=36, window_s=20.0, valid=False)
    rc, art = _run(monkeypatch, tmp_path, pcie, "--world-size", "0", "--baseline", base, "--current", lagged)
    (q,) = _checks(art, "qps_drop")
    assert rc == 0 and q.status == "warn" and "re-run it" in q.detail


def test_pcie_card_without_bridge_is_pcie_only_not_degraded(monkeypatch, tmp_path):
    nv = h100_node(2, name="NVIDIA H100 PCIe", nvlink_down=tuple(range(18)))
    rc, art = _run(monkeypatch, tmp_path, nv, "--world-size", "0")
    assert rc == 0 and art.decision.triggers == []
    assert all(c.status == "skipped" and "PCIe-only" in c.detail for c in _checks(art, "nvlink"))
    base = _loadtest(tmp_path / "b.json", 10.0)
    cur = _loadtest(tmp_path / "c.json", 5.0)
    rc, art = _run(monkeypatch, tmp_path, nv, "--world-size", "0", "--baseline", base, "--current", cur)
    assert rc == 3 and art.decision.triggers == ["pcie_only_qps_drop"]
    # The same links all down on an SXM board is a degraded fabric.
    rc, art = _run(monkeypatch, tmp_path, h100_node(2, nvlink_down=tuple(range(18))), "--world-size", "0")
    assert rc == 3 and art.decision.triggers == ["nvlink_degraded"]
