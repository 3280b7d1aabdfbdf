"""`lab compare`: eager vs compiled decode (the playbook's step 4) via `compare_inference_methods()`;
writes compare.json and prints one line per method."""

from __future__ import annotations

from lab.commands._common import add_model_args, add_output_json, nonneg_int, positive_int


def register(sub) -> None:
    from lab.bench.compare import DEFAULT_METHODS, METHODS

    p = sub.add_parser(
        "compare",
        help="compare eager, CUDA-graph, torch.compile and FlexAttention decode; writes compare.json",
        description="Run one workload through each decode method; report latency, throughput, memory, "
        "compile time, speedup vs eager and correctness vs eager. A failing method is recorded, not fatal.",
    )
    add_model_args(p)
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)} (default: all but max-autotune; eager always runs)",
    )
    p.add_argument("--batch-size", type=positive_int, default=1, help="rows decoded together (default 1)")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens per row (default 128)")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="tokens generated per row, >= 2 (default 64)"
    )
    p.add_argument("--iters", type=positive_int, default=5, help="timed iterations per method (default 5)")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed iterations per method (default 1)")
    p.add_argument(
        "--compile-cache-dir",
        default=".compile-cache",
        help="Inductor compile cache, shared with lab warmup (default .compile-cache)",
    )
    add_output_json(p, "compare.json")
    from lab.distributed import add_tp_args

    add_tp_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from lab.bench.compare import compare_inference_methods, parse_methods
    from lab.results import write_artifact

    parse_methods(args.methods)  # a bad name is a usage error before anything runs
    model, prepared = args.preset, None
    if args.tensor_parallel_gpus > 1:  # the multi-GPU tier: every rank runs every method on its shard
        from lab.distributed import tp_prepare

        prepared = tp_prepare(args, args.batch_size, args.prompt_len + max(args.max_new_tokens, 4))
        model = prepared.model
    result = compare_inference_methods(
        model,
        methods=args.methods,
        batch_size=args.batch_size,
        prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens,
        iters=args.iters,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        model_path=args.model_path,
        seed=args.seed,
        compile_cache_dir=args.compile_cache_dir or None,
        progress=lambda m: print(f"running {m} ...", file=sys.stderr, flush=True),
    )
    from lab.distributed import is_rank0

    if not is_rank0():
        return 0  # rank 0 records for the tier
    if prepared is not None:
        result.preset, result.memory_plan = prepared.spec.preset, prepared.plan.to_dict()  # per rank
    params = {k: v for k, v in vars(args).items() if k != "func"}
    art = result.to_artifact(params)
    write_artifact(args.output_json, art)
    print(format_table(result))
    print(f"wrote {args.output_json}")
    return 0 if art.status == "ok" else 1


def format_table(result) -> str:
    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    lines = [
        f"{result.preset or 'model'} {result.dtype} on {result.device}, batch {result.workload['batch_size']}, "
        f"prompt {result.workload['prompt_len']}, {result.workload['max_new_tokens']} new tokens",
        f"{'method':<16} {'status':<7} {'ms/token p50':>12} {'speedup':>8} {'tokens/s':>10} {'compile s':>9} "
        f"{'max dlogit':>10} {'correct':>7}",
    ]
    for r in result.methods.values():
        if r.status != "ok":
            lines.append(f"{r.name:<16} {r.status:<7} {r.reason}")
            continue
        lines.append(
            f"{r.name:<16} {r.status:<7} {f(r.decode_ms_per_token.get('p50'), '{:.3f}'):>12} "
            f"{f(r.speedup_vs_eager, '{:.2f}x'):>8} {f(r.decode_tokens_per_s_aggregate, '{:.1f}'):>10} "
            f"{f(r.compile_s, '{:.1f}'):>9} {f(r.max_logit_diff, '{:.2e}'):>10} {str(r.correct):>7}"
        )
    return "\n".join(lines)
