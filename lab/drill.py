"""The drill: run notebooks 01-04 with papermill into `reports/<run-id>/`, with a manifest that says
what ran, how long each cell took, what failed and why, then evaluate the capacity expectations.

Parameters are checked against each notebook's declared parameters before any kernel starts (papermill
itself only warns). Each step runs in its own kernel whose environment gets the playbook's hygiene
(NCCL leftovers unset, CUDA_VISIBLE_DEVICES scoped to one GPU); the caller's environment is untouched.
A failed step fails the drill but the other steps still run: they do not depend on one another (each
notebook builds its own model and warms its own kernels). The manifest is rewritten after every step,
so a kernel death or an interrupt still leaves a manifest that says where it stopped.
"""

from __future__ import annotations

import ast
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field

from lab.env import REPO_ROOT
from lab.errors import LabError
from lab.expectations import Profile
from lab.results import (
    MANIFEST_FILE,
    STEP_FILES,
    Artifact,
    ArtifactError,
    Status,
    finish,
    new_artifact,
    read_artifact,
    register,
    utcnow,
    write_artifact,
)

STEPS = ("health", "warmup", "compare", "loadtest")
STEP_NOTEBOOKS = {
    "health": "01_health_check.ipynb",
    "warmup": "02_warmup.ipynb",
    "compare": "03_eager_vs_compiled.ipynb",
    "loadtest": "04_load_test.ipynb",
}
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "python3"
COMMON_PARAMS = ("output_dir", "preset", "model_path", "device", "dtype", "seed")
NCCL_LEFTOVERS = ("NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL")
TRACE_TAG = "lab-trace"


# --- the manifest --------------------------------------------------------------------------------


class CellTiming(BaseModel):
    index: int
    execution_count: int | None = None
    status: str | None = None
    duration_s: float | None = None
    start_time: str | None = None
    end_time: str | None = None


class FailingCell(BaseModel):
    index: int
    execution_count: int | None = None
    source: str = ""
    error: str = ""


class StepRecord(BaseModel):
    step: str
    status: Status
    reason: str | None = None
    notebook: str | None = None  # the source notebook
    executed_notebook: str | None = None  # relative to the report directory
    artifact: str | None = None  # relative to the report directory
    parameters: dict[str, Any] = Field(default_factory=dict)
    ignored_parameters: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    started_at: datetime | None = None
    duration_s: float | None = None
    cells: list[CellTiming] = Field(default_factory=list)
    failing_cell: FailingCell | None = None
    kernel_log: str | None = None  # the kernel process's stdout/stderr
    trace: str | None = None


@register
class Manifest(Artifact):
    """`manifest.json`: the drill's parameters and per-step outcome; status failed if any step failed."""

    kind: str = "manifest"
    run_id: str
    report_dir: str
    profile: str | None = None
    profile_path: str | None = None
    steps: list[StepRecord] = Field(default_factory=list)
    env_hygiene: dict[str, Any] = Field(default_factory=dict)
    expectations_verdict: str | None = None
    trace_note: str | None = None


# --- planning (everything that can be a usage error happens here, before any kernel starts) -------


@dataclass
class StepPlan:
    step: str
    notebook: Path
    declared: dict[str, dict[str, Any]] | None  # None: the notebook could not be inspected
    problem: str | None  # why the step cannot run (missing notebook ...)
    unparsed: set[str] = field(default_factory=set)  # assigned in the cell, invisible to papermill
    parameters: dict[str, Any] = field(default_factory=dict)
    ignored: dict[str, Any] = field(default_factory=dict)
    trace: bool = False


@dataclass
class DrillPlan:
    run_id: str
    report_dir: Path
    profile: Profile
    steps: list[StepPlan]
    skipped: list[str]
    cell_timeout_s: float
    child_env: dict[str, str]
    hygiene: dict[str, Any]
    params: dict[str, Any]


def make_run_id(now: datetime | None = None, host: str | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", host or socket.gethostname()).strip("-") or "host"
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{host}"


def parse_steps(text: str | None) -> list[str]:
    if not text:
        return list(STEPS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STEPS]
    if unknown or not names:
        raise LabError(
            f"--steps: unknown step(s) {', '.join(unknown) or '(none)'}; choose from {','.join(STEPS)}"
        )
    return [s for s in STEPS if s in names]


def inspect_parameters(notebook: Path) -> dict[str, dict[str, Any]]:
    """The notebook's declared parameters (papermill.inspect_notebook); raises ValueError if unreadable."""
    import papermill as pm

    try:
        return pm.inspect_notebook(str(notebook))
    except Exception as e:  # nbformat / JSON errors: the notebook file is broken
        raise ValueError(f"cannot read notebook {notebook}: {type(e).__name__}: {e}") from None


def parameters_cell_names(notebook: Path) -> set[str]:
    """Names assigned in the cell tagged `parameters` (what papermill should have found)."""
    import nbformat

    try:
        nb = nbformat.read(str(notebook), as_version=4)
    except Exception:
        return set()
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            try:
                tree = ast.parse(cell.source)
            except SyntaxError:
                return set()
            names = set()
            for node in tree.body:
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
            return names
    return set()


def _base_type(type_name: str | None, default: str | None) -> tuple[str | None, bool]:
    """(base type name, allows None) from papermill's inferred type or the default literal."""
    t = (type_name or "").strip().replace("typing.", "")
    optional = False
    m = re.fullmatch(r"Optional\[(.+)\]", t)
    if m:
        t, optional = m.group(1), True
    parts = [p.strip() for p in t.split("|")]
    if "None" in parts and len(parts) > 1:
        optional = True
        parts = [p for p in parts if p != "None"]
        t = parts[0] if len(parts) == 1 else ""
    if t in ("", "None"):
        try:
            value = ast.literal_eval(default or "")
        except (ValueError, SyntaxError):
            return None, optional
        if value is None:
            return None, True
        t = type(value).__name__
    t = t.split("[")[0]
    return t, optional


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(value: Any, type_name: str | None, default: str | None, what: str) -> Any:
    """A value (text from `-p`, or typed from a profile) as the declared type; LabError otherwise."""
    base, optional = _base_type(type_name, default)
    if value is None or (isinstance(value, str) and value in ("None", "null") and optional):
        if optional or base is None:
            return None
        raise LabError(f"{what} is {base}; it cannot be None")
    if base is None:
        return yaml.safe_load(value) if isinstance(value, str) else value
    if isinstance(value, str):
        text = value.strip()
        try:
            if base == "int":
                return int(text)
            if base == "float":
                return float(text)
            if base == "bool":
                low = text.lower()
                if low in _TRUE | _FALSE:
                    return low in _TRUE
                raise ValueError
            if base == "str":
                return value
            if base in ("list", "dict", "tuple"):
                parsed = yaml.safe_load(text)
                if isinstance(parsed, list if base != "dict" else dict):
                    return parsed
                raise ValueError
        except ValueError:
            raise LabError(f"{what} is {base}; '{value}' is not a valid {base}") from None
        return value
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list),
        "tuple": isinstance(value, list),
        "dict": isinstance(value, dict),
    }.get(base, True)
    if not ok:
        raise LabError(f"{what} is {base}; got {value!r} ({type(value).__name__})")
    return float(value) if base == "float" else value


def child_environment(
    device: str, environ: dict[str, str] | None = None
) -> tuple[dict[str, str], dict[str, Any], str]:
    """The playbook's step 2 for the child kernels: unset NCCL P2P leftovers, scope
    CUDA_VISIBLE_DEVICES to one GPU. Returns (env, what changed, the device the notebooks get)."""
    env = dict(os.environ if environ is None else environ)
    caller_cvd = env.get("CUDA_VISIBLE_DEVICES")
    visible = [d.strip() for d in caller_cvd.split(",") if d.strip()] if caller_cvd else None
    unset = {k: env.pop(k) for k in NCCL_LEFTOVERS if k in env}
    notebook_device = device
    index = 0
    m = re.fullmatch(r"cuda:(\d+)", device)
    if m:
        index = int(m.group(1))
        notebook_device = "cuda"
    if visible is not None:
        if index >= len(visible):
            raise LabError(
                f"--device {device}: CUDA_VISIBLE_DEVICES={caller_cvd} exposes {len(visible)} GPU(s); "
                f"use cuda:0..cuda:{max(len(visible) - 1, 0)}"
            )
        scoped = visible[index]
    else:
        scoped = str(index)
    env["CUDA_VISIBLE_DEVICES"] = scoped
    # The kernel must import this same lab, installed or not.
    prev = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + prev if prev else "")
    hygiene = {
        "unset": unset,
        "set": {"CUDA_VISIBLE_DEVICES": scoped},
        "caller_cuda_visible_devices": caller_cvd,
        "pythonpath_prepended": str(REPO_ROOT),
        "notebook_device": notebook_device,
        "applies_to": "child kernels only; the caller's environment is unchanged",
    }
    return env, hygiene, notebook_device


def plan_drill(
    profile: Profile,
    *,
    steps: list[str],
    preset: str | None = None,
    model_path: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    output_root: str | Path = "reports",
    run_id: str | None = None,
    user_params: list[tuple[str, str]] | None = None,
    notebooks_dir: str | Path | None = None,
    cell_timeout_s: float | None = None,
    trace: bool = False,
    trace_steps: tuple[str, ...] = ("warmup", "loadtest"),
    environ: dict[str, str] | None = None,
) -> DrillPlan:
    """Validate everything and decide each step's parameters. Raises LabError on a usage error."""
    nb_dir = Path(notebooks_dir) if notebooks_dir else NOTEBOOKS_DIR
    run_id = run_id or make_run_id()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_id):
        raise LabError(f"--run-id '{run_id}': use letters, digits, '.', '_' and '-' only")
    report_dir = Path(output_root) / run_id
    if report_dir.exists() and any(report_dir.iterdir()):
        raise LabError(
            f"report directory {report_dir} already exists and is not empty; choose another --run-id"
        )
    drill_cfg = profile.drill or {}
    device = device or drill_cfg.get("device") or "auto"
    child_env, hygiene, nb_device = child_environment(device, environ)
    common: dict[str, Any] = {
        "output_dir": str(report_dir.resolve()),
        "preset": preset if preset is not None else ("" if model_path else drill_cfg.get("preset", "")),
        "model_path": model_path or "",
        "device": nb_device,
        "dtype": dtype or drill_cfg.get("dtype") or "auto",
        "seed": seed,
    }
    profile_params = drill_cfg.get("parameters") or {}
    plans: list[StepPlan] = []
    for step in steps:
        nb = nb_dir / STEP_NOTEBOOKS[step]
        if not nb.exists():
            plans.append(StepPlan(step, nb, None, f"notebook {nb} not found"))
            continue
        try:
            declared = inspect_parameters(nb)
        except ValueError as e:
            plans.append(StepPlan(step, nb, None, str(e)))
            continue
        problem = None
        if "output_dir" not in declared:
            problem = f"{nb.name} declares no output_dir parameter; the drill cannot collect its artifact"
        unparsed = parameters_cell_names(nb) - set(declared)
        plans.append(StepPlan(step, nb, declared, problem, unparsed, trace=trace and step in trace_steps))

    # Defaults the drill chooses: passed only to notebooks that declare them.
    for sp in plans:
        if sp.declared is None:
            continue
        wanted = {**common, **(profile_params.get(sp.step) or {})}
        for name, value in wanted.items():
            if name in sp.declared:
                d = sp.declared[name]
                sp.parameters[name] = coerce(
                    value, d["inferred_type_name"], d["default"], f"profile {profile.name}: {sp.step}.{name}"
                )
            else:
                sp.ignored[name] = value

    # The user's -p: strict. `name` goes to every selected notebook that declares it, `step.name` to one.
    inspectable = [sp for sp in plans if sp.declared is not None]
    for name, text in user_params or []:
        step, _, pname = name.rpartition(".")
        if step and step not in steps:
            raise LabError(f"-p {name}: step '{step}' is not selected; choose from {','.join(steps)}")
        targets = [sp for sp in inspectable if (not step or sp.step == step) and pname in sp.declared]
        if not targets:
            known = sorted({p for sp in inspectable if not step or sp.step == step for p in sp.declared})
            where = f"notebook for step '{step}'" if step else "selected notebook"
            hidden = [sp.notebook.name for sp in inspectable if pname in sp.unparsed]
            if hidden:
                raise LabError(
                    f"-p {name}: {', '.join(hidden)} assigns '{pname}' but papermill cannot parse that line "
                    "(a line with a second '=', e.g. in its help comment); fix the notebook's parameters cell"
                )
            raise LabError(
                f"-p {name}: no {where} declares a parameter '{pname}'; declared: {', '.join(known) or 'none'}"
            )
        if pname == "output_dir":
            raise LabError(
                "-p output_dir: the drill sets it to the report directory; use --output-dir instead"
            )
        for sp in targets:
            d = sp.declared[pname]  # type: ignore[index]
            sp.parameters[pname] = coerce(
                text,
                d["inferred_type_name"],
                d["default"],
                f"-p {name}: parameter '{pname}' of {sp.notebook.name}",
            )
            sp.ignored.pop(pname, None)

    timeout = float(cell_timeout_s or drill_cfg.get("cell_timeout_s") or 1800)
    params = {
        "profile": profile.name,
        "steps": steps,
        "preset": common["preset"],
        "model_path": common["model_path"],
        "device": device,
        "dtype": common["dtype"],
        "seed": seed,
        "user_parameters": [list(p) for p in user_params or []],
        "notebooks_dir": str(nb_dir),
        "cell_timeout_s": timeout,
        "kernel_name": KERNEL_NAME,
        "trace": trace,
    }
    skipped = [s for s in STEPS if s not in steps]
    return DrillPlan(run_id, report_dir, profile, plans, skipped, timeout, child_env, hygiene, params)


# --- running --------------------------------------------------------------------------------------


def _kernel_manager_class(env: dict[str, str], log: Any) -> type:
    """A kernel manager that starts the kernel with `env` (papermill has no env argument) and its
    stdout/stderr in `log` (the kernel's own messages, e.g. why it died, stay with the report)."""
    from jupyter_client import AsyncKernelManager

    class ScopedEnvKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
            kw["env"] = dict(env)
            kw["stdout"] = kw["stderr"] = log
            await super().start_kernel(**kw)

    return ScopedEnvKernelManager


def _with_trace_cells(nb_path: Path, step: str):
    """The notebook with a cell that starts torch.profiler after the parameters and one that writes
    the trace at the end (tagged lab-trace, visible in the executed notebook)."""
    import nbformat

    nb = nbformat.read(str(nb_path), as_version=4)
    idx = next(
        (i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), -1
    )
    start = nbformat.v4.new_code_cell(
        "# lab drill --trace: profile the rest of this notebook (torch.profiler; open in ui.perfetto.dev)\n"
        "from lab.trace import NotebookTrace as _LabTrace\n"
        f"_lab_trace = _LabTrace.start(output_dir, {step!r})"
    )
    stop = nbformat.v4.new_code_cell("_lab_trace.stop()")
    for c in (start, stop):
        c.metadata["tags"] = [TRACE_TAG]
    nb.cells.insert(idx + 1, start)
    nb.cells.append(stop)
    return nb


def _cell_timings(executed: Path) -> tuple[list[CellTiming], FailingCell | None]:
    import nbformat

    try:
        nb = nbformat.read(str(executed), as_version=4)
    except Exception:
        return [], None
    cells: list[CellTiming] = []
    failing: FailingCell | None = None
    running: FailingCell | None = None
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        meta = c.get("metadata", {}).get("papermill", {})
        cells.append(
            CellTiming(
                index=i,
                execution_count=c.get("execution_count"),
                status=meta.get("status"),
                duration_s=meta.get("duration"),
                start_time=meta.get("start_time"),
                end_time=meta.get("end_time"),
            )
        )
        err = next((o for o in c.get("outputs", []) if o.get("output_type") == "error"), None)
        if failing is None and (meta.get("exception") or err is not None):
            failing = FailingCell(
                index=i,
                execution_count=c.get("execution_count"),
                source=c.source[:500],
                error=f"{err.get('ename')}: {err.get('evalue')}" if err else "",
            )
        if running is None and meta.get("status") == "running":
            running = FailingCell(index=i, execution_count=c.get("execution_count"), source=c.source[:500])
    return cells, failing or running


def _cell_source(executed: Path, index: int) -> str:
    import nbformat

    try:
        return nbformat.read(str(executed), as_version=4).cells[index].source[:500]
    except Exception:
        return ""


def run_step(plan: DrillPlan, sp: StepPlan) -> StepRecord:
    """Execute one step's notebook; every outcome becomes a StepRecord, never an exception
    (except KeyboardInterrupt, which the caller records)."""
    import papermill as pm

    rec = StepRecord(
        step=sp.step,
        status="failed",
        notebook=str(sp.notebook),
        parameters=sp.parameters,
        ignored_parameters=sp.ignored,
        started_at=utcnow(),
    )
    if sp.unparsed:
        rec.warnings.append(
            f"papermill cannot parse the parameters {', '.join(sorted(sp.unparsed))} "
            "(a second '=' on the line); they cannot be set"
        )
    if sp.problem:
        rec.reason = sp.problem
        return rec
    executed = plan.report_dir / "notebooks" / sp.notebook.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    rec.executed_notebook = str(executed.relative_to(plan.report_dir))
    source: Any = _with_trace_cells(sp.notebook, sp.step) if sp.trace else str(sp.notebook)
    kernel_log = executed.with_suffix(".kernel.log")
    t0 = time.monotonic()
    error: str | None = None
    log = open(kernel_log, "w", encoding="utf-8")  # noqa: SIM115 - held for the kernel's lifetime
    try:
        pm.execute_notebook(
            source,
            str(executed),
            parameters=sp.parameters,
            kernel_name=KERNEL_NAME,
            execution_timeout=plan.cell_timeout_s,
            start_timeout=120,
            progress_bar=False,
            log_output=False,
            # The project root for notebooks/ (as `papermill notebooks/0N_*.ipynb` run from it): relative
            # defaults such as the compile cache land where `lab warmup` finds them.
            cwd=str(sp.notebook.parent.parent),
            kernel_manager_class=_kernel_manager_class(plan.child_env, log),
        )
    except pm.PapermillExecutionError as e:
        error = f"cell {e.exec_count} raised {e.ename}: {e.evalue}"
    except Exception as e:  # kernel death, cell timeout, kernel that never started
        name = type(e).__name__
        text = " ".join(str(e).split())[:400]
        if name == "DeadKernelError":
            error = f"the kernel died ({text or 'no message'}); see {kernel_log.name} in the report"
        elif name == "CellTimeoutError":
            error = f"a cell ran past the per-cell timeout of {plan.cell_timeout_s:g} s"
        else:
            error = f"{name}: {text}"
    finally:
        log.close()
    rec.kernel_log = str(kernel_log.relative_to(plan.report_dir))
    rec.duration_s = round(time.monotonic() - t0, 3)
    if executed.exists():
        rec.cells, rec.failing_cell = _cell_timings(executed)
    else:
        rec.executed_notebook = None
    if error and rec.failing_cell is None:
        # A kernel death or a timeout leaves no error output: the failing cell is the last one started.
        started = [c for c in rec.cells if c.start_time]
        if started:
            rec.failing_cell = FailingCell(
                index=started[-1].index, execution_count=started[-1].execution_count
            )
            rec.failing_cell.source = _cell_source(executed, started[-1].index)
    if error and rec.failing_cell is not None and not rec.failing_cell.error:
        rec.failing_cell.error = error

    artifact = plan.report_dir / STEP_FILES[sp.step]
    if artifact.exists():
        rec.artifact = artifact.name
    if sp.trace:
        trace_file = plan.report_dir / "traces" / f"{sp.step}.trace.json"
        rec.trace = str(trace_file.relative_to(plan.report_dir)) if trace_file.exists() else None
    if error:
        rec.reason = error
        return rec
    if not artifact.exists():
        rec.reason = f"{sp.notebook.name} finished but wrote no {artifact.name} into the report"
        return rec
    try:
        art = read_artifact(artifact)
    except ArtifactError as e:
        rec.reason = str(e)
        return rec
    rec.status = art.status
    rec.reason = art.reason if art.status != "ok" else None
    return rec


def _write_manifest(plan: DrillPlan, manifest: Manifest, records: dict[str, StepRecord]) -> None:
    manifest.steps = [records[s] for s in STEPS if s in records]
    write_artifact(plan.report_dir / MANIFEST_FILE, manifest)


def run_drill(plan: DrillPlan, progress: Callable[[str], None] = print) -> Manifest:
    """Run the planned steps; the manifest is on disk after every step and whatever happens."""
    from lab.expectations import write_evaluation

    plan.report_dir.mkdir(parents=True, exist_ok=True)
    manifest = new_artifact(
        Manifest,
        plan.params,
        run_id=plan.run_id,
        report_dir=str(plan.report_dir),
        profile=plan.profile.name,
        profile_path=plan.profile.path,
        env_hygiene=plan.hygiene,
    )
    if plan.params.get("trace"):
        from lab.trace import nsys_note

        manifest.trace_note = nsys_note()
    records: dict[str, StepRecord] = {
        s: StepRecord(step=s, status="skipped", reason="not selected (--steps)") for s in plan.skipped
    }
    for sp in plan.steps:
        records[sp.step] = StepRecord(step=sp.step, status="skipped", reason="not run yet")
    manifest.status, manifest.reason = "failed", "drill in progress (if this stays, it was interrupted)"
    _write_manifest(plan, manifest, records)
    total = len(plan.steps)
    current = None
    try:
        for n, sp in enumerate(plan.steps, 1):
            current = sp.step
            progress(f"[{n}/{total}] {sp.step}: running {sp.notebook.name} ...")
            rec = run_step(plan, sp)
            records[sp.step] = rec
            took = f" ({rec.duration_s:.1f} s)" if rec.duration_s is not None else ""
            progress(
                f"[{n}/{total}] {sp.step}: {rec.status}{took}" + (f": {rec.reason}" if rec.reason else "")
            )
            _write_manifest(plan, manifest, records)
        current = None
        failed = [r.step for r in records.values() if r.status == "failed"]
        finish(
            manifest, "failed" if failed else "ok", f"failed steps: {', '.join(failed)}" if failed else None
        )
        if not failed:
            manifest.reason = None
        try:
            ev = write_evaluation(plan.report_dir, plan.profile)
            manifest.expectations_verdict = ev.verdict
        except LabError as e:
            manifest.expectations_verdict = f"not evaluated: {e}"
        _write_manifest(plan, manifest, records)
    except BaseException as e:
        where = f" during step {current}" if current else ""
        if current:
            records[current] = StepRecord(
                step=current, status="failed", reason=f"interrupted ({type(e).__name__})"
            )
        finish(manifest, "failed", f"drill interrupted{where}: {type(e).__name__}")
        _write_manifest(plan, manifest, records)
        raise
    return manifest
