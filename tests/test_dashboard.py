"""The dashboard under Streamlit's AppTest: every page on the fixture reports (tests/fixtures/reports:
synthetic runs, one with a corrupt and a newer-schema file), an empty reports directory, new reports
appearing without a restart, and the loader's table logic. Figures are checked by their plotly specs."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import data

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "dashboard" / "app.py")
FIXTURES = ROOT / "tests" / "fixtures" / "reports"
LATEST = "20261126T020000Z-fixture-host"
BROKEN = "20261125T020000Z-broken"
PAGES = ["overview", "health", "warmup", "compare", "loadtest", "capacity", "history"]


# --- helpers -----------------------------------------------------------------------------------------


def arr(v) -> list:
    """A plotly array from a figure spec: plain list, or plotly 6's base64 typed array."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).tolist()
    return list(v)


def figures(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def figure(at: AppTest, title_part: str) -> dict:
    found = [f for f in figures(at) if title_part in str(f["layout"].get("title", {}).get("text", ""))]
    assert found, f"no figure titled like {title_part!r}: {[f['layout'].get('title') for f in figures(at)]}"
    return found[0]


def trace(fig: dict, name_part: str) -> dict:
    found = [t for t in fig["data"] if name_part in str(t.get("name", ""))]
    assert found, f"no trace named like {name_part!r}: {[t.get('name') for t in fig['data']]}"
    return found[0]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert "could not render" not in texts(at.error)


@pytest.fixture
def app(monkeypatch):
    def make(reports: Path) -> AppTest:
        monkeypatch.setenv(data.ENV_VAR, str(reports))
        return AppTest.from_file(APP, default_timeout=60)

    return make


def open_page(at: AppTest, page: str) -> AppTest:
    if page != "overview" or not at._tree.children:  # first run lands on the default page
        at.run()
    if page != "overview":
        at.switch_page(f"views/{page}.py").run()
    assert_clean(at)
    return at


# --- every page: the real CPU run (newest), then the synthetic GPU-like latest drill ---------------

REAL = "20261127T004029Z-vm"  # a real `lab drill` on a CPU machine (cpu-tiny profile)


@pytest.fixture(scope="module")
def fixture_app():
    """One AppTest over the fixtures, reused across page tests (each switch is a fresh script run)."""
    old = os.environ.get(data.ENV_VAR)
    os.environ[data.ENV_VAR] = str(FIXTURES)
    try:
        at = AppTest.from_file(APP, default_timeout=60).run()
        assert_clean(at)
        yield at
    finally:
        if old is None:
            os.environ.pop(data.ENV_VAR, None)
        else:
            os.environ[data.ENV_VAR] = old


def goto(at: AppTest, page: str, run_id: str | None = None) -> AppTest:
    if run_id is not None and at.sidebar.selectbox(key="run_id").value != run_id:
        at.sidebar.selectbox(key="run_id").set_value(run_id).run()
    at.switch_page(f"views/{page}.py").run()
    assert_clean(at)
    return at


def load(run: str, name: str) -> dict:
    return json.loads((FIXTURES / run / name).read_text())


def records(run: str, name: str = "load_test.requests.jsonl") -> list[dict]:
    return [json.loads(x) for x in (FIXTURES / run / name).read_text().splitlines()]


def test_real_cpu_run_is_the_default_and_every_page_renders(fixture_app) -> None:
    at = fixture_app
    assert at.sidebar.selectbox(key="run_id").value == REAL  # the newest run by default
    goto(at, "overview")
    manifest, ev = load(REAL, "manifest.json"), load(REAL, "expectations.json")
    verdicts = [m["status"] for m in ev["metrics"]]
    go_expected = manifest["status"] == "ok" and ev["verdict"] != "fail"
    assert metrics(at)["Go / no-go"] == ("GO" if go_expected else "NO-GO")
    assert metrics(at)["Expectations pass / warn / fail"] == " / ".join(
        str(verdicts.count(v)) for v in ("pass", "warn", "fail")
    )
    labels = [b.proto.label for b in at.get("download_button")]
    assert sum("executed" in lbl and lbl.endswith(".ipynb") for lbl in labels) == 4
    goto(at, "health")
    assert "No GPU inventory" in texts(at.info)  # NVML checks skipped on CPU: a state, not a crash
    goto(at, "warmup")
    n_iters = len(load(REAL, "warmup.json")["iterations"])
    assert len(arr(trace(figure(at, "Latency envelope"), "TTFT")["y"])) == n_iters
    assert "Not measured — power_w_mean" in texts(at.caption)
    goto(at, "compare")
    methods = load(REAL, "compare.json")["methods"]
    for m in methods:
        if m["status"] != "ok":  # failed on CPU, listed with its reason
            assert m["name"] in texts(at.markdown)
    goto(at, "loadtest")
    lt = load(REAL, "load_test.json")
    n_ok = sum(r["outcome"] == "ok" and r["phase"] == "measure" for r in records(REAL))
    assert f"TTFT (n={n_ok})" in [t["name"] for t in figure(at, "Latency CDFs")["data"]]
    if not lt["verdict"]["valid"]:
        assert "INVALID run" in texts(at.error)
    goto(at, "capacity")
    assert metrics(at).get("Replicas") or "no offered load met the SLO" in texts(at.warning)
    goto(at, "history")
    assert at.selectbox(key="history-group").value == "cpu-tiny · cpu"


def test_overview_go_decision_expectations_and_steps(fixture_app) -> None:
    at = goto(fixture_app, "overview", LATEST)
    m = metrics(at)
    assert m["Go / no-go"] == "GO"
    assert m["Fallback recommended"] == "yes"
    assert m["Expectations pass / warn / fail"] == "7 / 3 / 0"
    assert m["Drill steps ok"] == "4 / 4"
    assert "nvlink_degraded" in texts(at.error)
    fig = figure(at, "Measured / expected")
    bars = trace(fig, "measured / expected")
    exp = [
        e for e in load(LATEST, "expectations.json")["metrics"] if e["expected"] and e["measured"] is not None
    ]
    by_metric = dict(zip(bars["y"], arr(bars["x"])))
    assert by_metric == pytest.approx({e["metric"]: e["measured"] / e["expected"] for e in exp})
    colors = dict(zip(bars["y"], bars["marker"]["color"]))
    assert colors["decode_tokens_per_s"] == "#f9a825" and colors["peak_memory_gb"] == "#2e7d32"  # warn, pass
    tables = [d.value for d in at.dataframe]
    assert any(list(t.columns[:2]) == ["metric", "step"] and len(t) == 10 for t in tables)
    assert any("status" in t.columns and set(t["status"]) == {"ok"} and len(t) == 4 for t in tables)
    labels = [b.proto.label for b in at.get("download_button")]
    assert any(lbl.endswith("expectations.csv") for lbl in labels)
    assert any(lbl.endswith("manifest.json") for lbl in labels)
    assert "provisional" in texts(at.caption)  # the h100 profile says its figures are estimates


def test_overview_judges_the_run_by_another_profile(fixture_app) -> None:
    at = goto(fixture_app, "overview", LATEST)
    at.selectbox(key="overview-profile").set_value("cpu-tiny").run()
    assert_clean(at)
    assert "Profile `cpu-tiny`, evaluated now" in texts(at.caption)
    table = next(d.value for d in at.dataframe if "metric" in d.value.columns)
    assert set(table["metric"]) == {e["metric"] for e in load(REAL, "expectations.json")["metrics"]}
    at.selectbox(key="overview-profile").set_value(at.selectbox(key="overview-profile").options[0]).run()


def test_health_gpus_nvlink_threshold_and_nccl_fix(fixture_app) -> None:
    at = goto(fixture_app, "health", LATEST)
    fig = figure(at, "NVLink active links")
    assert arr(trace(fig, "active links")["y"]) == [18, 18, 18, 12, 18, 18, 18, 18]  # GPU 3 degraded
    assert trace(fig, "active links")["marker"]["color"][3] == "#c62828"
    assert arr(trace(fig, "links on the device")["y"]) == [18] * 8
    assert [s["y0"] for s in fig["layout"]["shapes"]] == [18]  # the threshold line
    assert "unset NCCL_P2P_DISABLE NCCL_P2P_LEVEL\nexport CUDA_VISIBLE_DEVICES=0" in texts(at.code)
    gpus = next(d.value for d in at.dataframe if "uuid" in d.value.columns)
    assert gpus["nvlink_active_links"].tolist() == [18, 18, 18, 12, 18, 18, 18, 18]
    n_checks = len(load(LATEST, "health.json")["checks"])
    checks = next(d.value for d in at.dataframe if "trigger" in d.value.columns and len(d.value) == n_checks)
    assert checks["status"].iloc[0] == "fail" and checks["trigger"].iloc[0] == "nvlink_degraded"
    assert checks["gpu"].iloc[0] == "3"


def test_warmup_envelope_compile_roofline(fixture_app) -> None:
    at = goto(fixture_app, "warmup", LATEST)
    w = load(LATEST, "warmup.json")
    env = figure(at, "Latency envelope")
    assert arr(trace(env, "TTFT")["y"]) == pytest.approx([i["ttft_ms"] for i in w["iterations"]])
    dec = trace(env, "decode ms/token")
    assert arr(dec["y"]) == pytest.approx([float(np.median(i["decode_step_ms"])) for i in w["iterations"]])
    assert sorted(round(s["y0"], 6) for s in env["layout"]["shapes"]) == sorted(
        [round(w["summary"]["ttft_ms_p99"], 6), round(w["summary"]["decode_ms_per_token_p99"], 6)]
    )
    stack = figure(at, "prefill vs decode")
    assert arr(trace(stack, "decode, all tokens")["y"]) == pytest.approx(
        [sum(i["decode_step_ms"]) for i in w["iterations"]]
    )
    comp = figure(at, "Compile")
    assert list(comp["data"][0]["x"]) == ["cold compile cache", "warm compile cache"]
    assert arr(comp["data"][0]["y"]) == [48.0, 9.5]
    roof = figure(at, "roofline")
    r = w["roofline"]
    achieved = r["bytes_per_step"] / r["decode_step_s_p50"] / 1e9
    assert arr(roof["data"][0]["y"]) == pytest.approx([achieved, r["copy_bandwidth_gb_s"]])
    assert f"MBU {r['mbu']:.0%}" in roof["layout"]["title"]["text"]
    assert metrics(at)["Decode tokens/s"] == f"{w['summary']['decode_tokens_per_s']:.3g}"
    assert figure(at, "GPU power")


def test_compare_speedups_memory_correctness_and_failures(fixture_app) -> None:
    at = goto(fixture_app, "compare", LATEST)
    fig = figure(at, "speedup")
    bars = trace(fig, "speedup vs eager")
    assert dict(zip(bars["x"], arr(bars["y"]))) == pytest.approx(
        {"eager": 1.0, "eager-cudagraph": 22.5 / 7.6, "compile": 22.5 / 11.0, "reduce-overhead": 22.5 / 7.2}
    )
    assert fig["layout"]["shapes"][0]["y0"] == 1.0  # eager = 1x line
    mem = figure(at, "Peak memory")
    assert arr(mem["data"][0]["y"]) == [16.4, 16.9, 16.6, 17.2]
    assert metrics(at)["Fastest method"] == "reduce-overhead"
    assert "compile: greedy tokens agree with eager on 97.0% only" in texts(at.warning)
    md = texts(at.markdown)
    assert "flex-attention" in md and "FlexAttention decode needs" in md


def test_loadtest_cdfs_sweep_knee_timeseries_outcomes_and_filter(fixture_app) -> None:
    at = goto(fixture_app, "loadtest", LATEST)
    assert len(at.selectbox(key="loadtest-artifact").options) == 2  # single GPU and the 8-GPU tier
    lt = load(LATEST, "load_test.json")
    recs = [r for r in records(LATEST) if r["run"] == "qps=3"]  # the sweep's chosen run
    measured = [r for r in recs if r["phase"] == "measure"]
    ok = [r for r in measured if r["outcome"] == "ok"]
    cdf = figure(at, "Latency CDFs")
    ttft = trace(cdf, "TTFT (n=")
    assert arr(ttft["x"]) == pytest.approx(sorted(r["ttft_ms"] for r in ok))
    assert arr(ttft["y"])[-1] == pytest.approx(1.0)
    assert arr(trace(cdf, "end-to-end SLO")["x"]) == [300.0, 300.0]
    assert cdf["layout"]["xaxis"]["type"] == "log"

    sweep = figure(at, "against offered load")
    assert arr(trace(sweep, "p99")["x"]) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert arr(trace(sweep, "p99")["y"]) == pytest.approx([p["e2e_ms_p99"] for p in lt["sweep"]["curve"]])
    shapes = sweep["layout"]["shapes"]
    assert any(s.get("y0") == 300.0 for s in shapes)  # the SLO line
    assert any(s.get("x0") == 3.0 for s in shapes)  # the knee: the last offered load meeting the SLO
    assert "first violation at 4 QPS" in texts(at.caption)

    ts = figure(at, "Over the run")
    names = [t["name"] for t in ts["data"]]
    assert names == ["arrivals/s", "completions/s", "queue depth", "output tokens/s", "power W"]
    assert sum(arr(ts["data"][0]["y"])) == len(recs)  # 1 s bins: every arrival of the run counted once
    assert sum(arr(ts["data"][1]["y"])) == sum(b["completed_ok"] for b in lt["timeline"])
    assert sum(arr(ts["data"][3]["y"])) == pytest.approx(sum(len(r["token_times"]) for r in recs))

    out = figure(at, "Request outcomes")
    counts = dict(zip(out["data"][0]["x"], arr(out["data"][0]["y"])))
    assert counts["ok"] == len(ok) and sum(counts.values()) == lt["summary"]["requests_sent"]
    n = lt["summary"]["requests_sent"]
    assert f"Accounting: {n} outcomes for {n} requests sent in the measured window" in texts(at.caption)

    table = at.dataframe[-1].value
    assert len(table) == len(recs) and set(table["run"]) == {"qps=3"} and "ttft_ms" in table.columns
    at.multiselect(key="loadtest-outcome-filter").set_value(["ok"]).run()
    at.multiselect(key="loadtest-phase-filter").set_value(["measure"]).run()
    assert_clean(at)
    assert len(at.dataframe[-1].value) == len(ok)
    at.multiselect(key="loadtest-run-filter").set_value(["qps=1", "qps=3"]).run()
    assert len(at.dataframe[-1].value) == len(ok) + sum(
        r["run"] == "qps=1" and r["phase"] == "measure" and r["outcome"] == "ok" for r in records(LATEST)
    )


def test_capacity_planner_answers_with_measured_figures_beside(fixture_app) -> None:
    at = goto(fixture_app, "capacity", LATEST)
    m = [(x.label, x.value) for x in at.metric]
    # fallback knee: 3 QPS offered, 2.5 achieved; usable 2.5 x 0.8 = 2; ceil(10 / 2) = 5
    assert m[:2] == [("Replicas", "5"), ("GPUs", "5")]
    # 8-GPU tier: knee at 24 QPS offered (25.06 achieved: capacity is the smaller); one replica of 8 GPUs
    assert m[5:7] == [("Replicas", "1"), ("GPUs", "8")]
    used = [d.value for d in at.dataframe if "figure" in d.value.columns]
    assert used[0].set_index("figure").loc["capacity (requests/s within the SLO)", "value"] == "2.5"
    assert used[1].set_index("figure").loc["capacity (requests/s within the SLO)", "value"] == "24"
    ratios = next(d.value for d in at.dataframe if "ratio" in d.value.columns)
    assert ratios.set_index("ratio").loc["GPUs needed (fallback ÷ multi-GPU)", "value"] == pytest.approx(
        5 / 8
    )
    at.slider(key="cap-headroom").set_value(50).run()
    assert_clean(at)
    assert [(x.label, x.value) for x in at.metric][0] == ("Replicas", "8")  # ceil(10 / 1.25)
    tokens_per_request = load(LATEST, "load_test.json")["sweep"]["curve"][2]["output_tokens_per_s"] / 2.5
    at.radio(key="cap-unit").set_value("output tokens/s").run()
    at.number_input(key="cap-target-output tokens/s").set_value(10 * tokens_per_request).run()
    assert_clean(at)
    assert [(x.label, x.value) for x in at.metric][0] == ("Replicas", "8")  # the same 10 req/s
    at.number_input(key="cap-attainment").set_value(0.5).run()  # a looser bar moves the knee to 4 QPS
    assert_clean(at)
    used = [d.value for d in at.dataframe if "figure" in d.value.columns]
    assert used[0].set_index("figure").loc["capacity (requests/s within the SLO)", "value"] == "4"


def test_history_band_regressions_and_run_comparison(fixture_app) -> None:
    at = goto(fixture_app, "history", LATEST)
    assert at.selectbox(key="history-group").value == "h100-llama8b · NVIDIA H100 80GB HBM3"
    assert at.selectbox(key="history-metric").value == "warmup.decode_tokens_per_s"
    fig = figure(at, "warmup.decode_tokens_per_s over drills")
    measured = trace(fig, "measured")
    assert len(arr(measured["y"])) == 3  # the broken run's warm-up is unreadable: skipped, not zero
    assert arr(trace(fig, "expectation limit (lower)")["y"]) == pytest.approx([150 * 0.85] * 3)
    reg = trace(fig, "regression")
    assert len(reg["text"]) == 1 and "worse than the previous run" in reg["text"][0]
    assert "compare.json" in texts(at.warning) and "schema_version 99" in texts(at.warning)
    assert at.selectbox(key="history-base").value == BROKEN
    at.selectbox(key="history-base").set_value("20261122T020000Z-fixture-host").run()
    assert_clean(at)
    cmp = at.dataframe[-1].value.set_index(["step", "metric"])
    row = cmp.loc[("warmup", "decode_tokens_per_s")]
    assert row["change"] == "worse" and row["delta"] < 0
    assert cmp.loc[("warmup", "ttft_ms_p99"), "change"] == "worse"
    at.selectbox(key="history-group").set_value("all runs").run()
    assert_clean(at)
    with_warmup = [r for r in data.load_reports([FIXTURES]).runs if r.step("warmup")]
    assert len(arr(trace(figure(at, "over drills"), "measured")["y"])) == len(with_warmup) == 5


# --- a broken run, an empty directory, live reloading ----------------------------------------------


def test_broken_run_warns_naming_files_and_the_rest_renders(app) -> None:
    at = app(FIXTURES).run()
    at.sidebar.selectbox(key="run_id").set_value(BROKEN).run()
    assert_clean(at)
    assert metrics(at)["Go / no-go"] == "NO-GO"
    warnings = texts(at.warning)
    assert f"{BROKEN}/compare.json: corrupt JSON" in warnings
    assert f"{BROKEN}/warmup.json: schema_version 99 is newer" in warnings
    for page in PAGES[1:]:
        at.switch_page(f"views/{page}.py").run()
        assert_clean(at)
    at.switch_page("views/compare.py").run()
    assert "compare.json: corrupt JSON" in texts(at.warning)
    assert "has no eager-vs-compiled comparison" in texts(at.info)
    at.switch_page("views/loadtest.py").run()
    assert figure(at, "Latency CDFs")  # its load test still renders


def test_empty_reports_directory_explains_how_to_run_a_drill(app, tmp_path) -> None:
    at = app(tmp_path)
    for page in PAGES:
        open_page(at, page)
        assert "make drill" in texts(at.info), page
        assert not at.get("plotly_chart")


def test_committed_empty_fixture_dir_and_missing_dir(app, tmp_path) -> None:
    at = open_page(app(ROOT / "tests" / "fixtures" / "reports_empty"), "overview")
    assert "No drill reports were found" in texts(at.info)
    at = open_page(app(tmp_path / "nope"), "overview")
    assert "no such directory" in texts(at.sidebar.caption)


def test_new_and_rewritten_reports_appear_without_restart(app, tmp_path) -> None:
    shutil.copytree(FIXTURES / "20261120T020000Z-fixture-host", tmp_path / "20261120T020000Z-fixture-host")
    at = open_page(app(tmp_path), "overview")
    assert len(at.sidebar.selectbox(key="run_id").options) == 1
    shutil.copytree(FIXTURES / LATEST, tmp_path / LATEST)
    at.run()
    assert_clean(at)
    assert at.sidebar.selectbox(key="run_id").options[0].startswith(LATEST)  # newest first
    # a report rewritten in place (a drill re-evaluated) is re-read: mtime and size changed
    p = tmp_path / LATEST / "expectations.json"
    doc = json.loads(p.read_text())
    for m in doc["metrics"]:
        m["status"] = "fail"
    time.sleep(0.01)
    p.write_text(json.dumps(doc))
    at.sidebar.selectbox(key="run_id").set_value(LATEST).run()
    assert metrics(at)["Expectations pass / warn / fail"] == "0 / 0 / 10"
    assert metrics(at)["Go / no-go"] == "NO-GO"
    # the Reload control re-reads everything
    at.sidebar.button[0].click().run()
    assert_clean(at)
    assert metrics(at)["Go / no-go"] == "NO-GO"


def test_odd_but_valid_content_renders_without_a_traceback(app, tmp_path) -> None:
    run = tmp_path / "r1"
    shutil.copytree(FIXTURES / LATEST, run)
    odd = {
        "health.json": {"checks": [], "gpus": [], "fix_commands": []},
        "warmup.json": {
            "iterations": [{"foo": 1}, {"ttft_ms": "slow"}],
            "roofline": {"bytes_per_step": "lots"},
            "telemetry": {"samples": [{"t_s": None}]},
            "compile": {},
        },
        "compare.json": {"methods": [{"name": "eager"}, {"status": "ok", "ttft_ms": {"p50": None}}]},
        "load_test.json": {
            "sweep": {"curve": [{"target_qps": "x"}, {"target_qps": 2}]},
            "timeline": [{"t_s": "a"}],
            "slo": {},
        },
        "expectations.json": {"metrics": []},
    }
    for name, fields in odd.items():
        doc = json.loads((run / name).read_text())
        doc.update(fields)
        doc["summary"] = {"ttft_ms_p50": "fast", "valid": "maybe"}
        (run / name).write_text(json.dumps(doc))
    (run / "load_test.requests.jsonl").write_text('{"outcome": "ok", "run": "qps=3"}\nnot json\n[1]\n')
    at = app(tmp_path)
    for page in PAGES:
        open_page(at, page)
    at.switch_page("views/loadtest.py").run()
    assert "2 unreadable line(s) skipped (first at line 2)" in texts(at.warning)


def test_the_warmup_page_says_whether_the_server_steps_were_primed(app, tmp_path) -> None:
    run = tmp_path / "r1"
    shutil.copytree(FIXTURES / LATEST, run)
    doc = json.loads((run / "warmup.json").read_text())
    doc.setdefault("compile", {})["serving"] = {
        **{"max_batch_size": 16, "max_seq_len": 4096, "prime_s": 12.5, "status": "ok", "cache_state": "miss"}
    }
    (run / "warmup.json").write_text(json.dumps(doc))
    at = open_page(app(tmp_path), "warmup")
    assert "Server steps primed: batch 16 x 4096 tokens in 12.5 s (compile cache miss)" in texts(at.caption)


def test_a_file_the_model_rejects_is_a_warning_naming_file_and_field(app, tmp_path) -> None:
    run = tmp_path / "r1"
    shutil.copytree(FIXTURES / LATEST, run)
    doc = json.loads((run / "health.json").read_text())
    doc["checks"] = "garbage"
    (run / "health.json").write_text(json.dumps(doc))
    at = app(tmp_path)
    open_page(at, "health")
    assert "health.json: invalid health artifact at 'checks'" in texts(at.warning)
    assert "has no health check" in texts(at.info)


# --- loader and table logic --------------------------------------------------------------------------


def test_discover_reads_nested_examples_once_and_names_duplicate_ids(tmp_path) -> None:
    reports = tmp_path / "reports"
    shutil.copytree(FIXTURES / LATEST, reports / LATEST)
    shutil.copytree(FIXTURES / LATEST, reports / "examples" / LATEST)
    (reports / "examples" / "README.md").write_text("real runs")
    r = data.load_reports([reports, reports / "examples"])
    assert sorted(x.run_id for x in r.runs) == sorted([f"reports/{LATEST}", f"examples/{LATEST}"])
    one = data.load_reports([reports / LATEST])  # a run folder given directly
    assert [x.run_id for x in one.runs] == [LATEST]


def test_manifest_listing_a_missing_artifact_is_a_warning(tmp_path) -> None:
    shutil.copytree(FIXTURES / LATEST, tmp_path / LATEST)
    (tmp_path / LATEST / "compare.json").unlink()
    (tmp_path / LATEST / "notes.json").write_text('{"hello": 1}')  # not an artifact, not ours: ignored
    run = data.load_reports([tmp_path]).runs[0]
    assert [Path(w.path).name for w in run.warnings] == ["compare.json"]
    assert "manifest lists it as ok but it is missing" in run.warnings[0].message
    verdict, reasons = data.go_no_go(run)
    assert verdict == "NO-GO" and "unreadable: compare.json" in reasons


def test_signature_changes_with_new_and_rewritten_files(tmp_path) -> None:
    shutil.copytree(FIXTURES / LATEST, tmp_path / "a")
    s1 = data.signature([tmp_path])
    assert data.signature([tmp_path]) == s1
    shutil.copytree(FIXTURES / LATEST, tmp_path / "b")
    s2 = data.signature([tmp_path])
    assert s2 != s1
    p = tmp_path / "a" / "health.json"
    p.write_text(p.read_text() + " ")
    assert data.signature([tmp_path]) != s2


def test_request_rows_measure_from_the_scheduled_time() -> None:
    df = data.request_rows(
        [
            {
                "t_scheduled": 1.0,
                "t_sent": 1.5,
                "t_admitted": 2.0,
                "t_first_token": 2.1,
                "t_done": 2.4,
                "output_tokens": 4,
                "outcome": "ok",
            },
            {"t_scheduled": 1.2, "t_done": 6.2, "output_tokens": 0, "outcome": "timed_out_in_queue"},
        ]
    )
    ok = df.iloc[0]
    assert ok["ttft_ms"] == pytest.approx(1100.0)  # not 600 (from the send time)
    assert ok["e2e_ms"] == pytest.approx(1400.0)
    assert ok["tpot_ms"] == pytest.approx((1400.0 - 1100.0) / 3)
    assert ok["queue_wait_ms"] == pytest.approx(1000.0) and ok["dispatch_lag_ms"] == pytest.approx(500.0)
    assert np.isnan(df.iloc[1]["ttft_ms"]) and np.isnan(df.iloc[1]["e2e_ms"])  # not completed: no latency
    ts = data.time_series(df)
    assert ts["arrivals_per_s"].tolist()[:3] == [0.0, 2.0, 0.0]
    # at each second from t=0: the first waits until admitted at 2.0, the second until it times out at 6.2
    assert ts["queue_depth"].tolist() == [0, 1, 1, 1, 1, 1, 1]
    # the artifact's own timeline (the engine's sampled queue) wins where it has a column
    ts = data.time_series(df, [{"t_s": 2.0, "waiting_max": 5, "completed_ok": 1, "output_tokens_per_s": 4.0}])
    assert ts["queue_depth"].tolist()[2] == 5 and ts["completions_per_s"].tolist()[2] == 1.0


def test_directions_regressions_and_comparisons() -> None:
    assert data.direction("ttft_ms_p99") == "lower" and data.direction("decode_tokens_per_s") == "higher"
    assert data.direction("requests_sent") is None and data.direction("power_w_mean") == "lower"
    r = data.load_reports([FIXTURES])
    h = data.flag_regressions(data.history_frame(r.runs), 0.10)
    flagged = h[h["regression"]]
    assert set(flagged[flagged["run_id"] == LATEST]["key"]) >= {
        "warmup.decode_tokens_per_s",
        "warmup.ttft_ms_p99",
    }
    assert not flagged["run_id"].eq("20261120T020000Z-fixture-host").any()  # the first run has no previous
    loose = data.flag_regressions(data.history_frame(r.runs), 0.9)
    assert "warmup.decode_tokens_per_s" not in set(loose[loose["regression"]]["key"])
    cmp = data.compare_runs(r.runs[0], r.get(LATEST)).set_index("metric")
    assert cmp.loc["decode_tokens_per_s", "change"] == "worse"
    assert cmp.loc["requests_sent", "change"] in ("changed", "same")
    assert data.to_csv_bytes(cmp.reset_index()).decode().splitlines()[0].startswith("metric,step,base,new")


def test_a_shared_link_opens_its_run(app) -> None:
    at = app(FIXTURES)
    at.query_params["run"] = BROKEN
    at.run()
    assert_clean(at)
    assert at.sidebar.selectbox(key="run_id").value == BROKEN
    assert metrics(at)["Go / no-go"] == "NO-GO"
    at.sidebar.selectbox(key="run_id").set_value(LATEST).run()
    assert at.query_params["run"] == LATEST  # the address bar follows the picker


def test_lab_dashboard_command_rejects_bad_flags_in_one_line(lab_cli, tmp_path) -> None:
    for argv, fragment in (
        (["--reports", str(tmp_path / "nope")], "no such directory"),
        (["--port", "70000"], "not a TCP port"),
        (["--port", "0"], "must be > 0"),
        (["--host", "not a host"], "not an IP address"),
    ):
        r = lab_cli("dashboard", *argv, timeout=60)
        assert r.returncode == 2, (argv, r.stderr)
        assert fragment in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


TIERS = "20261126T040000Z-tiers"  # `lab compare-tiers` layout: tiers.json, tp8/ and tp1/


def test_compare_tiers_layout_feeds_capacity_warmup_and_loadtest(fixture_app) -> None:
    at = goto(fixture_app, "capacity", TIERS)
    tiers = load(TIERS, "tiers.json")
    fig = figure(at, "fraction of the multi-GPU tier")
    bars = fig["data"][0]
    expect = {k: v["ratio"] for k, v in tiers["ratios"].items() if v["ratio"] is not None}
    assert dict(zip(bars["y"], arr(bars["x"]))) == pytest.approx(expect)
    assert any(s.get("x0") == 0.52 for s in fig["layout"]["shapes"])  # the playbook's 52 % claim
    used = [d.value for d in at.dataframe if "figure" in d.value.columns]
    assert len(used) == 2  # both tiers planned: tp1/ and tp8/ load tests
    gpus = [x.value for x in at.metric if x.label == "GPUs per replica"] or [
        u.set_index("figure").loc["GPUs per replica", "value"] for u in used
    ]
    assert gpus == ["1", "8"]
    goto(at, "warmup")
    assert at.selectbox(key="warmup-artifact").options == ["tp1/warmup.json", "tp8/warmup.json"]
    at.selectbox(key="warmup-artifact").set_value("tp8/warmup.json").run()
    assert_clean(at)
    assert (
        metrics(at)["Decode tokens/s"]
        == f"{load(TIERS, 'tp8/warmup.json')['summary']['decode_tokens_per_s']:.3g}"
    )
    goto(at, "loadtest")
    assert at.selectbox(key="loadtest-artifact").value.startswith("tp1/load_test.json")
    ok = [
        r
        for r in records(TIERS, "tp1/load_test.requests.jsonl")
        if r["outcome"] == "ok" and r["phase"] == "measure"
    ]
    assert f"TTFT (n={len(ok)})" in [t["name"] for t in figure(at, "Latency CDFs")["data"]]


def test_folders_without_lab_artifacts_are_not_runs(tmp_path) -> None:
    (tmp_path / "perf").mkdir()
    (tmp_path / "perf" / "perf_decode_h100.json").write_text('{"tokens_per_s": 1.0}')  # a benchmark output
    shutil.copytree(FIXTURES / LATEST, tmp_path / LATEST)
    r = data.load_reports([tmp_path])
    assert [x.run_id for x in r.runs] == [LATEST]
    assert any("perf: no lab artifacts" in n for n in r.notes)


def test_committed_gpu_examples_render_on_every_page(app) -> None:
    """reports/examples/ holds real GPU drills (what a new user sees first): every page renders them."""
    examples = Path(__file__).resolve().parent.parent / "reports" / "examples"
    at = app(examples).run()
    assert_clean(at)
    assert at.sidebar.selectbox(key="run_id").value == "h100-llama8b-drill"
    for page in ("overview", "health", "warmup", "compare", "loadtest", "capacity", "history"):
        goto(at, page)
    goto(at, "loadtest")  # what produced the numbers: the H100 drill's engine and its decode mode
    assert "Served by the in-process engine: llama-8b bfloat16, mode compile-cudagraphs" in texts(at.caption)
    goto(at, "warmup")
    shown = {m.label: m.value for m in at.metric}
    assert any("167" in str(v) for v in shown.values()), shown  # the H100's measured decode tokens/s


def test_committed_gpu_benchmark_runs_render(app) -> None:
    """The benchmark evidence with lab artifacts (the H100 load-test sweep, the 2x H200 tier comparison, the
    health probes) renders on every page when the dashboard is pointed at reports/examples/benchmarks."""
    bench = Path(__file__).resolve().parent.parent / "reports" / "examples" / "benchmarks"
    at = app(bench).run()
    assert_clean(at)
    runs = at.sidebar.selectbox(key="run_id").options
    assert {"loadtest-h100", "health-h200x2"} <= {r.split()[0] for r in runs}, runs
    for page in ("overview", "health", "capacity", "loadtest"):
        goto(at, page, "loadtest-h100")
    options = at.selectbox(key="loadtest-artifact").options
    assert any(o.startswith("sweep/load_test.json") for o in options), options
    assert any(o.startswith("saturation/load_test.json") for o in options), options
    shown = {m.label: m.value for m in at.metric}
    assert shown["TTFT p99 (ms)"] == "41.1", shown  # the playbook load test on the H100
    # The real out-of-memory runs: failed artifacts render as failed, with their reason, not as a crash.
    assert "oom-h100" in {r.split()[0] for r in runs}, runs
    for page in ("overview", "warmup", "loadtest"):
        goto(at, page, "oom-h100")
    assert "out of memory" in " ".join(str(e.value) for e in at.error), [e.value for e in at.error]

    tiers = app(bench / "tp-h200x2" / "tiers").run()  # `lab compare-tiers` output is its own run
    assert_clean(tiers)
    for page in ("overview", "warmup", "loadtest", "capacity"):
        goto(tiers, page)
    gpus = sorted(m.value for m in tiers.metric if m.label == "GPUs")
    assert gpus == ["2", "4"], gpus  # both tiers planned: 2 replicas of one GPU, 2 of the TP=2 pair
