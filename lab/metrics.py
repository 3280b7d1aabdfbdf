"""Prometheus export of a drill report: gauges in base units (seconds, bytes, joules, watts) with
bounded labels (step, quantile, outcome, metric; never a run id), in a registry of our own; written as a
node_exporter textfile (atomically) or pushed to a Pushgateway. Plus alerting rules built from the
expectations: p99 over its threshold, tokens/joule drop, a stale or failed drill.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.expectations import ExpectationsReport, Profile, ReportData, evaluate, load_report, read_evaluation
from lab.results import MANIFEST_FILE, atomic_write_text, read_json


@dataclass(frozen=True)
class Series:
    """A summary key of a step's artifact as a Prometheus series."""

    step: str
    key: str
    name: str
    scale: float = 1.0
    labels: tuple[tuple[str, str], ...] = ()


def _q(step: str, key: str, name: str, q: str, scale: float = 1e-3) -> Series:
    return Series(step, key, name, scale, (("quantile", q),))


# Family name -> (help, extra label names besides `step`).
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lab_ttft_seconds": ("Time to first token (prefill), by quantile.", ("quantile",)),
    "lab_decode_seconds_per_token": ("Decode time per token, by quantile.", ("quantile",)),
    "lab_tpot_seconds": ("Time per output token after the first, by quantile.", ("quantile",)),
    "lab_e2e_latency_seconds": (
        "End-to-end request latency from the scheduled time, by quantile.",
        ("quantile",),
    ),
    "lab_dispatch_lag_seconds": ("Load generator lag behind the schedule, by quantile.", ("quantile",)),
    "lab_decode_tokens_per_second": ("Decode throughput after warm-up.", ()),
    "lab_output_tokens_per_second": ("Served output tokens per second in the load test.", ()),
    "lab_peak_memory_bytes": ("Peak GPU memory allocated.", ()),
    "lab_compile_seconds": ("torch.compile / graph capture time.", ()),
    "lab_power_watts": ("Mean board power over the timed window.", ()),
    "lab_energy_joules": ("Energy over the timed window (NVML counter).", ()),
    "lab_tokens_per_joule": ("Tokens per joule over the same window.", ()),
    "lab_memory_bandwidth_utilization_ratio": ("Decode MBU against the measured copy bandwidth.", ()),
    "lab_target_requests_per_second": ("Load test offered QPS.", ()),
    "lab_achieved_requests_per_second": ("Load test achieved QPS.", ()),
    "lab_goodput_requests_per_second": ("Requests per second meeting every SLO.", ()),
    "lab_slo_attainment_ratio": ("Fraction of requests meeting every SLO.", ()),
    "lab_loadtest_requests": ("Load test requests by outcome in the last drill.", ("outcome",)),
    "lab_loadtest_valid": ("1 when the load test verdict is VALID.", ()),
    "lab_itl_seconds": ("Inter-token latency, by quantile.", ("quantile",)),
    "lab_queue_wait_seconds": ("Time a request waited for admission, by quantile.", ("quantile",)),
    "lab_memory_headroom_bytes": ("Planned free GPU memory for the drill's model and load.", ()),
    "lab_nvlink_active_links_min": ("Fewest active NVLink links on any visible GPU.", ()),
    "lab_ecc_uncorrected_errors": ("Uncorrected volatile ECC errors over the visible GPUs.", ()),
    "lab_collective_bus_bandwidth_bytes_per_second": ("All-reduce bus bandwidth of the health probe.", ()),
    "lab_fallback_vs_multi_gpu_ratio": ("The fallback as a fraction of the multi-GPU tier.", ("quantity",)),
    "lab_compare_speedup_ratio": ("Decode speedup of a method against eager (eager = 1).", ("method",)),
    "lab_compare_decode_tokens_per_second": ("Aggregate decode tokens/s per method.", ("method",)),
    "lab_compare_compile_seconds": ("Compile / capture time per method.", ("method",)),
}
COMPARE_METHODS = ("eager", "eager-cudagraph", "compile", "reduce-overhead", "max-autotune", "flex-attention")

SERIES: tuple[Series, ...] = (
    _q("warmup", "ttft_ms_p50", "lab_ttft_seconds", "0.5"),
    _q("warmup", "ttft_ms_p99", "lab_ttft_seconds", "0.99"),
    _q("warmup", "decode_ms_per_token_p50", "lab_decode_seconds_per_token", "0.5"),
    _q("warmup", "decode_ms_per_token_p99", "lab_decode_seconds_per_token", "0.99"),
    Series("warmup", "decode_tokens_per_s", "lab_decode_tokens_per_second"),
    Series("warmup", "peak_memory_gb", "lab_peak_memory_bytes", 1e9),
    Series("warmup", "compile_s", "lab_compile_seconds"),
    Series("warmup", "power_w_mean", "lab_power_watts"),
    Series("warmup", "energy_j", "lab_energy_joules"),
    Series("warmup", "tokens_per_joule", "lab_tokens_per_joule"),
    Series("warmup", "mbu", "lab_memory_bandwidth_utilization_ratio"),
    _q("loadtest", "ttft_ms_p50", "lab_ttft_seconds", "0.5"),
    _q("loadtest", "ttft_ms_p99", "lab_ttft_seconds", "0.99"),
    _q("loadtest", "tpot_ms_p50", "lab_tpot_seconds", "0.5"),
    _q("loadtest", "tpot_ms_p99", "lab_tpot_seconds", "0.99"),
    _q("loadtest", "e2e_ms_p50", "lab_e2e_latency_seconds", "0.5"),
    _q("loadtest", "e2e_ms_p99", "lab_e2e_latency_seconds", "0.99"),
    _q("loadtest", "dispatch_lag_ms_p99", "lab_dispatch_lag_seconds", "0.99"),
    _q("loadtest", "itl_ms_p50", "lab_itl_seconds", "0.5"),
    _q("loadtest", "itl_ms_p99", "lab_itl_seconds", "0.99"),
    _q("loadtest", "queue_wait_ms_p50", "lab_queue_wait_seconds", "0.5"),
    _q("loadtest", "queue_wait_ms_p99", "lab_queue_wait_seconds", "0.99"),
    Series("health", "memory_headroom_gb", "lab_memory_headroom_bytes", 1e9),
    Series("health", "nvlink_active_links_min", "lab_nvlink_active_links_min"),
    Series("health", "ecc_uncorrected_volatile_total", "lab_ecc_uncorrected_errors"),
    Series("health", "collective_busbw_gbps", "lab_collective_bus_bandwidth_bytes_per_second", 1e9),
    *(
        Series("tiers", f"{q}_ratio", "lab_fallback_vs_multi_gpu_ratio", 1.0, (("quantity", q),))
        for q in ("tokens_per_s", "p99_latency", "tokens_per_joule")
    ),
    Series("loadtest", "output_tokens_per_s", "lab_output_tokens_per_second"),
    Series("loadtest", "target_qps", "lab_target_requests_per_second"),
    Series("loadtest", "achieved_qps", "lab_achieved_requests_per_second"),
    Series("loadtest", "goodput_rps", "lab_goodput_requests_per_second"),
    Series("loadtest", "slo_attainment", "lab_slo_attainment_ratio"),
    Series("loadtest", "tokens_per_joule", "lab_tokens_per_joule"),
    Series("loadtest", "peak_memory_gb", "lab_peak_memory_bytes", 1e9),
    Series("loadtest", "power_w_mean", "lab_power_watts"),
    Series("loadtest", "valid", "lab_loadtest_valid"),
    *(
        Series("loadtest", f"requests_{o}", "lab_loadtest_requests", 1.0, (("outcome", o),))
        for o in ("sent", "ok", "rejected", "timed_out", "errored")
    ),
    *(
        Series("compare", f"{m}.{key}", name, 1.0, (("method", m),))
        for m in COMPARE_METHODS
        for key, name in (
            ("speedup_vs_eager", "lab_compare_speedup_ratio"),
            ("decode_tokens_per_s_aggregate", "lab_compare_decode_tokens_per_second"),
            ("compile_s", "lab_compare_compile_seconds"),
        )
    ),
)
KNOWN_TRIGGERS = ("nvlink_degraded", "nccl_hang", "pcie_only_qps_drop", "fits_anywhere")
STATUS_CODE = {"pass": 0, "warn": 1, "fail": 2}


def series_for(source: str) -> Series | None:
    step, _, key = source.partition(".")
    return next((s for s in SERIES if s.step == step and s.key == key), None)


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _ts(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def last_success_timestamp(report_dir: Path, manifest: dict[str, Any] | None) -> float:
    """When a drill last succeeded: this one if it did, else the newest ok sibling report; 0 if never
    (so `time() - lab_drill_last_success_timestamp_seconds` is huge and the stale alert fires)."""
    if manifest and manifest.get("status") == "ok":
        return _ts(manifest.get("finished_at")) or 0.0
    best = 0.0
    for path in report_dir.parent.glob(f"*/{MANIFEST_FILE}"):
        try:
            m = read_json(path)
        except LabError:
            continue
        if isinstance(m, dict) and m.get("kind") == "manifest" and m.get("status") == "ok":
            best = max(best, _ts(m.get("finished_at")) or 0.0)
    return best


class _Families:
    """Metric families gathered from a report, then served by one collector in our own registry.
    Families with a `quantile` label are summaries (as Prometheus requires); the rest are gauges."""

    def __init__(self) -> None:
        self.families: dict[str, Any] = {}

    def add(self, name: str, help_: str, value: float, **labels: str) -> None:
        from prometheus_client.core import Metric

        kind = "summary" if "quantile" in labels else "gauge"
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = Metric(name, help_, kind)
        fam.add_sample(name, labels, float(value))

    def count(self, name: str, value: float, **labels: str) -> None:
        fam = self.families[name]
        if not any(x.name == f"{name}_count" and x.labels == labels for x in fam.samples):
            fam.add_sample(f"{name}_count", labels, float(value))

    def collect(self):
        yield from self.families.values()


def build_registry(report_dir: str | Path, profile: Profile | None = None):
    """A CollectorRegistry of our own with every series the report supports (absent values are not
    exported: a missing series is honest, a 0 would be a lie)."""
    from prometheus_client import CollectorRegistry

    report_dir = Path(report_dir)
    data: ReportData = load_report(report_dir)
    fams = _Families()

    for s in SERIES:
        art = data.artifacts.get(s.step)
        if art is None or art.status != "ok":
            continue
        value = _num(art.summary.get(s.key))
        if value is None:
            continue
        fams.add(s.name, FAMILIES[s.name][0], value * s.scale, step=s.step, **dict(s.labels))
        # A summary's sample count, where the artifact states it (e.g. ttft_ms_count).
        count = (
            _num(art.summary.get(s.key.rsplit("_p", 1)[0] + "_count"))
            if "quantile" in dict(s.labels)
            else None
        )
        if count is not None:
            fams.count(s.name, count, step=s.step)

    health = data.artifacts.get("health")
    if health is not None and health.status == "ok":
        decision = getattr(health, "decision", None)
        if hasattr(decision, "model_dump"):
            decision = decision.model_dump()
        if isinstance(decision, dict) and "fallback_recommended" in decision:
            fams.add(
                "lab_fallback_recommended",
                "1 when the health check recommends the single-GPU fallback.",
                float(bool(decision["fallback_recommended"])),
            )
            fired = {t.get("name") if isinstance(t, dict) else str(t) for t in decision.get("triggers") or []}
            for t in KNOWN_TRIGGERS:
                fams.add(
                    "lab_fallback_trigger",
                    "1 when a playbook fallback trigger fired.",
                    float(t in fired),
                    trigger=t,
                )

    m = data.manifest
    if m is not None:
        fams.add(
            "lab_drill_success",
            "1 when every step of the last drill succeeded.",
            float(m.get("status") == "ok"),
        )
        start, end = _ts(m.get("started_at")), _ts(m.get("finished_at"))
        if end is not None:
            fams.add("lab_drill_last_run_timestamp_seconds", "When the last drill finished (Unix time).", end)
        if start is not None and end is not None:
            fams.add("lab_drill_duration_seconds", "Wall time of the last drill.", end - start)
        for rec in m.get("steps") or []:
            if not isinstance(rec, dict) or rec.get("status") == "skipped" or "step" not in rec:
                continue
            step = str(rec["step"])
            fams.add(
                "lab_drill_step_success",
                "1 when the drill step succeeded.",
                float(rec.get("status") == "ok"),
                step=step,
            )
            if isinstance(rec.get("duration_s"), (int, float)):
                fams.add(
                    "lab_drill_step_duration_seconds",
                    "Wall time of the drill step.",
                    rec["duration_s"],
                    step=step,
                )
    fams.add(
        "lab_drill_last_success_timestamp_seconds",
        "When a drill last succeeded (Unix time; 0 = never).",
        last_success_timestamp(report_dir, m),
    )

    ev: ExpectationsReport | None = evaluate(report_dir, profile) if profile else read_evaluation(report_dir)
    if ev is not None:
        for r in ev.metrics:
            if r.status in STATUS_CODE:
                fams.add(
                    "lab_expectation_status",
                    "Expectation result per metric: 0 pass, 1 warn, 2 fail.",
                    STATUS_CODE[r.status],
                    metric=r.metric,
                )
        fams.add(
            "lab_expectation_failures",
            "Metrics outside their fail band in the last drill.",
            sum(r.status == "fail" for r in ev.metrics),
        )
    reg = CollectorRegistry(auto_describe=False)
    reg.register(fams)
    return reg


def export_textfile(report_dir: str | Path, path: str | Path, profile: Profile | None = None) -> Path:
    """Write the node_exporter textfile atomically (a scrape never reads half a file)."""
    from prometheus_client import generate_latest

    path = Path(path)
    if path.suffix != ".prom":
        raise LabError(f"--textfile {path}: node_exporter's textfile collector reads only *.prom files")
    text = generate_latest(build_registry(report_dir, profile)).decode()
    return atomic_write_text(path, text)


def push(
    report_dir: str | Path, gateway: str, job: str = "lab_drill", profile: Profile | None = None
) -> None:
    from prometheus_client import push_to_gateway

    reg = build_registry(report_dir, profile)
    try:
        push_to_gateway(
            gateway, job=job, registry=reg, grouping_key={"instance": socket.gethostname()}, timeout=10
        )
    except OSError as e:
        raise LabError(f"cannot push to the Pushgateway at {gateway}: {e}; check --gateway") from None


# --- alerting rules -------------------------------------------------------------------------------


def _selector(s: Series) -> str:
    labels = {"step": s.step, **dict(s.labels)}
    return s.name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def alert_rules(
    ev: ExpectationsReport, stale_after_h: float = 26.0, for_duration: str = "10m"
) -> dict[str, Any]:
    """A Prometheus rules file (as a dict for YAML) pinned to the thresholds of an evaluation."""
    rules: list[dict[str, Any]] = [
        {
            "alert": "LabDrillStale",
            "expr": f"time() - lab_drill_last_success_timestamp_seconds > {int(stale_after_h * 3600)}",
            "for": for_duration,
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"No successful fallback drill for more than {stale_after_h:g} h",
                "description": "Run `lab drill` (the nightly job) and check its manifest.json.",
            },
        },
        {
            "alert": "LabDrillFailed",
            "expr": "lab_drill_success == 0",
            "for": "0m",
            "labels": {"severity": "warning"},
            "annotations": {"summary": "The last fallback drill had a failed step; see its manifest.json"},
        },
        {
            "alert": "LabExpectationFailed",
            "expr": "lab_expectation_status == 2",
            "for": "0m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Drill metric {{ $labels.metric }} is outside its capacity expectation"
            },
        },
    ]
    for m in ev.metrics:
        src = m.source or ""
        if not src:
            continue
        s = series_for(src)
        if s is None:
            continue
        unit = m.unit
        for op, thr in ((">", m.alert_above), ("<", m.alert_below)):
            if thr is None:
                continue
            value = thr * s.scale
            camel = "".join(p.capitalize() for p in m.metric.split("_"))
            what = "above" if op == ">" else "below"
            rules.append(
                {
                    "alert": f"Lab{camel}{what.capitalize()}Threshold",
                    "expr": f"{_selector(s)} {op} {value:.6g}",
                    "for": for_duration,
                    "labels": {"severity": "critical" if m.required else "warning"},
                    "annotations": {
                        "summary": f"{m.metric} {what} {thr:.4g} {unit} (profile {ev.profile})",
                        "description": (
                            f"Threshold derived from the drill: measured {m.measured if m.measured is not None else '-'} "
                            f"{unit}, expected {m.expected:g} {unit}; the run's envelope plus margin, capped at "
                            "the expectation's fail bound."
                        ),
                    },
                }
            )
    return {"groups": [{"name": f"lab-fallback-{ev.profile}", "rules": rules}]}


def rules_yaml(report_dir: str | Path | None, profile: Profile | None, stale_after_h: float = 26.0) -> str:
    """Rules from a report's evaluation (thresholds from the run), or from a profile alone (thresholds
    at the fail bounds) when no report is given."""
    import yaml

    if report_dir is not None:
        ev = evaluate(report_dir, profile) if profile else read_evaluation(report_dir)
        if ev is None:
            raise LabError(f"{report_dir} has no expectations.json; pass --profile NAME")
    elif profile is not None:
        ev = _profile_only_evaluation(profile)
    else:
        raise LabError("give a REPORT_DIR or --profile NAME to build the rules from")
    header = (
        f"# Prometheus alerting rules generated by `lab metrics rules` from profile {ev.profile}"
        + (f" and report {report_dir}" if report_dir else " (thresholds at its fail bounds)")
        + ".\n# Check with: promtool check rules <this file>\n"
    )
    return header + yaml.safe_dump(alert_rules(ev, stale_after_h), sort_keys=False, width=200)


def _profile_only_evaluation(profile: Profile) -> ExpectationsReport:
    from lab.expectations import Measured, judge
    from lab.results import new_artifact

    ev = new_artifact(ExpectationsReport, {"profile": profile.name}, profile=profile.name)
    for name, spec in profile.metrics.items():
        r = judge(name, spec, Measured(why="no run", step_ran=False), profile.alert_margin)
        r.source = spec.source[0]
        ev.metrics.append(r)
    return ev
