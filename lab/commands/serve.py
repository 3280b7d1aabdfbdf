"""`lab serve`: the OpenAI-compatible server over the continuous-batching engine (playbook steps 4-5)."""

from __future__ import annotations

import argparse

from lab.commands._common import (
    add_model_args,
    auto_or_positive_int,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)


def add_engine_args(p: argparse.ArgumentParser, max_seq_len_default: int | None) -> None:
    """Back-pressure flags with the playbook's defaults (step 5); shared by serve and loadtest."""
    g = p.add_argument_group("engine and back-pressure (playbook step 5)")
    g.add_argument(
        "--max-batch-size", type=positive_int, default=16, help="requests decoded together (playbook: 8-16)"
    )
    g.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=max_seq_len_default,
        help="prompt + generated tokens per request, the KV-cache length of each slot"
        + (" (default: serve: min(4096, the model's context); loadtest: longest prompt + max new tokens)"),
    )
    g.add_argument(
        "--max-queue", type=nonneg_int, default=64, help="waiting requests; one more gets 429 (default 64)"
    )
    g.add_argument(
        "--queue-timeout-s",
        type=positive_float,
        default=5.0,
        help="reject requests still waiting after this (playbook: 5)",
    )
    g.add_argument(
        "--long-context-tokens",
        type=positive_int,
        default=2048,
        help="prompts longer than this use the long-context lane (default 2048)",
    )
    g.add_argument(
        "--long-context-window-s",
        type=nonneg_float,
        default=4.0,
        help="long-context requests are admitted together, windows at least this far apart (playbook: >= 4)",
    )
    g.add_argument(
        "--max-gpu-memory-fraction",
        type=fraction,
        default=0.8,
        help="no admission that would take the GPU above this fraction (playbook: 80%%; not applicable on CPU)",
    )
    g.add_argument(
        "--prefill-chunk-tokens",
        type=positive_int,
        default=512,
        help="prompt tokens prefilled per engine tick; bounds the decode stall of running requests (default 512)",
    )
    g.add_argument(
        "--prefill-rows",
        type=positive_int,
        default=4,
        help="requests prefilled together per tick; compiled modes prefill at the fixed shape "
        "[rows, chunk tokens / rows] (default 4)",
    )
    g.add_argument(
        "--mode",
        default="auto",
        help="decode step: auto (regional-cudagraphs on a GPU, compile-cudagraphs for int8 weights; eager on "
        "CPU), eager, eager-cudagraphs (no compiler: ready in seconds), compile, compile-cudagraphs, regional "
        "(blocks compiled one by one), regional-cudagraphs",
    )
    g.add_argument(
        "--kv-buckets",
        type=auto_or_positive_int,
        default="auto",
        help="the decode step reads the KV cache only up to the shortest of this many lengths (--max-seq-len, "
        "half, a quarter, ...) that holds every running request; each length is compiled and captured at "
        "warm-up. 1: the whole cache. Not with --mode compile or compile-cudagraphs, nor tensor parallel "
        "(default auto: 4 on one GPU where it applies, else 1)",
    )
    g.add_argument(
        "--compile-cache-dir",
        default=".compile-cache",
        help="Inductor's compile cache, shared with lab warmup: a restart loads the compiled decode and "
        "prefill instead of recompiling them (default .compile-cache; '' for the process default)",
    )
    g.add_argument(
        "--simulate-step-delay-ms",
        type=nonneg_float,
        default=0.0,
        help="drills/tests: sleep this long every engine tick to simulate a slower GPU (default 0)",
    )


def engine_config_from_args(args, max_new_tokens_cap: int, max_seq_len: int):
    from lab.engine.batching import EngineConfig
    from lab.engine.generate import auto_kv_buckets, auto_mode, check_mode, compiles
    from lab.model import resolve_device

    mode = args.mode
    if mode != "auto":
        check_mode(mode, resolve_device(args.device))
    if mode == "auto":
        mode = auto_mode(resolve_device(args.device), args.dtype)
    return EngineConfig(
        # Pointed at by build_engine once the model is built (bad input leaves no directory behind).
        compile_cache_dir=(args.compile_cache_dir or None) if compiles(mode) else None,
        max_batch_size=args.max_batch_size,
        max_seq_len=max_seq_len,
        max_new_tokens=max_new_tokens_cap,
        max_queue=args.max_queue,
        queue_timeout_s=args.queue_timeout_s,
        long_context_tokens=args.long_context_tokens,
        long_context_window_s=args.long_context_window_s,
        max_gpu_memory_fraction=args.max_gpu_memory_fraction,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        prefill_rows=args.prefill_rows,
        mode=mode,
        kv_buckets=auto_kv_buckets(resolve_device(args.device), mode)
        if args.kv_buckets == "auto"
        else args.kv_buckets,
        step_delay_s=args.simulate_step_delay_ms / 1e3,
    )


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server (POST /v1/completions, GET /health, GET /metrics) with back-pressure",
        description="Continuous-batching server. /health is 503 until warm-up has compiled and captured the "
        "decode step, so a load balancer sends traffic only after warm-up. SIGTERM drains: stop admitting, "
        "finish in-flight requests, print the drain report, exit.",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=nonneg_int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=256,
        help="cap on max_tokens per request (playbook: 128-256)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="the model id clients send and /v1/models lists (default: the preset)",
    )
    p.add_argument(
        "--admin-token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' on POST /admin/drain (default $LAB_ADMIN_TOKEN; "
        "without one, only clients on this host may drain)",
    )
    p.add_argument(
        "--drain-timeout-s",
        type=positive_float,
        default=30.0,
        help="on SIGTERM, wait this long for in-flight requests",
    )
    add_engine_args(p, max_seq_len_default=None)
    p.add_argument(
        "--start-mode",
        default="auto",
        choices=("auto", "none", "eager", "eager-cudagraphs"),
        help="serve in this mode (nothing to compile: ready in seconds) while --mode compiles in the "
        "background, then switch to it between two engine ticks; /health says which mode serves. auto: "
        "eager-cudagraphs on one GPU when --mode is regional-cudagraphs or regional, none otherwise",
    )
    from lab.distributed import add_tp_args

    add_tp_args(p, tp_default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from lab import startup
    from lab.engine.server import create_app
    from lab.engine.tokenizer import load_tokenizer
    from lab.errors import LabError
    from lab.loadtest.session import build_engine

    startup.mark("imports")  # torch, the server stack and the engine's modules are imported
    if args.port > 65535:
        raise LabError(f"--port {args.port} is not a TCP port (0-65535)")
    _check_bindable(args.host, args.port)
    from lab.model import resolve_device, resolve_spec

    spec = resolve_spec(args.preset, args.model_path, resolve_device(args.device))
    max_seq = args.max_seq_len or min(4096, spec.args.max_seq_len)
    cfg = engine_config_from_args(args, args.max_new_tokens, max_seq)
    from lab.distributed import tp_from_env

    tp = tp_from_env(args.tensor_parallel_gpus)
    cfg.start_mode = resolve_start_mode(args.start_mode, cfg.mode, tp)
    cfg.validate(spec.args.max_seq_len)  # a bad --start-mode/--mode pair fails before the model is built
    if cfg.start_mode == "eager-cudagraphs" and resolve_device(args.device).type != "cuda":
        raise LabError(
            "--start-mode eager-cudagraphs needs a CUDA GPU; use --start-mode eager (or none) on CPU"
        )
    if tp > 1:
        # The multi-GPU tier under torchrun (lab.distributed): rank 0 serves HTTP and schedules; the
        # other ranks run each step it broadcasts until it stops.
        from lab.distributed import build_engine_tp, follow_engine, is_rank0

        engine, prepared = build_engine_tp(
            args.preset,
            args.model_path,
            args.device,
            args.dtype,
            args.seed,
            cfg,
            tp,
            args.dist_timeout_s,
            args.allow_smaller_world,
        )
        if not is_rank0():
            follow_engine(engine)
            return 0
    else:
        engine, prepared = build_engine(args.preset, args.model_path, args.device, args.dtype, args.seed, cfg)
    tokenizer = load_tokenizer(prepared.spec.model_path, prepared.spec.args.vocab_size)
    name = args.model_name or prepared.spec.preset or "lab"
    import os

    token = args.admin_token or os.environ.get("LAB_ADMIN_TOKEN") or None
    app = create_app(engine, tokenizer, name, args.drain_timeout_s, admin_token=token)
    import sys

    print(
        f"lab serve: {name} on {prepared.device} ({cfg.mode}"
        + (f", {cfg.start_mode} until it is compiled" if cfg.start_mode else "")
        + f"), http://{args.host}:{args.port} "
        f"- /health turns 200 after warm-up; tokenizer: {tokenizer.name}",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=int(args.drain_timeout_s),
    )
    import threading

    threading.Thread(target=_announce_ready, args=(engine,), name="lab-ready", daemon=True).start()
    server = _DrainingServer(config, engine)
    server.run()
    return 0 if engine.crashed is None else 1


def resolve_start_mode(start_mode: str, mode: str, tp: int) -> str | None:
    """--start-mode: auto serves eager-cudagraphs while a regional mode compiles, on one GPU only."""
    from lab.engine.batching import UPGRADE_MODES

    if start_mode == "none":
        return None
    if start_mode == "auto":
        if tp > 1 or mode not in UPGRADE_MODES:
            return None
        return "eager-cudagraphs" if mode == "regional-cudagraphs" else "eager"
    return start_mode


def _announce_ready(engine) -> None:
    """One stderr line when /health turns 200: how long the start took and where it went."""
    import sys

    from lab import startup

    engine.ready.wait()
    marks = startup.MARKS
    start = marks.get("main")
    took = f" {marks['ready'] - start:.1f} s after start" if start and "ready" in marks else ""
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in startup.phases().items())
    how = f"serving in {engine.mode} while {engine.config.mode} compiles" if engine.upgrade else ""
    cache = f"compile cache {engine.compile_cache_state}"
    print(f"lab serve: ready{took} ({how or cache}; {phases})", file=sys.stderr, flush=True)
    if engine.upgrade is None:
        return
    engine.upgraded.wait()
    up = engine.upgrade
    if up["state"] == "done":
        since = f" {marks['upgraded'] - start:.1f} s after start" if start and "upgraded" in marks else ""
        print(
            f"lab serve: switched to {up['to']}{since} (compiled in {up['compile_s']:.1f} s, compile cache "
            f"{up.get('compile_cache')})",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(
            f"lab serve: still serving in {up['from']}: compiling {up['to']} failed ({up.get('reason')})",
            file=sys.stderr,
            flush=True,
        )


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: stop admitting at once (health turns 503 draining), let uvicorn finish the
        open requests, then the app's shutdown drains the engine and prints the report. A completed
        graceful drain exits 0 instead of re-raising the signal."""

        def __init__(self, config, engine):
            super().__init__(config)
            self.engine = engine

        def handle_exit(self, sig, frame) -> None:
            self.engine.begin_drain()
            super().handle_exit(sig, frame)

        def run(self, sockets=None) -> None:
            import signal

            previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                super().run(sockets)
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

    return DrainingServer


def _DrainingServer(config, engine):
    return _server_class()(config, engine)


def _check_bindable(host: str, port: int) -> None:
    """Fail with one line before loading the model if the address is taken or invalid."""
    import socket

    from lab.errors import LabError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise LabError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --host/--port"
        ) from None
