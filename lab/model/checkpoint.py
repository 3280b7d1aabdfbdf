"""Checkpoints: the model's shape from a Hugging Face config.json, a preset, or the tensors themselves,
and its weights from a `.pt` state_dict, a `.safetensors` file, or a Hugging Face Llama directory.

Nothing in a checkpoint is ever executed: `.pt`/`.bin` files go through `torch.load(weights_only=True)`,
whose restricted unpickler admits tensors and plain containers only; safetensors holds no code at all.
Hugging Face names are mapped to the model's own (q/k/v fused into `wqkv`, gate/up into `w13`), and every
problem (missing, unexpected or mis-shaped tensors, a truncated file, a file that is not a checkpoint) is
one LabError naming the file and the tensors.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lab.errors import LabError
from lab.model.llama import ModelArgs

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
SUPPORTED_ROPE_TYPES = ("llama3",)
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit

# Hugging Face parameter names -> (our name, which part of a fused tensor or None).
_HF_LAYER = {
    "self_attn.q_proj.weight": ("attention.wqkv.weight", "q"),
    "self_attn.k_proj.weight": ("attention.wqkv.weight", "k"),
    "self_attn.v_proj.weight": ("attention.wqkv.weight", "v"),
    "self_attn.o_proj.weight": ("attention.wo.weight", None),
    "mlp.gate_proj.weight": ("feed_forward.w13.weight", "gate"),
    "mlp.up_proj.weight": ("feed_forward.w13.weight", "up"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", None),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
_HF_TOP = {
    "embed_tokens.weight": "tok_embeddings.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_FUSED_PARTS = {"attention.wqkv.weight": ("q", "k", "v"), "feed_forward.w13.weight": ("gate", "up")}
_HF_PART_NAME = {
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
}
# Buffers some older exports carry; recomputed by the model, so ignored.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------------------------------
# Shape: config.json, preset, or inference from the tensors
# ----------------------------------------------------------------------------------------------------


def read_config(path: Path, preset: str | None) -> ModelArgs:
    """The model shape for the checkpoint at `path`.

    A directory with config.json (or a file with a config.json beside it and no --preset) is described by
    that config. Otherwise the preset gives the shape; with no preset either, the shape is inferred from the
    tensors when it can be told apart (it matches one preset), else a LabError says to pass --preset."""
    from lab.model.presets import get_preset

    path = Path(path)
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            return args_from_hf_config(cfg)
        if preset:
            return get_preset(preset)
        return infer_args(path)
    if not path.is_file():
        raise LabError(
            f"checkpoint '{path}' is neither a file nor a directory; check --model-path / MODEL_PATH"
        )
    if preset:
        return get_preset(preset)
    beside = path.parent / "config.json"
    if beside.is_file():
        return args_from_hf_config(beside)
    return infer_args(path)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LabError(f"{path} is not readable JSON ({e}); fix or remove it") from None
    if not isinstance(data, dict):
        raise LabError(f"{path} is not a JSON object; expected a Hugging Face config")
    return data


def args_from_hf_config(path: Path) -> ModelArgs:
    """Map a Hugging Face Llama config.json to ModelArgs, rejecting what the model cannot represent."""
    c = _load_json(path)
    model_type = c.get("model_type")
    if model_type != "llama":
        raise LabError(
            f"{path}: model_type '{model_type}' is not supported; only Llama-architecture checkpoints "
            "(model_type 'llama') load"
        )
    required = [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    ]
    missing = [k for k in required if not isinstance(c.get(k), int) or isinstance(c.get(k), bool)]
    if missing:
        raise LabError(f"{path}: missing or non-integer {', '.join(missing)}; not a usable Llama config")
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    if heads <= 0 or dim % heads:
        raise LabError(f"{path}: hidden_size {dim} is not divisible by num_attention_heads {heads}")
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim != dim // heads:
        raise LabError(
            f"{path}: head_dim {head_dim} differs from hidden_size/num_attention_heads = {dim // heads}; "
            "this model needs head_dim = hidden_size / num_attention_heads"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            raise LabError(f"{path}: {flag} is true; this model has no bias terms")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise LabError(f"{path}: hidden_act '{act}' is not supported; the model uses SwiGLU (silu)")

    # transformers >= 5 writes rope_parameters (with rope_theta inside); older versions write
    # rope_theta and rope_scaling at the top level.
    rope = c.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise LabError(f"{path}: rope_parameters is not an object")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        scaling = None
    elif rope_type not in SUPPORTED_ROPE_TYPES:
        raise LabError(
            f"{path}: rope scaling type '{rope_type}' is not supported; supported: none (default) or "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    elif "factor" not in scaling:
        raise LabError(f"{path}: rope scaling '{rope_type}' has no 'factor'")
    else:
        scaling = {**scaling, "rope_type": rope_type}

    eos = c.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    args = ModelArgs(
        vocab_size=c["vocab_size"],
        dim=dim,
        n_layers=c["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=kv_heads,
        ffn_dim=c["intermediate_size"],
        max_seq_len=int(c.get("max_position_embeddings") or 4096),
        rope_theta=float(theta),
        norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=eos,
        extra={"config": str(path)},
    )
    if heads % kv_heads:
        raise LabError(
            f"{path}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}"
        )
    return args


def infer_args(path: Path) -> ModelArgs:
    """Shape from tensor shapes. Sizes, layers and tying are visible in the tensors; the head count is
    not, so the shape must match exactly one preset."""
    from lab.model.presets import PRESETS

    shapes = {}
    for name, shape in read_shapes(path).items():
        mapped = _map_name(name)
        if mapped is not None:
            shapes[mapped] = (shape, name)
    emb = shapes.get(("tok_embeddings.weight", None))
    if emb is None:
        raise LabError(
            f"cannot tell the model shape of {path}: no embedding tensor (tok_embeddings / "
            "model.embed_tokens); pass --preset NAME or use a Hugging Face directory with config.json"
        )
    vocab, dim = emb[0]
    layers = 1 + max((int(k.split(".")[1]) for k, _ in shapes if k.startswith("layers.")), default=-1)

    def rows(name: str, part: str | None = None) -> int | None:
        got = shapes.get((name, part))
        return got[0][0] if got else None

    ffn = rows("layers.0.feed_forward.w13.weight", "gate")
    if ffn is None and rows("layers.0.feed_forward.w13.weight"):
        ffn = rows("layers.0.feed_forward.w13.weight") // 2
    q_rows = rows("layers.0.attention.wqkv.weight", "q")
    kv_rows = rows("layers.0.attention.wqkv.weight", "k")
    wo = shapes.get(("layers.0.attention.wo.weight", None))
    if q_rows is None and wo is not None and rows("layers.0.attention.wqkv.weight"):
        q_rows = wo[0][1]
        kv_rows = (rows("layers.0.attention.wqkv.weight") - q_rows) // 2
    tied = ("output.weight", None) not in shapes
    seen = dict(vocab=vocab, dim=dim, layers=layers, ffn=ffn, q_rows=q_rows, kv_rows=kv_rows, tied=tied)
    matches = [
        name
        for name, a in PRESETS.items()
        if (a.vocab_size, a.dim, a.n_layers, a.ffn_dim, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim)
        == (vocab, dim, layers, ffn, q_rows, kv_rows)
        and a.tie_embeddings == tied
    ]
    if len(matches) != 1:
        desc = ", ".join(f"{k} {v}" for k, v in seen.items())
        raise LabError(
            f"cannot tell the attention head count of {path} from its tensors ({desc}); "
            "pass --preset NAME or put a Hugging Face config.json beside it"
        )
    from lab.model.presets import get_preset

    args = get_preset(matches[0])
    args.extra = {"shape_from": f"preset {matches[0]} (matched the tensor shapes)"}
    return args


# ----------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------


def _map_name(name: str) -> tuple[str, str | None] | None:
    """Our name (and fused part) for a checkpoint name in either naming; None for ignored buffers.
    Unknown names come back unchanged so they can be reported as unexpected."""
    if _IGNORED.search(name):
        return None
    for prefix in _WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix) :]
    if name.startswith("model."):
        name = name[len("model.") :]
    if name in _HF_TOP:
        return _HF_TOP[name], None
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _HF_LAYER:
        ours, part = _HF_LAYER[m.group(2)]
        return f"layers.{m.group(1)}.{ours}", part
    return name, None


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor the model loads, in its own names, with its shape."""
    d, hd, f = args.dim, args.head_dim, args.ffn_dim
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        out[p + "attention.wqkv.weight"] = ((args.n_heads + 2 * args.n_kv_heads) * hd, d)
        out[p + "attention.wo.weight"] = (d, args.n_heads * hd)
        out[p + "feed_forward.w13.weight"] = (2 * f, d)
        out[p + "feed_forward.w2.weight"] = (d, f)
        out[p + "attention_norm.weight"] = (d,)
        out[p + "ffn_norm.weight"] = (d,)
    if not args.tie_embeddings:
        out["output.weight"] = (args.vocab_size, d)
    return out


def _part_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    hd, d = args.head_dim, args.dim
    return {
        "q": (args.n_heads * hd, d),
        "k": (args.n_kv_heads * hd, d),
        "v": (args.n_kv_heads * hd, d),
        "gate": (args.ffn_dim, d),
        "up": (args.ffn_dim, d),
    }


def _list(names: Iterable[str], limit: int = 6) -> str:
    names = list(names)
    head = ", ".join(names[:limit])
    return head + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Validate a safetensors file's framing ourselves, so a truncated file or one that is not
    safetensors gets a plain message instead of a parser error."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise LabError(f"{path} is not a safetensors file ({size} bytes); re-export the checkpoint")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_SAFETENSORS_HEADER:
                raise LabError(
                    f"{path} is not a safetensors file (no valid header); check the path or re-export it"
                )
            raw = fh.read(n)
    except OSError as e:
        raise LabError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) < n:
        raise LabError(
            f"{path} is truncated: its header needs {n} bytes but the file has {size}; re-download or re-export it"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LabError(f"{path} is not a safetensors file (header is not JSON); check the path") from None
    if not isinstance(header, dict):
        raise LabError(f"{path} is not a safetensors file (header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise LabError(f"{path} is corrupt: tensor '{name}' has no valid data_offsets") from None
    if 8 + n + end > size:
        raise LabError(
            f"{path} is truncated: its tensors need {8 + n + end} bytes but the file has {size}; "
            "re-download or re-export it"
        )
    return header


def _read_safetensors(path: Path, names_only: bool = False) -> dict[str, Any]:
    header = _safetensors_header(path)
    if names_only:
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LabError(f"{path} is corrupt or not a safetensors file ({e}); re-export it") from None


def _refusal(path: Path, why: str) -> LabError:
    return LabError(
        f"refused: {path} contains code or objects other than tensors ({why}); re-save it as a plain "
        "state_dict or safetensors"
    )


def _read_torch(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True (never a plain unpickle), memory-mapped when the file is in
    torch's zip format."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise LabError(f"cannot read {path}: {e.strerror or e}") from None
    is_zip = magic.startswith(b"PK\x03\x04")
    is_pickle = magic[:1] == b"\x80" and len(magic) > 1 and 2 <= magic[1] <= 5
    if not (is_zip or is_pickle):
        raise LabError(
            f"{path} is not a checkpoint (not a torch-saved file); pass a .pt state_dict, a .safetensors file "
            "or a Hugging Face directory"
        )
    if is_zip:
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            raise LabError(f"{path} is truncated or corrupt (unreadable zip archive); re-save it") from None
        if not any(n.endswith("data.pkl") for n in names):
            raise LabError(f"{path} is a zip archive but not a torch checkpoint (no data.pkl)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if re.search(r"GLOBAL|allowed global|Unsupported operand", msg):
            found = re.search(r"GLOBAL (\S+)", msg)
            raise _refusal(
                path, f"it names {found.group(1)}" if found else "disallowed pickle content"
            ) from None
        raise LabError(f"{path} is truncated or corrupt ({msg.splitlines()[0][:160]}); re-save it") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise LabError(f"{path} is truncated or corrupt ({first}); re-save it") from None
    return _tensor_dict(obj, path)


def _tensor_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The state_dict inside what torch.load returned: the dict itself, or under 'state_dict'/'model'."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner)
        bad = [str(k) for k, v in obj.items() if not isinstance(v, Tensor) or not isinstance(k, str)]
        if obj and not bad:
            return dict(obj)
        if bad:
            raise LabError(
                f"{path} is not a plain state_dict: entries {_list(bad)} are not tensors; save "
                "model.state_dict() (a dict of name -> tensor)"
            )
    raise LabError(
        f"{path} is not a state_dict (it holds {type(obj).__name__}); save model.state_dict() or use safetensors"
    )


def _weight_files(path: Path) -> list[Path]:
    """The files that hold the weights: the file itself, or a directory's shards."""
    if path.is_file():
        if path.suffix in TORCH_SUFFIXES or path.suffix == SAFETENSORS_SUFFIX:
            return [path]
        raise LabError(
            f"{path} is not a checkpoint: expected a .pt/.pth/.bin state_dict, a .safetensors file or a "
            "Hugging Face directory"
        )
    if not path.is_dir():
        raise LabError(f"checkpoint '{path}' not found; check --model-path / MODEL_PATH")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = _load_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise LabError(f"{index} has no weight_map; re-export the checkpoint")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise LabError(f"{index} lists shards that are missing in {path}: {_list(missing)}")
            return [path / s for s in shards]
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "pytorch_model*.bin"):
        found = sorted(path.glob(pattern))
        if found:
            return found
    found = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth"))
    if found:
        return found
    raise LabError(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json with shards, "
        "pytorch_model*.bin or a .pt file"
    )


def _read_file(path: Path) -> dict[str, Any]:
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    return _read_torch(path)


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes without reading the data (safetensors headers; mmap'd .pt files)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in _weight_files(Path(path)):
        if f.suffix == SAFETENSORS_SUFFIX:
            shapes.update(_read_safetensors(f, names_only=True))
        else:
            shapes.update({k: tuple(v.shape) for k, v in _read_torch(f).items()})
    return shapes


# ----------------------------------------------------------------------------------------------------
# The state dict
# ----------------------------------------------------------------------------------------------------


def load_state_dict(path: Path, args: ModelArgs) -> dict[str, Tensor]:
    """Read the checkpoint at `path` into the model's own names, checked against `args`: every expected
    tensor present with the expected shape, nothing unexpected. Tied embeddings need no output weight."""
    path = Path(path)
    raw: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    for f in _weight_files(path):
        for k, v in _read_file(f).items():
            raw[k] = v
            origin[k] = f
    if not raw:
        raise LabError(f"{path} holds no tensors; it is not a checkpoint")

    expected = expected_shapes(args)
    parts_shape = _part_shapes(args)
    plain: dict[str, Tensor] = {}
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    unexpected: list[str] = []
    for name, tensor in raw.items():
        mapped = _map_name(name)
        if mapped is None:
            continue
        ours, part = mapped
        if ours == "output.weight" and args.tie_embeddings:
            continue  # tied: the embedding is the output head
        if ours not in expected:
            unexpected.append(name)
            continue
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            what = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
            raise LabError(f"{origin[name]}: tensor {name} is {what}, expected floating-point weights")
        if part is None:
            plain[ours] = tensor
        else:
            parts.setdefault(ours, {})[part] = (name, tensor)

    if unexpected:
        raise LabError(
            f"{path} has unexpected tensors for this model shape ({args.n_layers} layers): {_list(unexpected)}; "
            "check --preset or the checkpoint's config.json"
        )

    missing: list[str] = []
    bad_shapes: list[str] = []
    for ours, pieces in parts.items():
        if ours in plain:
            raise LabError(f"{path} holds both fused {ours} and its separate parts; keep one form")
        _, n, suffix = ours.split(".", 2)  # layers.N.<fused name>
        order = _FUSED_PARTS[suffix]
        layer_prefix = f"layers.{n}"
        absent = [f"model.{layer_prefix}.{_HF_PART_NAME[p]}" for p in order if p not in pieces]
        if absent:
            missing.extend(absent)
            continue
        for p in order:
            name, t = pieces[p]
            if tuple(t.shape) != parts_shape[p]:
                bad_shapes.append(f"{name} expected {list(parts_shape[p])} got {list(t.shape)}")
        if not bad_shapes:
            plain[ours] = torch.cat([pieces[p][1] for p in order], dim=0)

    for ours, shape in expected.items():
        if ours not in plain:
            if ours not in parts:
                missing.append(ours)
        elif tuple(plain[ours].shape) != shape:
            bad_shapes.append(f"{ours} expected {list(shape)} got {list(plain[ours].shape)}")
    if missing:
        raise LabError(
            f"{path} is missing tensors: {_list(missing)}; check --preset or the checkpoint's config.json"
        )
    if bad_shapes:
        raise LabError(
            f"{path} has mis-shaped tensors: {_list(bad_shapes, 4)}; check --preset or the checkpoint's config.json"
        )
    return plain


__all__ = [
    "args_from_hf_config",
    "expected_shapes",
    "infer_args",
    "load_state_dict",
    "read_config",
    "read_shapes",
]
