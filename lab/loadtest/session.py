"""A load-test session: build (or take) the in-process engine, run one open-loop run or a sweep, and
produce the `loadtest` artifact plus the per-request JSONL beside it. The CLI, the notebook and the GPU
benchmark all call `run_loadtest`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lab import startup
from lab.errors import LabError
from lab.faults import is_oom, oom_plan, oom_reason
from lab.loadtest.runner import (
    LoadTestArtifact,
    LoadTestConfig,
    RunResult,
    add_run_to_summary,
    config_dict,
    exclusions,
    make_target,
    requests_path,
    run_once,
    write_requests,
)
from lab.loadtest.sweep import best_passing, point, search
from lab.results import finish, new_artifact, write_artifact


def build_engine(
    preset: str | None,
    model_path: str | None,
    device: str,
    dtype: str,
    seed: int,
    engine_config,
):
    """The one way the load test and the server build the in-process engine (plans memory first)."""
    from lab.engine.batching import Engine
    from lab.model import oom_context, prepare

    prepared = prepare(
        preset, model_path, device, dtype, seed, engine_config.max_batch_size, engine_config.max_seq_len
    )
    startup.mark("model_built")
    point_compile_cache(engine_config)
    with oom_context(prepared.plan, prepared.device, "allocating the KV cache"):
        engine = Engine(prepared.model, engine_config, eos_id=prepared.spec.args.eos_token_id)
    startup.mark("engine_built")
    return engine, prepared


def offline_batch(engine, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict[str, Any]:
    """A closed batch: `batch` requests of random prompts submitted at once into the idle, started engine
    and run to completion (the engine's offline rate, which the GPU benchmarks compare served load with).
    `decode_tokens_per_s_aggregate` counts only tokens stamped after every row has its first token."""
    import time

    import numpy as np

    from lab.engine.batching import Request

    rng = np.random.default_rng(seed)
    reqs = [
        Request(rng.integers(0, engine.vocab_size, prompt_len).tolist(), new_tokens, ignore_eos=True)
        for _ in range(batch)
    ]
    t0 = time.monotonic()
    for r in reqs:
        engine.submit(r)
    while not all(r.done for r in reqs):
        time.sleep(0.002)
    if any(r.outcome != "ok" for r in reqs):
        raise LabError(f"offline batch: not every request finished ok: {[r.outcome for r in reqs]}")
    t_end = max(r.t_done for r in reqs)
    t_all_first = max(r.t_first_token for r in reqs)
    total = sum(len(r.tokens) for r in reqs)
    steady = sum(1 for r in reqs for t in r.token_times if t > t_all_first)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "wall_s": t_end - t0,
        "tokens": total,
        "tokens_per_s_aggregate": total / (t_end - t0),
        "decode_tokens_per_s_aggregate": steady / (t_end - t_all_first) if t_end > t_all_first else None,
        "ttft_s_max": t_all_first - t0,
    }


def point_compile_cache(engine_config) -> None:
    """Before the engine's first compile: Inductor's on-disk cache at engine_config.compile_cache_dir
    (resolved in place, so the artifact records the absolute path). No-op without one, or in eager mode
    (nothing is compiled)."""
    from lab.engine.generate import compiles

    if engine_config.compile_cache_dir and compiles(engine_config.mode):
        from lab.engine.compile_cache import use_compile_cache

        engine_config.compile_cache_dir = str(use_compile_cache(engine_config.compile_cache_dir))


def engine_info(engine, prepared) -> dict[str, Any]:
    from lab.engine.batching import config_dict as engine_cfg
    from lab.model import dtype_name

    return {
        "target": "in-process",
        "preset": prepared.spec.preset,
        "model_path": prepared.spec.model_path,
        "device": str(prepared.device),
        "dtype": dtype_name(prepared.dtype),
        "config": engine_cfg(engine.config),
        "warmup_s": engine.warmup_s,
        "compile_cache": engine.compile_cache_state,
        "memory_plan": prepared.plan.to_dict(),
        "memory_guard": engine.memory_guard.not_applicable or "active",
    }


def run_loadtest(
    cfg: LoadTestConfig,
    engine=None,
    sweep: str | list[float] | None = None,
    sweep_max_runs: int = 8,
    output_json: str | Path | None = None,
    params: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    telemetry_device: Any = None,
) -> LoadTestArtifact:
    """Run the test against `engine` (in-process) or `cfg.endpoint`; write the artifact and JSONL when
    `output_json` is given. The engine must be started and warmed up."""
    if cfg.endpoint is None and engine is None:
        raise LabError("no target: pass --endpoint URL, or an engine")
    if engine is not None and not wait_ready(engine):
        raise LabError(
            f"the engine did not finish warming up: {engine.crashed or 'still warming up after 1 h'}"
        )
    if vocab_size is None:
        vocab_size = engine.vocab_size if engine is not None else 256
    if engine is not None and telemetry_device is None:
        telemetry_device = engine.device
    art = new_artifact(LoadTestArtifact, params or {"config": config_dict(cfg), "sweep": sweep})
    art.engine = info or ({"target": "http", "endpoint": cfg.endpoint} if cfg.endpoint else {})
    if cfg.endpoint:
        from lab.loadtest.client import wait_for_full_speed

        server = wait_for_full_speed(cfg.endpoint)
        if server is not None:
            art.engine["server"] = server  # the mode the measured steps ran in
    target = make_target(cfg, engine)
    runs: list[RunResult] = []
    threads = _leave_a_core_for_the_generator(engine)

    def run_at(qps: float) -> dict[str, Any]:
        run = run_once(cfg, target, qps, vocab_size, telemetry_device)
        runs.append(run)
        return add_run_to_summary(run, engine.stats() if engine is not None else None)

    summaries: dict[int, dict[str, Any]] = {}
    try:
        if sweep is None:
            summaries[0] = run_at(cfg.target_qps)
            chosen = 0
        else:
            if not cfg.slo().given():
                raise LabError("--sweep needs at least one SLO: --slo-ttft-ms, --slo-tpot-ms or --slo-e2e-ms")
            pairs = (
                search(run_at, cfg.target_qps, cfg.slo_attainment_target, sweep_max_runs)
                if sweep == "search"
                else [(q, run_at(q)) for q in sweep]
            )
            for i, (_, s) in enumerate(pairs):
                summaries[i] = s
            best = best_passing(pairs, cfg.slo_attainment_target)
            chosen = next((i for i, (q, _) in enumerate(pairs) if q == best), 0)
            curve = sorted(
                (point(s, cfg.slo_attainment_target) for _, s in pairs), key=lambda p: p["target_qps"]
            )
            art.sweep = {
                "mode": "search" if sweep == "search" else "list",
                "max_qps_meeting_slo": best,
                "slo": cfg.slo().to_dict(),
                "curve": curve,
                "order_run": [q for q, _ in pairs],
            }
    finally:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
    run = runs[chosen]
    art.summary = summaries[chosen]
    if art.sweep is not None:
        art.summary["max_qps_meeting_slo"] = art.sweep["max_qps_meeting_slo"]
        art.summary["sweep_points"] = len(runs)
        if art.sweep["max_qps_meeting_slo"] is None:
            art.unavailable["max_qps_meeting_slo"] = "no swept rate met the SLOs; lower the start QPS"
    art.verdict = run.metrics["verdict"]
    art.distributions = run.metrics["distributions"]
    art.slo = run.metrics["slo"]
    art.exclusions = exclusions(run)
    art.schedule = run.schedule.to_dict()
    art.timeline = run.timeline
    art.telemetry = run.telemetry
    art.unavailable.update(run.unavailable)
    if cfg.endpoint:
        art.unavailable.setdefault(
            "queue_wait_ms",
            "not visible to an HTTP client: the server does not report when it admitted a request",
        )
    for key in ("tokens_per_joule", "energy_j", "power_w_mean", "peak_memory_gb"):
        if art.summary.get(key) is None:
            art.unavailable.setdefault(key, art.unavailable.get("energy") or "not measured on this device")
    if engine is not None:
        art.engine["stats"] = engine.stats()
    if not art.verdict["valid"]:
        art.reason = "INVALID: " + "; ".join(art.verdict["reasons"])
    if engine is not None and engine.crashed:  # e.g. out of memory mid-run: every request was failed
        crash = engine.crashed
        plan = (info or {}).get("memory_plan")
        art.reason = oom_reason("the load test", crash, plan, _LOADTEST_KNOBS) if is_oom(crash) else crash
        finish(art, "failed", art.reason)
    else:
        finish(art)
    if output_json is not None:
        req_file = requests_path(output_json)
        write_requests(req_file, runs)
        art.requests_file = req_file.name
        write_artifact(output_json, art)
    return art


_LOADTEST_KNOBS = "--max-batch-size, --max-seq-len or --prompt-len-max"


def wait_ready(engine, timeout_s: float = 3600.0) -> bool:
    """Wait for warm-up, but return at once if the engine thread crashed (it never sets `ready`)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not engine.ready.wait(timeout=0.05):
        if engine.crashed or time.monotonic() > deadline:
            return False
    return True


def _failed(cfg, params, info, output_json, error: str, step: str) -> LoadTestArtifact:
    """A load test that could not run (out of memory at warm-up): a failed artifact with the plan."""
    art = new_artifact(LoadTestArtifact, params or {"config": config_dict(cfg)})
    art.engine = info
    reason = oom_reason(step, error, info.get("memory_plan"), _LOADTEST_KNOBS)
    finish(art, "failed", reason)
    if output_json is not None:
        write_artifact(output_json, art)
    return art


def _leave_a_core_for_the_generator(engine) -> int | None:
    """An in-process engine on the CPU would otherwise take every core for its matrix maths and starve
    the load generator (dispatch lag, an INVALID run). Returns the thread count to restore."""
    if engine is None or engine.device.type != "cpu":
        return None
    import os

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 2) - 1)))
    return before


def run_in_process(
    cfg: LoadTestConfig,
    engine_config,
    preset: str | None,
    model_path: str | None,
    device: str = "auto",
    dtype: str = "auto",
    sweep: str | list[float] | None = None,
    sweep_max_runs: int = 8,
    output_json: str | Path | None = None,
    params: dict[str, Any] | None = None,
    tensor_parallel_gpus: int = 1,
    dist_timeout_s: float | None = None,
    allow_smaller_world: bool = False,
) -> LoadTestArtifact | None:
    """Build the engine (memory plan first), warm it up, run the test, stop the engine.

    On the multi-GPU tier (tensor_parallel_gpus > 1, under torchrun; lab.distributed) every rank builds
    its shard; rank 0 generates the load, schedules and records, the other ranks run each step it
    broadcasts and return None. Tokens and requests are counted once, on rank 0."""
    if tensor_parallel_gpus > 1:
        from lab.distributed import build_engine_tp, follow_engine, is_rank0

        engine, prepared = build_engine_tp(
            preset,
            model_path,
            device,
            dtype,
            cfg.seed,
            engine_config,
            tensor_parallel_gpus,
            dist_timeout_s,
            allow_smaller_world,
        )
        if not is_rank0():
            follow_engine(engine)
            return None
    else:
        try:
            engine, prepared = build_engine(preset, model_path, device, dtype, cfg.seed, engine_config)
        except LabError:
            raise
        except Exception as e:
            if not is_oom(e):
                raise
            info = {"target": "in-process", "preset": preset, "memory_plan": oom_plan(e)}
            return _failed(cfg, params, info, output_json, e, getattr(e, "lab_step", "loading the model"))
    engine.start(warmup=True)
    try:
        if not wait_ready(engine) or engine.crashed:
            if is_oom(engine.crashed):  # a step that broke, not bad input: a failed artifact says so
                return _failed(
                    cfg, params, engine_info(engine, prepared), output_json, engine.crashed, "warm-up"
                )
            raise LabError(f"the engine failed to warm up: {engine.crashed}")
        info = engine_info(engine, prepared)
        if tensor_parallel_gpus > 1:
            from lab.distributed import current

            info["tensor_parallel"] = current().describe() if current() else None
        return run_loadtest(cfg, engine, sweep, sweep_max_runs, output_json, params, info)
    finally:
        engine.stop()


def describe(art: LoadTestArtifact, path: str | Path | None = None) -> str:
    """A few human lines: verdict, accounting, rates, latency percentiles, goodput, energy."""
    s = art.summary

    def f(key: str, unit: str = "", nd: int = 1) -> str:
        v = s.get(key)
        return "n/a" if v is None else (f"{v:.{nd}f}{unit}" if isinstance(v, float) else f"{v}{unit}")

    lines = [
        f"load test: {'FAILED' if art.status == 'failed' else 'VALID' if art.verdict.get('valid') else 'INVALID'}"
        + (f" -> {path}" if path else ""),
        f"  requests: sent {f('requests_sent')} ok {f('requests_ok')} rejected {f('requests_rejected')} "
        f"timed out {f('requests_timed_out')} errored {f('requests_errored')} cancelled {f('requests_cancelled')}",
        f"  qps: target {f('target_qps', '', 2)} achieved {f('achieved_qps', '', 2)}; "
        f"output {f('output_tokens_per_s', ' tok/s')} (aggregate)",
        f"  ttft p50/p99 {f('ttft_ms_p50', ' ms')} / {f('ttft_ms_p99', ' ms')}; tpot p50/p99 "
        f"{f('tpot_ms_p50', ' ms', 2)} / {f('tpot_ms_p99', ' ms', 2)}; e2e p50/p99 {f('e2e_ms_p50', ' ms')} / "
        f"{f('e2e_ms_p99', ' ms')} (n={f('e2e_ms_count')})",
        f"  goodput {f('goodput_rps', ' req/s', 2)}, SLO attainment {f('slo_attainment', '', 3)}; dispatch lag p99 "
        f"{f('dispatch_lag_ms_p99', ' ms', 3)}; tokens/J {f('tokens_per_joule', '', 2)}",
    ]
    n = s.get("e2e_ms_count") or 0
    if 0 < n < 100:
        lines.append(
            f"  note: {n} samples, so p99 is interpolated toward the max; lengthen --duration for a firmer tail"
        )
    if "max_qps_meeting_slo" in s:
        lines.append(f"  sweep: max QPS meeting the SLOs = {f('max_qps_meeting_slo', '', 2)}")
    lines.extend(f"  INVALID: {r}" for r in art.verdict.get("reasons", []))
    if s.get("requests_errored"):
        lines.append(
            f"  note: {s['requests_errored']} requests errored (the server failed them, or the connection was "
            "lost or refused); they count as failures in goodput and SLO attainment; reasons per request in "
            + (art.requests_file or "the requests JSONL")
        )
    if art.status == "failed":
        lines.append(f"  FAILED: {art.reason}")
    return "\n".join(lines)


def read_requests(path: str | Path) -> list[dict[str, Any]]:
    """The per-request JSONL beside an artifact (one JSON object per line; no code is executed)."""
    import json

    p = Path(path)
    try:
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise LabError(f"{p}: requests file not found; re-run the load test") from None
    except json.JSONDecodeError as e:
        raise LabError(f"{p}: corrupt line {e.lineno}; re-run the load test") from None
