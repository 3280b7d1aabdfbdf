"""One open-loop run (and the artifact around one run or a sweep of runs).

The generator is an asyncio loop that sleeps until each arrival's ABSOLUTE deadline on the monotonic
clock (sleeping to within a millisecond, then yielding until the deadline), starts the request as its
own task and never waits for answers before sending the next one. Dispatch lag (sent - scheduled) is
recorded for every request, and latency is measured from the scheduled time.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.loadtest.client import HTTPTarget, InProcessTarget, RequestRecord
from lab.loadtest.schedule import Schedule, make_schedule
from lab.loadtest.stats import SLO, compute, timeline
from lab.results import Artifact, atomic_write_text, register


@register
class LoadTestArtifact(Artifact):
    """load_test.json: one open-loop run (or a sweep of runs) with its verdict and evidence."""

    kind: str = "loadtest"
    verdict: dict[str, Any] = {}
    distributions: dict[str, Any] = {}
    slo: dict[str, Any] = {}
    exclusions: dict[str, Any] = {}
    schedule: dict[str, Any] = {}
    timeline: list[dict[str, Any]] = []
    telemetry: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    sweep: dict[str, Any] | None = None
    requests_file: str | None = None


@dataclass
class LoadTestConfig:
    """Field names match the CLI flags (--duration -> duration_s)."""

    duration_s: float = 20.0
    target_qps: float = 3.0
    pattern: str = "poisson"
    burst_cv: float = 2.0
    seed: int = 0
    prompt_len_min: int = 32
    prompt_len_max: int = 64
    max_new_tokens: int = 4
    warmup_s: float | None = None  # None: min(2 s, 10 % of the duration)
    cooldown_s: float | None = None  # None: min(2 s, 10 % of the duration)
    drain_timeout_s: float = 60.0
    max_dispatch_lag_ms: float = 5.0
    min_requests: int = 5
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = 2500.0  # the playbook's P99 envelope (about 2.5 s)
    slo_attainment_target: float = 0.99
    endpoint: str | None = None
    model_name: str = "lab"
    prompt_format: str = "ids"
    request_timeout_s: float = 600.0
    progress: bool = True
    timeline_bin_s: float = 1.0

    def edges_s(self) -> tuple[float, float]:
        auto = min(2.0, 0.1 * self.duration_s)
        return (
            auto if self.warmup_s is None else self.warmup_s,
            auto if self.cooldown_s is None else self.cooldown_s,
        )

    def slo(self) -> SLO:
        return SLO(self.slo_ttft_ms, self.slo_tpot_ms, self.slo_e2e_ms, self.slo_attainment_target)


@dataclass
class RunResult:
    qps: float
    schedule: Schedule
    records: list[RequestRecord]
    t0: float
    metrics: dict[str, Any]
    timeline: list[dict[str, Any]]
    telemetry: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        return self.metrics["summary"]


def _sleep_until_loop():
    loop = asyncio.get_running_loop()

    async def until(deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0.0015:  # epoll wakes to the millisecond; the rest is done by yielding
            await asyncio.sleep(delay - 0.001)
        while time.monotonic() < deadline:
            await asyncio.sleep(0)

    return loop, until


async def _drive(schedule: Schedule, target, cfg: LoadTestConfig, telemetry_window) -> tuple:
    loop, until = _sleep_until_loop()
    await target.start()
    t0 = time.monotonic() + 0.05
    records = [
        RequestRecord(a.index, a.phase, t0 + a.t_s, a.prompt_len, a.max_new_tokens) for a in schedule.arrivals
    ]
    prompts = [schedule.prompt_ids(a.index) for a in schedule.arrivals]
    depth: list[dict[str, Any]] = []
    bar = _progress(len(records), cfg.progress, schedule.target_qps)
    stop_sampling = asyncio.Event()

    async def sample_depth() -> None:
        while not stop_sampling.is_set():
            depth.append({"t_s": time.monotonic() - t0, **target.depth()})
            try:
                await asyncio.wait_for(stop_sampling.wait(), 0.25)
            except asyncio.TimeoutError:
                pass

    async def one(i: int) -> None:
        try:
            await target.send(prompts[i], records[i])
        finally:
            if bar is not None:
                bar.update(1)

    sampler = asyncio.create_task(sample_depth())
    if telemetry_window is not None:
        telemetry_window.start(t0)
    tasks = []
    for rec in records:
        await until(rec.t_scheduled)
        tasks.append(asyncio.create_task(one(rec.index)))
    await until(t0 + schedule.duration_s)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=cfg.drain_timeout_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
    stop_sampling.set()
    await sampler
    await target.close()
    if bar is not None:
        bar.close()
    return records, t0, depth


def _progress(total: int, enabled: bool, qps: float):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"load test @ {qps:g} QPS", unit="req", file=sys.stderr, mininterval=0.5)


class _TelemetryWindow:
    """Runs the lead's Telemetry over exactly the measured window, in its own thread (its device
    synchronisation must not stall the load generator). Records when the window really opened/closed."""

    def __init__(self, device, start_s: float, end_s: float):
        from lab.distributed import tier_telemetry

        self.tel = tier_telemetry(device)  # Telemetry; on a multi-GPU tier, every rank's GPU summed
        self.start_s, self.end_s = start_s, end_s
        self.t_open: float | None = None
        self.t_close: float | None = None
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self, t0: float) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(t0,), name="lab-telemetry-window", daemon=True
        )
        self._thread.start()

    def _run(self, t0: float) -> None:
        try:
            time.sleep(max(0.0, t0 + self.start_s - time.monotonic()))
            self.tel.__enter__()
            self.t_open = time.monotonic()
            time.sleep(max(0.0, t0 + self.end_s - time.monotonic()))
            self.t_close = time.monotonic()
            self.tel.__exit__(None, None, None)
        except Exception as e:  # telemetry must never break the load test; say what is missing
            self.error = f"{type(e).__name__}: {e}"

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=30)

    def result(self, records: list[RequestRecord]) -> tuple[dict[str, Any], dict[str, str]]:
        unavailable = dict(self.tel.unavailable)
        if self.error:
            unavailable["telemetry"] = self.error
        tokens = None
        if self.t_open is not None and self.t_close is not None:
            tokens = sum(self.t_open <= t < self.t_close for r in records for t in r.token_times)
        out = self.tel.summary(tokens)
        out["tokens_in_window"] = tokens
        out["samples"] = self.tel.samples
        mem = [s.get("mem_used_gb") for s in self.tel.samples if s.get("mem_used_gb") is not None]
        out["gpu_mem_used_gb_max"] = max(mem) if mem else None
        return out, unavailable


def run_once(
    cfg: LoadTestConfig,
    target,
    qps: float,
    vocab_size: int,
    telemetry_device: Any = None,
) -> RunResult:
    """One open-loop run at `qps` against `target` (an InProcessTarget or HTTPTarget)."""
    schedule = make_schedule(
        qps,
        cfg.duration_s,
        cfg.seed,
        cfg.pattern,
        cfg.prompt_len_min,
        cfg.prompt_len_max,
        cfg.max_new_tokens,
        *cfg.edges_s(),
        cfg.burst_cv,
        vocab_size,
    )
    window = schedule.measure_window_s
    tw = _TelemetryWindow(telemetry_device, *window) if telemetry_device is not None else None
    # The in-process engine thread shares the GIL with the generator; Python's default 5 ms switch
    # interval would let a busy engine delay a due dispatch by up to 5 ms. Hand over faster while we run.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, 0.0002))
    try:
        records, t0, depth = _run_coro(lambda: _drive(schedule, target, cfg, tw))
    finally:
        sys.setswitchinterval(switch)
    metrics = compute(records, t0, window, qps, cfg.slo(), cfg.max_dispatch_lag_ms, cfg.min_requests)
    tel: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    if tw is not None:
        tw.join()
        tel, unavailable = tw.result(records)
    else:
        unavailable["power"] = unavailable["energy"] = (
            "not measured: the server behind --endpoint may run elsewhere (pass --telemetry-device cuda:N "
            "when it shares this host's GPU)"
        )
    return RunResult(
        qps=qps,
        schedule=schedule,
        records=records,
        t0=t0,
        metrics=metrics,
        timeline=timeline(records, t0, depth, cfg.timeline_bin_s),
        telemetry=tel,
        unavailable=unavailable,
    )


def _run_coro(make):
    """asyncio.run, also from a thread that already runs an event loop (Jupyter): then the generator
    gets a fresh loop in its own thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="lab-loadgen") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def make_target(cfg: LoadTestConfig, engine=None):
    if cfg.endpoint:
        if cfg.prompt_format not in ("ids", "text"):
            raise LabError("--prompt-format must be ids or text")
        return HTTPTarget(cfg.endpoint, cfg.model_name, cfg.request_timeout_s, cfg.prompt_format)
    if engine is None:
        raise LabError("no target: pass --endpoint URL or build the in-process engine")
    return InProcessTarget(engine)


def add_run_to_summary(run: RunResult, engine_stats: dict[str, Any] | None) -> dict[str, Any]:
    """The flat summary: the metrics plus energy, tokens/joule and peak memory (null when unmeasured)."""
    s = dict(run.summary)
    tel = run.telemetry
    s["power_w_mean"] = tel.get("power_w_mean")
    s["energy_j"] = tel.get("energy_j")
    s["tokens_per_joule"] = tel.get("tokens_per_joule")
    peak = (engine_stats or {}).get("peak_memory_gb")
    s["peak_memory_gb"] = peak if peak is not None else tel.get("gpu_mem_used_gb_max")
    return s


def write_requests(path: Path, runs: list[RunResult]) -> Path:
    import json

    lines = []
    for run in runs:
        tag = f"qps={run.qps:g}" if len(runs) > 1 else None
        lines.extend(json.dumps(r.to_row(run.t0, tag)) for r in run.records)
    return atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def requests_path(output_json: str | Path) -> Path:
    p = Path(output_json)
    return p.with_name(p.stem + ".requests.jsonl")


def exclusions(run: RunResult) -> dict[str, Any]:
    from lab.loadtest.stats import accounting

    out: dict[str, Any] = {"measure_window_s": list(run.schedule.measure_window_s)}
    for phase in ("warmup", "cooldown"):
        recs = [r for r in run.records if r.phase == phase]
        out[phase] = {
            "seconds": run.schedule.warmup_s if phase == "warmup" else run.schedule.cooldown_s,
            **accounting(recs),
        }
    return out


def config_dict(cfg: LoadTestConfig) -> dict[str, Any]:
    return asdict(cfg)
