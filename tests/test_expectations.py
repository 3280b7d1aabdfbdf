"""Capacity-expectation profiles and their evaluation against synthetic drill reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.errors import LabError
from lab.expectations import (
    ExpectationsReport,
    evaluate,
    list_profiles,
    load_profile,
    profile_for_environment,
    write_evaluation,
)
from lab.results import STEP_FILES, read_artifact
from tests.drill_fixtures import LOADTEST, WARMUP, make_report


def by_metric(ev: ExpectationsReport) -> dict:
    return {m.metric: m for m in ev.metrics}


def test_shipped_profiles_load_and_name_known_steps():
    assert {"b200-gpt40b", "h100-llama8b", "cpu-tiny"} <= set(list_profiles())
    for name in list_profiles():
        prof = load_profile(name)
        assert prof.drill.get("preset"), name
        for metric, spec in prof.metrics.items():
            for src in spec.source:
                step = src.split(".")[0]
                assert step in (*STEP_FILES, "derived", "tiers", "compare_tiers"), (name, metric, src)


def test_b200_profile_holds_the_playbook_figures():
    prof = load_profile("b200-gpt40b")
    m = prof.metrics
    assert m["decode_tokens_per_s"].expected == 1850 and m["decode_tokens_per_s"].direction == "higher"
    assert m["e2e_ms_p99"].expected == 2500 and m["e2e_ms_p99"].direction == "lower"
    assert m["peak_memory_gb"].expected == 42
    assert m["memory_free_gb"].bounds(m["memory_free_gb"].fail)[0] == pytest.approx(6.0)
    assert m["power_w_mean"].expected == 510 and m["power_w_mean"].direction == "target"
    assert m["tokens_per_joule"].expected == 3.6
    assert m["tokens_per_joule_vs_multi_gpu"].expected == 0.52
    lt = prof.drill["parameters"]["loadtest"]
    assert (lt["duration"], lt["target_qps"], lt["max_new_tokens"]) == (20, 3, 4)
    assert not prof.provisional
    h100 = load_profile("h100-llama8b")  # calibrated from the committed H100 drill
    assert not h100.provisional and "reports/examples/h100-llama8b-drill" in h100.provenance


def test_profile_chosen_by_gpu_name():
    assert profile_for_environment([]) == "cpu-tiny"
    assert profile_for_environment(["NVIDIA H100 80GB HBM3"]) == "h100-llama8b"
    assert profile_for_environment(["NVIDIA B200"]) == "b200-gpt40b"
    with pytest.raises(LabError, match="--profile"):
        profile_for_environment(["Tesla T4"])


def test_within_expectations_passes_with_alert_thresholds_from_the_run(tmp_path):
    ev = evaluate(make_report(tmp_path), load_profile("b200-gpt40b"))
    m = by_metric(ev)
    assert ev.verdict == "pass"
    assert m["decode_tokens_per_s"].status == "pass" and m["decode_tokens_per_s"].measured == 1900
    # The envelope plus the 25% margin, capped at the fail bound (2500 * 1.3 = 3250).
    assert m["e2e_ms_p99"].alert_above == pytest.approx(2400 * 1.25)
    assert m["decode_tokens_per_s"].alert_below == pytest.approx(1900 * 0.75)
    assert m["memory_free_gb"].measured == pytest.approx(180 - 41)
    assert m["power_w_mean"].alert_above is not None and m["power_w_mean"].alert_below is not None
    # Not measured by this drill: skipped, not failed.
    assert m["tokens_per_joule_vs_multi_gpu"].status == "skipped"


def test_alert_threshold_never_looser_than_the_fail_bound(tmp_path):
    ev = evaluate(
        make_report(tmp_path, loadtest={**LOADTEST, "e2e_ms_p99": 3000.0}), load_profile("b200-gpt40b")
    )
    m = by_metric(ev)["e2e_ms_p99"]
    assert m.status == "warn"
    assert m.alert_above == pytest.approx(3250.0)


def test_warn_and_fail_bands(tmp_path):
    prof = load_profile("b200-gpt40b")
    warn = evaluate(make_report(tmp_path, "w", warmup={**WARMUP, "decode_tokens_per_s": 1600.0}), prof)
    assert by_metric(warn)["decode_tokens_per_s"].status == "warn" and warn.verdict == "warn"
    fail = evaluate(make_report(tmp_path, "f", warmup={**WARMUP, "decode_tokens_per_s": 1000.0}), prof)
    row = by_metric(fail)["decode_tokens_per_s"]
    assert row.status == "fail" and fail.verdict == "fail"
    assert "1000" in row.detail and "1850" in row.detail
    low_power = evaluate(make_report(tmp_path, "p", warmup={**WARMUP, "power_w_mean": 300.0}), prof)
    assert by_metric(low_power)["power_w_mean"].status == "fail"


def test_required_metric_not_measured_fails_and_says_why(tmp_path):
    warm = {k: v for k, v in WARMUP.items() if k != "tokens_per_joule"}
    ev = evaluate(make_report(tmp_path, warmup=warm), load_profile("b200-gpt40b"))
    row = by_metric(ev)["tokens_per_joule"]
    assert row.status == "missing" and ev.verdict == "fail"
    assert "not in the summary" in row.detail


def test_failed_step_in_manifest_is_missing_not_skipped(tmp_path):
    d = make_report(tmp_path, failed_step="loadtest")
    (d / "load_test.json").unlink()
    ev = evaluate(d, load_profile("b200-gpt40b"))
    row = by_metric(ev)["e2e_ms_p99"]
    assert row.status == "missing" and "loadtest step failed: boom" in row.detail
    assert ev.verdict == "fail"


def test_corrupt_artifact_is_listed_not_raised(tmp_path):
    d = make_report(tmp_path)
    (d / "load_test.json").write_text("{not json")
    ev = evaluate(d, load_profile("b200-gpt40b"))
    assert "loadtest" in ev.unreadable and "corrupt JSON" in ev.unreadable["loadtest"]
    assert by_metric(ev)["e2e_ms_p99"].status == "missing"


def test_evaluation_written_and_read_back(tmp_path):
    d = make_report(tmp_path)
    write_evaluation(d, load_profile("b200-gpt40b"))
    back = read_artifact(d / "expectations.json")
    assert isinstance(back, ExpectationsReport)
    assert back.profile == "b200-gpt40b" and back.summary["verdict"] == "pass"
    assert json.loads((d / "expectations.json").read_text())["kind"] == "expectations"


def test_user_profile_file_and_defaults(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text(
        "name: mine\ndefaults: {warn: 0.1, fail: 0.2}\n"
        "metrics:\n  tps: {source: warmup.decode_tokens_per_s, expected: 2000, direction: higher}\n"
    )
    prof = load_profile(str(p))
    assert prof.metrics["tps"].fail == 0.2
    ev = evaluate(make_report(tmp_path), prof)
    assert by_metric(ev)["tps"].status == "pass"  # 1900 >= 2000 * 0.9


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name: x\nmetrics: [1, 2\n", "invalid YAML"),
        ("name: x\nmetrics: {}\n", "at least one metric"),
        (
            "metrics:\n  a: {source: warmup.x, expected: 1, direction: higher, warn: 0.5, fail: 0.1}\n",
            "warn <= fail",
        ),
        (
            "metrics:\n  a: {source: nodot, expected: 1, direction: higher, warn: 0, fail: 0}\n",
            "<step>.<summary key>",
        ),
        ("metrics:\n  a: {source: warmup.x, expected: 1, direction: up, warn: 0, fail: 0}\n", "direction"),
        (
            "metrics:\n  a: {source: warmup.x, expected: 1, direction: higher, warn: 0, fail: 0, typo: 1}\n",
            "typo",
        ),
    ],
)
def test_bad_profiles_name_the_file_and_the_problem(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(LabError, match=match) as e:
        load_profile(str(p))
    assert "bad.yaml" in str(e.value)


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(LabError, match="cpu-tiny"):
        load_profile("no-such-profile")


def test_report_dir_must_exist_and_hold_something(tmp_path):
    with pytest.raises(LabError, match="does not exist"):
        evaluate(tmp_path / "nope", load_profile("cpu-tiny"))
    with pytest.raises(LabError, match="no manifest.json and no step artifacts"):
        evaluate(tmp_path, load_profile("cpu-tiny"))


def test_cpu_report_has_no_free_memory_metric(tmp_path):
    d = make_report(tmp_path, gpu_memory_gb=None)
    row = by_metric(evaluate(d, load_profile("b200-gpt40b")))["memory_free_gb"]
    assert row.status == "missing" and "CPU" in row.detail
    assert Path(d).is_dir()
