"""--kv-buckets: the decode step reads the KV cache only up to the shortest of a few lengths that holds every
running request, not the whole static cache of every slot (issue 10's "KV cache read only up to the filled
length"). On the CPU, eager: the same logits as the full read, the same greedy tokens through the engine
while requests cross the lengths, and the lengths chosen as the positions grow. No compile here
(test_upgrade covers the bucketed steps compiled, regional)."""

from __future__ import annotations

import pytest
import torch

from lab.engine.batching import Engine, EngineConfig, Request, kv_bucket_lengths
from lab.engine.generate import Generator, decode_step
from lab.errors import LabError
from tests.engine_helpers import wait_done


def tiny():
    from lab.model import ModelSpec, build_model, get_preset

    a = get_preset("tiny")
    a.n_layers = 2
    return build_model(ModelSpec(a, "tiny", None), torch.device("cpu"), torch.float32, 0)


def test_bucket_lengths_halve_from_the_cache_length():
    assert kv_bucket_lengths(4096, 5) == [256, 512, 1024, 2048, 4096]
    assert kv_bucket_lengths(96, 3) == [24, 48, 96]
    assert kv_bucket_lengths(4096, 1) == [4096]
    assert kv_bucket_lengths(2, 5) == [1, 2]  # never below one position


def test_a_bounded_read_gives_the_logits_of_the_full_read():
    model = tiny()
    model.setup_caches(2, 64)
    prompt = torch.randint(0, model.args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(prompt, torch.arange(10).expand(2, 10))
        tok, pos = prompt[:, -1:], torch.tensor([[10], [7]])
        _, full = decode_step(model, tok, pos, None, 0.0, None)
        _, short = decode_step(model, tok, pos, None, 0.0, None, kv_len=16)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


PROMPTS = [list(range(3, 30)), [5, 6, 7], [9] * 21]


def test_the_engine_serves_the_same_tokens_while_requests_cross_the_lengths():
    model = tiny()
    want = [
        Generator(model, "eager", 1, 96).generate(torch.tensor([p]), 30).tokens[0].tolist() for p in PROMPTS
    ]
    eng = Engine(model, EngineConfig(max_batch_size=4, max_seq_len=96, kv_buckets=3))
    assert eng.kv_lengths == [24, 48, 96]
    seen: list[int | None] = []
    real = eng.decode_fn

    def recording(*args, **kw):
        seen.append(kw.get("kv_len"))
        return real(*args, **kw)

    eng.decode_fn = recording
    eng.start()
    try:
        assert eng.ready.wait(60) and eng.crashed is None, eng.crashed
        seen.clear()  # warm-up ran every length once; from here on, the engine's own choices
        reqs = [eng.submit(Request(p, 30)) for p in PROMPTS]
        wait_done(reqs)
        assert [r.outcome for r in reqs] == ["ok"] * 3 and [r.tokens for r in reqs] == want
        # The longest request (27 + 30 tokens) reads 48 positions at first, then 96; never a length too short.
        assert seen[0] == 48 and 96 in seen and None not in seen, seen
        assert seen == sorted(seen), seen  # the batch only grows longer here
    finally:
        eng.stop()


@pytest.mark.parametrize("mode", ["compile", "compile-cudagraphs"])
def test_whole_step_compile_cannot_bucket(mode):
    with pytest.raises(LabError, match="--kv-buckets needs --mode eager, eager-cudagraphs, regional"):
        EngineConfig(mode=mode, kv_buckets=4).validate(4096)
    for n in (0, 9):
        with pytest.raises(LabError, match="--kv-buckets must be between 1 .* and 8"):
            EngineConfig(kv_buckets=n).validate(4096)


def test_regional_compilation_keeps_a_graph_per_bucket():
    """Every length's decode, the prefill and more fit under Dynamo's per-code-object graph limit, which
    tune_inductor raises: past it (8 by default) the blocks would silently run uncompiled."""
    import torch._dynamo.config as dynamo_cfg

    from lab.engine.batching import MAX_KV_BUCKETS
    from lab.engine.generate import tune_inductor

    tune_inductor()
    assert dynamo_cfg.recompile_limit >= 2 * (MAX_KV_BUCKETS + 1)


def test_auto_buckets_on_one_gpu_where_the_mode_can_bucket(monkeypatch):
    from lab.engine.generate import GPU_KV_BUCKETS, auto_kv_buckets

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert GPU_KV_BUCKETS > 1
    for mode in ("regional-cudagraphs", "regional", "eager-cudagraphs", "eager"):
        assert auto_kv_buckets(cuda, mode) == GPU_KV_BUCKETS
        assert auto_kv_buckets(cpu, mode) == 1  # tests and the CPU drill: no compile per length
    for mode in ("compile", "compile-cudagraphs"):
        assert auto_kv_buckets(cuda, mode) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: tensor parallel reads the whole cache
    assert auto_kv_buckets(cuda, "regional-cudagraphs") == 1
    EngineConfig(mode="regional-cudagraphs", kv_buckets=GPU_KV_BUCKETS).validate(4096)


def test_kv_buckets_flag_takes_auto_or_a_count_and_names_itself_when_wrong():
    from tests.engine_helpers import lab_serve

    proc = lab_serve("--port", "0", "--kv-buckets", "many")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "--kv-buckets" in err and "'auto' or a positive integer" in err, err
    proc = lab_serve("--port", "0", "--kv-buckets", "12", "--mode", "eager")
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.strip().splitlines() if line]
    assert proc.returncode != 0 and len(lines) == 1 and "--kv-buckets must be between 1" in lines[0], err
