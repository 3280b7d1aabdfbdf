"""`compare_inference_methods()` and `lab compare` on the tiny preset (CPU): per-method results, speedup
vs eager, failures recorded without aborting the others, the correctness check catching a perturbed
model, reusable handles, the artifact, FlexAttention decode against the dense path (eager, no compile),
and notebook 03 under papermill. The module's one torch.compile is the `compile` method."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lab import compare_inference_methods
from lab.bench.compare import CompareArtifact, flex_available, flex_decode_step, parse_methods
from lab.engine.generate import Generator, decode_step
from lab.errors import LabError
from lab.model import ModelSpec, build_model, get_preset
from lab.results import read_artifact, write_artifact


def _tiny():
    spec = ModelSpec(args=get_preset("tiny"), preset="tiny", model_path=None)
    return build_model(spec, torch.device("cpu"), torch.float32, seed=0)


def _perturbed(model, max_batch, max_seq):
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.layers[0].feed_forward.w2.weight.mul_(1.5)
    return Generator(bad, "eager", max_batch, max_seq)


def _broken(model, max_batch, max_seq):
    raise RuntimeError("simulated kernel failure\nwith a second line")


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    return compare_inference_methods(
        _tiny(),
        methods="compile,eager-cudagraph,reduce-overhead",
        prompt_len=8,
        max_new_tokens=6,
        iters=2,
        warmup=1,
        custom_methods={"perturbed": _perturbed, "broken": _broken},
    )


def test_every_method_has_a_row_and_eager_is_the_reference(result):
    assert list(result.methods) == [
        "eager",
        "compile",
        "eager-cudagraph",
        "reduce-overhead",
        "perturbed",
        "broken",
    ]
    eager = result.methods["eager"]
    assert eager.status == "ok" and eager.speedup_vs_eager == pytest.approx(1.0)
    assert eager.correct is True and eager.max_logit_diff == 0.0 and eager.compile_s is None
    d = eager.decode_ms_per_token
    assert d["count"] == 2 * 5 and 0 < d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]
    assert eager.decode_tokens_per_s_per_user > 0 and len(eager.iterations) == 2


def test_compiled_method_matches_eager_and_reports_speedup(result):
    c = result.methods["compile"]
    assert c.status == "ok" and c.compile_s > 0 and c.cache_state in ("hit", "miss", "partial")
    assert c.correct is True and c.max_logit_diff < 1e-3 and c.greedy_token_agreement == 1.0
    assert c.first_divergence is None and c.forced_argmax_agreement == 1.0
    base = result.methods["eager"].decode_ms_per_token["p50"]
    assert c.speedup_vs_eager == pytest.approx(base / c.decode_ms_per_token["p50"])


def test_failures_are_recorded_and_the_others_still_run(result):
    for name in ("eager-cudagraph", "reduce-overhead"):
        r = result.methods[name]
        assert r.status == "failed" and "needs a CUDA GPU" in r.reason and r.speedup_vs_eager is None
    broken = result.methods["broken"]
    assert broken.status == "failed" and broken.reason == "RuntimeError: simulated kernel failure"
    assert result.methods["perturbed"].status == "ok"  # ran after a failure


def test_correctness_check_catches_a_perturbed_model(result):
    p = result.methods["perturbed"]
    assert p.correct is False
    assert p.rel_logit_diff > 1e-3 and p.max_logit_diff > result.methods["compile"].max_logit_diff * 100
    assert result.best() in ("eager", "compile")  # an incorrect method is never "best"


def test_handles_are_reusable_generators(result):
    eager_tokens = result.handle("eager").generate(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 5).tokens
    compiled = result.handle("compile")
    assert isinstance(compiled, Generator)
    assert torch.equal(compiled.generate(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 5).tokens, eager_tokens)
    with pytest.raises(LabError, match="failed"):
        result.handle("eager-cudagraph")
    with pytest.raises(LabError, match="was not run"):
        result.handle("max-autotune")


def test_artifact_round_trips_and_validates(result, tmp_path):
    art = result.to_artifact({"note": "test"})
    write_artifact(tmp_path / "compare.json", art)
    back = read_artifact(tmp_path / "compare.json")
    assert isinstance(back, CompareArtifact) and back.kind == "compare" and back.status == "ok"
    assert [m["name"] for m in back.methods] == list(result.methods)
    assert back.summary["compile.correct"] is True and back.summary["perturbed.correct"] is False
    assert back.summary["methods_failed"] == 3 and "needs a CUDA GPU" in back.unavailable["reduce-overhead"]
    assert "not available on cpu" in back.unavailable["peak_memory_gb"]
    assert all("handle" not in m for m in back.methods)
    eager = back.methods[0]
    assert (
        eager["decode_ms_per_token_p50"] == eager["decode_ms_per_token"]["p50"]
        and eager["decode_tokens_per_s"] > 0
    )


def test_method_names_are_validated():
    assert parse_methods("compile, eager") == ["eager", "compile"]
    assert parse_methods(None)[0] == "eager" and "max-autotune" not in parse_methods(None)
    with pytest.raises(LabError, match="unknown method"):
        parse_methods("eager,fast")
    with pytest.raises(LabError, match="shadow"):
        compare_inference_methods(_tiny(), methods="eager", custom_methods={"compile": _perturbed})


@pytest.mark.skipif(flex_available() is not None, reason="this torch has no FlexAttention block masks")
def test_flex_attention_decode_matches_the_dense_path():
    import warnings

    model = _tiny()
    model.setup_caches(2, 160)  # two KV blocks of 128: the second is partly filled for one row
    torch.manual_seed(3)
    prompt = torch.randint(0, 512, (2, 140))
    model(prompt, torch.arange(140).expand(2, 140))
    tokens, pos = torch.tensor([[5], [9]]), torch.tensor([[140], [140]])
    snapshot = [
        (layer.attention.kv_cache.k.clone(), layer.attention.kv_cache.v.clone()) for layer in model.layers
    ]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention without torch.compile warns that it is slow
        _, dense = decode_step(model, tokens, pos, None, 0.0, None)
        for layer, (k, v) in zip(model.layers, snapshot):
            layer.attention.kv_cache.k.copy_(k)
            layer.attention.kv_cache.v.copy_(v)
        _, flex = flex_decode_step(model, tokens, pos, None, 0.0, None)
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)


def test_cli_compare_writes_the_artifact(lab_cli, tmp_path):
    out = tmp_path / "compare.json"
    r = lab_cli(
        "compare",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--methods",
        "eager,eager-cudagraph",
        "--prompt-len",
        "8",
        "--max-new-tokens",
        "4",
        "--iters",
        "2",
        "--output-json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    art = read_artifact(out)
    assert art.kind == "compare" and [m["status"] for m in art.methods] == ["ok", "failed"]
    assert "eager-cudagraph" in r.stdout and "needs a CUDA GPU" in r.stdout


def test_cli_compare_bad_method_is_a_usage_error(lab_cli, tmp_path):
    r = lab_cli("compare", "--methods", "eager,warp-speed", "--output-json", str(tmp_path / "c.json"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "unknown method" in r.stderr
    assert not (tmp_path / "c.json").exists()


@pytest.mark.slow
def test_notebook_03_runs_under_papermill(repo_root, tmp_path):
    import papermill as pm

    out = tmp_path / "report"
    pm.execute_notebook(
        str(repo_root / "notebooks" / "03_eager_vs_compiled.ipynb"),
        str(tmp_path / "03_out.ipynb"),
        parameters={
            "output_dir": str(out),
            "preset": "tiny",
            "device": "cpu",
            "methods": "eager,eager-cudagraph",
            "prompt_len": 8,
            "max_new_tokens": 4,
            "iters": 2,
        },
        kernel_name="python3",
        cwd=str(repo_root),
        progress_bar=False,
    )
    art = read_artifact(out / "compare.json")
    assert art.kind == "compare" and art.status == "ok" and len(art.methods) == 2
    nb = json.loads((tmp_path / "03_out.ipynb").read_text())
    figures = [
        o
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if "application/vnd.plotly.v1+json" in o.get("data", {})
    ]
    assert len(figures) >= 4
