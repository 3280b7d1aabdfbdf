"""Loading drill reports for the dashboard: find run directories, read every artifact through
`lab.results.read_artifact` (a corrupt, partial or newer-schema file becomes a warning naming the file;
the rest of the run still loads), and shape tables for the pages.

The loader is cached on the report directories' file modification times, so a new or rewritten report
appears on the next rerun without restarting the server; `reload()` drops the cache outright.
Readers never write: nothing here changes a report.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from lab.env import REPO_ROOT
from lab.results import EXPECTATIONS_FILE, MANIFEST_FILE, STEP_FILES, ArtifactError, read_artifact

ENV_VAR = "LAB_DASHBOARD_REPORTS"  # os.pathsep-separated report directories (set by `lab dashboard`)
DEFAULT_DIRS = (REPO_ROOT / "reports", REPO_ROOT / "reports" / "examples")
KNOWN_FILES = {*STEP_FILES.values(), MANIFEST_FILE, EXPECTATIONS_FILE}
STEP_KINDS = {
    "health": "health",
    "warmup": "warmup",
    "compare": "compare",
    "loadtest": "loadtest",
    "tiers": "tiers",
}
REQUEST_FILE_FIELDS = ("requests_file", "requests_path", "per_request_file", "requests_jsonl")
# Modules whose `@register`ed models validate each kind strictly (else the base Artifact checks the envelope).
ARTIFACT_MODULES = (
    "lab.health.report",
    "lab.bench.warmup",
    "lab.bench.compare",
    "lab.loadtest.runner",
    "lab.drill",
    "lab.expectations",
    "lab.commands.compare_tiers",
)

# Direction of "better" for metrics without an expectation entry saying so.
_HIGHER = ("_per_s", "tokens_per_joule", "mbu", "goodput", "slo_attainment", "qps", "speedup", "agreement")
_LOWER_UNITS = re.compile(r"_(ms|gb|w|j|s)(_|$)")  # a unit token: ttft_ms_p99, power_w_mean, compile_s
_LOWER_WORDS = ("rejected", "timed_out", "errored", "failed", "diff")


@dataclass(frozen=True)
class FileWarning:
    path: str
    message: str


@dataclass
class Run:
    """One drill report directory: its artifacts as plain dicts keyed by file name."""

    run_id: str
    path: str
    source: str
    started_at: datetime | None
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[FileWarning] = field(default_factory=list)

    def by_kind(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        """Artifacts of `kind`, the step's canonical file first."""
        canonical = STEP_FILES.get(
            kind, {"manifest": MANIFEST_FILE, "expectations": EXPECTATIONS_FILE}.get(kind)
        )
        found = [(n, a) for n, a in self.artifacts.items() if a.get("kind") == kind]
        return sorted(found, key=lambda item: (item[0] != canonical, item[0]))

    def step(self, kind: str) -> dict[str, Any] | None:
        found = self.by_kind(kind)
        return found[0][1] if found else None

    def file_of(self, kind: str) -> str | None:
        found = self.by_kind(kind)
        return found[0][0] if found else None

    @property
    def manifest(self) -> dict[str, Any] | None:
        return self.step("manifest")

    @property
    def expectations(self) -> dict[str, Any] | None:
        return self.step("expectations")

    def warnings_for(self, *files: str | None) -> list[FileWarning]:
        names = {Path(f).name for f in files if f}
        return [w for w in self.warnings if not names or Path(w.path).name in names]


@dataclass
class Reports:
    dirs: list[str]
    runs: list[Run]  # oldest first
    notes: list[str] = field(default_factory=list)  # directories that are missing or unreadable

    @property
    def latest(self) -> Run | None:
        return self.runs[-1] if self.runs else None

    def get(self, run_id: str | None) -> Run | None:
        return next((r for r in self.runs if r.run_id == run_id), None)


# --- discovery and loading -----------------------------------------------------------------------


def report_dirs() -> list[Path]:
    """The directories to read: $LAB_DASHBOARD_REPORTS (set by `lab dashboard --reports`), else
    reports/ and reports/examples/ of this checkout."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if raw:
        return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]
    return list(DEFAULT_DIRS)


def _is_run_dir(d: Path) -> bool:
    try:
        return any(p.suffix == ".json" and not p.name.startswith(".") for p in d.iterdir() if p.is_file())
    except OSError:
        return False


def discover(dirs: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[str]]:
    """Run directories (path, source dir) under `dirs`. A dir that itself holds artifacts is one run;
    otherwise each child holding JSON files is a run. Each run is listed once even when dirs nest."""
    seen: set[Path] = set()
    listed = {Path(d).resolve() for d in dirs}
    runs: list[tuple[Path, str]] = []
    notes: list[str] = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            notes.append(f"{d}: no such directory")
            continue
        candidates = [d] if _is_run_dir(d) else []
        if not candidates:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
            except OSError as e:
                notes.append(f"{d}: cannot list ({e.strerror or e})")
                continue
            # a nested listed dir (reports/examples inside reports) is read as its own source
            candidates = [c for c in children if c.resolve() not in listed and _is_run_dir(c)]
        for c in candidates:
            r = c.resolve()
            if r not in seen:
                seen.add(r)
                runs.append((c, str(d)))
    return runs, notes


def signature(dirs: Sequence[Path]) -> tuple:
    """(path, mtime_ns, size) of every report file and directory: the cache key. Cheap: stats only."""
    sig: list[tuple[str, int, int]] = []
    for d in dirs:
        try:
            st_ = Path(d).stat()
            sig.append((str(d), st_.st_mtime_ns, 0))
        except OSError:
            sig.append((str(d), -1, -1))
    runs, _ = discover(dirs)
    for run_dir, _src in runs:
        for p in _json_files(run_dir):
            try:
                s = p.stat()
            except OSError:
                continue
            sig.append((str(p), s.st_mtime_ns, s.st_size))
        for p in [*run_dir.glob("*.jsonl"), *run_dir.glob("*/*.jsonl")]:  # per-request records
            try:
                s = p.stat()
                sig.append((str(p), s.st_mtime_ns, s.st_size))
            except OSError:
                continue
    return tuple(sig)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    return None


def _inside(base: Path, rel: str) -> Path | None:
    """`rel` resolved inside `base`, or None if it escapes the run directory."""
    p = (base / rel).resolve()
    try:
        p.relative_to(base.resolve())
    except ValueError:
        return None
    return p


def _json_files(run_dir: Path) -> list[Path]:
    """The run's JSON files, and those one folder down (`lab compare-tiers` writes tp1/ and tpN/)."""
    out: list[Path] = []
    try:
        entries = sorted(run_dir.iterdir())
    except OSError:
        return out
    for p in entries:
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix == ".json":
            out.append(p)
        elif p.is_dir():
            try:
                out += sorted(
                    q
                    for q in p.iterdir()
                    if q.is_file() and q.suffix == ".json" and not q.name.startswith(".")
                )
            except OSError:
                continue
    return out


def load_run(run_dir: Path, source: str, run_id: str | None = None) -> Run:
    """Read every JSON artifact of one run; failures become warnings naming the file."""
    run = Run(run_id=run_id or run_dir.name, path=str(run_dir), source=source, started_at=None)
    for p in _json_files(run_dir):
        try:
            art = read_artifact(p)
        except ArtifactError as e:
            if "no 'kind' field" in str(e) and p.name not in KNOWN_FILES:
                continue  # some other JSON beside the artifacts (a schedule, a config): not ours
            run.warnings.append(FileWarning(str(p), str(e)))
            continue
        except Exception as e:  # a reader must never take the page down
            run.warnings.append(FileWarning(str(p), f"{p}: could not be read ({type(e).__name__}: {e})"))
            continue
        run.artifacts[p.relative_to(run_dir).as_posix()] = art.model_dump(mode="json")
    manifest = run.manifest
    if manifest:
        for s in _manifest_steps(manifest):
            rel = s.get("artifact")
            if s.get("status") == "ok" and isinstance(rel, str) and rel:
                target = _inside(run_dir, rel)
                if target is None or not target.is_file():
                    run.warnings.append(
                        FileWarning(
                            str(run_dir / rel),
                            f"{run_dir / rel}: the manifest lists it as ok but it is missing",
                        )
                    )
    times = [_parse_time(manifest.get("started_at"))] if manifest else []
    times = [t for t in times if t] or [
        t for a in run.artifacts.values() if (t := _parse_time(a.get("started_at")))
    ]
    if times:
        run.started_at = min(times)
    else:
        try:
            run.started_at = datetime.fromtimestamp(run_dir.stat().st_mtime, timezone.utc)
        except OSError:
            run.started_at = None
    return run


def load_reports(dirs: Sequence[Path]) -> Reports:
    model_notes = register_artifact_models()
    found, notes = discover(dirs)
    runs = []
    for path, src in found:
        run = load_run(path, src)
        if run.artifacts or run.warnings:
            runs.append(run)
        else:  # JSON that is not a lab artifact (benchmark outputs, configs): not a drill report
            notes.append(f"{path}: no lab artifacts, not shown")
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.run_id] = counts.get(r.run_id, 0) + 1
    for r in runs:
        if counts[r.run_id] > 1:  # the same run id in two sources: say which is which
            r.run_id = f"{Path(r.source).name}/{r.run_id}"
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    runs.sort(key=lambda r: (r.started_at or oldest, r.run_id))
    return Reports(dirs=[str(d) for d in dirs], runs=runs, notes=notes + model_notes)


@st.cache_data(show_spinner=False, max_entries=16)
def _cached_reports(dirs: tuple[str, ...], sig: tuple) -> Reports:
    # `sig` is unused in the body on purpose: it is the cache key (file mtimes and sizes)
    return load_reports([Path(d) for d in dirs])


def get_reports(dirs: Sequence[Path] | None = None) -> Reports:
    """The reports, cached until any report file's modification time or size changes."""
    dirs = list(dirs) if dirs is not None else report_dirs()
    return _cached_reports(tuple(str(d) for d in dirs), signature(dirs))


def reload() -> None:
    """Drop every cached read (the dashboard's Reload control)."""
    _cached_reports.clear()
    _cached_requests.clear()


# --- per-request records (JSONL beside the load-test JSON) -----------------------------------------


def requests_path(run: Run, filename: str) -> Path | None:
    """The per-request JSONL of a load-test artifact: beside it, never outside the run's folder."""
    art = run.artifacts.get(filename) or {}
    base = (Path(run.path) / filename).parent
    if _inside(Path(run.path), filename) is None:
        return None
    for key in REQUEST_FILE_FIELDS:
        rel = art.get(key)
        if isinstance(rel, str) and rel:
            return _inside(base, rel)  # never outside the artifact's folder (inside the run)
    stem = Path(filename).stem
    for name in (f"{stem}.requests.jsonl", f"{stem}_requests.jsonl", f"{stem}.jsonl"):
        if (base / name).is_file():
            return base / name
    return None


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def request_rows(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per request. Latencies are of completed requests, from the *scheduled* time
    (MEASUREMENT.md): the writer's own derived values when the record carries them."""
    rows = []
    for r in records:
        ts, tf, td = _num(r.get("t_scheduled")), _num(r.get("t_first_token")), _num(r.get("t_done"))
        ta, tsent = _num(r.get("t_admitted")), _num(r.get("t_sent"))
        n = r.get("output_tokens")
        n = int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None
        outcome = str(r.get("outcome", "unknown"))
        ok = outcome == "ok"
        ttft = (tf - ts) * 1e3 if ok and ts is not None and tf is not None else None
        e2e = (td - ts) * 1e3 if ok and ts is not None and td is not None else None
        tpot = (e2e - ttft) / (n - 1) if ttft is not None and e2e is not None and n and n > 1 else None
        if "ttft_ms" in r:
            ttft = _num(r["ttft_ms"])
        if "e2e_ms" in r:
            e2e = _num(r["e2e_ms"])
        if "tpot_ms" in r:
            tpot = _num(r["tpot_ms"])
        times = r.get("token_times")
        rows.append(
            {
                "id": r.get("index", r.get("id", r.get("request_id"))),
                "run": r.get("run"),
                "phase": r.get("phase", "measure"),
                "outcome": outcome,
                "reason": r.get("reason"),
                "prompt_tokens": r.get("prompt_tokens"),
                "output_tokens": n,
                "ttft_ms": ttft,
                "tpot_ms": tpot,
                "e2e_ms": e2e,
                "queue_wait_ms": (ta - ts) * 1e3 if ta is not None and ts is not None else None,
                "dispatch_lag_ms": (tsent - ts) * 1e3 if tsent is not None and ts is not None else None,
                "t_scheduled_s": ts,
                "t_admitted_s": ta,
                "t_first_token_s": tf,
                "t_done_s": td,
                "token_times_s": [t for t in times if isinstance(t, (int, float))]
                if isinstance(times, list)
                else None,
            }
        )
    cols = [
        "id",
        "run",
        "phase",
        "outcome",
        "reason",
        "prompt_tokens",
        "output_tokens",
        "ttft_ms",
        "tpot_ms",
        "e2e_ms",
        "queue_wait_ms",
        "dispatch_lag_ms",
        "t_scheduled_s",
        "t_admitted_s",
        "t_first_token_s",
        "t_done_s",
        "token_times_s",
    ]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_wait_ms", "dispatch_lag_ms"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def read_requests(path: Path) -> tuple[pd.DataFrame, list[FileWarning]]:
    """Parse a per-request JSONL file; bad lines are counted into one warning, never fatal."""
    warnings: list[FileWarning] = []
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    try:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    bad.append(i)
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
                else:
                    bad.append(i)
    except (OSError, UnicodeDecodeError) as e:
        return request_rows([]), [FileWarning(str(path), f"{path}: cannot read per-request records ({e})")]
    if bad:
        warnings.append(
            FileWarning(str(path), f"{path}: {len(bad)} unreadable line(s) skipped (first at line {bad[0]})")
        )
    return request_rows(records), warnings


@st.cache_data(show_spinner=False, max_entries=16)
def _cached_requests(path: str, mtime_ns: int, size: int) -> tuple[pd.DataFrame, list[FileWarning]]:
    # mtime_ns and size are the cache key: a rewritten file is read again
    return read_requests(Path(path))


def get_requests(run: Run, filename: str) -> tuple[pd.DataFrame | None, list[FileWarning]]:
    path = requests_path(run, filename)
    if path is None or not path.is_file():
        return None, []
    s = path.stat()
    return _cached_requests(str(path), s.st_mtime_ns, s.st_size)


def time_series(
    df: pd.DataFrame, timeline: Sequence[dict[str, Any]] | None = None, bin_s: float = 1.0
) -> pd.DataFrame:
    """Per time bin from the run's start (t = 0): arrivals/s, completions/s, queue depth, output
    tokens/s. The artifact's own timeline (the engine's sampled queue) is used where it has a column;
    the rest is binned from the per-request records (queue depth there: scheduled, not yet admitted)."""
    cols = ["t_s", "arrivals_per_s", "completions_per_s", "queue_depth", "output_tokens_per_s"]
    sched = df["t_scheduled_s"].dropna()
    tl = [b for b in timeline or [] if isinstance(b, dict) and _num(b.get("t_s")) is not None]
    ends = [float(x) for x in (df["t_done_s"].max(), sched.max()) if pd.notna(x)]
    ends += [_num(b["t_s"]) + bin_s for b in tl]
    if not ends:
        return pd.DataFrame(columns=cols)
    n_bins = max(1, int(math.ceil(max(ends) / bin_s)))
    edges = [i * bin_s for i in range(n_bins)]

    def counts(values: Iterable[Any]) -> list[float]:
        out = [0.0] * n_bins
        for v in values:
            x = _num(v)
            if x is None:
                continue
            i = int(x // bin_s)
            if 0 <= i < n_bins:
                out[i] += 1
        return [c / bin_s for c in out]

    arrivals = counts(sched)
    completions = counts(df.loc[df["outcome"] == "ok", "t_done_s"])
    tokens = counts(t for tt in df["token_times_s"].dropna() for t in tt)
    left = df["t_admitted_s"].where(df["t_admitted_s"].notna(), df["t_done_s"])
    queue = [float(((df["t_scheduled_s"] <= e) & ~(left <= e)).sum()) for e in edges]
    by_bin = {int(_num(b["t_s"]) // bin_s): b for b in tl}
    for i in range(n_bins):
        b = by_bin.get(i)
        if b is None:
            continue
        if _num(b.get("completed_ok")) is not None:
            completions[i] = _num(b["completed_ok"]) / bin_s
        if _num(b.get("output_tokens_per_s")) is not None:
            tokens[i] = _num(b["output_tokens_per_s"])
        if _num(b.get("waiting_max")) is not None:
            queue[i] = _num(b["waiting_max"])
    return pd.DataFrame(
        {
            "t_s": edges,
            "arrivals_per_s": arrivals,
            "completions_per_s": completions,
            "queue_depth": queue,
            "output_tokens_per_s": tokens,
        },
        columns=cols,
    )


# --- tables the pages show -------------------------------------------------------------------------


def direction(metric: str) -> str | None:
    """'higher' or 'lower' is better, from the metric's name (units in names make this possible)."""
    m = metric.lower()
    if m.startswith("target_"):
        return None  # an input, not an outcome
    if any(k in m for k in _HIGHER):
        return "higher"
    if _LOWER_UNITS.search(m) or any(k in m for k in _LOWER_WORDS):
        return "lower"
    return None


def _manifest_steps(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    steps = manifest.get("steps")
    if isinstance(steps, dict):
        return [{"name": k, **(v if isinstance(v, dict) else {"status": v})} for k, v in steps.items()]
    if isinstance(steps, list):
        return [s for s in steps if isinstance(s, dict)]
    return []


def steps_frame(run: Run) -> pd.DataFrame:
    """Drill step statuses: from the manifest, else from the artifacts present."""
    cols = ["step", "status", "duration_s", "artifact", "detail"]
    rows = []
    manifest = run.manifest
    if manifest:
        for s in _manifest_steps(manifest):
            err = s.get("error") or s.get("reason")
            cell = s.get("failing_cell")
            if isinstance(cell, dict) and cell.get("error"):
                err = f"cell {cell.get('index')}: {cell.get('error')}"
            if isinstance(err, dict):
                err = "; ".join(f"{k}: {v}" for k, v in err.items())
            rows.append(
                {
                    "step": s.get("step") or s.get("name"),
                    "status": s.get("status", "unknown"),
                    "duration_s": _num(s.get("duration_s")),
                    "artifact": s.get("artifact"),
                    "detail": err,
                }
            )
    else:
        for step, kind in STEP_KINDS.items():
            a = run.step(kind)
            if a is not None:
                rows.append(
                    {
                        "step": step,
                        "status": a.get("status", "ok"),
                        "duration_s": _duration_s(a),
                        "artifact": run.file_of(kind),
                        "detail": a.get("reason"),
                    }
                )
    return pd.DataFrame(rows, columns=cols)


def _duration_s(a: dict[str, Any]) -> float | None:
    t0, t1 = _parse_time(a.get("started_at")), _parse_time(a.get("finished_at"))
    return (t1 - t0).total_seconds() if t0 and t1 else None


def expectations_frame(run: Run | None = None, exp: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per metric of an expectations evaluation: measured vs expected, verdict, pass band
    (warn_low..warn_high: inside it the metric passes), fail band and the derived alert thresholds."""
    cols = [
        "metric",
        "step",
        "measured",
        "expected",
        "unit",
        "verdict",
        "direction",
        "warn_low",
        "warn_high",
        "fail_low",
        "fail_high",
        "alert_above",
        "alert_below",
        "required",
        "source",
        "detail",
    ]
    exp = exp if exp is not None else (run.expectations if run is not None else None)
    if not exp:
        return pd.DataFrame(columns=cols)
    raw = exp.get("metrics") or exp.get("results") or []
    if isinstance(raw, dict):
        raw = [{"metric": k, **v} for k, v in raw.items() if isinstance(v, dict)]
    rows = []
    for m in raw:
        if not isinstance(m, dict):
            continue
        name = str(m.get("metric") or m.get("name") or "")
        source = m.get("source")
        d = m.get("direction") or direction(name)
        expected = _num(m.get("expected"))
        wl, wh = _bounds(m.get("warn_bounds"))
        fl, fh = _bounds(m.get("fail_bounds"))
        tol = _num(m.get("tolerance"))
        if wl is None and wh is None and tol is not None and expected is not None:  # relative tolerance only
            wl, wh = (expected * (1 - tol), None) if d == "higher" else (None, expected * (1 + tol))
        rows.append(
            {
                "metric": name,
                "step": m.get("step") or (str(source).split(".", 1)[0] if source else None),
                "measured": _num(m.get("measured")),
                "expected": expected,
                "unit": m.get("unit"),
                "verdict": str(m.get("verdict") or m.get("status") or "unknown"),
                "direction": d,
                "warn_low": wl,
                "warn_high": wh,
                "fail_low": fl,
                "fail_high": fh,
                "alert_above": _num(m.get("alert_above", m.get("alert_threshold"))),
                "alert_below": _num(m.get("alert_below")),
                "required": bool(m.get("required", False)),
                "source": source,
                "detail": m.get("detail"),
            }
        )
    return pd.DataFrame(rows, columns=cols)


def go_no_go(run: Run, exp: pd.DataFrame | None = None) -> tuple[str, list[str]]:
    """GO when every drill step succeeded, every file was readable, and no metric failed its
    expectation (nor a required one went unmeasured); NO-GO otherwise. UNKNOWN when the run says too
    little to decide."""
    reasons: list[str] = []
    steps = steps_frame(run)
    exp = expectations_frame(run) if exp is None else exp
    if steps.empty and exp.empty:
        return "UNKNOWN", ["no manifest, step artifacts or expectations in this run"]
    for _, s in steps.iterrows():
        if s["status"] == "failed":
            reasons.append(f"step {s['step']} failed" + (f": {s['detail']}" if s["detail"] else ""))
    for _, m in exp.iterrows():
        if m["verdict"] == "fail":
            reasons.append(
                f"{m['metric']} = {_fmt(m['measured'])} misses its expectation {_fmt(m['expected'])}"
            )
        elif m["verdict"] == "missing" and m["required"]:
            reasons.append(f"{m['metric']} is required but was not measured")
    for w in run.warnings:
        reasons.append(f"unreadable: {Path(w.path).name}")
    if reasons:
        return "NO-GO", reasons
    if exp.empty:
        return "GO", ["every step succeeded; no expectations evaluated in this run"]
    warns = int((exp["verdict"] == "warn").sum())
    return "GO", [f"every step succeeded; {len(exp)} metrics evaluated, {warns} warning(s)"]


def _fmt(v: Any) -> str:
    x = _num(v)
    return "n/a" if x is None else f"{x:,.4g}"


def summary_rows(run: Run) -> list[dict[str, Any]]:
    """Every numeric summary value of the run's step artifacts as (step, metric, value)."""
    rows = []
    for step, kind in STEP_KINDS.items():
        a = run.step(kind)
        if not a:
            continue
        for k, v in (a.get("summary") or {}).items():
            x = _num(v)
            if x is not None:
                rows.append({"step": step, "metric": k, "value": x})
    return rows


def history_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per (run, step.metric) with the expectation band where the run evaluated one."""
    cols = [
        "run_id",
        "started_at",
        "key",
        "step",
        "metric",
        "value",
        "expected",
        "band_low",
        "band_high",
        "verdict",
        "direction",
    ]
    rows = []
    for run in runs:
        exp: dict[tuple[str, str], dict[str, Any]] = {}
        for e in expectations_frame(run).to_dict("records"):
            for src in e["source"] if isinstance(e["source"], list) else [e["source"]]:
                if isinstance(src, str) and src.count(".") == 1:
                    exp.setdefault(tuple(src.split(".")), e)  # type: ignore[arg-type]
        for r in summary_rows(run):
            e = exp.get((r["step"], r["metric"]))
            rows.append(
                {
                    "run_id": run.run_id,
                    "started_at": run.started_at,
                    "key": f"{r['step']}.{r['metric']}",
                    "step": r["step"],
                    "metric": r["metric"],
                    "value": r["value"],
                    "expected": e["expected"] if e else None,
                    "band_low": e["warn_low"] if e else None,
                    "band_high": e["warn_high"] if e else None,
                    "verdict": e["verdict"] if e else None,
                    "direction": (e["direction"] if e else None) or direction(r["metric"]),
                }
            )
    df = pd.DataFrame(rows, columns=cols)
    for c in ("value", "expected", "band_low", "band_high"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def flag_regressions(history: pd.DataFrame, tolerance: float = 0.10) -> pd.DataFrame:
    """Add `regression` and `why`: a value outside its expectation band (fail), or worse than the
    previous run of the same metric by more than `tolerance` in the metric's bad direction."""
    if history.empty:
        return history.assign(regression=pd.Series(dtype=bool), why=pd.Series(dtype=object))
    out = history.sort_values(["key", "started_at", "run_id"]).copy()
    flags, whys = [], []
    prev: dict[str, float] = {}
    for _, r in out.iterrows():
        why = []
        if r["verdict"] == "fail":
            why.append("fails its expectation")
        p = prev.get(r["key"])
        if p is not None and p != 0 and r["direction"] in ("higher", "lower"):
            change = (r["value"] - p) / abs(p)
            worse = -change if r["direction"] == "higher" else change
            if worse > tolerance:
                why.append(f"{worse:.0%} worse than the previous run")
        prev[r["key"]] = r["value"]
        flags.append(bool(why))
        whys.append("; ".join(why) or None)
    out["regression"] = flags
    out["why"] = whys
    return out


def compare_runs(base: Run, new: Run) -> pd.DataFrame:
    """Base -> new for every metric both runs measured: deltas and whether it got better."""
    cols = ["step", "metric", "base", "new", "delta", "delta_pct", "direction", "change"]
    b = {(r["step"], r["metric"]): r["value"] for r in summary_rows(base)}
    n = {(r["step"], r["metric"]): r["value"] for r in summary_rows(new)}
    rows = []
    for key in sorted(set(b) | set(n)):
        bv, nv = b.get(key), n.get(key)
        delta = nv - bv if bv is not None and nv is not None else None
        pct = delta / abs(bv) if delta is not None and bv else None
        d = direction(key[1])
        if delta is None or d is None:
            change = "n/a" if delta is None else "changed" if delta else "same"
        elif delta == 0:
            change = "same"
        else:
            change = "better" if (delta > 0) == (d == "higher") else "worse"
        rows.append(
            {
                "step": key[0],
                "metric": key[1],
                "base": bv,
                "new": nv,
                "delta": delta,
                "delta_pct": pct,
                "direction": d,
                "change": change,
            }
        )
    return pd.DataFrame(rows, columns=cols)


def to_json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


def to_csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode()


def slo_ms(artifact: dict[str, Any]) -> dict[str, float]:
    """The load test's SLO limits in ms, keyed ttft/tpot/e2e: its `slo` block, else its parameters."""
    blocks = [
        artifact.get("slo"),
        (artifact.get("sweep") or {}).get("slo") if isinstance(artifact.get("sweep"), dict) else None,
    ]
    params = artifact.get("params") or {}
    config = params.get("config") if isinstance(params.get("config"), dict) else {}
    out: dict[str, float] = {}
    for m in ("ttft", "tpot", "e2e"):
        v = None
        for b in blocks:
            if isinstance(b, dict) and v is None:
                v = _num(b.get(f"{m}_ms", b.get(m)))
        for src in (params, config):
            if v is None:
                v = _num(src.get(f"slo_{m}_ms"))
        if v is not None and v > 0:
            out[m] = v
    return out


def tensor_parallel_gpus(artifact: dict[str, Any]) -> int:
    """GPUs one replica of this artifact's tier used (tensor-parallel world size), 1 when unstated."""
    params = artifact.get("params") or {}
    config = params.get("config") if isinstance(params.get("config"), dict) else {}
    engine = artifact.get("engine") if isinstance(artifact.get("engine"), dict) else {}
    tp_info = engine.get("tensor_parallel") if isinstance(engine.get("tensor_parallel"), dict) else {}
    for src in (tp_info, params, config, engine):
        for key in ("tensor_parallel_gpus", "world_size", "tp"):
            v = _num(src.get(key))
            if v is not None and v >= 1:
                return int(v)
    return 1


def telemetry_samples(artifact: dict[str, Any]) -> list[dict[str, Any]]:
    """The NVML samples (t_s, power_w, ...) an artifact recorded over its window, wherever it put them."""
    tel = artifact.get("telemetry")
    if isinstance(tel, dict) and isinstance(tel.get("samples"), list):
        return tel["samples"]
    for key in ("telemetry_samples", "samples"):
        if isinstance(artifact.get(key), list):
            return artifact[key]
    return []


def register_artifact_models() -> list[str]:
    """Import the modules that register each step's artifact model (so each kind validates strictly);
    an absent module is fine (its kind is checked as a plain Artifact), a broken one is reported."""
    import importlib
    import importlib.util

    notes = []
    for name in ARTIFACT_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                continue
            importlib.import_module(name)
        except Exception as e:  # a broken writer module must not take the dashboard down
            notes.append(
                f"{name} could not be imported ({type(e).__name__}: {e}); its artifacts are checked loosely"
            )
    return notes


def _bounds(v: Any) -> tuple[float | None, float | None]:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return _num(v[0]), _num(v[1])
    return None, None


def slo_attainment_target(artifact: dict[str, Any], default: float = 0.99) -> float:
    for b in (
        artifact.get("slo"),
        (artifact.get("sweep") or {}).get("slo") if isinstance(artifact.get("sweep"), dict) else None,
    ):
        if isinstance(b, dict) and _num(b.get("attainment_target")) is not None:
            return float(_num(b["attainment_target"]))
    return default


def sweep_curve(artifact: dict[str, Any]) -> list[dict[str, Any]]:
    """The load test's latency-vs-throughput curve: `sweep.curve` (or a bare list), by offered QPS."""
    sw = artifact.get("sweep")
    raw = sw.get("curve") if isinstance(sw, dict) else sw
    pts = [
        p
        for p in raw or []
        if isinstance(p, dict) and _num(p.get("target_qps", p.get("offered_qps"))) is not None
    ]
    return sorted(pts, key=lambda p: _num(p.get("target_qps", p.get("offered_qps"))) or 0.0)


def chosen_run_tag(artifact: dict[str, Any]) -> str | None:
    """Which run of a sweep the summary describes, as tagged in the per-request file ("qps=3")."""
    if not sweep_curve(artifact):
        return None
    q = _num((artifact.get("summary") or {}).get("target_qps"))
    return f"qps={q:g}" if q is not None else None


@st.cache_data(show_spinner=False, max_entries=32)
def evaluate_profile(run_path: str, profile: str, sig: tuple) -> tuple[dict[str, Any] | None, str | None]:
    """Evaluate a run against another capacity-expectation profile (read-only; `sig` keys the cache)."""
    try:
        from lab.expectations import evaluate, load_profile

        return evaluate(run_path, load_profile(profile)).model_dump(mode="json"), None
    except Exception as e:  # a bad profile or an unreadable report is a message, not a traceback
        return None, f"{type(e).__name__}: {e}"


def profiles() -> list[str]:
    try:
        from lab.expectations import list_profiles

        return list(list_profiles())
    except Exception:
        return []


def run_group(run: Run) -> str:
    """Which runs are comparable: the expectation profile (or preset) and the card they ran on."""
    profile = None
    for a in (run.manifest, run.expectations):
        if a and not profile:
            profile = a.get("profile") or (a.get("params") or {}).get("profile")
    if not profile:
        for kind in STEP_KINDS.values():
            a = run.step(kind)
            params = (a or {}).get("params") or {}
            profile = (
                params.get("preset") or (params.get("config") or {}).get("preset")
                if isinstance(params, dict)
                else None
            )
            if profile:
                break
    card = "cpu"
    for a in run.artifacts.values():
        gpus = (a.get("environment") or {}).get("gpus") or []
        if gpus:
            card = str(gpus[0].get("name"))
            break
    return f"{profile or 'unknown profile'} · {card}"
