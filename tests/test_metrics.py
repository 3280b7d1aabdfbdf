"""Prometheus export (textfile and Pushgateway) and alerting rules, checked with the real promtool."""

from __future__ import annotations

import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from lab.expectations import load_profile, write_evaluation
from lab.metrics import build_registry, rules_yaml
from tests.drill_fixtures import WARMUP, make_report

ROOT = Path(__file__).resolve().parent.parent


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool is needed (Debian: apt-get install prometheus; .ci/run installs it)"
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=60)


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture
def report(tmp_path) -> Path:
    d = make_report(tmp_path, "20260101T000000Z-unique-run")
    write_evaluation(d, load_profile("b200-gpt40b"))
    return d


def test_textfile_export_is_valid_and_in_base_units(report, tmp_path, lab_cli):
    path = tmp_path / "collector" / "lab.prom"
    r = lab_cli("metrics", "export", str(report), "--textfile", str(path))
    assert r.returncode == 0, r.stderr
    text = path.read_text()
    check = promtool("check", "metrics", stdin=text)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
        check.stdout + check.stderr
    )
    s = samples(text)
    assert s['lab_decode_tokens_per_second{step="warmup"}'] == 1900.0
    assert s['lab_ttft_seconds{quantile="0.99",step="warmup"}'] == pytest.approx(0.055)
    assert s['lab_e2e_latency_seconds{quantile="0.99",step="loadtest"}'] == pytest.approx(2.4)
    assert s['lab_peak_memory_bytes{step="warmup"}'] == pytest.approx(41e9)
    assert s['lab_tokens_per_joule{step="warmup"}'] == pytest.approx(3.7)
    assert s['lab_power_watts{step="warmup"}'] == 505.0
    assert s['lab_loadtest_requests{outcome="ok",step="loadtest"}'] == 60
    assert (
        s["lab_fallback_recommended"] == 1.0 and s['lab_fallback_trigger{trigger="nvlink_degraded"}'] == 1.0
    )
    assert s["lab_drill_success"] == 1.0
    assert s["lab_drill_last_success_timestamp_seconds"] == s["lab_drill_last_run_timestamp_seconds"] > 1.7e9
    assert s['lab_expectation_status{metric="decode_tokens_per_s"}'] == 0
    assert "# TYPE lab_ttft_seconds summary" in text
    assert s['lab_e2e_latency_seconds_count{step="loadtest"}'] == 60
    # Bounded labels only: never a run id or a path.
    labels = {kv.split("=")[0] for name in s for kv in name.partition("{")[2].rstrip("}").split(",") if kv}
    assert labels <= {"step", "quantile", "outcome", "trigger", "metric", "method"}
    assert "unique-run" not in text and str(tmp_path) not in text
    assert [p.name for p in path.parent.iterdir()] == ["lab.prom"], "no temp files left behind"


def test_failed_drill_keeps_the_last_success_from_an_earlier_report(tmp_path):
    make_report(tmp_path, "old", finished_offset_s=-86400)
    bad = make_report(tmp_path, "new", manifest_status="failed", failed_step="warmup")
    from prometheus_client import generate_latest

    s = samples(generate_latest(build_registry(bad)).decode())
    assert s["lab_drill_success"] == 0.0 and s['lab_drill_step_success{step="warmup"}'] == 0.0
    assert (
        0 < s["lab_drill_last_success_timestamp_seconds"] < s["lab_drill_last_run_timestamp_seconds"] - 80000
    )
    # Values of the failed warm-up are not exported (its artifact is marked failed here).
    only = make_report(tmp_path / "x", "lonely", manifest_status="failed")
    s = samples(generate_latest(build_registry(only)).decode())
    assert s["lab_drill_last_success_timestamp_seconds"] == 0.0


def test_tier_comparison_is_exported(tmp_path):
    from prometheus_client import generate_latest

    from tests.drill_fixtures import step_artifact

    d = make_report(tmp_path)
    step_artifact(d / "tiers.json", {"tokens_per_joule_ratio": 0.55, "p99_latency_ratio": 1.8})
    text = generate_latest(build_registry(d)).decode()
    s = samples(text)
    assert s['lab_fallback_vs_multi_gpu_ratio{quantity="tokens_per_joule",step="tiers"}'] == 0.55
    assert promtool("check", "metrics", stdin=text).returncode == 0


def test_unmeasured_values_are_absent_not_zero(tmp_path):
    warm = {k: v for k, v in WARMUP.items() if k not in ("tokens_per_joule", "power_w_mean")}
    from prometheus_client import generate_latest

    text = generate_latest(build_registry(make_report(tmp_path, warmup=warm))).decode()
    assert 'lab_tokens_per_joule{step="warmup"}' not in text and "lab_power_watts" not in text


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, bytes]] = []

    def do_PUT(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.seen.append((self.command, self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_push_to_a_real_http_gateway(report, lab_cli):
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        r = lab_cli("metrics", "push", str(report), "--gateway", url)
        assert r.returncode == 0, r.stderr
    finally:
        server.shutdown()
    method, path, body = _Recorder.seen[-1]
    assert method == "PUT" and path.startswith("/metrics/job/lab_drill/instance/")
    assert b'lab_decode_tokens_per_second{step="warmup"} 1900.0' in body


def test_push_to_nothing_is_a_clear_error(report, lab_cli):
    r = lab_cli("metrics", "push", str(report), "--gateway", "http://127.0.0.1:9")
    assert r.returncode == 2 and "cannot push to the Pushgateway" in r.stderr


def test_textfile_must_be_prom(report, lab_cli):
    r = lab_cli("metrics", "export", str(report), "--textfile", str(report / "x.txt"))
    assert r.returncode == 2 and "*.prom" in r.stderr


def test_rules_from_a_run_pass_promtool(report, tmp_path, lab_cli):
    out = tmp_path / "rules.yml"
    r = lab_cli("metrics", "rules", str(report), "--out", str(out), "--stale-after-h", "30")
    assert r.returncode == 0, r.stderr
    check = promtool("check", "rules", str(out))
    assert check.returncode == 0, check.stdout + check.stderr
    rules = {x["alert"]: x for x in yaml.safe_load(out.read_text())["groups"][0]["rules"]}
    assert rules["LabDrillStale"]["expr"] == "time() - lab_drill_last_success_timestamp_seconds > 108000"
    # p99 over threshold: the run's 2.4 s envelope plus 25%.
    assert rules["LabE2eMsP99AboveThreshold"]["expr"] == (
        'lab_e2e_latency_seconds{step="loadtest",quantile="0.99"} > 3'
    )
    # tokens/joule drop: 3.7 - 25%, never looser than the profile's fail bound (2.7).
    assert rules["LabTokensPerJouleBelowThreshold"]["expr"] == 'lab_tokens_per_joule{step="warmup"} < 2.775'


@pytest.mark.parametrize("profile", ["b200-gpt40b", "h100-llama8b"])
def test_shipped_rule_files_are_current_and_valid(profile):
    path = ROOT / "ops" / "prometheus" / f"lab-alerts-{profile}.yml"
    assert path.read_text() == rules_yaml(None, load_profile(profile)), (
        f"regenerate: lab metrics rules --profile {profile} --out {path.relative_to(ROOT)}"
    )
    check = promtool("check", "rules", str(path))
    assert check.returncode == 0, check.stdout + check.stderr


def test_nightly_script_gates_and_exports(tmp_path):
    """ops/nightly-drill.sh end to end on a drill-shaped notebook: report, gate, textfile, last-good."""
    from tests.drill_fixtures import make_notebook

    nbs = tmp_path / "nbs"
    make_notebook(nbs / "02_warmup.ipynb", "warmup.json")
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "name: nightly-test\n"
        "metrics:\n  t: {source: warmup.decode_tokens_per_s, expected: 300, direction: higher, warn: 0.1, fail: 0.5}\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LAB": str(ROOT / ".venv" / "bin" / "lab") if (ROOT / ".venv/bin/lab").exists() else "lab",
        "LAB_PROFILE": str(profile),
        "LAB_STEPS": "warmup",
        "LAB_REPORTS": str(tmp_path / "nightly"),
        "LAB_TEXTFILE": str(tmp_path / "lab.prom"),
        "LAB_DRILL_ARGS": f"--notebooks-dir {nbs}",
        "NCCL_P2P_DISABLE": "1",
    }
    r = subprocess.run(
        ["bash", str(ROOT / "ops" / "nightly-drill.sh")], env=env, capture_output=True, text=True, timeout=200
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gate: PASS" in r.stdout
    last_good = Path((tmp_path / "nightly" / "last-good").read_text().strip())
    assert last_good.name.startswith("nightly-") and (last_good / "manifest.json").exists()
    assert "lab_drill_success 1.0" in (tmp_path / "lab.prom").read_text()
