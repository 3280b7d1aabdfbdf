"""Checkpoint loading refuses what it must: pickles that would run code (and the code never runs),
truncated or foreign files, missing / unexpected / mis-shaped tensors, unusable configs. Each is one
LabError naming the file and the tensors, and through the CLI exit code 2 with one line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lab.errors import LabError
from lab.model import prepare
from lab.model.checkpoint import load_state_dict, read_config
from lab.model.presets import get_preset

TINY = get_preset("tiny")


class WritesMarker:
    """Unpickling this calls builtins.open(marker, 'w'): a file appears if the pickle's code runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _ours(tiny_model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_model.state_dict().items()}


def _hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own state_dict renamed and split the way Hugging Face stores it."""
    a, hd = TINY, TINY.head_dim
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    out["lm_head.weight"] = state["output.weight"]
    for i in range(a.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state[p + "attention.wqkv.weight"].split(
            [a.n_heads * hd, a.n_kv_heads * hd, a.n_kv_heads * hd]
        )
        gate, up = state[p + "feed_forward.w13.weight"].split([a.ffn_dim, a.ffn_dim])
        out.update(
            {
                h + "self_attn.q_proj.weight": q,
                h + "self_attn.k_proj.weight": k,
                h + "self_attn.v_proj.weight": v,
                h + "self_attn.o_proj.weight": state[p + "attention.wo.weight"],
                h + "mlp.gate_proj.weight": gate,
                h + "mlp.up_proj.weight": up,
                h + "mlp.down_proj.weight": state[p + "feed_forward.w2.weight"],
                h + "input_layernorm.weight": state[p + "attention_norm.weight"],
                h + "post_attention_layernorm.weight": state[p + "ffn_norm.weight"],
            }
        )
    return {k: v.contiguous() for k, v in out.items()}


def _one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lab: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# --- code in pickles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "legacy-torch", "plain-pickle"])
def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.pt"
    payload = {"tok_embeddings.weight": torch.zeros(2, 2), "x": WritesMarker(marker)}
    if fmt == "zip":
        torch.save(payload, bad)
    elif fmt == "legacy-torch":
        torch.save(payload, bad, _use_new_zipfile_serialization=False)
    else:
        with bad.open("wb") as f:
            pickle.dump(payload, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(LabError, match=r"^refused: .*evil\.pt contains code or objects other than tensors"):
        prepare("tiny", str(bad), "cpu", "float32")
    with pytest.raises(LabError, match="refused"):
        read_config(bad, None)  # shape inference reads the file too, under the same rules
    assert not marker.exists()


def test_cli_refuses_code_pickle_with_exit_2_and_one_line(tmp_path, lab_cli):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.pt"
    torch.save({"w": WritesMarker(marker)}, bad)
    line = _one_line_error(
        lab_cli(
            "generate", "--preset", "tiny", "--model-path", str(bad), "--prompt-ids", "1,2", "--device", "cpu"
        )
    )
    assert "refused" in line and "re-save it as a plain state_dict or safetensors" in line
    assert not marker.exists()


# --- files that are not (whole) checkpoints -----------------------------------------------------------


def test_text_file_named_pt_is_not_a_checkpoint(tmp_path):
    fake = tmp_path / "model.pt"
    fake.write_text("this is a README, not weights\n")
    with pytest.raises(LabError, match=r"model\.pt is not a checkpoint"):
        load_state_dict(fake, TINY)


def test_text_file_named_safetensors(tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_text("hello world, definitely not tensors")
    with pytest.raises(LabError, match=r"model\.safetensors is not a safetensors file"):
        load_state_dict(fake, TINY)


def test_unknown_suffix_is_rejected(tmp_path):
    f = tmp_path / "weights.npz"
    f.write_bytes(b"PK\x03\x04")
    with pytest.raises(LabError, match=r"weights\.npz is not a checkpoint: expected a \.pt"):
        load_state_dict(f, TINY)


def test_truncated_safetensors(tmp_path, tiny_model):
    good = tmp_path / "good.safetensors"
    save_file(_ours(tiny_model), str(good))
    data = good.read_bytes()
    cut_data = tmp_path / "cut.safetensors"
    cut_data.write_bytes(data[: len(data) - 1000])
    with pytest.raises(LabError, match=r"cut\.safetensors is truncated: its tensors need \d+ bytes but"):
        load_state_dict(cut_data, TINY)
    cut_header = tmp_path / "cuthead.safetensors"
    cut_header.write_bytes(data[:40])
    with pytest.raises(LabError, match=r"cuthead\.safetensors is truncated: its header needs"):
        load_state_dict(cut_header, TINY)


def test_truncated_pt(tmp_path, tiny_model):
    good = tmp_path / "good.pt"
    torch.save(_ours(tiny_model), good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LabError, match=r"cut\.pt is truncated or corrupt"):
        load_state_dict(cut, TINY)


def test_pt_holding_something_other_than_a_state_dict(tmp_path):
    f = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], f)
    with pytest.raises(LabError, match=r"list\.pt is not a state_dict \(it holds list\)"):
        load_state_dict(f, TINY)
    g = tmp_path / "mixed.pt"
    torch.save({"tok_embeddings.weight": torch.zeros(2), "lr": 0.1}, g)
    with pytest.raises(LabError, match=r"mixed\.pt is not a plain state_dict: entries lr are not tensors"):
        load_state_dict(g, TINY)


def test_directory_with_no_weights(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(LabError, match=r"no weights in .*: expected model\.safetensors"):
        load_state_dict(tmp_path, TINY)


def test_sharded_index_naming_a_missing_shard(tmp_path, tiny_model):
    save_file(_hf_names(_ours(tiny_model)), str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LabError, match=r"lists shards that are missing .*model-00002-of-00002\.safetensors"):
        load_state_dict(tmp_path, TINY)


# --- tensors that do not fit the model ----------------------------------------------------------------


def test_good_files_load_exactly(tmp_path, tiny_model):
    """Our names in .pt and HF names in .safetensors give the same tensors back."""
    ours = _ours(tiny_model)
    torch.save(ours, tmp_path / "ours.pt")
    save_file(_hf_names(ours), str(tmp_path / "hf.safetensors"))
    for f in ("ours.pt", "hf.safetensors"):
        loaded = load_state_dict(tmp_path / f, TINY)
        assert set(loaded) == set(ours)
        for k in ours:
            assert torch.equal(loaded[k], ours[k]), (f, k)


def test_hf_directory_with_pytorch_bin_and_wrapped_names(tmp_path, tiny_model):
    """pytorch_model.bin (HF names, weights_only) in a directory; DDP/compile prefixes in a .pth."""
    ours = _ours(tiny_model)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    torch.save(_hf_names(ours), hf_dir / "pytorch_model.bin")
    torch.save({f"module._orig_mod.{k}": v for k, v in ours.items()}, tmp_path / "ddp.pth")
    for path in (hf_dir, tmp_path / "ddp.pth"):
        loaded = load_state_dict(path, TINY)
        assert set(loaded) == set(ours) and all(torch.equal(loaded[k], ours[k]) for k in ours)


def test_missing_tensors_are_named(tmp_path, tiny_model):
    ours = _ours(tiny_model)
    del ours["layers.1.feed_forward.w2.weight"]
    torch.save(ours, tmp_path / "m.pt")
    with pytest.raises(LabError, match=r"m\.pt is missing tensors: layers\.1\.feed_forward\.w2\.weight;"):
        load_state_dict(tmp_path / "m.pt", TINY)
    hf = _hf_names(_ours(tiny_model))
    del hf["model.layers.0.self_attn.k_proj.weight"]
    save_file(hf, str(tmp_path / "m.safetensors"))
    with pytest.raises(LabError, match=r"missing tensors: model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_state_dict(tmp_path / "m.safetensors", TINY)


def test_unexpected_tensors_are_named(tmp_path, tiny_model):
    ours = _ours(tiny_model)
    ours["layers.2.attention.wo.weight"] = torch.zeros(64, 64)  # a third layer the preset lacks
    ours["vision_tower.proj.weight"] = torch.zeros(4, 4)
    torch.save(ours, tmp_path / "u.pt")
    with pytest.raises(
        LabError, match=r"unexpected tensors .*layers\.2\.attention\.wo\.weight, vision_tower"
    ):
        load_state_dict(tmp_path / "u.pt", TINY)


def test_mis_shaped_tensors_say_expected_and_got(tmp_path, tiny_model):
    ours = _ours(tiny_model)
    ours["layers.0.attention.wo.weight"] = torch.zeros(64, 32)
    torch.save(ours, tmp_path / "s.pt")
    with pytest.raises(
        LabError,
        match=r"mis-shaped tensors: layers\.0\.attention\.wo\.weight expected \[64, 64\] got \[64, 32\]",
    ):
        load_state_dict(tmp_path / "s.pt", TINY)
    hf = _hf_names(_ours(tiny_model))
    hf["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(hf, str(tmp_path / "s.safetensors"))
    with pytest.raises(
        LabError, match=r"model\.layers\.1\.mlp\.up_proj\.weight expected \[172, 64\] got \[100, 64\]"
    ):
        load_state_dict(tmp_path / "s.safetensors", TINY)


def test_wrong_preset_for_the_weights_fails_before_loading_anything(tmp_path, tiny_model):
    torch.save(_ours(tiny_model), tmp_path / "tiny.pt")
    with pytest.raises(LabError, match=r"mis-shaped tensors|missing tensors|unexpected tensors"):
        prepare("llama-1b", str(tmp_path / "tiny.pt"), "cpu", "float32")


def test_shape_cannot_be_inferred_without_preset(tmp_path, tiny_model):
    ours = _ours(tiny_model)
    ours["tok_embeddings.weight"] = torch.zeros(300, 64)  # vocab 300 matches no preset
    ours["output.weight"] = torch.zeros(300, 64)
    torch.save(ours, tmp_path / "odd.pt")
    with pytest.raises(LabError, match=r"cannot tell the attention head count .*pass --preset NAME"):
        read_config(tmp_path / "odd.pt", None)


def test_tied_checkpoint_needs_no_output_weight(tmp_path, tiny_model):
    from dataclasses import replace

    tied = replace(TINY, tie_embeddings=True)
    ours = _ours(tiny_model)
    del ours["output.weight"]
    torch.save(ours, tmp_path / "tied.pt")
    loaded = load_state_dict(tmp_path / "tied.pt", tied)
    assert "output.weight" not in loaded and torch.equal(
        loaded["tok_embeddings.weight"], ours["tok_embeddings.weight"]
    )


# --- config.json --------------------------------------------------------------------------------------


def _config(tmp_path: Path, **overrides) -> Path:
    cfg = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": [7, 9],
    }
    cfg.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_old_style_config_fields(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192}
    args = read_config(_config(tmp_path, rope_scaling=scaling), None)
    assert args.eos_token_id == 7 and args.bos_token_id == 1 and args.max_seq_len == 512
    assert args.rope_scaling["factor"] == 32.0 and args.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model_type": "mistral"}, r"model_type 'mistral' is not supported"),
        ({"head_dim": 32}, r"head_dim 32 differs from hidden_size/num_attention_heads = 16"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            r"rope scaling type 'yarn' is not supported",
        ),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, r"rope scaling type 'dynamic'"),
        ({"attention_bias": True}, r"attention_bias is true; this model has no bias terms"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
        ({"num_key_value_heads": 3}, r"not divisible by num_key_value_heads 3"),
        ({"hidden_size": None}, r"missing or non-integer hidden_size"),
    ],
)
def test_unusable_configs_are_rejected(tmp_path, overrides, message):
    with pytest.raises(LabError, match=message):
        read_config(_config(tmp_path, **overrides), None)


def test_config_that_is_not_json(tmp_path, lab_cli):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LabError, match=r"config\.json is not readable JSON"):
        read_config(tmp_path, None)
    line = _one_line_error(
        lab_cli("generate", "--model-path", str(tmp_path), "--prompt-ids", "1", "--device", "cpu")
    )
    assert "config.json is not readable JSON" in line


def test_cli_errors_are_one_line(tmp_path, lab_cli):
    fake = tmp_path / "model.pt"
    fake.write_text("not weights")
    line = _one_line_error(
        lab_cli("generate", "--model-path", str(fake), "--preset", "tiny", "--prompt-ids", "1")
    )
    assert "is not a checkpoint" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_error(
        lab_cli("generate", "--prompt-ids", "1", "--device", "cpu", env={"MODEL_PATH": str(empty)})
    )
    assert "cannot tell the model shape" in line or "no weights in" in line
    line = _one_line_error(
        lab_cli("generate", "--model-path", str(tmp_path / "nope.pt"), "--prompt-ids", "1")
    )
    assert "not found" in line
