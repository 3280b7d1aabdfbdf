"""`lab warmup`: the playbook's warm-up benchmark (step 3) with the same flags as
`test_gpt_large_optimized.py --iters 3 --warmup 1 --tensor-parallel-gpus 1 --output-json FILE`."""

from __future__ import annotations

from lab.commands._common import add_model_args, add_output_json, nonneg_int, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "warmup",
        help="warm the model: prime compiled graphs, record the latency envelope, memory, energy, MBU",
        description="Prime the compiled decode step (persisting the compile cache for the next process), "
        "then time --iters iterations of prefill + decode and write the warm-up artifact. In compiled modes "
        "it then compiles the serving engine's steps too, so `lab serve` starts from the cache.",
    )
    add_model_args(p)
    p.add_argument("--iters", type=positive_int, default=3, help="timed iterations (default 3)")
    p.add_argument(
        "--warmup", type=nonneg_int, default=1, help="untimed iterations after compiling (default 1)"
    )
    p.add_argument(
        "--tensor-parallel-gpus",
        type=positive_int,
        default=1,
        help="1 = the single-GPU fallback; N > 1 runs under torchrun --nproc_per_node=N",
    )
    p.add_argument("--batch-size", type=positive_int, default=1, help="rows decoded together (default 1)")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens per row (default 128)")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=128,
        help="tokens generated per row, >= 2 (default 128; the playbook caps serving at 128-256)",
    )
    p.add_argument(
        "--mode",
        default="auto",
        help="auto (regional-cudagraphs on a GPU, compile-cudagraphs for int8; eager on CPU), eager, eager-cudagraphs, compile, compile-cudagraphs, regional (blocks compiled one by one), "
        "regional-cudagraphs",
    )
    p.add_argument(
        "--compile-cache-dir",
        default=".compile-cache",
        help="where Inductor's compile cache is persisted and reloaded by the next run (default .compile-cache)",
    )
    g = p.add_argument_group("priming the server (playbook step 4 starts it next)")
    g.add_argument(
        "--no-prime-serving",
        dest="prime_serving",
        action="store_false",
        help="do not compile the serving engine's decode and prefill into the compile cache (compiled modes "
        "prime them by default, so `lab serve` with the same shapes starts from the cache)",
    )
    g.add_argument(
        "--serve-max-batch-size",
        type=positive_int,
        default=16,
        help="the --max-batch-size `lab serve` will use (default 16, as lab serve)",
    )
    g.add_argument(
        "--serve-max-seq-len",
        type=positive_int,
        default=None,
        help="the --max-seq-len `lab serve` will use (default: as lab serve, min(4096, the model's context))",
    )
    p.add_argument(
        "--no-roofline",
        dest="measure_roofline",
        action="store_false",
        help="skip the copy-bandwidth and matmul probes (no MBU/MFU)",
    )
    add_output_json(p, "warmup.json")
    p.add_argument(
        "--trace",
        default=None,
        metavar="PATH.json",
        help="write a torch.profiler trace of the run (open in ui.perfetto.dev)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from lab.bench.warmup import WarmupConfig, describe, is_rank_zero, run_and_write

    cfg = WarmupConfig(
        preset=args.preset,
        model_path=args.model_path,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        batch_size=args.batch_size,
        prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens,
        iters=args.iters,
        warmup=args.warmup,
        mode=args.mode,
        compile_cache_dir=args.compile_cache_dir or None,
        tensor_parallel_gpus=args.tensor_parallel_gpus,
        measure_roofline=args.measure_roofline,
        prime_serving=args.prime_serving,
        serve_max_batch_size=args.serve_max_batch_size,
        serve_max_seq_len=args.serve_max_seq_len,
    )
    from lab.trace import trace_region

    with trace_region(args.trace):
        art = run_and_write(cfg, args.output_json)
    if not is_rank_zero():
        return 0 if art.status == "ok" else 1
    if art.status != "ok":
        print(f"lab warmup: failed: {art.reason}; wrote {args.output_json}", file=sys.stderr)
        return 1
    print(describe(art))
    print(f"wrote {args.output_json}")
    return 0
