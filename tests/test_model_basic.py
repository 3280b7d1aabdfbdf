"""Model and generation basics on the tiny preset (HF equivalence lives in test_hf_equivalence.py)."""

import json

import pytest
import torch

from lab.engine.generate import Generator, sample
from lab.errors import LabError
from lab.model import ModelSpec, build_model, get_preset, resolve_device


def test_incremental_decode_matches_full_forward(tiny_model):
    """Logits from prefill + one-token decode steps equal a single full forward pass."""
    torch.manual_seed(1)
    tokens = torch.randint(0, 512, (2, 12))
    tiny_model.setup_caches(2, 32)
    pos = torch.arange(12).expand(2, 12)
    full = tiny_model(tokens, pos)
    tiny_model.setup_caches(3, 33)  # fresh cache
    step = [tiny_model(tokens[:, :6], pos[:, :6])]
    for i in range(6, 12):
        step.append(tiny_model(tokens[:, i : i + 1], pos[:, i : i + 1]))
    inc = torch.cat(step, dim=1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_rows_and_positions_are_independent(tiny_model):
    """Two sequences of different lengths in arbitrary cache rows give the same logits as alone."""
    torch.manual_seed(2)
    a, b = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 9))
    tiny_model.setup_caches(4, 64)
    la = tiny_model(a, torch.arange(5)[None], rows=torch.tensor([3]))
    lb = tiny_model(b, torch.arange(9)[None], rows=torch.tensor([1]))
    # Decode one token for both in one batched step with per-row positions.
    nxt = torch.tensor([[7], [11]])
    step = tiny_model(nxt, torch.tensor([[5], [9]]), rows=torch.tensor([3, 1]))
    tiny_model.setup_caches(1, 65)
    ref_a = tiny_model(torch.cat([a, nxt[:1]], 1), torch.arange(6)[None])
    tiny_model.setup_caches(1, 64)
    ref_b = tiny_model(torch.cat([b, nxt[1:]], 1), torch.arange(10)[None])
    torch.testing.assert_close(step[0, 0], ref_a[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], ref_b[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(la[0], ref_a[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lb[0], ref_b[0, :9], atol=1e-5, rtol=1e-5)


def test_generate_greedy_is_deterministic_and_batched_rows_agree(tiny_model):
    gen = Generator(tiny_model, "eager", max_batch_size=3, max_seq_len=64)
    prompt = torch.tensor([[1, 2, 3, 4]] * 3)
    r1 = gen.generate(prompt, 10)
    r2 = gen.generate(prompt[:1], 10)
    assert r1.tokens.shape == (3, 10)
    assert torch.equal(r1.tokens[0], r2.tokens[0]) and torch.equal(r1.tokens[1], r1.tokens[2])
    assert len(r1.decode_step_s) == 9 and r1.prefill_s > 0


def test_sampling_is_seeded_and_top_k_restricts(tiny_model):
    gen = Generator(tiny_model, "eager", max_batch_size=1, max_seq_len=64)
    p = torch.tensor([[5, 6, 7]])
    a = gen.generate(p, 12, temperature=1.0, top_k=5, seed=3)
    b = gen.generate(p, 12, temperature=1.0, top_k=5, seed=3)
    assert torch.equal(a.tokens, b.tokens)
    logits = torch.randn(4, 50)
    allowed = torch.topk(logits, 3).indices
    for _ in range(20):
        s = sample(logits, 1.0, 3)
        assert all(s[i] in allowed[i] for i in range(4))


def test_eos_stops_and_pads(tiny_model):
    gen = Generator(tiny_model, "eager", max_batch_size=1, max_seq_len=64)
    p = torch.tensor([[1, 2, 3]])
    free = gen.generate(p, 20).tokens[0]
    eos = int(free[2])
    stopped = gen.generate(p, 20, eos_id=eos).tokens[0]
    first = int((stopped == eos).nonzero()[0, 0])
    assert (stopped[first:] == eos).all() and torch.equal(stopped[:first], free[:first])


def test_cudagraphs_on_cpu_is_a_clear_error(tiny_model):
    with pytest.raises(LabError, match="needs a CUDA GPU"):
        Generator(tiny_model, "compile-cudagraphs")


def test_bad_preset_and_device():
    with pytest.raises(LabError, match="unknown preset"):
        get_preset("llama-3b")
    if not torch.cuda.is_available():
        with pytest.raises(LabError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_tied_embeddings_share_storage():
    args = get_preset("tiny")
    args.tie_embeddings = True
    m = build_model(ModelSpec(args, "tiny", None), torch.device("cpu"), torch.float32)
    assert m.output.weight.data_ptr() == m.tok_embeddings.weight.data_ptr()


def test_cli_generate_prints_json(lab_cli):
    r = lab_cli(
        "generate",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "5",
        "--greedy",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 5 and out["ttft_ms"] > 0 and out["decode_steps"] == 4


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "--prompt-ids", "1,x"], "comma-separated"),
        (["generate", "--prompt-ids", "1", "--max-new-tokens", "0"], "must be >"),
        (["generate", "--prompt-ids", "1", "--preset", "nope"], "unknown preset"),
        (
            ["generate", "--prompt-ids", "99999", "--preset", "tiny", "--device", "cpu"],
            "outside the vocabulary",
        ),
        (
            ["generate", "--prompt-ids", "1", "--mode", "compile-cudagraphs", "--device", "cpu"],
            "needs a CUDA",
        ),
        (["generate", "--prompt-ids", "1", "--dtype", "fp64"], "unknown dtype"),
        (["generate", "--prompt-ids", "1", "--model-path", "/nonexistent/ckpt.pt"], "not found"),
        (["generate", "--prompt-ids", "1", "--bogus"], "unrecognized arguments"),
        (["plan", "--batch-size", "-1"], "must be >"),
        (["nosuchcommand"], "invalid choice"),
    ],
)
def test_cli_usage_errors_are_one_line_exit_2(lab_cli, argv, needle):
    r = lab_cli(*argv)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_plan_arithmetic_and_verdicts(lab_cli):
    from lab.model.plan import plan_memory

    a = get_preset("llama-8b")
    p = plan_memory(a, "bfloat16", 1, 4096, 80.0, "cuda", "llama-8b")
    assert 8.0e9 < a.num_params() < 8.1e9
    assert p.weights_gb == pytest.approx(a.num_params() * 2 / 1e9, rel=1e-3)
    # KV: 2 (k,v) x 32 layers x 4096 tokens x 8 heads x 128 dims x 2 bytes
    assert p.kv_cache_gb == pytest.approx(2 * 32 * 4096 * 8 * 128 * 2 / 1e9, rel=1e-3)
    assert p.fits and p.reserve_gb == 8.0
    big = plan_memory(get_preset("gpt-40b"), "bfloat16", 1, 4096, 80.0, "cuda", "gpt-40b")
    assert big.fits is False and "--dtype int8" in big.suggestions
    r = lab_cli("plan", "--preset", "llama-70b", "--gpu-memory-gb", "80", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["fits"] is False


def test_attention_accepts_a_non_contiguous_sdpa_output(tiny_model, monkeypatch):
    """CUDA's fused SDPA kernels can return [b, h, t, d] with a transposed memory layout (seen in float32
    on an H200); the model must not assume contiguity."""
    import torch.nn.functional as F

    torch.manual_seed(3)
    tokens = torch.randint(0, 512, (2, 7))
    pos = torch.arange(7).expand(2, 7)
    tiny_model.setup_caches(2, 16)
    ref = tiny_model(tokens, pos)
    real = F.scaled_dot_product_attention

    def strided(*args, **kwargs):
        y = real(*args, **kwargs)
        return y.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides

    monkeypatch.setattr(F, "scaled_dot_product_attention", strided)
    tiny_model.setup_caches(2, 17)
    torch.testing.assert_close(tiny_model(tokens, pos), ref)
