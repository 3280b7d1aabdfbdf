"""Human-readable views of a health artifact: the decision on top, then one line per check (GPUs whose
rows say the same thing are folded into one line), then the fix commands."""

from __future__ import annotations

import textwrap
from typing import Any

from lab.health.report import HealthArtifact

STATUS_ORDER = {"fail": 0, "warn": 1, "ok": 2, "skipped": 3}


def headline(art: HealthArtifact) -> str:
    d = art.decision
    if d.fallback_recommended:
        text = f"FALLBACK RECOMMENDED (exit {art.exit_code}): triggers {', '.join(d.triggers)}"
        if d.fallback_gpu is not None:
            text += f"; serve from GPU {d.fallback_gpu}"
        if d.fallback_viable is False:
            text += "; but the fallback is NOT viable: " + "; ".join(d.blockers)
        return text
    if art.exit_code == 1:
        return f"INCOMPLETE (exit 1): a check could not run: {art.reason}"
    return f"HEALTHY (exit {art.exit_code}): no fallback trigger fired"


def _gpu_span(gpus: list[int | None]) -> str:
    ids = sorted(g for g in gpus if g is not None)
    if not ids:
        return "-"
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def check_rows(art: HealthArtifact, fold: bool = True) -> list[dict[str, Any]]:
    """Rows for a table (also the notebook's DataFrame). With `fold`, per-GPU rows with the same name,
    status and detail collapse into one row listing the GPUs."""
    rows: list[dict[str, Any]] = []
    index: dict[tuple, dict[str, Any]] = {}
    for c in art.checks:
        key = (c.name, c.status, c.detail, c.trigger)
        if fold and c.gpu is not None and key in index:
            index[key]["_gpus"].append(c.gpu)
            continue
        # Machine-wide rows skipped for the same reason (e.g. no NVIDIA GPU) share one line.
        skey = ("skipped", c.detail)
        if fold and c.gpu is None and c.status == "skipped" and skey in index:
            index[skey]["check"] += f", {c.name}"
            continue
        row = {
            "check": c.name,
            "_gpus": [c.gpu],
            "status": c.status,
            "value": c.value,
            "threshold": c.threshold,
            "trigger": c.trigger or "",
            "detail": c.detail,
        }
        index[skey if c.gpu is None and c.status == "skipped" else key] = row
        rows.append(row)
    for r in rows:
        r["gpu"] = _gpu_span(r.pop("_gpus"))
    order = ["check", "gpu", "status", "value", "threshold", "trigger", "detail"]
    return [{k: r[k] for k in order} for r in rows]


def format_report(art: HealthArtifact, width: int = 110) -> str:
    lines = [f"lab health: {headline(art)}"]
    for r in art.decision.reasons:
        lines.append(f"  reason: {r}")
    lines.append("")
    rows = check_rows(art)
    w_check = min(24, max([len("CHECK"), *(len(r["check"]) for r in rows)]))
    w_gpu = max([len("GPU"), *(len(r["gpu"]) for r in rows)])
    lines.append(f"{'CHECK':<{w_check}}  {'GPU':<{w_gpu}}  {'STATUS':<7}  DETAIL")
    for r in sorted(rows, key=lambda r: STATUS_ORDER[r["status"]]):
        name = r["check"]
        head = f"{name if len(name) <= w_check else '':<{w_check}}  {r['gpu']:<{w_gpu}}  {r['status']:<7}  "
        if len(name) > w_check:
            lines.append(name)
        detail = r["detail"] + (f" [trigger: {r['trigger']}]" if r["trigger"] else "")
        room = max(30, width - len(head))
        chunks = textwrap.wrap(detail, room, break_on_hyphens=False) or [""]
        lines.append(head + chunks[0])
        lines += [" " * len(head) + c for c in chunks[1:]]
    if art.fix_commands:
        lines.append("")
        lines.append("fix commands:")
        lines += [f"  {c}" for c in art.fix_commands]
    return "\n".join(lines)
