"""The CI guardrail: a report passes when every step ran, every metric is within its expectation and
nothing regressed against a baseline report by more than the profile allows. One line per violation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lab.errors import LabError
from lab.expectations import (
    ExpectationsReport,
    MetricSpec,
    Profile,
    evaluate,
    load_profile,
    load_report,
    read_evaluation,
    violations,
    warnings,
)

EXIT_OK = 0
EXIT_VIOLATED = 3


@dataclass
class GateResult:
    profile: str
    verdict: str
    violations: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_VIOLATED if self.violations else EXIT_OK


def _recorded_profile(path: str | None, name: str | None) -> Profile | None:
    """The profile a report was evaluated with: its file if still there (it may come from another
    host), else the shipped profile of that name."""
    for candidate in (path, name):
        if candidate:
            try:
                return load_profile(candidate)
            except LabError:
                continue
    return None


def _evaluation(report_dir: Path, profile_name: str | None) -> tuple[ExpectationsReport, Profile | None]:
    if profile_name:
        profile = load_profile(profile_name)
        return evaluate(report_dir, profile), profile
    stored = read_evaluation(report_dir)
    if stored is not None:
        return stored, _recorded_profile(stored.profile_path, stored.profile)
    manifest = load_report(report_dir).manifest or {}
    profile = _recorded_profile(manifest.get("profile_path"), manifest.get("profile"))
    if profile is None:
        raise LabError(
            f"{report_dir} has no expectations.json and no drill manifest naming a profile; pass --profile NAME"
        )
    return evaluate(report_dir, profile), profile


def regression(spec: MetricSpec, current: float, base: float, default_allowed: float) -> tuple[float, float]:
    """(how much worse `current` is than `base`, how much is allowed), both as the spec's tolerance
    kind: relative fractions, or absolute units for absolute-tolerance metrics."""
    if spec.tolerance == "absolute":
        allowed = spec.regression if spec.regression is not None else spec.warn
        scale = 1.0
    else:
        allowed = spec.regression if spec.regression is not None else default_allowed
        scale = abs(base) or 1.0
    if spec.direction == "higher":
        worse = (base - current) / scale
    elif spec.direction == "lower":
        worse = (current - base) / scale
    else:
        worse = abs(current - base) / scale
    return worse, allowed


def gate(
    report_dir: str | Path, profile: str | None = None, baseline: str | Path | None = None
) -> GateResult:
    report_dir = Path(report_dir)
    data = load_report(report_dir)
    ev, prof = _evaluation(report_dir, profile)
    res = GateResult(profile=ev.profile, verdict=ev.verdict)
    for step, why in data.failed_steps.items():
        res.violations.append(f"FAIL step {step}: {why}")
    for what, why in data.unreadable.items():
        res.violations.append(f"FAIL unreadable {what}: {why}")
    res.violations += violations(ev)
    res.warnings += warnings(ev)
    if ev.provisional:
        res.notes.append(f"note: profile {ev.profile} is provisional ({ev.reason or 'estimates'})")
    if baseline is not None:
        if prof is None:
            raise LabError(f"cannot load profile {ev.profile} to compare with the baseline; pass --profile")
        base_ev = evaluate(Path(baseline), prof)
        base_by = {m.metric: m for m in base_ev.metrics}
        compared = 0
        for m in ev.metrics:
            b = base_by.get(m.metric)
            spec = prof.metrics.get(m.metric)
            if b is None or spec is None or m.measured is None or b.measured is None:
                continue
            compared += 1
            worse, allowed = regression(spec, m.measured, b.measured, prof.regression)
            if worse > allowed + 1e-12:
                amount = f"{worse:+.1%} worse, allowed {allowed:.0%}"
                if spec.tolerance == "absolute":
                    amount = f"{worse:+.4g} {spec.unit} worse, allowed {allowed:g}"
                res.violations.append(
                    f"REGRESSED {m.metric}: {m.measured:.4g} {spec.unit} vs baseline {b.measured:.4g} "
                    f"{spec.unit} ({amount})"
                )
        res.notes.append(f"baseline {baseline}: {compared} metric(s) compared")
    if res.violations:
        res.verdict = "fail"
    return res


def calibrated_profile_yaml(report_dir: str | Path, base: str, name: str | None = None) -> str:
    """YAML for a profile whose expected values are the report's measurements (see h100-llama8b.yaml)."""
    import yaml

    from lab.expectations import calibrate

    prof = load_profile(base)
    raw = calibrate(report_dir, prof, name or prof.name, provenance=f"calibrated from {report_dir}")
    for spec in raw["metrics"].values():
        if len(spec.get("source", [])) == 1:
            spec["source"] = spec["source"][0]
    header = f"# Calibrated by `lab gate --calibrate-to` from {report_dir}; schema: see b200-gpt40b.yaml.\n"
    return header + yaml.safe_dump(raw, sort_keys=False)
