"""Model presets. `tiny` is the embedded default on CPU; the rest are real shapes (random weights
unless a checkpoint is given)."""

from __future__ import annotations

from lab.errors import LabError
from lab.model.llama import ModelArgs

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, ModelArgs] = {
    # Runs in seconds on 2 CPU cores; byte-level tokenizer fits in its vocabulary.
    "tiny": ModelArgs(
        vocab_size=512,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=172,
        max_seq_len=1024,
        rope_theta=10000.0,
        eos_token_id=None,
    ),
    # Llama 3.2 1B shape.
    "llama-1b": ModelArgs(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=8192,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
        rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # Llama 3 8B shape.
    "llama-8b": ModelArgs(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE),
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # The playbook's "GPT-40B class": d=8192, ffn=22016, 56 layers, about 39.6 B parameters.
    "gpt-40b": ModelArgs(
        vocab_size=50304,
        dim=8192,
        n_layers=56,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim=22016,
        max_seq_len=8192,
        rope_theta=10000.0,
    ),
    # Llama 3 70B shape.
    "llama-70b": ModelArgs(
        vocab_size=128256,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim=28672,
        max_seq_len=8192,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE),
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}


def get_preset(name: str) -> ModelArgs:
    try:
        base = PRESETS[name]
    except KeyError:
        raise LabError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}") from None
    return ModelArgs(**base.to_dict())
