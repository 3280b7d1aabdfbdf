"""`lab plan`: the memory plan for a model and load, against the visible device or --gpu-memory-gb."""

from __future__ import annotations

import json

from lab.commands._common import positive_float, positive_int


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory plan: weights, KV cache, activations, reserve; fits or not")
    p.add_argument("--preset", default=None, help="model preset (default: tiny on CPU, llama-8b on a GPU)")
    p.add_argument("--model-path", default=None, help="checkpoint whose config gives the shape")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16, fp8, int8")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--max-seq-len", type=positive_int, default=4096, help="prompt + new tokens")
    p.add_argument(
        "--gpu-memory-gb",
        type=positive_float,
        default=None,
        help="plan against this many GB instead of the visible device",
    )
    p.add_argument(
        "--reserve-gb",
        type=float,
        default=None,
        help="kept free for CUDA graphs and NCCL buffers (default 8 on a GPU, 1 on CPU)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from lab.model import resolve_device, resolve_spec
    from lab.model.plan import device_memory_gb, plan_memory

    device = resolve_device(args.device)
    if args.gpu_memory_gb is not None:
        device_name, mem = "cuda", args.gpu_memory_gb
    else:
        device_name, mem = str(device), device_memory_gb(device)
    spec = resolve_spec(args.preset, args.model_path, device if args.gpu_memory_gb is None else _cuda())
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_name.startswith("cuda") else "float32"
    plan = plan_memory(
        spec.args, dtype, args.batch_size, args.max_seq_len, mem, device_name, spec.preset, args.reserve_gb
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.line())
        if plan.suggestions:
            print("what would fit: " + ", ".join(plan.suggestions))
    return 0 if plan.fits is not False else 1


def _cuda():
    import torch

    return torch.device("cuda")
