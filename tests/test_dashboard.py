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


# --- every page on the latest fixture run ----------------------------------------------------------


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


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    assert_clean(at)
    return at


def test_overview_go_decision_expectations_and_steps(fixture_app) -> None:
    at = goto(fixture_app, "overview")
    assert at.sidebar.selectbox(key="run_id").value == LATEST  # the latest run by default
    m = metrics(at)
    assert m["Go / no-go"] == "GO"
    assert m["Fallback recommended"] == "yes"
    assert m["Expectations pass / warn / fail"] == "3 / 3 / 0"
    assert m["Drill steps ok"] == "4 / 4"
    assert "nvlink_degraded" in texts(at.error)
    fig = figure(at, "Measured / expected")
    bars = trace(fig, "measured / expected")
    exp = json.loads((FIXTURES / LATEST / "expectations.json").read_text())["metrics"]
    by_metric = dict(zip(bars["y"], arr(bars["x"])))
    for e in exp:
        assert by_metric[e["metric"]] == pytest.approx(e["measured"] / e["expected"])
    colors = dict(zip(bars["y"], bars["marker"]["color"]))
    assert colors["ttft_ms_p99"] == "#f9a825" and colors["peak_memory_gb"] == "#2e7d32"  # warn, pass
    tables = [d.value for d in at.dataframe]
    assert any(list(t.columns[:2]) == ["metric", "step"] and len(t) == 6 for t in tables)
    assert any("status" in t.columns and set(t["status"]) == {"ok"} and len(t) == 4 for t in tables)
    labels = [b.proto.label for b in at.get("download_button")]
    assert any(lbl.endswith("expectations.csv") for lbl in labels)
    assert any(lbl.endswith("manifest.json") for lbl in labels)


def test_health_gpus_nvlink_threshold_and_nccl_fix(fixture_app) -> None:
    at = goto(fixture_app, "health")
    fig = figure(at, "NVLink active links")
    assert arr(trace(fig, "active links")["y"]) == [12]
    assert arr(trace(fig, "links on the device")["y"]) == [18]
    assert [s["y0"] for s in fig["layout"]["shapes"]] == [18]  # the threshold line
    assert "unset NCCL_P2P_DISABLE NCCL_P2P_LEVEL" in texts(at.code)
    gpus = next(d.value for d in at.dataframe if "uuid" in d.value.columns)
    assert gpus["nvlink_active_links"].tolist() == [12]
    checks = next(d.value for d in at.dataframe if "threshold" in d.value.columns and len(d.value) == 6)
    assert checks["status"].iloc[0] == "fail"  # failures first


def test_warmup_envelope_compile_roofline(fixture_app) -> None:
    at = goto(fixture_app, "warmup")
    w = json.loads((FIXTURES / LATEST / "warmup.json").read_text())
    env = figure(at, "Latency envelope")
    assert arr(trace(env, "TTFT")["y"]) == pytest.approx([i["ttft_ms"] for i in w["iterations"]])
    dec = trace(env, "decode ms/token")
    assert arr(dec["y"]) == pytest.approx([i["decode_ms_per_token_p50"] for i in w["iterations"]])
    assert {round(s["y0"], 6) for s in env["layout"]["shapes"]} == {
        round(w["summary"]["ttft_ms_p99"], 6),
        round(w["summary"]["decode_ms_per_token_p99"], 6),
    }
    stack = figure(at, "prefill vs decode")
    assert arr(trace(stack, "decode, all tokens")["y"]) == pytest.approx(
        [sum(i["decode_ms_per_token"]) for i in w["iterations"]]
    )
    comp = figure(at, "Compile")
    assert list(comp["data"][0]["x"]) == ["cold compile cache", "warm compile cache"]
    assert arr(comp["data"][0]["y"]) == [48.0, 9.5]
    roof = figure(at, "roofline")
    assert arr(roof["data"][0]["y"]) == pytest.approx([w["roofline"]["achieved_gb_per_s"], 2980.0])
    assert "MBU 57%" in roof["layout"]["title"]["text"]
    assert metrics(at)["Decode tokens/s"] == f"{w['summary']['decode_tokens_per_s']:.3g}"


def test_compare_speedups_memory_correctness_and_failures(fixture_app) -> None:
    at = goto(fixture_app, "compare")
    fig = figure(at, "speedup")
    bars = trace(fig, "speedup vs eager")
    assert dict(zip(bars["x"], arr(bars["y"]))) == {
        "eager": 1.0,
        "cuda-graph": 1.6,
        "compile": 1.46,
        "reduce-overhead": 1.72,
    }
    assert fig["layout"]["shapes"][0]["y0"] == 1.0  # eager = 1x line
    mem = figure(at, "Peak memory")
    assert arr(mem["data"][0]["y"]) == [16.4, 16.9, 16.6, 17.2]
    assert metrics(at)["Fastest method"] == "reduce-overhead"
    assert "compile: greedy tokens agree with eager on 97.0% only" in texts(at.warning)
    md = texts(at.markdown)
    assert "flex-decode" in md and "max-autotune" in md and "FlexAttention" in md


def test_loadtest_cdfs_sweep_knee_timeseries_outcomes_and_filter(fixture_app) -> None:
    at = goto(fixture_app, "loadtest")
    assert len(at.selectbox(key="loadtest-artifact").options) == 2  # single GPU and the 8-GPU tier
    lines = (FIXTURES / LATEST / "load_test.requests.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    ok = [r for r in recs if r["outcome"] == "ok"]
    cdf = figure(at, "Latency CDFs")
    ttft = trace(cdf, "TTFT (n=")
    expect = sorted((r["t_first_token"] - r["t_scheduled"]) * 1e3 for r in ok)
    assert arr(ttft["x"]) == pytest.approx(expect)
    assert arr(ttft["y"])[-1] == pytest.approx(1.0)
    assert arr(trace(cdf, "end-to-end SLO")["x"]) == [2500.0, 2500.0]
    assert cdf["layout"]["xaxis"]["type"] == "log"

    sweep = figure(at, "against offered load")
    p99 = trace(sweep, "p99")
    assert arr(p99["x"]) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    shapes = sweep["layout"]["shapes"]
    assert any(s.get("y0") == 2500.0 for s in shapes)  # the SLO line
    assert any(s.get("x0") == 3.0 for s in shapes)  # the knee: the last offered load meeting the SLO
    assert "first violation at 4 QPS" in texts(at.caption)

    ts = figure(at, "Over the run")
    names = [t["name"] for t in ts["data"]]
    assert names == ["arrivals/s", "completions/s", "queue depth", "output tokens/s", "power W"]
    assert sum(arr(ts["data"][0]["y"])) == len(recs)  # 1 s bins: every arrival counted once
    assert sum(arr(ts["data"][3]["y"])) == sum(r["output_tokens"] for r in ok)

    out = figure(at, "Request outcomes")
    counts = dict(zip(out["data"][0]["x"], arr(out["data"][0]["y"])))
    assert counts["ok"] == len(ok) and sum(counts.values()) == len(recs)
    assert f"Accounting: {len(recs)} outcomes for {len(recs)} requests sent" in texts(at.caption)

    table = at.dataframe[-1].value
    assert len(table) == len(recs) and "ttft_ms" in table.columns
    at.multiselect(key="loadtest-outcome-filter").set_value(["ok"]).run()
    assert_clean(at)
    assert len(at.dataframe[-1].value) == len(ok)
    assert set(at.dataframe[-1].value["outcome"]) == {"ok"}


def test_capacity_planner_answers_with_measured_figures_beside(fixture_app) -> None:
    at = goto(fixture_app, "capacity")
    m = [(x.label, x.value) for x in at.metric]
    # fallback knee: 3 QPS offered, 2.97 achieved; usable 2.97 * 0.8 = 2.376; ceil(10 / 2.376) = 5
    assert m[:2] == [("Replicas", "5"), ("GPUs", "5")]
    # 8-GPU tier: never violated, 47.52 QPS; one replica of 8 GPUs
    assert m[5:7] == [("Replicas", "1"), ("GPUs", "8")]
    figures_used = [d.value for d in at.dataframe if "figure" in d.value.columns]
    assert figures_used[0].set_index("figure").loc["capacity (requests/s within the SLO)", "value"] == "2.97"
    ratios = next(d.value for d in at.dataframe if "ratio" in d.value.columns)
    assert ratios.set_index("ratio").loc["GPUs needed (fallback ÷ multi-GPU)", "value"] == pytest.approx(
        5 / 8
    )
    at.slider(key="cap-headroom").set_value(50).run()
    assert_clean(at)
    assert [(x.label, x.value) for x in at.metric][0] == ("Replicas", "7")  # ceil(10 / 1.485)
    at.radio(key="cap-unit").set_value("output tokens/s").run()
    at.number_input(key="cap-target-output tokens/s").set_value(320.0).run()
    assert_clean(at)
    assert [(x.label, x.value) for x in at.metric][0] == ("Replicas", "7")  # 320 / 32 tokens = 10 req/s


def test_history_band_regressions_and_run_comparison(fixture_app) -> None:
    at = goto(fixture_app, "history")
    assert at.selectbox(key="history-metric").value == "warmup.decode_tokens_per_s"
    fig = figure(at, "warmup.decode_tokens_per_s over drills")
    measured = trace(fig, "measured")
    assert len(arr(measured["y"])) == 3  # the broken run's warm-up is unreadable: skipped, not zero
    assert arr(trace(fig, "expectation limit (lower)")["y"]) == pytest.approx([128 * 0.9] * 3)
    reg = trace(fig, "regression")
    assert list(reg["text"]) == ["19% worse than the previous run"]
    assert "compare.json" in texts(at.warning) and "schema_version 99" in texts(at.warning)
    assert at.selectbox(key="history-base").value == BROKEN
    at.selectbox(key="history-base").set_value("20261122T020000Z-fixture-host").run()
    assert_clean(at)
    cmp = at.dataframe[-1].value.set_index(["step", "metric"])
    row = cmp.loc[("warmup", "decode_tokens_per_s")]
    assert row["change"] == "worse" and row["delta"] < 0
    assert cmp.loc[("warmup", "ttft_ms_p99"), "change"] == "worse"


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
        m["verdict"] = "fail"
    time.sleep(0.01)
    p.write_text(json.dumps(doc))
    at.sidebar.selectbox(key="run_id").set_value(LATEST).run()
    assert metrics(at)["Expectations pass / warn / fail"] == "0 / 0 / 6"
    assert metrics(at)["Go / no-go"] == "NO-GO"
    # the Reload control re-reads everything
    at.sidebar.button[0].click().run()
    assert_clean(at)
    assert metrics(at)["Go / no-go"] == "NO-GO"


def test_a_page_error_is_one_line_not_a_traceback(app, tmp_path) -> None:
    run = tmp_path / "r1"
    shutil.copytree(FIXTURES / LATEST, run)
    # valid artifact envelope, nonsense inside: every page must still render without a traceback
    for name in ("health.json", "warmup.json", "compare.json", "load_test.json", "expectations.json"):
        doc = json.loads((run / name).read_text())
        for key in ("checks", "gpus", "iterations", "methods", "sweep", "metrics", "decision", "roofline"):
            if key in doc:
                doc[key] = "garbage" if key != "decision" else {"fallback_recommended": "maybe"}
        doc["summary"] = {"ttft_ms_p50": "fast"}
        (run / name).write_text(json.dumps(doc))
    (run / "load_test.requests.jsonl").write_text('{"outcome": "ok"}\nnot json\n[1]\n')
    at = app(tmp_path)
    for page in PAGES:
        open_page(at, page)
    at.switch_page("views/loadtest.py").run()
    assert "2 unreadable line(s) skipped (first at line 2)" in texts(at.warning)


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
    assert df.iloc[1]["ttft_ms"] is None or np.isnan(df.iloc[1]["ttft_ms"])
    ts = data.time_series(df)
    assert ts["arrivals_per_s"].tolist()[:2] == [2.0, 0.0]
    # at each second from t=1: the first waits until admitted at 2.0, the second until it times out at 6.2
    assert ts["queue_depth"].tolist() == [1, 1, 1, 1, 1, 1, 0]


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
    cmp = data.compare_runs(r.runs[0], r.runs[-1]).set_index("metric")
    assert cmp.loc["decode_tokens_per_s", "change"] == "worse"
    assert cmp.loc["requests_sent", "change"] in ("changed", "same")
    assert data.to_csv_bytes(cmp.reset_index()).decode().splitlines()[0].startswith("metric,step,base,new")
