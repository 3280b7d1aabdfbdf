"""`lab compare-tiers`: what the fallback costs. Runs the same warm-up and the same open-loop load on the
multi-GPU tier (tensor parallel over N GPUs, under torchrun) and on the single-GPU fallback, then reports
the fallback as a fraction of the multi-GPU tier: tokens/s, p99 latency and tokens/joule (the playbook's
"3.6 tokens/joule, 52 % of the multi-GPU system", measured instead of quoted).

Each tier runs in its own `torchrun --standalone --nproc_per_node=N -m lab compare-tiers --tier-worker`
launch (the fallback with CUDA_VISIBLE_DEVICES pinned to one GPU, as the playbook does): every rank builds
its shard once, runs the warm-up, then serves the load test's engine (rank 0 schedules, the others follow).
Rank 0 writes `<out>/tp<N>/warmup.json` and `load_test.json`; the parent writes `<out>/tiers.json`.
`--from-reports MULTI_DIR FALLBACK_DIR` compares two existing runs without running anything.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lab.commands._common import add_model_args, nonneg_float, nonneg_int, positive_float, positive_int
from lab.errors import LabError
from lab.results import STEP_FILES, Artifact
from lab.results import register as register_artifact

TIERS_FILE = STEP_FILES["tiers"]
PLAYBOOK_TOKENS_PER_JOULE_RATIO = 0.52  # "expect 3.6 tokens/joule (52 % of the multi-GPU system)"

# (summary key in tiers.json, source step, metric in that step's summary, what it means)
RATIOS = (
    ("loadtest_tokens_per_s", "loadtest", "output_tokens_per_s", "output tokens/s under the same load"),
    ("loadtest_e2e_ms_p99", "loadtest", "e2e_ms_p99", "p99 end-to-end latency (from the scheduled time)"),
    ("loadtest_ttft_ms_p99", "loadtest", "ttft_ms_p99", "p99 time to first token"),
    ("loadtest_tokens_per_joule", "loadtest", "tokens_per_joule", "tokens/joule over the measured window"),
    ("warmup_decode_tokens_per_s", "warmup", "decode_tokens_per_s", "warm decode tokens/s"),
    ("warmup_decode_ms_per_token_p99", "warmup", "decode_ms_per_token_p99", "p99 decode time per token"),
    ("warmup_ttft_ms_p99", "warmup", "ttft_ms_p99", "p99 prefill (time to first token)"),
    ("warmup_tokens_per_joule", "warmup", "tokens_per_joule", "tokens/joule of the timed decode window"),
)
# The headline ratios (fallback / multi-GPU): >1 on latency means the fallback is slower.
HEADLINE = {
    "tokens_per_s_ratio": "loadtest_tokens_per_s",
    "p99_latency_ratio": "loadtest_e2e_ms_p99",
    "tokens_per_joule_ratio": "loadtest_tokens_per_joule",
}


@register_artifact
class TiersArtifact(Artifact):
    """tiers.json: the fallback (TP=1) as a fraction of the multi-GPU tier (TP=N), same warm-up and load."""

    kind: str = "tiers"
    tiers: dict[str, Any] = {}  # "multi" / "fallback": gpus, report dir, per-step status and key metrics
    ratios: dict[str, Any] = {}  # name -> {fallback, multi, ratio, source, meaning}


def register(sub) -> None:
    p = sub.add_parser(
        "compare-tiers",
        help="run the same warm-up and load on the multi-GPU tier (TP=N) and the single-GPU fallback; "
        "write tiers.json with the fallback as a fraction of the multi-GPU tier",
        description=__doc__.split("\n\n")[0],
    )
    add_model_args(p)
    p.add_argument(
        "--tensor-parallel-gpus",
        type=positive_int,
        default=2,
        help="GPUs of the multi-GPU tier (default 2; the playbook's production tier is 8)",
    )
    p.add_argument("--out", default="reports/tiers", help="report directory (default reports/tiers)")
    p.add_argument(
        "--fallback-gpu",
        default=None,
        help="CUDA_VISIBLE_DEVICES for the single-GPU fallback tier (default: the first visible GPU, "
        "0 as in the playbook when CUDA_VISIBLE_DEVICES is unset)",
    )
    p.add_argument(
        "--from-reports",
        nargs=2,
        metavar=("MULTI_DIR", "FALLBACK_DIR"),
        default=None,
        help="compare two existing report directories (warmup.json + load_test.json each); run nothing",
    )
    w = p.add_argument_group("warm-up (same at both tiers)")
    w.add_argument("--iters", type=positive_int, default=3, help="timed iterations (default 3)")
    w.add_argument("--warmup", type=nonneg_int, default=1, help="untimed iterations (default 1)")
    w.add_argument("--batch-size", type=positive_int, default=1, help="warm-up rows (default 1)")
    w.add_argument("--prompt-len", type=positive_int, default=128, help="warm-up prompt tokens (default 128)")
    w.add_argument("--max-new-tokens", type=positive_int, default=128, help="warm-up tokens (default 128)")
    w.add_argument(
        "--mode",
        default="auto",
        help="decode step for warm-up and serving: auto (regional-cudagraphs on a GPU, compile-cudagraphs for int8; eager on CPU), eager, "
        "compile, compile-cudagraphs, regional, regional-cudagraphs",
    )
    w.add_argument(
        "--compile-cache-dir", default=".compile-cache", help="Inductor cache (default .compile-cache)"
    )
    w.add_argument("--no-roofline", dest="measure_roofline", action="store_false", help="skip MBU/MFU probes")
    ld = p.add_argument_group("load (same seeded schedule at both tiers)")
    ld.add_argument("--duration", type=positive_float, default=20.0, help="seconds of arrivals (default 20)")
    ld.add_argument("--target-qps", type=positive_float, default=3.0, help="mean arrival rate (default 3)")
    ld.add_argument(
        "--load-max-new-tokens", type=positive_int, default=64, help="tokens per request (default 64)"
    )
    ld.add_argument("--prompt-len-min", type=positive_int, default=32, help="(default 32)")
    ld.add_argument("--prompt-len-max", type=positive_int, default=64, help="(default 64)")
    ld.add_argument("--warmup-s", type=nonneg_float, default=2.0, help="excluded from metrics (default 2)")
    ld.add_argument("--cooldown-s", type=nonneg_float, default=2.0, help="excluded from metrics (default 2)")
    ld.add_argument("--max-batch-size", type=positive_int, default=16, help="engine slots (playbook: 8-16)")
    ld.add_argument("--min-requests", type=nonneg_int, default=10, help="INVALID with fewer (default 10)")
    ld.add_argument(
        "--max-dispatch-lag-ms", type=positive_float, default=5.0, help="INVALID above this p99 (default 5)"
    )
    r = p.add_argument_group("runs")
    r.add_argument(
        "--tier-timeout-s",
        type=positive_float,
        default=1800.0,
        help="a tier's launch is killed after this (default 1800)",
    )
    r.add_argument(
        "--dist-timeout-s",
        type=positive_float,
        default=None,
        help="collective deadline inside a tier (default $LAB_DIST_TIMEOUT_S or 300)",
    )
    r.add_argument(
        "--only",
        choices=("multi", "fallback"),
        default=None,
        help="run one tier now and compare with the other tier's files already under --out (for hosts "
        "with a per-command time limit)",
    )
    r.add_argument("--tier-worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.tier_worker:
        return run_tier_worker(args)
    if args.from_reports:
        multi, fallback = (Path(d) for d in args.from_reports)
        art = compare_reports(multi, fallback, params=_params(args))
        out = Path(args.out)
    else:
        _check_args(args)
        out = Path(args.out)
        art = run_both(args, out)
    from lab.results import write_artifact

    write_artifact(out / TIERS_FILE, art)
    print(describe(art))
    print(f"wrote {out / TIERS_FILE}")
    if art.status != "ok" and _other_tier_pending(args, art):
        other = "fallback" if args.only == "multi" else "multi"
        print(f"the {args.only} tier ran; run the same command with --only {other} to compare the tiers")
        return 0
    return 0 if art.status == "ok" else 1


def _other_tier_pending(args, art) -> bool:
    """With --only: this tier ran cleanly and the only thing missing is the other tier's files."""
    if not args.only:
        return False
    other = "fallback" if args.only == "multi" else "multi"
    mine, theirs = art.tiers.get(args.only, {}), art.tiers.get(other, {})
    ran = mine.get("launch", {}).get("exit_code") == 0 and all(
        mine.get(step, {}).get("status") == "ok" for step in ("warmup", "loadtest")
    )
    return ran and all(theirs.get(step, {}).get("status") == "missing" for step in ("warmup", "loadtest"))


def _params(args) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("func", "tier_worker")}


def _check_args(args) -> None:
    if args.tensor_parallel_gpus < 2:
        raise LabError("--tensor-parallel-gpus must be >= 2: the multi-GPU tier is compared against one GPU")
    if args.prompt_len_min > args.prompt_len_max:
        raise LabError("--prompt-len-min must be <= --prompt-len-max")
    from lab.model import get_preset, resolve_device
    from lab.model.tp import check_divisible

    dev = resolve_device(args.device)
    if args.preset or not (args.model_path or os.environ.get("MODEL_PATH")):
        from lab.model import default_preset

        name = args.preset or default_preset(dev)
        check_divisible(get_preset(name), args.tensor_parallel_gpus, name)
    if dev.type == "cuda":
        import torch

        if torch.cuda.device_count() < args.tensor_parallel_gpus:
            raise LabError(
                f"--tensor-parallel-gpus {args.tensor_parallel_gpus} but {torch.cuda.device_count()} GPU(s) "
                "visible; lower it or run on a bigger host"
            )


# --- the parent: launch each tier, then compare ---------------------------------------------------------


def tier_command(args, n: int, out_dir: Path) -> list[str]:
    """The torchrun launch of one tier (the same flags at both tiers but N)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    cmd += ["-m", "lab", "compare-tiers", "--tier-worker", "--tensor-parallel-gpus", str(n)]
    cmd += ["--out", str(out_dir)]
    for flag in (
        "preset",
        "model_path",
        "device",
        "dtype",
        "seed",
        "iters",
        "warmup",
        "batch_size",
        "prompt_len",
        "max_new_tokens",
        "mode",
        "compile_cache_dir",
        "duration",
        "target_qps",
        "load_max_new_tokens",
        "prompt_len_min",
        "prompt_len_max",
        "warmup_s",
        "cooldown_s",
        "max_batch_size",
        "min_requests",
        "max_dispatch_lag_ms",
        "dist_timeout_s",
    ):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    if not args.measure_roofline:
        cmd.append("--no-roofline")
    return cmd


def run_tier(args, n: int, out_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """Launch one tier; returns what happened (exit status, seconds, the tail of its output)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (STEP_FILES["warmup"], STEP_FILES["loadtest"]):
        (out_dir / name).unlink(missing_ok=True)  # never compare against a previous run's files
    cmd = tier_command(args, n, out_dir)
    print(f"lab compare-tiers: tier TP={n}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    log = out_dir / "tier.log"
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.tier_timeout_s)
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
    return {
        "gpus": n,
        "exit_code": rc,
        "timed_out": rc is None,
        "seconds": round(time.monotonic() - t0, 1),
        "log": log.name,
        "log_tail": tail,
        "command": cmd,
    }


def run_both(args, out: Path) -> TiersArtifact:
    n = args.tensor_parallel_gpus
    base_env = dict(os.environ)
    multi_env = dict(base_env)
    fallback_env = dict(base_env)
    from lab.model import resolve_device

    if resolve_device(args.device).type == "cuda":
        visible = [x for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
        # The playbook pins the fallback to one GPU (export CUDA_VISIBLE_DEVICES=0).
        fallback_env["CUDA_VISIBLE_DEVICES"] = args.fallback_gpu or (visible[0] if visible else "0")
    multi_dir, fallback_dir = out / f"tp{n}", out / "tp1"
    runs = {}
    if args.only in (None, "multi"):
        runs["multi"] = run_tier(args, n, multi_dir, multi_env)
    if args.only in (None, "fallback"):
        runs["fallback"] = run_tier(args, 1, fallback_dir, fallback_env)
    art = compare_reports(multi_dir, fallback_dir, params=_params(args))
    for tier, info in runs.items():
        art.tiers[tier]["launch"] = {k: v for k, v in info.items() if k != "log_tail"}
        if info["exit_code"] not in (0, 1):  # 1 = an INVALID load test, still a comparable run
            art.tiers[tier]["launch"]["log_tail"] = info["log_tail"]
            why = "timed out" if info["timed_out"] else f"exited {info['exit_code']}"
            art.status = "failed"
            art.reason = (art.reason + "; " if art.reason else "") + (
                f"{tier} tier (TP={info['gpus']}) {why}; see {tier}/{info['log']}: "
                + (info["log_tail"][-1] if info["log_tail"] else "no output")
            )
    return art


def _read(path: Path) -> tuple[Any | None, str | None]:
    from lab.results import ArtifactError, read_artifact

    try:
        return read_artifact(path), None
    except ArtifactError as e:
        return None, str(e)


def compare_reports(
    multi_dir: Path, fallback_dir: Path, params: dict[str, Any] | None = None
) -> TiersArtifact:
    """The ratios, fallback / multi-GPU, from two report directories. A metric missing on either side is
    null with the reason in `unavailable`, never 0."""
    from lab.results import finish, new_artifact

    art = new_artifact(TiersArtifact, params or {})
    dirs = {"multi": Path(multi_dir), "fallback": Path(fallback_dir)}
    steps: dict[str, dict[str, Any]] = {}
    problems = []
    for tier, d in dirs.items():
        art.tiers[tier] = {"dir": str(d)}
        steps[tier] = {}
        for step in ("warmup", "loadtest"):
            a, err = _read(d / STEP_FILES[step])
            steps[tier][step] = a
            entry: dict[str, Any] = {
                "status": a.status if a else "missing",
                "reason": (a.reason if a else err),
            }
            if a is not None and step == "loadtest":
                entry["valid"] = a.summary.get("valid")
                if not entry["valid"]:  # still comparable, but say why the run does not count as valid
                    entry["invalid_reasons"] = list((getattr(a, "verdict", None) or {}).get("reasons", []))
            art.tiers[tier][step] = entry
            if a is None or a.status != "ok":
                problems.append(f"{tier} {step}: {entry['reason'] or entry['status']}")
        w = steps[tier]["warmup"]
        lt = steps[tier]["loadtest"]
        art.tiers[tier]["gpus"] = _gpus(w, lt)
        art.tiers[tier]["preset"] = ((w.params.get("resolved") or {}).get("preset")) if w else None
    s: dict[str, Any] = {}
    for name, step, metric, meaning in RATIOS:
        fb = _metric(steps["fallback"][step], metric)
        mu = _metric(steps["multi"][step], metric)
        ratio = fb / mu if fb is not None and mu not in (None, 0) else None
        art.ratios[name] = {
            "fallback": fb,
            "multi": mu,
            "ratio": ratio,
            "source": f"{step}.{metric}",
            "meaning": meaning,
        }
        s[f"{name}_fallback"], s[f"{name}_multi"], s[f"{name}_ratio"] = fb, mu, ratio
        if ratio is None:
            side = [t for t, v in (("fallback", fb), ("multi-GPU", mu)) if v is None]
            art.unavailable[f"{name}_ratio"] = (
                f"{metric} not measured on the {' and '.join(side)} tier" + _why(steps, step, metric)
                if side
                else f"{metric} is 0 on the multi-GPU tier"
            )
    for headline, name in HEADLINE.items():
        s[headline] = s[f"{name}_ratio"]
        if s[headline] is None:
            art.unavailable[headline] = art.unavailable.get(f"{name}_ratio", "not measured")
    s["multi_gpus"] = art.tiers["multi"]["gpus"]
    s["fallback_gpus"] = art.tiers["fallback"]["gpus"]
    s["playbook_tokens_per_joule_ratio"] = PLAYBOOK_TOKENS_PER_JOULE_RATIO
    s["multi_loadtest_valid"] = art.tiers["multi"]["loadtest"].get("valid")
    s["fallback_loadtest_valid"] = art.tiers["fallback"]["loadtest"].get("valid")
    art.summary = s
    if problems:
        return finish(art, "failed", "; ".join(problems))
    return finish(art)


def _metric(a, metric: str) -> float | None:
    if a is None or a.status != "ok":
        return None
    v = a.summary.get(metric)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _why(steps, step: str, metric: str) -> str:
    for tier in ("fallback", "multi"):
        a = steps[tier][step]
        if a is not None and metric in a.unavailable:
            return f" ({tier}: {a.unavailable[metric]})"
    return ""


def _gpus(w, lt) -> int | None:
    for a in (lt, w):
        if a is None:
            continue
        tp = (getattr(a, "engine", None) or {}).get("tensor_parallel") or {}
        if tp.get("tensor_parallel_gpus"):
            return int(tp["tensor_parallel_gpus"])
        if a.params.get("tensor_parallel_gpus"):
            return int(a.params["tensor_parallel_gpus"])
    return None


def describe(art: TiersArtifact) -> str:
    s = art.summary

    def f(v, fmt="{:.2f}") -> str:
        return "n/a" if v is None else fmt.format(v)

    lines = [
        f"tiers: {art.status}{' (' + art.reason + ')' if art.reason else ''}",
        f"  fallback (1 GPU) as a fraction of the multi-GPU tier ({s.get('multi_gpus')} GPUs):",
    ]
    for name, _, _, meaning in RATIOS:
        r = art.ratios.get(name, {})
        lines.append(
            f"    {meaning:48s} fallback {f(r.get('fallback'))}  multi {f(r.get('multi'))}  "
            f"ratio {f(r.get('ratio'), '{:.3f}')}"
        )
    lines.append(f"  playbook's tokens/joule ratio: {PLAYBOOK_TOKENS_PER_JOULE_RATIO}")
    return "\n".join(lines)


# --- one tier, every rank ------------------------------------------------------------------------------


def run_tier_worker(args) -> int:
    """Under torchrun: build this rank's shard once, warm up, then serve the load test (rank 0 schedules
    and records, the others follow). Rank 0 writes warmup.json and load_test.json into --out."""
    import torch

    from lab.bench.warmup import WarmupArtifact, WarmupConfig, resolve_mode, run_warmup, use_compile_cache
    from lab.distributed import current, follow_engine, is_rank0, prepare_tp
    from lab.engine.batching import Engine, EngineConfig
    from lab.engine.generate import compiles
    from lab.loadtest.runner import LoadTestConfig
    from lab.loadtest.session import engine_info, run_loadtest, wait_ready
    from lab.results import finish, new_artifact, write_artifact

    out = Path(args.out)
    n = args.tensor_parallel_gpus
    wcfg = WarmupConfig(
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
        tensor_parallel_gpus=n,
        measure_roofline=args.measure_roofline,
    )
    wcfg.validate()
    warm_seq = args.prompt_len + max(args.max_new_tokens, 4)
    load_seq = args.prompt_len_max + args.load_max_new_tokens
    prepared = prepare_tp(
        args.preset,
        args.model_path,
        args.device,
        args.dtype,
        args.seed,
        max(args.batch_size, args.max_batch_size),
        max(warm_seq, load_seq),
        n,
        args.dist_timeout_s,
    )
    mode = resolve_mode(args.mode, prepared.device, args.dtype)
    cache_dir = (
        use_compile_cache(wcfg.compile_cache_dir) if wcfg.compile_cache_dir and compiles(mode) else None
    )
    tp_info = current().describe() if current() else {"tensor_parallel_gpus": 1}
    try:
        wart = run_warmup(wcfg, prepared, cache_dir)
    except LabError:
        raise
    except Exception as e:  # a broken run is recorded as failed, as `lab warmup` does
        wart = finish(new_artifact(WarmupArtifact, wcfg.to_params()), "failed", f"{type(e).__name__}: {e}")
    wart.params["tensor_parallel"] = tp_info
    if is_rank0():
        write_artifact(out / STEP_FILES["warmup"], wart)
    if torch.cuda.is_available() and prepared.device.type == "cuda":
        torch.cuda.empty_cache()

    ecfg = EngineConfig(
        max_batch_size=args.max_batch_size,
        max_seq_len=load_seq,
        max_new_tokens=args.load_max_new_tokens,
        mode=mode,
    )
    engine = Engine(prepared.model, ecfg, eos_id=prepared.spec.args.eos_token_id)
    if not is_rank0():
        follow_engine(engine)
        return 0
    lcfg = LoadTestConfig(
        duration_s=args.duration,
        target_qps=args.target_qps,
        seed=args.seed,
        prompt_len_min=args.prompt_len_min,
        prompt_len_max=args.prompt_len_max,
        max_new_tokens=args.load_max_new_tokens,
        warmup_s=args.warmup_s,
        cooldown_s=args.cooldown_s,
        min_requests=args.min_requests,
        max_dispatch_lag_ms=args.max_dispatch_lag_ms,
        progress=False,
    )
    engine.start(warmup=True)
    try:
        if not wait_ready(engine) or engine.crashed:
            raise LabError(f"the engine failed to warm up: {engine.crashed}")
        info = engine_info(engine, prepared)
        info["tensor_parallel"] = tp_info
        params = {**_params(args), "tensor_parallel_gpus": n}
        lart = run_loadtest(lcfg, engine, None, 1, out / STEP_FILES["loadtest"], params, info)
    finally:
        engine.stop()
    print(
        f"tier TP={n}: warm-up {wart.status}, load test {'VALID' if lart.verdict.get('valid') else 'INVALID'}",
        file=sys.stderr,
    )
    return 0 if wart.status == "ok" and lart.verdict.get("valid") else 1


# --- the drill's option ---------------------------------------------------------------------------------


def compare_into_report(report_dir: Path, n: int, params: dict[str, Any], profile=None) -> TiersArtifact:
    """`lab drill --compare-tiers N`: run both tiers with the drill's model flags into the report directory
    (tiers.json beside the notebooks' artifacts), then judge expectations again so the profile's
    `tiers.*` metrics count, and record the new verdict in the manifest."""
    from lab.cli import build_parser
    from lab.results import MANIFEST_FILE, read_artifact, write_artifact

    argv = ["compare-tiers", "--tensor-parallel-gpus", str(n), "--out", str(report_dir)]
    for flag in ("preset", "model_path", "device", "dtype", "seed"):
        if params.get(flag) not in (None, ""):
            argv += [f"--{flag.replace('_', '-')}", str(params[flag])]
    args = build_parser().parse_args(argv)
    _check_args(args)
    art = run_both(args, Path(report_dir))
    write_artifact(Path(report_dir) / TIERS_FILE, art)
    if profile is not None:
        from lab.expectations import write_evaluation

        try:
            verdict = write_evaluation(Path(report_dir), profile).verdict
        except LabError as e:
            verdict = f"not evaluated: {e}"
        manifest_path = Path(report_dir) / MANIFEST_FILE
        if manifest_path.exists():
            manifest = read_artifact(manifest_path)
            manifest.expectations_verdict = verdict
            write_artifact(manifest_path, manifest)
    return art
