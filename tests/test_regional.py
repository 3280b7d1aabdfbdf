"""Regional compilation (`--mode regional`, and `regional-cudagraphs` on a GPU): each transformer block is
compiled in place and the identical blocks share one graph per input shape, so compile time is that of
one block. On the CPU: the same greedy tokens as eager, through the Generator and the serving engine, and
one graph per shape whatever the number of layers. One small compile per shape in this module."""

from __future__ import annotations

import pytest
import torch

from lab.engine.batching import Engine, EngineConfig, Request
from lab.engine.generate import Generator, check_mode
from lab.errors import LabError
from tests.engine_helpers import wait_done


def tiny(layers: int):
    from lab.model import ModelSpec, build_model, get_preset

    a = get_preset("tiny")
    a.n_layers = layers
    return build_model(ModelSpec(a, "tiny", None), torch.device("cpu"), torch.float32, 0)


def test_regional_blocks_share_one_graph_per_shape_and_match_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny(layers=4)  # four blocks, and still one graph per shape
    prompt = torch.randint(0, model.args.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    want = Generator(model, "eager", 2, 64).generate(prompt, 10).tokens
    gen = Generator(model, "regional", 2, 64)
    gen.warmup(2, 8, steps=4)  # compiles the decode [2, 1] and the prefill [2, 8] shapes
    assert torch.equal(gen.generate(prompt, 10).tokens, want)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # not 2 x 4 layers
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.layers)


def test_the_engine_serves_the_same_tokens_in_regional_mode():
    model = tiny(layers=2)
    prompts = [list(range(3, 30)), [5, 6, 7], [9] * 21]
    solo = [
        Generator(model, "eager", 1, 96).generate(torch.tensor([p]), 8).tokens[0].tolist() for p in prompts
    ]
    eng = Engine(model, EngineConfig(max_batch_size=4, max_seq_len=96, mode="regional")).start()
    try:
        assert eng.ready.wait(300) and eng.crashed is None, eng.crashed
        assert eng.fixed_prefill  # a compiled mode: the fixed-shape prefill, served by the compiled blocks
        reqs = [eng.submit(Request(p, 8)) for p in prompts]
        wait_done(reqs, 60)
        assert [r.outcome for r in reqs] == ["ok"] * 3 and [r.tokens for r in reqs] == solo
    finally:
        eng.stop()


@pytest.mark.parametrize("mode", ["regional-cudagraphs", "eager-cudagraphs", "compile-cudagraphs"])
def test_the_cuda_graph_modes_need_a_gpu(mode):
    from lab.engine.generate import compiles

    check_mode("regional", torch.device("cpu"))
    with pytest.raises(LabError, match=f"{mode} needs a CUDA GPU"):
        check_mode(mode, torch.device("cpu"))
    # eager-cudagraphs compiles nothing: no compile cache, no fixed-shape prefill, no recompile guard
    assert compiles(mode) is (mode != "eager-cudagraphs")
