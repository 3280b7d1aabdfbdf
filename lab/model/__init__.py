"""Model construction: presets or checkpoints, on the chosen device and dtype, after the memory plan."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lab.errors import LabError
from lab.model.llama import ModelArgs, Transformer, init_random_weights
from lab.model.presets import PRESETS, get_preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    name = DTYPE_ALIASES.get(name, name)
    if name == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise LabError(f"unknown dtype '{name}'; choose auto, {', '.join(DTYPES)}") from None


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU. Asking for CUDA on a machine without it is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LabError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LabError(f"device '{name}' asked for but no CUDA GPU is visible; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LabError(f"device '{name}' does not exist: {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise LabError(f"unsupported device '{name}'; use auto, cpu, cuda or cuda:N")
    return dev


def default_preset(device: torch.device) -> str:
    """On CPU the embedded default is `tiny`; on a GPU, `llama-8b`."""
    return "tiny" if device.type == "cpu" else "llama-8b"


@dataclass
class ModelSpec:
    """What to build: a preset's shape, optionally with weights from a checkpoint."""

    args: ModelArgs
    preset: str | None
    model_path: str | None


def resolve_spec(preset: str | None, model_path: str | None, device: torch.device) -> ModelSpec:
    """--model-path (or MODEL_PATH, the playbook's convention) wins over the preset for the weights;
    the preset (or the checkpoint's config.json) gives the shape."""
    model_path = model_path or os.environ.get("MODEL_PATH") or None
    if model_path:
        p = Path(model_path)
        if not p.exists():
            raise LabError(f"checkpoint '{model_path}' not found; check --model-path / MODEL_PATH")
        from lab.model.checkpoint import read_config

        args = read_config(p, preset)
        return ModelSpec(args=args, preset=preset, model_path=str(p))
    name = preset or default_preset(device)
    return ModelSpec(args=get_preset(name), preset=name, model_path=None)


def build_model(
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    quant: str | None = None,
    shard: Callable[[torch.nn.Module], None] | None = None,
) -> Transformer:
    """Materialise the model on `device` in `dtype`: checkpoint weights if given, else seeded random.

    Built module by module (embeddings, each block, head), so with `quant` ("fp8"/"int8" weight-only)
    each block is quantised as soon as it exists and the bf16 model never needs to fit whole."""
    with torch.device("meta"):
        model = Transformer(spec.args)
    # Cast on the meta device first: materialising in float32 and then casting would briefly need
    # twice the bf16 footprint (33 GB peak for llama-8b, measured on an H200).
    model = model.to(dtype)
    state = None
    if spec.model_path:
        from lab.model.checkpoint import load_state_dict

        state = load_state_dict(Path(spec.model_path), spec.args)
        _check_keys(model, state, spec)
    n = spec.args.n_layers
    heads = [model.tok_embeddings, model.norm] + ([] if spec.args.tie_embeddings else [model.output])
    for k, module in enumerate(heads):
        _materialise(module, device, state, _prefix(model, module), seed * 1_000_003 + n + 1 + k, n)
        if shard is not None:
            shard(module)
    if spec.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
        if shard is not None:
            shard(model.output)
    for i, block in enumerate(model.layers):
        _materialise(block, device, state, f"layers.{i}.", seed * 1_000_003 + i, n)
        if shard is not None:  # tensor parallel (lab.model.tp): keep this rank's slice, before quantising
            shard(block)
        if quant:
            from lab.model.quant import quantize_block

            quantize_block(block, quant)
    return model.eval().requires_grad_(False)


def _prefix(model: Transformer, module: torch.nn.Module) -> str:
    for name, m in model.named_children():
        if m is module:
            return name + "."
    raise AssertionError("module not in model")


def _empty_on(module: torch.nn.Module, device: torch.device) -> None:
    """`module.to_empty(device)` without its `empty_like` of meta tensors: that runs torch's Python reference,
    which imports sympy, 2.3-3.6 s on the critical path of every `lab serve` start (H100 host, session 16).
    `torch.empty` of each shape allocates the same storage, uninitialised, through the C++ path."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                m._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad
                )
        for name, b in m._buffers.items():
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


@torch.no_grad()
def _materialise(module, device, state, prefix: str, seed: int, n_layers: int) -> None:
    _empty_on(module, device)
    if state is None:
        init_random_weights(module, seed, n_layers)
        return
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    module.load_state_dict(sub, strict=True)


def _check_keys(model: Transformer, state: dict, spec: ModelSpec) -> None:
    expected = dict(model.state_dict())
    if spec.args.tie_embeddings:
        expected.pop("output.weight", None)
        state.pop("output.weight", None)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)} got {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:

        def few(xs):
            return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")

        parts = [
            f"missing {few(missing)}" if missing else "",
            f"unexpected {few(unexpected)}" if unexpected else "",
            f"mis-shaped {few(shapes)}" if shapes else "",
        ]
        raise LabError(
            f"checkpoint {spec.model_path} does not match the model shape: {'; '.join(p for p in parts if p)}"
        )


@dataclass
class Prepared:
    model: Transformer
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    plan: object  # lab.model.plan.MemoryPlan
    quant: str | None = None


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@contextlib.contextmanager
def oom_context(plan, device: torch.device, step: str) -> Iterator[None]:
    """An out-of-memory error inside carries the plan, the step and the device's free memory at the
    failure (`lab_plan`, `lab_step`): the plan covers this process, so memory another process holds on
    the card is what usually makes a shape that "fits" fail here. Callers turn it into a failed artifact
    or one line (lab.faults)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        import gc

        gc.collect()
        from lab.faults import free_gb

        d = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan or {})
        free = free_gb(device)
        if free is not None:
            d["device_free_gb_at_failure"] = free
        e.lab_plan, e.lab_step = d, step
        raise


def prepare(
    preset: str | None,
    model_path: str | None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    batch_size: int = 1,
    max_seq_len: int = 256,
) -> Prepared:
    """Resolve, plan (fail before allocating if it cannot fit), then build. The one path every
    command that needs a model takes."""
    from lab.model.plan import check_fits, device_memory_gb, plan_memory

    dev = resolve_device(device)
    quant = dtype if dtype in ("fp8", "int8") else None
    dt = torch.bfloat16 if quant else resolve_dtype(dtype, dev)
    spec = resolve_spec(preset, model_path, dev)
    if max_seq_len > spec.args.max_seq_len:
        raise LabError(
            f"prompt + new tokens = {max_seq_len} exceeds the model's context of {spec.args.max_seq_len} tokens; "
            "shorten the prompt or --max-new-tokens"
        )
    plan = plan_memory(
        spec.args,
        quant or dtype_name(dt),
        batch_size,
        max_seq_len,
        device_memory_gb(dev),
        str(dev),
        spec.preset,
    )
    check_fits(plan)
    from lab import startup

    startup.mark("planned")  # the device is up (CUDA initialised) and the memory plan checked
    with oom_context(plan, dev, "loading the model"):
        model = build_model(spec, dev, dt, seed, quant)
    return Prepared(model=model, spec=spec, device=dev, dtype=dt, plan=plan, quant=quant)


__all__ = [
    "Prepared",
    "prepare",
    "dtype_name",
    "DTYPES",
    "PRESETS",
    "ModelArgs",
    "ModelSpec",
    "Transformer",
    "build_model",
    "default_preset",
    "get_preset",
    "resolve_device",
    "resolve_dtype",
    "resolve_spec",
]
