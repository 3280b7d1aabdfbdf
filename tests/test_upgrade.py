"""Serving while compiling (`lab serve --start-mode`): the engine serves in a mode with nothing to compile
(eager; eager-cudagraphs on a GPU) from the moment its model is loaded, compiles `--mode` (regional) in a
thread of its own on a twin of the model that shares its weights and KV cache, and switches between two
ticks. On the CPU: the same greedy tokens before, across and after the switch; the live model's blocks are
never compiled; a failed compile keeps the server serving in the start mode; the real `lab serve` says
which mode serves. One small compile in-process and one in the `lab serve` process."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

import lab.engine.generate as generate
from lab.commands.serve import resolve_start_mode
from lab.engine.batching import COMPILING_SWITCH_INTERVAL_S, Engine, EngineConfig, Request
from lab.engine.generate import Generator
from lab.errors import LabError
from tests.engine_helpers import lab_serve, wait_done


def tiny(layers: int = 2):
    from lab.model import ModelSpec, build_model, get_preset

    a = get_preset("tiny")
    a.n_layers = layers
    return build_model(ModelSpec(a, "tiny", None), torch.device("cpu"), torch.float32, 0)


PROMPTS = [list(range(3, 30)), [5, 6, 7], [9] * 21]


def solo_tokens(model, n: int) -> list[list[int]]:
    return [
        Generator(model, "eager", 1, 96).generate(torch.tensor([p]), n).tokens[0].tolist() for p in PROMPTS
    ]


def run_all(eng: Engine, n: int, timeout_s: float = 120) -> list[Request]:
    reqs = [eng.submit(Request(p, n)) for p in PROMPTS]
    wait_done(reqs, timeout_s)
    return reqs


def gated_compile(monkeypatch) -> threading.Event:
    """Hold the compile thread until the test releases it: requests are served in the start mode meanwhile."""
    gate, real = threading.Event(), generate.regional_copy
    monkeypatch.setattr(generate, "regional_copy", lambda model: (gate.wait(120), real(model))[1])
    return gate


def test_serves_in_the_start_mode_while_compiling_then_switches_with_the_same_tokens(monkeypatch):
    torch._dynamo.reset()
    model = tiny()
    want = solo_tokens(model, 30)
    gate = gated_compile(monkeypatch)
    switch = sys.getswitchinterval()
    # With --kv-buckets: the twin compiles, and the switch captures, the decode at every KV length.
    cfg = EngineConfig(
        max_batch_size=4,
        max_seq_len=96,
        mode="regional",
        start_mode="eager",
        step_delay_s=0.005,
        kv_buckets=3,
    )
    eng = Engine(model, cfg).start()
    try:
        assert eng.ready.wait(60) and eng.crashed is None, eng.crashed
        s = eng.stats()
        assert s["mode"] == "eager" and s["upgrade"]["state"] == "compiling", s
        # The engine takes the GIL back from the compile thread within 0.2 ms, not Python's 5 ms.
        assert sys.getswitchinterval() == pytest.approx(COMPILING_SWITCH_INTERVAL_S)
        assert eng.fixed_prefill  # the target mode's prefill shape from the start: the switch keeps it
        assert eng.kv_lengths == [96]  # a start mode reads the whole cache: one graph before the first token
        before = run_all(eng, 30)
        assert [r.outcome for r in before] == ["ok"] * 3 and [r.tokens for r in before] == want
        assert all(layer._compiled_call_impl is None for layer in model.layers)  # served uncompiled

        # Requests in flight across the switch: the compiled twin continues from the shared KV cache.
        across = [eng.submit(Request(p, 30)) for p in PROMPTS]
        gate.set()
        assert eng.upgraded.wait(300), eng.stats()
        wait_done(across)
        up = eng.stats()["upgrade"]
        assert up["state"] == "done" and up["from"] == "eager" and up["to"] == "regional", up
        assert up["compile_s"] > 0 and "compile_cache" in up
        assert list(up["phases_s"]) == ["twin", "prefill", "decode_kv24", "decode_kv48", "decode_kv96"], up
        assert eng.mode == "regional" and eng.stats()["mode"] == "regional"
        assert eng.kv_lengths == [24, 48, 96]  # every length from the switch on
        assert sys.getswitchinterval() == pytest.approx(switch)  # restored once the switch is done
        assert [r.outcome for r in across] == ["ok"] * 3 and [r.tokens for r in across] == want

        after = run_all(eng, 30)
        assert [r.tokens for r in after] == want
        assert all(layer._compiled_call_impl is not None for layer in eng.step_model.layers)
        assert all(layer._compiled_call_impl is None for layer in model.layers)  # the twin's, not these
        assert eng.step_model.layers[0].attention.kv_cache is model.layers[0].attention.kv_cache
        assert eng.crashed is None
    finally:
        eng.stop()


def test_a_failed_compile_keeps_serving_in_the_start_mode(monkeypatch):
    model = tiny()
    want = solo_tokens(model, 6)

    def boom(model):
        raise RuntimeError("inductor fell over")

    monkeypatch.setattr(generate, "regional_copy", boom)
    switch = sys.getswitchinterval()
    eng = Engine(model, EngineConfig(max_batch_size=4, max_seq_len=96, mode="regional", start_mode="eager"))
    eng.start()
    try:
        assert eng.ready.wait(60) and eng.upgraded.wait(60)
        up = eng.stats()["upgrade"]
        assert up["state"] == "failed" and "inductor fell over" in up["reason"], up
        assert eng.mode == "eager" and eng.crashed is None
        assert sys.getswitchinterval() == pytest.approx(switch)
        reqs = run_all(eng, 6)
        assert [r.outcome for r in reqs] == ["ok"] * 3 and [r.tokens for r in reqs] == want
    finally:
        eng.stop()


@pytest.mark.parametrize(
    "mode, start, match",
    [
        ("compile", "eager", "--start-mode eager needs --mode regional or regional-cudagraphs"),
        ("eager", "eager", "needs --mode regional"),
        ("regional", "compile", "--start-mode compile is not one of: eager, eager-cudagraphs"),
    ],
)
def test_start_mode_needs_a_regional_mode_and_a_mode_with_nothing_to_compile(mode, start, match):
    with pytest.raises(LabError, match=match):
        EngineConfig(mode=mode, start_mode=start).validate(4096)
    EngineConfig(mode="regional-cudagraphs", start_mode="eager-cudagraphs").validate(4096)


def test_auto_start_mode():
    assert resolve_start_mode("auto", "regional-cudagraphs", 1) == "eager-cudagraphs"
    assert resolve_start_mode("auto", "regional", 1) == "eager"
    assert resolve_start_mode("auto", "compile-cudagraphs", 1) is None  # compiles whole: nothing to switch to
    assert (
        resolve_start_mode("auto", "regional-cudagraphs", 2) is None
    )  # tensor parallel: one mode throughout
    assert resolve_start_mode("none", "regional-cudagraphs", 1) is None
    assert resolve_start_mode("eager", "regional", 1) == "eager"


def test_a_bad_start_mode_pair_is_one_line_before_the_model_loads():
    proc = lab_serve("--port", "0", "--max-seq-len", "128", "--mode", "compile", "--start-mode", "eager")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "needs --mode regional or regional-cudagraphs" in lines[0], err


def test_a_gpu_start_mode_on_the_cpu_names_the_flag():
    proc = lab_serve("--port", "0", "--mode", "regional", "--start-mode", "eager-cudagraphs")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "--start-mode eager-cudagraphs needs a CUDA GPU" in err, err


def test_lab_serve_reports_the_start_mode_then_the_switch(tmp_path):
    from tests.test_server import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cache = str(tmp_path / "cache")
    proc = lab_serve(
        "--port", str(port), "--mode", "regional", "--start-mode", "eager", "--compile-cache-dir", cache
    )
    try:
        health, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                r = httpx.get(url + "/health")
                if r.status_code == 200:
                    health = r.json()
                    if health["upgrade"]["state"] in ("done", "failed"):
                        break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert health is not None and health["upgrade"]["state"] == "done", health
        assert health["mode"] == "regional" and "upgraded" in health["startup"]["marks"]
        body = {"prompt": "after the switch", "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        assert "lab_full_speed 1.0" in httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    ready = next(line for line in err.splitlines() if line.startswith("lab serve: ready"))
    assert "serving in eager while regional compiles" in ready, err
    switched = next(line for line in err.splitlines() if line.startswith("lab serve: switched"))
    assert "switched to regional" in switched and "compile cache miss" in switched, switched
    assert json.dumps(health)  # /health stays plain JSON with the upgrade record


def test_auto_mode_is_regional_on_a_gpu_except_int8_and_tensor_parallel(monkeypatch):
    from lab.engine.generate import auto_mode

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert auto_mode(cuda, "bfloat16") == "regional-cudagraphs"
    assert auto_mode(cuda, "fp8") == "regional-cudagraphs"
    assert auto_mode(cuda, "int8") == "compile-cudagraphs"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert auto_mode(cuda, "bfloat16") == "compile-cudagraphs"
    assert auto_mode(torch.device("cpu"), "bfloat16") == "eager"


def test_lab_compare_measures_regional_on_a_twin_and_leaves_the_model_uncompiled():
    from lab.bench.compare import compare_inference_methods

    model = tiny()
    res = compare_inference_methods(
        model, methods="regional", prompt_len=8, max_new_tokens=4, iters=1, warmup=0
    )
    r = res.methods["regional"]
    assert r.status == "ok" and r.correct is True and r.greedy_token_agreement == 1.0, r
    assert all(layer._compiled_call_impl is None for layer in model.layers)
    assert (
        res.methods["regional-cudagraphs"].status == "unavailable"
        if "regional-cudagraphs" in res.methods
        else True
    )


def test_a_load_test_against_a_compiling_server_waits_for_the_switch(monkeypatch):
    """`lab loadtest --endpoint` would otherwise measure two speeds in one run."""
    import uvicorn

    from lab.engine.server import create_app
    from lab.engine.tokenizer import ByteTokenizer
    from lab.loadtest.client import wait_for_full_speed
    from tests.test_server import free_port

    gate = gated_compile(monkeypatch)
    cfg = EngineConfig(max_batch_size=4, max_seq_len=96, mode="regional", start_mode="eager", kv_buckets=3)
    eng = Engine(tiny(), cfg)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(eng, ByteTokenizer(), "tiny", 10), host="127.0.0.1", port=port, log_level="error"
        )
    )
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        assert eng.ready.wait(60)
        got: list = []
        waiter = threading.Thread(
            target=lambda: got.append(wait_for_full_speed(f"http://127.0.0.1:{port}/v1", 120, 0.05))
        )
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and not got  # still compiling: the load test has not started
        gate.set()
        waiter.join(300)
        assert got and got[0]["mode"] == "regional" and got[0]["upgrade"]["state"] == "done", got
    finally:
        server.should_exit = True
        th.join(timeout=20)
        eng.stop()


def test_the_start_modes_path_to_ready_imports_no_compiler():
    """Everything before a start mode's first token (model build, engine, warm-up) runs without importing
    Dynamo: that import alone took 1.1-1.7 s on this host. The compile thread imports it later."""
    script = (
        "import sys, torch\n"
        "from lab.engine.batching import EngineConfig\n"
        "from lab.loadtest.session import build_engine\n"
        "cfg = EngineConfig(max_batch_size=2, max_seq_len=64, mode='regional', start_mode='eager')\n"
        "eng, _ = build_engine('tiny', None, 'cpu', 'float32', 0, cfg)\n"
        "with torch.inference_mode():\n"
        "    eng.warmup()\n"
        "print(eng.compile_cache_state, sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-2] == "none []", r.stdout
