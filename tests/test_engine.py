"""The continuous-batching engine on the tiny model (CPU): correctness against solo generation, every
back-pressure rule (queue full, queue timeout, long-context windows, memory guard), drain and cancel."""

from __future__ import annotations

import time

import pytest
import torch

from lab.engine.batching import Engine, EngineConfig, Request, _MemoryGuard
from lab.errors import LabError


@pytest.fixture(scope="module")
def model():
    from lab.model import prepare

    return prepare("tiny", None, "cpu", "float32", 0, 4, 128).model


def make(model, **kw) -> Engine:
    kw.setdefault("max_batch_size", 4)
    kw.setdefault("max_seq_len", 128)
    return Engine(model, EngineConfig(**kw)).start()


def wait_all(reqs, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not all(r.done for r in reqs):
        assert time.monotonic() < deadline, [r.outcome for r in reqs]
        time.sleep(0.005)


@pytest.mark.parametrize("chunk,gap_s,fixed", [(8, 0.004, False), (128, 0.0, False), (64, 0.0, True)])
def test_continuous_batching_matches_solo_generation(model, chunk, gap_s, fixed):
    """Requests joining a running batch at different times, with chunked prefill (8) or several prompts
    prefilled in one right-padded forward (128, all at once), produce exactly the tokens each would get
    alone (greedy). `fixed`: the compiled modes' fixed-shape prefill [4, 16] with scratch-row padding."""
    from lab.engine.generate import Generator

    prompts = [list(range(3, 40)), [5, 6, 7], [9] * 21, list(range(100, 111))]
    gen = Generator(model, "eager", 1, 128)
    solo = [gen.generate(torch.tensor([p]), 12).tokens[0].tolist() for p in prompts]
    eng = make(model, prefill_chunk_tokens=chunk, prefill_fixed_shape=fixed)
    assert eng.fixed_prefill is fixed
    try:
        reqs = []
        for p in prompts:
            reqs.append(eng.submit(Request(p, 12)))
            time.sleep(gap_s)  # join mid-flight
        wait_all(reqs)
        for r, want in zip(reqs, solo):
            assert r.outcome == "ok" and r.finish_reason == "length"
            assert r.tokens == want
            assert len(r.token_times) == 12 and r.t_first_token == r.token_times[0]
            assert r.t_submitted <= r.t_admitted <= r.t_first_token <= r.t_done
        # Re-using freed slots (stale cache contents) still gives the same answer.
        again = eng.submit(Request(prompts[1], 12))
        wait_all([again])
        assert again.tokens == solo[1]
    finally:
        eng.stop()


def test_queue_full_rejects_at_once_and_everything_is_accounted(model):
    eng = make(model, max_batch_size=1, max_queue=2, step_delay_s=0.02)
    try:
        reqs = [eng.submit(Request([1, 2, 3], 10)) for _ in range(6)]
        rejected = [r for r in reqs if r.outcome == "rejected_queue_full"]
        # One may already be running; the queue holds two; the rest are refused synchronously.
        assert len(rejected) >= 3
        assert all("queue full" in r.reason for r in rejected)
        wait_all(reqs)
        outcomes = [r.outcome for r in reqs]
        assert sum(o == "ok" for o in outcomes) + len(rejected) == len(reqs)
        assert sum(eng.outcomes.values()) == len(reqs)
    finally:
        eng.stop()


def test_queue_timeout_rejects_waiting_requests(model):
    eng = make(model, max_batch_size=1, queue_timeout_s=0.2, step_delay_s=0.02)
    try:
        first = eng.submit(Request([1, 2, 3], 40))  # ~0.8 s in the only slot
        time.sleep(0.05)
        late = eng.submit(Request([4, 5], 4))
        wait_all([first, late])
        assert first.outcome == "ok"
        assert late.outcome == "timed_out_in_queue"
        assert late.t_admitted is None and late.tokens == []
        assert 0.2 <= late.t_done - late.t_submitted < 2.0  # loose: shared CI machines
        assert "--queue-timeout-s" in late.reason
    finally:
        eng.stop()


def test_long_context_lane_admits_in_windows(model):
    eng = make(model, long_context_tokens=16, long_context_window_s=1.0, queue_timeout_s=5)
    try:
        a = eng.submit(Request(list(range(30)), 2))
        wait_all([a])
        b = eng.submit(Request(list(range(30)), 2))
        short = eng.submit(Request([1, 2], 2))
        wait_all([b, short])
        assert a.long_context and b.long_context and not short.long_context
        # b had free slots all along but waits for the next window; the short one does not wait.
        assert b.t_admitted - a.t_admitted >= 1.0
        assert short.t_admitted - short.t_submitted < 0.8
        assert b.outcome == "ok"
    finally:
        eng.stop()


def test_drain_finishes_in_flight_and_refuses_new(model):
    eng = make(model, max_batch_size=2, step_delay_s=0.01)
    reqs = [eng.submit(Request([1, 2, 3], 15)) for _ in range(4)]
    report = eng.drain(timeout_s=30)
    assert [r.outcome for r in reqs] == ["ok"] * 4
    assert report["in_flight_at_drain"] == 4 and report["finished_during_drain"] == 4
    assert report["cancelled"] == 0
    late = eng.submit(Request([1], 2))
    assert late.outcome == "rejected_draining"


def test_cancel_frees_the_slot(model):
    eng = make(model, max_batch_size=1, step_delay_s=0.02)
    try:
        r = eng.submit(Request([1, 2, 3], 100))
        while not r.tokens:
            time.sleep(0.005)
        eng.cancel(r)
        nxt = eng.submit(Request([1, 2], 3))
        wait_all([r, nxt], timeout_s=10)
        assert r.outcome == "cancelled" and 0 < len(r.tokens) < 100
        assert nxt.outcome == "ok"
    finally:
        eng.stop()


def test_callbacks_and_sampled_rows(model):
    events = []
    eng = make(model)
    try:
        r = Request([1, 2, 3], 5, temperature=0.8, callback=lambda req, ev: events.append(ev))
        eng.submit(r)
        wait_all([r])
        assert events[0] == "admitted" and events[-1] == "done"
        assert events.count("token") == 5
        assert all(0 <= t < model.args.vocab_size for t in r.tokens)
    finally:
        eng.stop()


@pytest.mark.parametrize(
    "prompt,max_new,match",
    [
        ([], 4, "empty"),
        ([1, 2], 0, "at least 1"),
        ([1, 2], 999, "cap"),
        ([1, 10_000], 4, "vocabulary"),
        (list(range(120)), 20, "context"),
    ],
)
def test_requests_the_engine_can_never_serve(model, prompt, max_new, match):
    eng = Engine(model, EngineConfig(max_batch_size=4, max_seq_len=128))
    with pytest.raises(LabError, match=match):
        eng.submit(Request(prompt, max_new))


def test_bad_config_is_a_usage_error(model):
    with pytest.raises(LabError, match="max-seq-len"):
        Engine(model, EngineConfig(max_seq_len=10**6))
    with pytest.raises(LabError, match="queue-timeout"):
        Engine(model, EngineConfig(queue_timeout_s=0, max_seq_len=128))


def test_memory_guard_defers_admission_above_the_fraction(model, monkeypatch):
    """The guard's arithmetic with a simulated 10 GB card (no GPU here): admission is refused when the
    projected use would cross the fraction, and allowed below it."""
    cfg = EngineConfig(max_batch_size=4, max_seq_len=128, max_gpu_memory_fraction=0.8)
    guard = _MemoryGuard(model, cfg, torch.device("cpu"))
    assert guard.admit() and guard.not_applicable.startswith("not applicable on cpu")
    guard.cuda = True
    gb = 1e9
    used = {"total": 10 * gb, "others": 1 * gb, "reserved": 6 * gb, "allocated": 6 * gb}
    monkeypatch.setattr(
        torch.cuda,
        "mem_get_info",
        lambda d: (used["total"] - used["others"] - used["reserved"], used["total"]),
    )
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: used["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: used["allocated"])
    assert guard.admit()  # 7 GB + a small prefill workspace < 8 GB
    used["allocated"] = used["reserved"] = 7.9 * gb
    assert not guard.admit()  # 8.9 GB > 8 GB
    assert guard.deferrals == 1
    with pytest.raises(LabError, match="max-gpu-memory-fraction"):
        guard.check_startup()


def test_model_thread_gets_its_own_cuda_graph_tree_state(monkeypatch):
    """Older torch (the H100 host's) creates CUDA-graph-tree state only in the importing thread; the
    engine's model thread must get its own or the first replay asserts (pytorch#123177)."""
    import threading

    from torch._inductor import cudagraph_trees as ct

    from lab.engine.batching import _cudagraph_state_for_this_thread

    monkeypatch.delattr(ct, "_initialize_tls", raising=False)  # behave like the old release
    seen = {}

    def model_thread():
        seen["before"] = hasattr(ct.local, "tree_manager_containers")
        _cudagraph_state_for_this_thread()
        seen["container"] = ct.get_container(0)

    t = threading.Thread(target=model_thread)
    t.start()
    t.join()
    assert seen["before"] is False
    assert isinstance(seen["container"], ct.TreeManagerContainer)


def test_offline_batch_runs_every_request_to_completion_and_counts_tokens():
    """lab.loadtest.session.offline_batch, the closed batch the GPU benchmarks take as the offline rate."""
    from lab.engine.batching import Engine, EngineConfig
    from lab.loadtest.session import offline_batch
    from lab.model import ModelSpec, build_model, get_preset

    model = build_model(ModelSpec(get_preset("tiny"), "tiny", None), torch.device("cpu"), torch.float32, 0)
    eng = Engine(model, EngineConfig(max_batch_size=3, max_seq_len=64)).start()
    try:
        assert eng.ready.wait(60)
        r = offline_batch(eng, 3, 8, 6)
        assert r["tokens"] == 18 and r["batch"] == 3 and r["prompt_len"] == 8 and r["new_tokens"] == 6
        assert r["tokens_per_s_aggregate"] > 0 and r["decode_tokens_per_s_aggregate"] > 0
        assert 0 < r["ttft_s_max"] <= r["wall_s"]
    finally:
        eng.stop()
