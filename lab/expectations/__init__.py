"""Capacity expectations: YAML profiles (per metric an expected value, a direction and warn/fail bands)
and their evaluation against a drill report, written as `expectations.json`.

A profile also carries the drill workload its figures hold at (preset, per-step notebook parameters),
so `lab drill --profile NAME` measures under the same settings the expectations were stated for.
Profiles ship beside this file (`b200-gpt40b`, `h100-llama8b`, `cpu-tiny`); a user may pass a path.

The alert thresholds are derived from the run (the playbook: "records the baseline latency envelope
we pin alerts to"): the measured value plus a margin, never looser than the profile's fail bound.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lab.errors import LabError
from lab.results import (
    EXPECTATIONS_FILE,
    MANIFEST_FILE,
    STEP_FILES,
    Artifact,
    ArtifactError,
    read_artifact,
    read_json,
    register,
)

PROFILE_DIR = Path(__file__).resolve().parent
Direction = Literal["higher", "lower", "target"]
Verdict = Literal["pass", "warn", "fail"]
MetricStatus = Literal["pass", "warn", "fail", "missing", "skipped"]
# A report's step name from its artifact file name (load_test.json -> loadtest).
FILE_STEPS = {v: k for k, v in STEP_FILES.items()}
# Values computed from several artifacts rather than read from one summary.
DERIVED = {
    "memory_free_gb": "GPU memory total minus the warm-up's peak memory (playbook: leave 6-8 GB free)",
}


class MetricSpec(BaseModel):
    """One expectation: `source` is `<step>.<summary key>` (or `derived.<name>`); the first source
    present in the report is used, so a profile can name alternatives."""

    model_config = ConfigDict(extra="forbid")

    source: list[str]
    expected: float
    direction: Direction
    warn: float
    fail: float
    tolerance: Literal["relative", "absolute"] = "relative"
    regression: float | None = None
    alert_margin: float | None = None
    unit: str = ""
    required: bool = False
    note: str = ""

    @field_validator("source", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("source")
    @classmethod
    def _dotted(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one source like warmup.decode_tokens_per_s")
        for s in v:
            step, _, key = s.partition(".")
            if not step or not key:
                raise ValueError(f"source '{s}' must look like <step>.<summary key>, e.g. warmup.ttft_ms_p99")
            if step == "derived" and key not in DERIVED:
                raise ValueError(f"unknown derived metric '{key}'; known: {', '.join(DERIVED)}")
        return v

    @model_validator(mode="after")
    def _bands(self) -> MetricSpec:
        if not math.isfinite(self.expected):
            raise ValueError("expected must be a finite number")
        if not 0 <= self.warn <= self.fail:
            raise ValueError(f"bands must satisfy 0 <= warn <= fail (got warn {self.warn}, fail {self.fail})")
        if self.tolerance == "relative" and self.expected == 0:
            raise ValueError("a relative tolerance needs a non-zero expected value; use tolerance: absolute")
        return self

    def bounds(self, band: float) -> tuple[float | None, float | None]:
        """(lowest acceptable, highest acceptable) for a band (the warn or the fail tolerance)."""
        delta = abs(self.expected) * band if self.tolerance == "relative" else band
        lo = self.expected - delta if self.direction in ("higher", "target") else None
        hi = self.expected + delta if self.direction in ("lower", "target") else None
        return lo, hi


class Profile(BaseModel):
    """A capacity-expectation profile (see lab/expectations/*.yaml for the schema by example)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    provisional: bool = False
    provenance: str = ""
    gpu: str | None = None  # substring of the GPU name this profile is for; None = CPU
    alert_margin: float = 0.25
    regression: float = 0.10
    drill: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, MetricSpec]
    path: str | None = None

    @field_validator("metrics")
    @classmethod
    def _non_empty(cls, v: dict[str, MetricSpec]) -> dict[str, MetricSpec]:
        if not v:
            raise ValueError("a profile needs at least one metric")
        return v


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name, or a YAML file by path. Errors name the file and the field."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.exists()):
        path = PROFILE_DIR / f"{text}.yaml"
        if not path.exists():
            raise LabError(
                f"unknown expectation profile '{text}'; choose one of {', '.join(list_profiles())} "
                "or pass a path to a YAML file"
            )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabError(f"profile file {path} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LabError(f"cannot read profile {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise LabError(f"profile {path}: invalid YAML{where}; fix the file") from None
    if not isinstance(raw, dict):
        raise LabError(f"profile {path}: expected a mapping with 'name' and 'metrics'")
    defaults = raw.pop("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise LabError(f"profile {path}: 'defaults' must be a mapping")
    metrics = raw.get("metrics")
    if isinstance(metrics, dict):
        raw["metrics"] = {k: {**defaults, **v} if isinstance(v, dict) else v for k, v in metrics.items()}
    raw.setdefault("name", path.stem)
    try:
        profile = Profile.model_validate({**raw, "path": str(path)})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise LabError(f"profile {path}: invalid '{where}': {first['msg']}") from None
    return profile


def profile_for_environment(gpu_names: list[str]) -> str:
    """The shipped profile matching the first visible GPU (or `cpu-tiny` with none)."""
    if not gpu_names:
        return "cpu-tiny"
    for name in list_profiles():
        profile = load_profile(name)
        if profile.gpu and profile.gpu.lower() in gpu_names[0].lower():
            return name
    raise LabError(
        f"no shipped expectation profile for GPU '{gpu_names[0]}'; pass --profile NAME "
        f"({', '.join(list_profiles())}) or a path to your own YAML"
    )


# --- measurements --------------------------------------------------------------------------------


class Measured(BaseModel):
    value: float | None = None
    source: str | None = None
    why: str | None = None  # why the value is absent
    step_ran: bool = True


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


class ReportData(BaseModel):
    """What a report directory holds: step artifacts, unreadable files, and the manifest's word on
    steps that failed before writing an artifact (or were not selected)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    artifacts: dict[str, Artifact] = Field(default_factory=dict)
    unreadable: dict[str, str] = Field(default_factory=dict)
    failed_steps: dict[str, str] = Field(default_factory=dict)
    skipped_steps: dict[str, str] = Field(default_factory=dict)
    manifest: dict[str, Any] | None = None


def load_report(report_dir: str | Path) -> ReportData:
    """Read every artifact in a report directory (tolerantly: a bad file is listed, not raised)."""
    report_dir = Path(report_dir)
    if not report_dir.is_dir():
        raise LabError(f"report directory {report_dir} does not exist; pass a reports/<run-id> directory")
    data = ReportData()
    for path in sorted(report_dir.glob("*.json")):
        if path.name in (MANIFEST_FILE, EXPECTATIONS_FILE):
            continue
        step = FILE_STEPS.get(path.name, path.stem)
        try:
            data.artifacts[step] = read_artifact(path)
        except ArtifactError as e:
            data.unreadable[step] = str(e)
    mpath = report_dir / MANIFEST_FILE
    if mpath.exists():
        try:
            manifest = read_json(mpath)
        except ArtifactError as e:
            data.unreadable["manifest"] = str(e)
            manifest = None
        if isinstance(manifest, dict):
            data.manifest = manifest
            for rec in manifest.get("steps") or []:
                if not isinstance(rec, dict) or "step" not in rec:
                    continue
                why = str(rec.get("reason") or "no reason given")
                if rec.get("status") == "failed":
                    data.failed_steps[rec["step"]] = why
                elif rec.get("status") == "skipped":
                    data.skipped_steps[rec["step"]] = why
    if not data.artifacts and not data.unreadable and data.manifest is None:
        raise LabError(
            f"{report_dir} holds no manifest.json and no step artifacts; pass a reports/<run-id> directory"
        )
    return data


def _lookup(data: ReportData, sources: list[str]) -> Measured:
    whys: list[str] = []
    any_step_ran = False
    for src in sources:
        step, _, key = src.partition(".")
        if step == "derived":
            m = _derived(data.artifacts, key)
            if m.value is not None:
                return m
            any_step_ran |= m.step_ran
            whys.append(m.why or "")
            continue
        if step in data.unreadable:
            any_step_ran = True
            whys.append(data.unreadable[step])
            continue
        art = data.artifacts.get(step)
        if art is None:
            if step in data.failed_steps:
                any_step_ran = True
                whys.append(f"{step} step failed: {data.failed_steps[step]}")
            elif step in data.skipped_steps:
                whys.append(f"{step} step skipped: {data.skipped_steps[step]}")
            else:
                whys.append(f"no {step} artifact in the report")
            continue
        any_step_ran = True
        if art.status != "ok":
            whys.append(f"{step} step {art.status}: {art.reason or 'no reason given'}")
            continue
        value = _number(art.summary.get(key))
        if value is None:
            reason = art.unavailable.get(key) or (
                "not in the summary" if key not in art.summary else "null in the summary"
            )
            whys.append(f"{src}: {reason}")
            continue
        return Measured(value=value, source=src)
    return Measured(why="; ".join(w for w in whys if w), step_ran=any_step_ran)


def measure(report_dir: str | Path, sources: list[str]) -> Measured:
    """The first of `sources` measured in a report, or why none is."""
    return _lookup(load_report(report_dir), sources)


def _derived(arts: dict[str, Artifact], key: str) -> Measured:
    if key == "memory_free_gb":
        art = arts.get("warmup")
        if art is None:
            return Measured(why="no warmup artifact in the report", step_ran=False)
        peak = _number(art.summary.get("peak_memory_gb")) if art.status == "ok" else None
        if peak is None:
            return Measured(why="warm-up peak memory not measured")
        if not art.environment.gpus:
            return Measured(why="no GPU: free memory is not meaningful on CPU")
        total = art.environment.gpus[0].memory_total_gb
        return Measured(value=round(total - peak, 3), source="derived.memory_free_gb")
    return Measured(why=f"unknown derived metric {key}", step_ran=False)


# --- evaluation ----------------------------------------------------------------------------------


class MetricResult(BaseModel):
    metric: str
    status: MetricStatus
    measured: float | None
    expected: float
    unit: str
    direction: Direction
    source: str | None
    ratio: float | None = None  # measured / expected
    warn_bounds: tuple[float | None, float | None]
    fail_bounds: tuple[float | None, float | None]
    # Derived from the run: alert when the live value goes above / below these.
    alert_above: float | None = None
    alert_below: float | None = None
    required: bool = False
    detail: str = ""


@register
class ExpectationsReport(Artifact):
    """`expectations.json`: each metric of a profile, measured vs expected, with pass/warn/fail."""

    kind: str = "expectations"
    profile: str
    profile_path: str | None = None
    provisional: bool = False
    verdict: Verdict = "pass"
    metrics: list[MetricResult] = Field(default_factory=list)
    unreadable: dict[str, str] = Field(default_factory=dict)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}"


def judge(name: str, spec: MetricSpec, measured: Measured, default_margin: float) -> MetricResult:
    warn_b, fail_b = spec.bounds(spec.warn), spec.bounds(spec.fail)
    margin = spec.alert_margin if spec.alert_margin is not None else default_margin
    res = MetricResult(
        metric=name,
        status="missing",
        measured=measured.value,
        expected=spec.expected,
        unit=spec.unit,
        direction=spec.direction,
        source=measured.source,
        warn_bounds=warn_b,
        fail_bounds=fail_b,
        required=spec.required,
    )
    v = measured.value
    if v is None:
        res.status = "missing" if measured.step_ran else "skipped"
        res.detail = measured.why or "not measured"
        # No run value: alert on the profile's fail bounds.
        res.alert_below, res.alert_above = fail_b
        return res
    res.ratio = v / spec.expected if spec.expected else None

    def inside(b: tuple[float | None, float | None]) -> bool:
        lo, hi = b
        return (lo is None or v >= lo) and (hi is None or v <= hi)

    res.status = "pass" if inside(warn_b) else "warn" if inside(fail_b) else "fail"
    lo_f, hi_f = fail_b
    band = {
        "higher": f"higher is better, fails below {_fmt(lo_f)}",
        "lower": f"lower is better, fails above {_fmt(hi_f)}",
        "target": f"fails outside {_fmt(lo_f)}..{_fmt(hi_f)}",
    }[spec.direction]
    res.detail = f"{_fmt(v)} {spec.unit} vs expected {_fmt(spec.expected)} {spec.unit} ({band})".replace(
        "  ", " "
    )
    # The envelope plus a margin, but never looser than the expectation's fail bound.
    if spec.direction in ("lower", "target"):
        run_hi = v + abs(v) * margin
        res.alert_above = min(run_hi, hi_f) if hi_f is not None else run_hi
    if spec.direction in ("higher", "target"):
        run_lo = v - abs(v) * margin
        res.alert_below = max(run_lo, lo_f) if lo_f is not None else run_lo
    return res


def evaluate(report_dir: str | Path, profile: Profile) -> ExpectationsReport:
    """Evaluate a report directory against a profile (does not write; see `write_evaluation`)."""
    from lab.results import finish, new_artifact

    data = load_report(report_dir)
    out = new_artifact(
        ExpectationsReport,
        {"report_dir": str(report_dir), "profile": profile.name},
        profile=profile.name,
        profile_path=profile.path,
        provisional=profile.provisional,
        unreadable=data.unreadable,
    )
    for name, spec in profile.metrics.items():
        out.metrics.append(judge(name, spec, _lookup(data, spec.source), profile.alert_margin))
    statuses = [m.status for m in out.metrics]
    required_missing = [m for m in out.metrics if m.required and m.status == "missing"]
    out.verdict = (
        "fail" if "fail" in statuses or required_missing else "warn" if "warn" in statuses else "pass"
    )
    counts = {s: statuses.count(s) for s in ("pass", "warn", "fail", "missing", "skipped")}
    out.summary = {"verdict": out.verdict, **{f"metrics_{k}": v for k, v in counts.items()}}
    if profile.provisional:
        out.reason = (
            f"profile {profile.name} is provisional: {profile.provenance or 'not yet from a measured run'}"
        )
    return finish(out)


def write_evaluation(report_dir: str | Path, profile: Profile) -> ExpectationsReport:
    from lab.results import write_artifact

    ev = evaluate(report_dir, profile)
    write_artifact(Path(report_dir) / EXPECTATIONS_FILE, ev)
    return ev


def read_evaluation(report_dir: str | Path) -> ExpectationsReport | None:
    path = Path(report_dir) / EXPECTATIONS_FILE
    if not path.exists():
        return None
    ev = read_artifact(path, expect=ExpectationsReport)
    assert isinstance(ev, ExpectationsReport)
    return ev


def violations(ev: ExpectationsReport) -> list[str]:
    """One line per violated metric: a fail, or a required metric that was not measured."""
    lines = []
    for m in ev.metrics:
        if m.status == "fail":
            lines.append(f"FAIL {m.metric}: {m.detail}")
        elif m.status == "missing" and m.required:
            lines.append(f"FAIL {m.metric}: required but not measured ({m.detail})")
    return lines


def warnings(ev: ExpectationsReport) -> list[str]:
    return [f"warn {m.metric}: {m.detail}" for m in ev.metrics if m.status == "warn"]


def calibrate(report_dir: str | Path, base: Profile, name: str, provenance: str) -> dict[str, Any]:
    """A profile (as a dict for YAML) whose expected values are a measured report's values: the way
    a project turns a committed example run into its expectations."""
    data = load_report(report_dir)
    raw = base.model_dump(exclude={"path"}, exclude_none=True)
    raw.update(name=name, provisional=False, provenance=provenance)
    for metric, spec in base.metrics.items():
        m = _lookup(data, spec.source)
        if m.value is not None:
            raw["metrics"][metric]["expected"] = round(m.value, 6)
    return raw
