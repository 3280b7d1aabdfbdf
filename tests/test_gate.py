"""`lab gate`: exit codes and one line per violation, through the real CLI."""

from __future__ import annotations

import yaml

from lab.expectations import load_profile
from lab.gate import gate
from tests.drill_fixtures import LOADTEST, WARMUP, make_report


def test_pass_exits_zero(tmp_path, lab_cli):
    d = make_report(tmp_path)
    r = lab_cli("gate", str(d), "--profile", "b200-gpt40b")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("gate: PASS; profile b200-gpt40b")


def test_violations_exit_3_one_line_each(tmp_path, lab_cli):
    d = make_report(
        tmp_path,
        warmup={**WARMUP, "decode_tokens_per_s": 900.0, "tokens_per_joule": 1.0},
        loadtest={**LOADTEST, "e2e_ms_p99": 2900.0},
    )
    r = lab_cli("gate", str(d), "--profile", "b200-gpt40b")
    assert r.returncode == 3, r.stdout + r.stderr
    fails = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL ")]
    assert [ln.split(":")[0] for ln in fails] == ["FAIL decode_tokens_per_s", "FAIL tokens_per_joule"]
    assert any(ln.startswith("warn e2e_ms_p99") for ln in r.stdout.splitlines())
    assert "FAIL (2 violation(s))" in r.stdout


def test_failed_step_is_a_violation(tmp_path):
    d = make_report(tmp_path, failed_step="health", manifest_status="failed")
    res = gate(d, profile="b200-gpt40b")
    assert res.exit_code == 3
    assert res.violations == ["FAIL step health: boom"]


def test_baseline_regression(tmp_path, lab_cli):
    base = make_report(tmp_path, "base")
    slower = make_report(tmp_path, "new", warmup={**WARMUP, "decode_tokens_per_s": 1700.0})
    same = gate(base, profile="b200-gpt40b", baseline=base)
    assert same.exit_code == 0 and not same.violations
    r = lab_cli("gate", str(slower), "--profile", "b200-gpt40b", "--baseline", str(base))
    assert r.returncode == 3, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("REGRESSED")]
    # 1700 is within the expectation's warn band but 10.5% below the baseline (10% allowed).
    assert len(lines) == 1 and lines[0].startswith("REGRESSED decode_tokens_per_s: 1700")
    assert "baseline 1900" in lines[0]


def test_absolute_metric_regression(tmp_path):
    base = make_report(tmp_path, "base")
    new = make_report(tmp_path, "new", loadtest={**LOADTEST, "requests_errored": 1})
    res = gate(new, profile="b200-gpt40b", baseline=base)
    assert any(v.startswith("FAIL requests_errored") for v in res.violations)
    assert any(v.startswith("REGRESSED requests_errored") for v in res.violations)


def test_nightly_warmup_only_directory(tmp_path):
    """The nightly job gates a directory holding only the warm-up: load-test metrics are skipped."""
    d = make_report(tmp_path, manifest_status=None)
    (d / "load_test.json").unlink()
    (d / "health.json").unlink()
    res = gate(d, profile="b200-gpt40b")
    assert res.exit_code == 0, res.violations


def test_default_profile_from_the_drill(tmp_path):
    d = make_report(tmp_path, profile="b200-gpt40b")
    assert gate(d).profile == "b200-gpt40b"


def test_usage_errors_exit_2(tmp_path, lab_cli):
    r = lab_cli("gate", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    d = make_report(tmp_path, manifest_status=None)
    r = lab_cli("gate", str(d))
    assert r.returncode == 2 and "--profile" in r.stderr
    assert "Traceback" not in r.stderr


def test_calibrate_writes_a_profile_the_report_passes(tmp_path, lab_cli):
    d = make_report(tmp_path, warmup={**WARMUP, "decode_tokens_per_s": 160.0, "peak_memory_gb": 17.0})
    out = tmp_path / "h100.yaml"
    r = lab_cli("gate", str(d), "--profile", "h100-llama8b", "--calibrate-to", str(out))
    assert r.returncode == 0, r.stderr
    prof = load_profile(str(out))
    raw = yaml.safe_load(out.read_text())
    assert raw["provisional"] is False and prof.metrics["decode_tokens_per_s"].expected == 160.0
    assert prof.metrics["peak_memory_gb"].expected == 17.0
    assert gate(d, profile=str(out)).exit_code == 0


def test_report_from_another_host_falls_back_to_the_shipped_profile(tmp_path):
    import json

    from lab.expectations import write_evaluation

    d = make_report(tmp_path)
    write_evaluation(d, load_profile("b200-gpt40b"))
    data = json.loads((d / "expectations.json").read_text())
    data["profile_path"] = "/elsewhere/lab/expectations/b200-gpt40b.yaml"
    (d / "expectations.json").write_text(json.dumps(data))
    res = gate(d, baseline=d)
    assert res.exit_code == 0 and res.profile == "b200-gpt40b"
    assert any("metric(s) compared" in n for n in res.notes)
