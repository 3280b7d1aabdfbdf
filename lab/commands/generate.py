"""`lab generate`: one prompt through prefill and decode; prints one JSON object."""

from __future__ import annotations

import json

from lab.commands._common import add_model_args, int_list, nonneg_float, nonneg_int, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate tokens from token ids; prints JSON with token_ids and timings"
    )
    add_model_args(p)
    p.add_argument("--prompt-ids", type=int_list, required=True, help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument(
        "--greedy", action="store_true", help="greedy decoding (the default when --temperature is 0)"
    )
    p.add_argument("--temperature", type=nonneg_float, default=0.0)
    p.add_argument("--top-k", type=nonneg_int, default=None)
    p.add_argument(
        "--mode",
        default="eager",
        help="eager, eager-cudagraphs (GPU), compile, compile-cudagraphs (GPU), regional, regional-cudagraphs (GPU)",
    )
    p.add_argument("--batch-size", type=positive_int, default=1, help="repeat the prompt over this many rows")
    p.add_argument(
        "--compile-cache-dir",
        default=".compile-cache",
        help="Inductor's compile cache for the compiled modes, shared with lab warmup "
        "(default .compile-cache; '' for the process default)",
    )
    p.add_argument(
        "--tensor-parallel-gpus",
        type=positive_int,
        default=1,
        help="shard over N GPUs; N > 1 must run under torchrun --nproc_per_node=N",
    )
    from lab.distributed import add_tp_args

    add_tp_args(p, with_tp_flag=False)  # --dist-timeout-s, --allow-smaller-world
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from lab.engine.generate import Generator, check_mode, compiles
    from lab.errors import LabError
    from lab.model import prepare

    temperature = 0.0 if args.greedy else args.temperature
    seq = len(args.prompt_ids) + args.max_new_tokens
    if args.tensor_parallel_gpus > 1:
        from lab.distributed import tp_prepare

        prepared = tp_prepare(args, args.batch_size, seq)
    else:
        from lab.model import resolve_device

        check_mode(args.mode, resolve_device(args.device))
        prepared = prepare(
            args.preset, args.model_path, args.device, args.dtype, args.seed, args.batch_size, seq
        )
    vocab = prepared.spec.args.vocab_size
    bad = [t for t in args.prompt_ids if not 0 <= t < vocab]
    if bad:
        raise LabError(f"--prompt-ids {bad[:5]} outside the vocabulary [0, {vocab}); use ids below {vocab}")
    if compiles(args.mode) and args.compile_cache_dir:  # before the first compile, after every check
        from lab.engine.compile_cache import use_compile_cache

        use_compile_cache(args.compile_cache_dir)
    gen = Generator(prepared.model, args.mode, args.batch_size, seq)
    prompt = torch.tensor([args.prompt_ids] * args.batch_size, dtype=torch.long)
    if args.mode != "eager":
        gen.warmup(args.batch_size, len(args.prompt_ids), steps=min(args.max_new_tokens, 4))
    res = gen.generate(
        prompt, args.max_new_tokens, temperature, args.top_k, args.seed, prepared.spec.args.eos_token_id
    )
    out = {
        "preset": prepared.spec.preset,
        "model_path": prepared.spec.model_path,
        "device": str(prepared.device),
        "dtype": str(prepared.dtype).removeprefix("torch."),
        "mode": args.mode,
        "prompt_ids": args.prompt_ids,
        **res.to_dict(),
    }
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out))
    return 0
