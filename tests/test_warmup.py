"""`lab warmup` on the tiny preset (CPU): the playbook command verbatim, the artifact and its summary,
the compile cache written by one process and reused by the next (the module's one compile), usage
errors, a failed run recorded, and notebook 02 under papermill."""

from __future__ import annotations

import json

import pytest

from lab.bench.warmup import (
    CACHE_HISTORY_FILE,
    SUMMARY_KEYS,
    WarmupArtifact,
    cache_state,
    latency_summary,
    record_compile_time,
)
from lab.results import read_artifact

SMALL = ["--preset", "tiny", "--device", "cpu", "--prompt-len", "8", "--max-new-tokens", "6"]


def test_playbook_command_verbatim_writes_a_valid_artifact(lab_cli, tmp_path):
    r = lab_cli(
        "warmup",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--tensor-parallel-gpus",
        "1",
        "--output-json",
        "fallback_benchmark.json",
        env={"CUDA_VISIBLE_DEVICES": ""},
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    art = read_artifact(tmp_path / "fallback_benchmark.json")
    assert isinstance(art, WarmupArtifact) and art.kind == "warmup" and art.status == "ok"
    assert art.params["iters"] == 3 and art.params["warmup"] == 1
    assert art.params["resolved"]["preset"] == "tiny" and art.params["resolved"]["mode"] == "eager"
    s = art.summary
    assert set(SUMMARY_KEYS) <= set(s)
    # the envelope: percentiles ordered, spread bracketing them, one sample per decode step
    for name in ("ttft_ms", "decode_ms_per_token"):
        assert (
            0
            < s[f"{name}_min"]
            <= s[f"{name}_p50"]
            <= s[f"{name}_p90"]
            <= s[f"{name}_p99"]
            <= s[f"{name}_max"]
        )
    assert s["iters"] == 3 and s["decode_step_samples"] == 3 * 127
    assert len(art.iterations) == 3 and all(len(it["decode_step_ms"]) == 127 for it in art.iterations)
    assert s["decode_tokens_per_s"] == s["decode_tokens_per_s_aggregate"] == s["decode_tokens_per_s_per_user"]
    assert s["peak_memory_kind"] == "process_rss_peak" and s["peak_memory_gb"] > 0
    assert art.memory_plan["preset"] == "tiny" and art.memory_plan["fits"] is True
    # what the CPU cannot measure is null with a reason, never 0
    for key in ("power_w_mean", "energy_j", "tokens_per_joule", "mbu", "compile_s"):
        assert s[key] is None and key in art.unavailable
    for key in ("power_w_mean", "energy_j", "tokens_per_joule"):
        assert "not available" in art.unavailable[key]
    assert "mode eager" in art.unavailable["compile_s"]
    assert "fallback_benchmark.json" in r.stdout


def test_compile_cache_is_written_and_reused_by_the_next_process(lab_cli, tmp_path):
    cache = tmp_path / "cc"
    argv = [*SMALL, "--mode", "compile", "--iters", "2", "--warmup", "0", "--compile-cache-dir", str(cache)]
    argv.append("--no-prime-serving")  # priming the server's steps: tests/test_compile_cache.py
    first = lab_cli("warmup", *argv, "--output-json", str(tmp_path / "cold.json"))
    assert first.returncode == 0, first.stderr
    cold = read_artifact(tmp_path / "cold.json")
    assert cold.compile["cache_state"] == "miss" and cold.summary["compile_cache_hit"] is False
    assert (
        cold.compile["serving"]["status"] == "skipped"
        and "--no-prime-serving" in cold.compile["serving"]["reason"]
    )
    assert cold.summary["serving_prime_s"] is None and "not asked" in cold.unavailable["serving_prime_s"]
    assert cold.summary["compile_s"] > 0 and cold.summary["compile_s_cold"] == cold.summary["compile_s"]
    assert (
        cold.summary["compile_s_warm"] is None
        and "run the same command again" in cold.unavailable["compile_s_warm"]
    )
    written = [p for p in (cache / "inductor").rglob("*") if p.is_file()]
    assert written, "the compile cache directory stayed empty"
    assert (cache / CACHE_HISTORY_FILE).exists()

    second = lab_cli("warmup", *argv, "--output-json", str(tmp_path / "warm.json"))
    assert second.returncode == 0, second.stderr
    warm = read_artifact(tmp_path / "warm.json")
    assert warm.compile["cache_state"] == "hit" and warm.summary["compile_cache_hit"] is True
    assert (
        warm.compile["cache_counters"]["fxgraph_hit"] >= 1
        and warm.compile["cache_counters"]["fxgraph_miss"] == 0
    )
    # both times in the restart's artifact: the cold one remembered from the first process
    assert warm.summary["compile_s_cold"] == pytest.approx(cold.summary["compile_s"])
    assert warm.summary["compile_s_warm"] == pytest.approx(warm.summary["compile_s"])
    assert warm.summary["compile_restart_speedup"] == pytest.approx(
        warm.summary["compile_s_cold"] / warm.summary["compile_s_warm"]
    )


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--tensor-parallel-gpus", "2"], "torchrun"),
        (["--max-new-tokens", "1"], "must be >= 2"),
        (["--mode", "turbo"], "unknown mode"),
        (["--mode", "compile-cudagraphs"], "needs a CUDA"),
        (["--mode", "eager-cudagraphs"], "needs a CUDA"),
        (["--iters", "0"], "must be >"),
        (["--prompt-len", "2000"], "exceeds the model's context"),
        (["--mode", "compile", "--serve-max-seq-len", "100000"], "--serve-max-seq-len 100000 exceeds"),
        (["--serve-max-batch-size", "0"], "--serve-max-batch-size"),
    ],
)
def test_usage_errors_are_one_line_and_write_nothing(lab_cli, tmp_path, extra, needle):
    out = tmp_path / "w.json"
    r = lab_cli(
        "warmup", *SMALL, *extra, "--output-json", str(out), "--compile-cache-dir", str(tmp_path / "c")
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()


def test_a_run_that_breaks_is_recorded_as_failed(tmp_path, monkeypatch, capsys):
    import lab.bench.warmup as warmup
    from lab.cli import main

    def boom(*a, **kw):
        raise RuntimeError("CUDA out of memory (simulated)\nsecond line")

    monkeypatch.setattr(warmup, "run_warmup", boom)
    out = tmp_path / "w.json"
    rc = main(["warmup", *SMALL, "--output-json", str(out)])
    assert rc == 1
    art = read_artifact(out)
    assert art.kind == "warmup" and art.status == "failed" and "out of memory (simulated)" in art.reason
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed" in err[0]


def test_cache_state_and_history():
    zero = {"fxgraph_hit": 0, "fxgraph_miss": 0, "aot_autograd_hit": 0, "aot_autograd_miss": 0}
    assert cache_state(zero, dict(zero, fxgraph_hit=1, aot_autograd_hit=1))[0] == "hit"
    assert cache_state(zero, dict(zero, fxgraph_miss=2))[0] == "miss"
    assert cache_state(zero, dict(zero, fxgraph_miss=1, fxgraph_hit=1))[0] == "partial"
    assert cache_state(zero, zero)[0] == "none"


def test_compile_history_survives_a_corrupt_file(tmp_path):
    (tmp_path / CACHE_HISTORY_FILE).write_text("{not json")
    entry = record_compile_time(tmp_path, "k", "miss", 12.0)
    assert entry["cold_s"] == 12.0
    entry = record_compile_time(tmp_path, "k", "hit", 2.0)
    assert entry["cold_s"] == 12.0 and entry["warm_s"] == 2.0
    assert json.loads((tmp_path / CACHE_HISTORY_FILE).read_text())["k"]["warm_s"] == 2.0


def test_latency_summary_merges_samples_and_labels_rates():
    its = [
        {"ttft_ms": 10.0, "decode_steps": 2, "decode_step_ms": [1.0, 3.0], "tokens_generated": 12},
        {"ttft_ms": 20.0, "decode_steps": 2, "decode_step_ms": [2.0, 2.0], "tokens_generated": 12},
    ]
    s = latency_summary(its, batch_size=4)
    assert s["decode_ms_per_token_p50"] == 2.0 and s["decode_ms_per_token_max"] == 3.0
    assert s["decode_step_samples"] == 4 and s["ttft_ms_p50"] == 15.0
    assert s["decode_tokens_per_s_per_user"] == pytest.approx(4 / 0.008)
    assert s["decode_tokens_per_s_aggregate"] == pytest.approx(16 / 0.008)


@pytest.mark.slow
def test_notebook_02_runs_under_papermill(repo_root, tmp_path):
    import papermill as pm

    out = tmp_path / "report"
    pm.execute_notebook(
        str(repo_root / "notebooks" / "02_warmup.ipynb"),
        str(tmp_path / "02_out.ipynb"),
        parameters={
            "output_dir": str(out),
            "preset": "tiny",
            "device": "cpu",
            "iters": 2,
            "prompt_len": 8,
            "max_new_tokens": 6,
            "mode": "eager",
        },
        kernel_name="python3",
        cwd=str(repo_root),
        progress_bar=False,
    )
    art = read_artifact(out / "warmup.json")
    assert art.kind == "warmup" and art.status == "ok" and len(art.iterations) == 2
    nb = json.loads((tmp_path / "02_out.ipynb").read_text())
    figures = [
        o
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if "application/vnd.plotly.v1+json" in o.get("data", {})
    ]
    assert len(figures) >= 3
