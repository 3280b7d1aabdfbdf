"""Our Llama equals transformers' LlamaForCausalLM: full-sequence logits to 1e-4 in float32 and greedy
generation token for token, for checkpoints loaded from a Hugging Face directory (single and sharded
safetensors), a `.pt` state_dict in our names, a `.safetensors` file in HF names, and through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency (pyproject's [dev] extra): a test-only reference

from lab.engine.generate import Generator
from lab.model import prepare

PROMPT_LEN, NEW_TOKENS, FULL_LEN = 7, 24, 48

BASE = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256
)
CONFIGS: dict[str, dict] = {
    # Grouped-query attention, untied embeddings, default theta.
    "gqa": dict(BASE, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    # Multi-head attention with tied embeddings.
    "tied": dict(BASE, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    # A non-default rope theta and norm epsilon, 3 layers.
    "theta": dict(
        BASE,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_theta=123456.0,
        rms_norm_eps=1e-6,
        eos_token_id=[3, 4],  # a list, as Llama 3 configs have: the first is used
        tie_word_embeddings=False,
    ),
    # Llama 3 rope scaling; head_dim 16 with original context 512 puts one frequency in the smoothed band.
    "llama3": dict(
        BASE,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
        tie_word_embeddings=True,
    ),
    # Exactly the `tiny` preset's shape, so files without config.json load by --preset or by inference.
    "tiny-shape": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}


def _hf_model(cfg: dict, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(initializer_range=0.08, **cfg)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so swapping attention_norm and ffn_norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """One random HF model per config, saved with save_pretrained (safetensors); `llama3` is sharded."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model = _hf_model(cfg, seed=100 + i)
        d = tmp_path_factory.mktemp(f"hf-{name}")
        kw = {"max_shard_size": "64KB"} if name == "llama3" else {}
        model.save_pretrained(d, safe_serialization=True, **kw)
        out[name] = (model, d)
    return out


def _prompts(vocab: int, seed: int, batch: int = 2, length: int = PROMPT_LEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@torch.no_grad()
def _hf_greedy(model, prompt: torch.Tensor) -> torch.Tensor:
    # An explicit all-ones mask: otherwise transformers masks prompt tokens equal to pad_token_id.
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
    )
    return out[:, prompt.shape[1] :]


def _assert_equivalent(hf_model, path: str, preset: str | None = None) -> None:
    vocab = hf_model.config.vocab_size
    prepared = prepare(preset, path, "cpu", "float32", 0, 2, FULL_LEN)
    ours = prepared.model

    tokens = _prompts(vocab, seed=1, length=FULL_LEN)
    ours.setup_caches(2, FULL_LEN)
    with torch.no_grad():
        got = ours(tokens, torch.arange(FULL_LEN).expand(2, FULL_LEN))
        want = hf_model(tokens).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    prompt = _prompts(vocab, seed=2)
    gen = Generator(ours, "eager", max_batch_size=2, max_seq_len=PROMPT_LEN + NEW_TOKENS)
    result = gen.generate(prompt, NEW_TOKENS)
    assert result.tokens.tolist() == _hf_greedy(hf_model, prompt).tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_directory_matches_transformers(hf_checkpoints, name):
    model, d = hf_checkpoints[name]
    if name == "llama3":
        assert (d / "model.safetensors.index.json").is_file()  # the sharded path is exercised
    _assert_equivalent(model, str(d))


def test_config_maps_every_field(hf_checkpoints):
    from lab.model.checkpoint import read_config

    args = read_config(hf_checkpoints["llama3"][1], None)
    assert (args.dim, args.n_heads, args.n_kv_heads, args.ffn_dim, args.vocab_size) == (64, 4, 2, 96, 160)
    assert args.tie_embeddings and args.max_seq_len == 256 and args.rope_theta == 500000.0
    assert args.rope_scaling["rope_type"] == "llama3" and args.rope_scaling["factor"] == 8.0
    theta = read_config(hf_checkpoints["theta"][1], None)
    assert theta.norm_eps == 1e-6 and theta.rope_theta == 123456.0 and not theta.tie_embeddings
    assert theta.eos_token_id == 3 and theta.n_layers == 3 and theta.n_kv_heads == 1


def test_pt_state_dict_in_our_names(hf_checkpoints, tmp_path):
    """A .pt of the model's own state_dict, shaped by --preset, by inference, or by a config.json beside it."""
    model, d = hf_checkpoints["tiny-shape"]
    state = prepare(None, str(d), "cpu", "float32", 0, 1, 16).model.state_dict()
    assert "layers.0.attention.wqkv.weight" in state
    pt = tmp_path / "weights.pt"
    torch.save(state, pt)
    _assert_equivalent(model, str(pt), preset="tiny")
    _assert_equivalent(model, str(pt))  # no preset: the shapes match exactly one preset (tiny)

    gqa_model, gqa_dir = hf_checkpoints["gqa"]
    state = prepare(None, str(gqa_dir), "cpu", "float32", 0, 1, 16).model.state_dict()
    side = tmp_path / "side"
    side.mkdir()
    torch.save({"state_dict": state, "step": 7}, side / "model.pt")  # a training-style wrapper
    shutil.copy(gqa_dir / "config.json", side / "config.json")
    _assert_equivalent(gqa_model, str(side / "model.pt"))


def test_safetensors_file_in_hf_names(hf_checkpoints, tmp_path):
    model, d = hf_checkpoints["tiny-shape"]
    single = tmp_path / "llama.safetensors"
    shutil.copy(d / "model.safetensors", single)
    _assert_equivalent(model, str(single), preset="tiny")

    tied_model, tied_dir = hf_checkpoints["tied"]
    side = tmp_path / "tied"
    side.mkdir()
    shutil.copy(tied_dir / "model.safetensors", side / "weights.safetensors")
    shutil.copy(tied_dir / "config.json", side / "config.json")
    _assert_equivalent(tied_model, str(side / "weights.safetensors"))


def test_cli_generate_from_hf_directory_and_model_path_env(hf_checkpoints, lab_cli):
    model, d = hf_checkpoints["gqa"]
    prompt = _prompts(model.config.vocab_size, seed=3, batch=1)
    want = _hf_greedy(model, prompt)[0].tolist()
    # The CLI stops at the config's EOS (2); transformers here does not. This seed never emits it.
    assert model.config.eos_token_id not in want
    ids = ",".join(str(t) for t in prompt[0].tolist())
    common = ["--prompt-ids", ids, "--max-new-tokens", str(NEW_TOKENS), "--greedy", "--device", "cpu"]
    common += ["--dtype", "float32"]

    by_flag = lab_cli("generate", "--model-path", str(d), *common)
    assert by_flag.returncode == 0, by_flag.stderr
    out = json.loads(by_flag.stdout)
    assert out["token_ids"] == want and out["model_path"] == str(d)

    by_env = lab_cli("generate", *common, env={"MODEL_PATH": str(d)})
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["token_ids"] == want
