"""`lab serve` over real HTTP on localhost: the official openai client (streaming and not), /health
before and after warm-up, /metrics, 400s for bad requests, 429 + Retry-After and 503 under overload,
drain by call and by SIGTERM (a real subprocess), and `lab loadtest --endpoint` against it."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest

from lab.engine.batching import Engine, EngineConfig
from lab.engine.server import create_app
from lab.engine.tokenizer import ByteTokenizer
from tests.engine_helpers import lab_serve


@pytest.fixture(scope="module")
def model():
    from lab.model import prepare

    return prepare("tiny", None, "cpu", "float32", 0, 4, 256).model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, engine: Engine, server, thread, url: str):
        self.engine, self.server, self.thread, self.url = engine, server, thread, url


@pytest.fixture
def serve(model):
    """Start a real uvicorn server in a thread; returns a factory taking EngineConfig fields."""
    import uvicorn

    started: list[Served] = []

    def start(warmup_gate: threading.Event | None = None, admin_token: str | None = None, **kw) -> Served:
        kw.setdefault("max_batch_size", 4)
        kw.setdefault("max_seq_len", 256)
        kw.setdefault("max_new_tokens", 64)
        engine = Engine(model, EngineConfig(**kw))
        if warmup_gate is not None:
            real = engine.warmup
            engine.warmup = lambda: (warmup_gate.wait(30), real())[1]
        app = create_app(engine, ByteTokenizer(), "tiny", drain_timeout_s=10, admin_token=admin_token)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        s = Served(engine, server, th, f"http://127.0.0.1:{port}")
        started.append(s)
        return s

    yield start
    for s in started:
        s.server.should_exit = True
        s.thread.join(timeout=20)


def wait_ready(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("server never became ready")


def test_health_is_503_until_warmed_up(serve):
    gate = threading.Event()
    s = serve(warmup_gate=gate)
    r = httpx.get(s.url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "warming_up"
    early = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert early.status_code == 503 and early.json()["error"]["code"] == "warming_up"
    gate.set()
    wait_ready(s.url)
    body = httpx.get(s.url + "/health").json()
    assert body["status"] == "ok"
    # where the start's seconds went: epoch marks (this process: engine ready at least) and their gaps
    marks = body["startup"]["marks"]
    assert "ready" in marks and all(v > 1.7e9 for v in marks.values()), marks
    assert set(body["startup"]["phases_s"]) == {
        f"{a}->{b}" for a, b in zip(sorted(marks, key=marks.get), sorted(marks, key=marks.get)[1:])
    }


def test_openai_client_streams_one_token_per_event_with_usage_last(serve):
    from openai import OpenAI

    s = serve()
    wait_ready(s.url)
    client = OpenAI(base_url=s.url + "/v1", api_key="unused")
    chunks = list(
        client.completions.create(model="tiny", prompt="Hello", max_tokens=7, temperature=0, stream=True)
    )
    assert len(chunks) == 7
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].usage.prompt_tokens == len(b"Hello")
    assert chunks[-1].choices[0].finish_reason == "length"
    streamed_text = "".join(c.choices[0].text for c in chunks)
    # The same request, not streamed, gives the same greedy text and usage.
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=7, temperature=0)
    assert full.choices[0].text == streamed_text
    assert full.usage.total_tokens == 5 + 7
    # Token ids as the prompt work too.
    ids = client.completions.create(model="tiny", prompt=list(b"Hello"), max_tokens=7, temperature=0)
    assert ids.choices[0].text == streamed_text
    assert [m.id for m in client.models.list()] == ["tiny"]


@pytest.mark.parametrize(
    "body,match",
    [
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 1000}, "cap"),
        ({"prompt": [1, 99999], "max_tokens": 2}, "vocabulary"),
        ({"prompt": "x" * 300, "max_tokens": 2}, "context"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "n": 2}, "n and best_of"),
        ({"prompt": ["a", "b"]}, "one prompt"),
        ({"prompt": ""}, "empty"),
        ({"prompt": "hi", "stop": ["\n"]}, "stop"),
        ({"prompt": {"not": "valid"}}, "prompt"),
    ],
)
def test_bad_requests_get_400_with_a_message(serve, body, match):
    s = serve()
    wait_ready(s.url)
    r = httpx.post(s.url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"]


def test_malformed_json_and_unknown_paths_are_4xx(serve):
    s = serve()
    wait_ready(s.url)
    r = httpx.post(
        s.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(s.url + "/v1/nothing").status_code == 404


def test_overload_gives_429_with_retry_after_and_503_on_queue_timeout(serve):
    import asyncio

    s = serve(max_batch_size=1, max_queue=2, queue_timeout_s=0.4, step_delay_s=0.03)
    wait_ready(s.url)

    async def fire():
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
            return await asyncio.gather(
                *(c.post("/v1/completions", json={"prompt": "load", "max_tokens": 30}) for _ in range(6))
            )

    results = asyncio.run(fire())
    codes = sorted(r.status_code for r in results)
    full = [r for r in results if r.status_code == 429]
    timed_out = [r for r in results if r.status_code == 503]
    assert full and all(int(r.headers["Retry-After"]) >= 1 for r in full), codes
    assert timed_out and all(r.json()["error"]["code"] == "queue_timeout" for r in timed_out), codes
    assert any(r.status_code == 200 for r in results)
    assert 500 not in codes
    metrics = httpx.get(s.url + "/metrics").text
    assert 'lab_requests_total{outcome="rejected_queue_full"}' in metrics
    assert 'lab_requests_total{outcome="timed_out_in_queue"}' in metrics
    assert "lab_ttft_seconds_bucket" in metrics and "lab_queue_depth" in metrics


def test_drain_call_stops_admission(serve):
    s = serve()
    wait_ready(s.url)
    assert httpx.post(s.url + "/admin/drain").status_code == 200
    assert httpx.get(s.url + "/health").json()["status"] == "draining"
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"


def test_drain_with_an_admin_token_needs_the_token(serve):
    s = serve(admin_token="s3cret")
    wait_ready(s.url)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        r = httpx.post(s.url + "/admin/drain", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", headers
    assert httpx.get(s.url + "/health").json()["status"] == "ok"  # refused calls change nothing
    r = httpx.post(s.url + "/admin/drain", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and httpx.get(s.url + "/health").json()["status"] == "draining"


def test_without_a_token_only_this_host_may_drain():
    from starlette.requests import Request

    from lab.engine.server import admin_refusal

    def request(host: str) -> Request:
        return Request(
            {"type": "http", "method": "POST", "path": "/admin/drain", "headers": [], "client": (host, 5)}
        )

    assert admin_refusal(request("127.0.0.1"), None) is None
    assert admin_refusal(request("::1"), None) is None
    refused = admin_refusal(request("10.1.2.3"), None)
    assert refused.status_code == 403 and b"--admin-token" in refused.body


def test_loadtest_against_the_endpoint(serve, tmp_path):
    from lab.loadtest.runner import LoadTestConfig
    from lab.loadtest.session import run_loadtest
    from lab.results import read_artifact

    s = serve(max_batch_size=4)
    wait_ready(s.url)
    cfg = LoadTestConfig(
        duration_s=2.0,
        target_qps=15,
        warmup_s=0.3,
        cooldown_s=0.3,
        prompt_len_min=4,
        prompt_len_max=12,
        max_new_tokens=3,
        endpoint=s.url,
        progress=False,
        min_requests=1,
        max_dispatch_lag_ms=1000,
    )
    out = tmp_path / "load_test.json"
    art = run_loadtest(cfg, output_json=out)
    sm = art.summary
    assert sm["requests_ok"] == sm["requests_sent"] > 0
    assert read_artifact(out).kind == "loadtest"
    rows = [json.loads(x) for x in (tmp_path / "load_test.requests.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["outcome"] == "ok"]
    assert ok and all(r["output_tokens"] == 3 and len(r["token_times"]) == 3 for r in ok)
    assert all(r["prompt_tokens"] == r["prompt_tokens"] for r in ok)
    assert "power" in art.unavailable  # the endpoint may be remote: not measured, and said so
    assert sm["queue_wait_ms_count"] == 0 and "queue_wait_ms" in art.unavailable


def test_sigterm_drains_in_flight_requests(tmp_path):
    """A real `lab serve` process: SIGTERM mid-stream still delivers every token, then exits 0 with
    the drain report."""
    port = free_port()
    proc = lab_serve(
        "--port",
        str(port),
        "--max-seq-len",
        "256",
        "--simulate-step-delay-ms",
        "25",
        "--drain-timeout-s",
        "20",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout_s=120)
        body = {"prompt": "drain me", "max_tokens": 40, "stream": True, "temperature": 0}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if not events:
                    proc.send_signal(signal.SIGTERM)  # after the first token
                events.append(line[6:])
        assert events[-1] == "[DONE]"
        tokens = [json.loads(e) for e in events[:-1]]
        assert len(tokens) == 40 and tokens[-1]["usage"]["completion_tokens"] == 40
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
        assert rc == 0, err
        assert "drained" in err
        ready = next(line for line in err.splitlines() if line.startswith("lab serve: ready"))
        assert "s after start" in ready and "engine_built->ready" in ready, ready  # where the start went
        report = json.loads(err.split("drained ", 1)[1].splitlines()[0])
        assert report["in_flight_at_drain"] == 1 and report["finished_during_drain"] == 1
        assert report["cancelled"] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tokenizer_json_beside_the_checkpoint_is_used(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lab.engine.tokenizer import HFTokenizer, IncrementalDecoder, load_tokenizer

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    t = load_tokenizer(str(tmp_path / "model.safetensors"), vocab_size=3)
    assert isinstance(t, HFTokenizer) and t.encode("hello world") == [1, 2]
    assert isinstance(load_tokenizer(None, 512), ByteTokenizer)
    from lab.errors import LabError

    with pytest.raises(LabError, match="tokenizer.json"):
        load_tokenizer(None, 100)
    # Streaming a multi-byte character byte by byte: nothing half-decoded leaks out.
    dec = IncrementalDecoder(ByteTokenizer())
    pieces = [dec.push(b) for b in "né✓".encode()]
    assert "".join(pieces) + dec.flush() == "né✓" and "\ufffd" not in "".join(pieces)
    assert ByteTokenizer().decode([104, 300, 105]) == "h<|300|>i"
