"""The serving engine persists Inductor's compile cache (`--compile-cache-dir`, shared with `lab warmup`):
the first process compiles (cache miss), a restart loads the compiled decode and prefill (hit). This is the
fallback server's time to ready after a restart. One cold compile in this module (tiny model, CPU)."""

from __future__ import annotations

from lab.results import read_artifact

LOADTEST = (
    *("loadtest", "--allow-smaller-world", "--preset", "tiny", "--device", "cpu", "--mode", "compile"),
    *("--duration", "3", "--target-qps", "2", "--max-new-tokens", "4", "--prompt-len-min", "8"),
    *("--prompt-len-max", "16", "--warmup-s", "0.5", "--cooldown-s", "0.5", "--min-requests", "1"),
    *("--max-dispatch-lag-ms", "1000", "--max-batch-size", "2", "--no-progress"),
)


def test_warmup_primes_the_server_and_a_restart_loads_it_from_the_cache(tmp_path, lab_cli):
    """The playbook's order: `lab warmup` (step 3) compiles the serving engine's steps at the server's shapes,
    so the engine started next (here the load test's, batch 2 x 20 tokens) loads them: a cache hit."""
    cache = tmp_path / "cache"
    warm = tmp_path / "warmup.json"
    r = lab_cli(
        *(
            "warmup",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--mode",
            "compile",
            "--iters",
            "1",
            "--warmup",
            "0",
        ),
        *("--prompt-len", "8", "--max-new-tokens", "4", "--no-roofline", "--compile-cache-dir", str(cache)),
        *("--serve-max-batch-size", "2", "--serve-max-seq-len", "20", "--output-json", str(warm)),
        timeout=400,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    serving = read_artifact(warm).compile["serving"]
    assert serving["status"] == "ok" and serving["cache_state"] == "miss", serving
    assert (serving["max_batch_size"], serving["max_seq_len"]) == (2, 20) and serving["prime_s"] > 0
    assert "serving steps (batch 2 x 20 tokens) primed" in r.stdout, r.stdout
    assert any((cache / "inductor").rglob("*")), "nothing was written to the cache"

    out = tmp_path / "run" / "load_test.json"
    r = lab_cli(*LOADTEST, "--compile-cache-dir", str(cache), "--output-json", str(out), timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    engine = read_artifact(out).engine
    assert engine["compile_cache"] == "hit", engine
    assert engine["config"]["compile_cache_dir"] == str(cache.resolve())
    assert (engine["config"]["max_batch_size"], engine["config"]["max_seq_len"]) == (2, 20)


def test_eager_and_bad_input_leave_no_cache_directory(tmp_path, lab_cli):
    cache = tmp_path / "cache"
    bad = [a if a != "3" else "0" for a in LOADTEST]  # --duration 0: refused before anything is built
    r = lab_cli(*bad, "--compile-cache-dir", str(cache))
    assert r.returncode == 2 and "--duration" in r.stderr, r.stderr
    out = tmp_path / "eager" / "load_test.json"
    r = lab_cli(*LOADTEST, "--mode", "eager", "--compile-cache-dir", str(cache), "--output-json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]  # eager compiles nothing: no cache
    r = lab_cli(
        *("generate", "--preset", "tiny", "--device", "cpu", "--mode", "nope", "--prompt-ids", "1,2"),
        *("--compile-cache-dir", str(cache)),
    )
    assert r.returncode == 2 and "unknown mode" in r.stderr, r.stderr
    r = lab_cli(
        *("generate", "--preset", "tiny", "--device", "cpu", "--prompt-ids", "1,2", "--max-new-tokens", "2"),
        *("--compile-cache-dir", str(cache)),
    )
    assert r.returncode == 0, r.stderr
    assert not cache.exists()
