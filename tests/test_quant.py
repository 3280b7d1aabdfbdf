"""Weight-only fp8/int8 quantisation: fits the plan, and agrees with the unquantised model."""

import pytest
import torch

from lab.engine.generate import Generator
from lab.model import ModelSpec, build_model, get_preset, prepare
from lab.model.quant import WeightOnlyLinear, quantize_weight


@pytest.mark.parametrize("kind,tol", [("fp8", 0.07), ("int8", 0.01)])
def test_quantised_weights_round_trip(kind, tol):
    w = torch.randn(64, 128)
    q, s = quantize_weight(w, kind)
    err = ((q.float() * s[:, None]) - w).norm() / w.norm()
    assert err < tol and q.element_size() == 1 and s.shape == (64,)


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_quantised_model_agrees_with_bf16(kind):
    spec = ModelSpec(get_preset("tiny"), "tiny", None)
    ref = build_model(spec, torch.device("cpu"), torch.bfloat16, seed=0)
    qm = build_model(spec, torch.device("cpu"), torch.bfloat16, seed=0, quant=kind)
    assert isinstance(qm.layers[0].attention.wqkv, WeightOnlyLinear)
    assert qm.layers[0].feed_forward.w13.weight.element_size() == 1
    prompt = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    g_ref = Generator(ref, "eager", 1, 64).generate(prompt, 12, keep_logits=True)
    g_q = Generator(qm, "eager", 1, 64).generate(prompt, 12, keep_logits=True)
    # Logit error relative to the logits' scale, reported by the perf benchmark on real shapes too.
    rel = (g_q.logits[0] - g_ref.logits[0]).norm() / g_ref.logits[0].norm()
    assert rel < 0.1
    agree = (g_q.tokens == g_ref.tokens).float().mean()
    assert agree >= 0.75


def test_prepare_fp8_plans_quantised_bytes():
    p = prepare("tiny", None, "cpu", "fp8", 0, 1, 64)
    assert p.quant == "fp8" and p.dtype == torch.bfloat16 and p.plan.dtype == "fp8"
