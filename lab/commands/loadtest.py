"""`lab loadtest`: the playbook's optional fallback load test, open loop (MEASUREMENT.md).

Works as `torchrun --nproc_per_node=1 -m lab loadtest ... --allow-smaller-world` and without torchrun.
Under torchrun only rank 0 generates load and records.
"""

from __future__ import annotations

import os

from lab.commands._common import (
    add_model_args,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)
from lab.commands.serve import add_engine_args
from lab.results import STEP_FILES


def _ms_or_off(text: str) -> float | None:
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of milliseconds (0 = no SLO)") from None
    if v < 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}' must be >= 0 milliseconds (0 = no SLO)")
    return v or None


def register(sub) -> None:
    p = sub.add_parser(
        "loadtest",
        help="open-loop load test (seeded schedule, latency from the scheduled time, VALID/INVALID verdict)",
        description="Open-loop load test against the in-process engine (default) or --endpoint URL. Writes the "
        "artifact (--output-json) and a per-request JSONL beside it. Exit 1 when the run is INVALID.",
    )
    g = p.add_argument_group("load (the playbook's flags)")
    g.add_argument(
        "--duration",
        type=positive_float,
        default=20.0,
        help="seconds of arrivals, warm-up and cool-down included (default 20)",
    )
    g.add_argument("--target-qps", type=positive_float, default=3.0, help="mean arrival rate (default 3)")
    g.add_argument(
        "--max-new-tokens", type=positive_int, default=4, help="tokens generated per request (default 4)"
    )
    g.add_argument(
        "--prompt-len-min", type=positive_int, default=32, help="shortest prompt in tokens (default 32)"
    )
    g.add_argument(
        "--prompt-len-max", type=positive_int, default=64, help="longest prompt in tokens (default 64)"
    )
    g.add_argument(
        "--allow-smaller-world",
        action="store_true",
        help="accept a world smaller than --expected-world-size (the single-GPU fallback)",
    )
    g.add_argument(
        "--expected-world-size",
        type=positive_int,
        default=8,
        help="tensor-parallel world of the multi-GPU tier this test was written for (default 8)",
    )
    add_output = STEP_FILES["loadtest"]
    g.add_argument(
        "--output-json",
        default=add_output,
        help=f"artifact path (default {add_output}); requests JSONL beside it",
    )
    a = p.add_argument_group("arrivals")
    a.add_argument(
        "--pattern", default="poisson", choices=("poisson", "constant", "bursty"), help="arrival process"
    )
    a.add_argument(
        "--burst-cv",
        type=positive_float,
        default=2.0,
        help="coefficient of variation of gaps for bursty (> 1)",
    )
    a.add_argument(
        "--warmup-s",
        type=nonneg_float,
        default=None,
        help="first seconds excluded from the metrics (default: min(2, 10%% of --duration))",
    )
    a.add_argument(
        "--cooldown-s",
        type=nonneg_float,
        default=None,
        help="last seconds excluded from the metrics (default: min(2, 10%% of --duration))",
    )
    a.add_argument(
        "--drain-timeout-s",
        type=positive_float,
        default=60.0,
        help="after the last arrival, wait this long for answers",
    )
    a.add_argument(
        "--max-dispatch-lag-ms",
        type=positive_float,
        default=5.0,
        help="INVALID when the generator's dispatch lag p99 exceeds this (default 5)",
    )
    a.add_argument(
        "--min-requests",
        type=nonneg_int,
        default=5,
        help="INVALID with fewer measured requests (default 5)",
    )
    s = p.add_argument_group("SLOs (failed requests count as violations; 0 = none)")
    s.add_argument(
        "--slo-ttft-ms", type=_ms_or_off, default=None, help="time to first token, from the scheduled time"
    )
    s.add_argument(
        "--slo-tpot-ms", type=_ms_or_off, default=None, help="time per output token after the first"
    )
    s.add_argument(
        "--slo-e2e-ms",
        type=_ms_or_off,
        default=2500.0,
        help="end to end (default 2500: the playbook's P99 of about 2.5 s)",
    )
    s.add_argument(
        "--slo-attainment",
        type=fraction,
        default=0.99,
        help="fraction of requests that must meet the SLOs (default 0.99)",
    )
    s.add_argument(
        "--sweep",
        default=None,
        help="'search' (highest QPS meeting the SLOs, starting at --target-qps) or a QPS list like 1,2,4,8",
    )
    s.add_argument(
        "--sweep-max-runs", type=positive_int, default=8, help="runs a search may take (default 8)"
    )
    t = p.add_argument_group("target")
    t.add_argument(
        "--endpoint", default=None, help="an OpenAI-compatible server URL (default: the in-process engine)"
    )
    t.add_argument("--model-name", default="lab", help="`model` sent to --endpoint (default lab)")
    t.add_argument(
        "--prompt-format", default="ids", choices=("ids", "text"), help="prompts as token ids or text"
    )
    t.add_argument("--request-timeout-s", type=positive_float, default=600.0, help="HTTP timeout per request")
    t.add_argument(
        "--telemetry-device", default=None, help="GPU to read NVML from with --endpoint, e.g. cuda:0"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_model_args(p)
    add_engine_args(p, max_seq_len_default=None)
    from lab.distributed import add_tp_args

    add_tp_args(p, with_allow_smaller_world=False, tp_default=None)
    p.add_argument(
        "--trace",
        default=None,
        metavar="PATH.json",
        help="write a torch.profiler trace of the run, rank 0 only (open in ui.perfetto.dev)",
    )
    p.set_defaults(func=run)


def check_world(args) -> tuple[int, int]:
    """The test expects the multi-GPU tier's world; a smaller one is refused unless allowed."""
    from lab.errors import LabError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < args.expected_world_size and not args.allow_smaller_world:
        raise LabError(
            f"world size {world} is smaller than the expected tensor-parallel world {args.expected_world_size} "
            "(--expected-world-size); add --allow-smaller-world to run the single-GPU fallback load test"
        )
    return world, rank


def check_endpoint(url: str) -> None:
    """--endpoint must be an http(s) URL with something listening; otherwise every request would error."""
    from urllib.parse import urlparse

    import httpx

    from lab.errors import LabError

    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise LabError(f"--endpoint {url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000")
    try:
        httpx.get(url.rstrip("/"), timeout=5.0)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as e:
        raise LabError(
            f"nothing answers at --endpoint {url} ({type(e).__name__}); start `lab serve` or fix the URL"
        ) from None


def _tp(args, world: int) -> int:
    """Tensor-parallel ranks: --tensor-parallel-gpus, else the world torchrun launched."""
    from lab.distributed import tp_from_env

    return tp_from_env(args.tensor_parallel_gpus) if world > 1 or args.tensor_parallel_gpus else 1


def run(args) -> int:
    from lab.errors import LabError
    from lab.loadtest.runner import LoadTestConfig
    from lab.loadtest.sweep import parse_sweep

    world, rank = check_world(args)
    if args.prompt_len_min > args.prompt_len_max:
        raise LabError("--prompt-len-min must be <= --prompt-len-max")
    if args.endpoint and rank == 0:
        check_endpoint(args.endpoint)
    sweep = parse_sweep(args.sweep) if args.sweep else None
    cfg = LoadTestConfig(
        duration_s=args.duration,
        target_qps=args.target_qps,
        pattern=args.pattern,
        burst_cv=args.burst_cv,
        seed=args.seed,
        prompt_len_min=args.prompt_len_min,
        prompt_len_max=args.prompt_len_max,
        max_new_tokens=args.max_new_tokens,
        warmup_s=args.warmup_s,
        cooldown_s=args.cooldown_s,
        drain_timeout_s=args.drain_timeout_s,
        max_dispatch_lag_ms=args.max_dispatch_lag_ms,
        min_requests=args.min_requests,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        slo_e2e_ms=args.slo_e2e_ms,
        slo_attainment_target=args.slo_attainment,
        endpoint=args.endpoint,
        model_name=args.model_name,
        prompt_format=args.prompt_format,
        request_timeout_s=args.request_timeout_s,
        progress=not args.no_progress and rank == 0,
    )
    # Validate the schedule parameters before building a model.
    from lab.loadtest.schedule import make_schedule

    make_schedule(
        cfg.target_qps,
        cfg.duration_s,
        0,
        cfg.pattern,
        cfg.prompt_len_min,
        cfg.prompt_len_max,
        cfg.max_new_tokens,
        *cfg.edges_s(),
        cfg.burst_cv,
    )
    params = {k: v for k, v in vars(args).items() if k != "func"}
    params["world_size"], params["rank"] = world, rank
    if sweep is not None and not cfg.slo().given():
        raise LabError("--sweep needs at least one SLO: --slo-ttft-ms, --slo-tpot-ms or --slo-e2e-ms")
    from lab.trace import trace_region

    with trace_region(args.trace if rank == 0 else None):
        art = _run(args, cfg, sweep, params, world, rank)
    if art is None:
        return 0  # a follower rank of the multi-GPU tier (or of an --endpoint run): rank 0 reports
    return _report(args, art)


def _run(args, cfg, sweep, params, world: int, rank: int):
    from lab.loadtest.session import run_in_process, run_loadtest

    if args.endpoint:
        if rank != 0:
            return None  # only rank 0 generates load; the endpoint serves every rank's model
        art = run_loadtest(
            cfg,
            None,
            sweep,
            args.sweep_max_runs,
            args.output_json,
            params,
            telemetry_device=args.telemetry_device,
        )
    else:
        max_seq = args.max_seq_len or (args.prompt_len_max + args.max_new_tokens)
        from lab.commands.serve import engine_config_from_args

        ecfg = engine_config_from_args(args, args.max_new_tokens, max_seq)
        art = run_in_process(
            cfg,
            ecfg,
            args.preset,
            args.model_path,
            args.device,
            args.dtype,
            sweep,
            args.sweep_max_runs,
            args.output_json,
            params,
            tensor_parallel_gpus=_tp(args, world),
            dist_timeout_s=args.dist_timeout_s,
            allow_smaller_world=args.allow_smaller_world,
        )
    return art


def _report(args, art) -> int:
    from lab.loadtest.session import describe

    print(describe(art, args.output_json), flush=True)
    return 0 if art.verdict.get("valid") and art.status == "ok" else 1
