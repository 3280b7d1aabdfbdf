"""Faults a step survives and reports: out of memory is recognised and turned into a reason that names
the memory plan and what to change, so a failed artifact tells the operator the next move."""

from __future__ import annotations

from typing import Any

OOM_MARKERS = ("out of memory", "outofmemoryerror", "cuda error: out of memory", "cublas_status_alloc_failed")


def is_oom(error: BaseException | str | None) -> bool:
    """True for torch.OutOfMemoryError (CUDA or CPU allocators) or a message that says the same."""
    if error is None:
        return False
    if isinstance(error, BaseException):
        try:
            import torch

            if isinstance(error, torch.OutOfMemoryError):
                return True
        except (ImportError, AttributeError):  # pragma: no cover - torch always has it here
            pass
        if isinstance(error, MemoryError):
            return True
        error = f"{type(error).__name__}: {error}"
    text = str(error).lower()
    return any(m in text for m in OOM_MARKERS)


def _plan_dict(plan: Any) -> dict[str, Any]:
    if plan is None:
        return {}
    if isinstance(plan, dict):
        return plan
    return plan.to_dict()


def free_gb(device: Any) -> float | None:
    """The device's free memory now, in GB (None off CUDA), after returning cached blocks to it."""
    try:
        import torch

        if torch.device(device).type != "cuda":
            return None
        torch.cuda.empty_cache()
        return round(torch.cuda.mem_get_info(device)[0] / 1e9, 2)
    except Exception:  # noqa: BLE001 - a broken context must not hide the OOM itself
        return None


def oom_plan(error: BaseException | str | None, plan: Any = None) -> Any:
    """The plan an out-of-memory error carries (lab.model.oom_context), else `plan`."""
    return getattr(error, "lab_plan", None) or plan


def _sentences(text: str, limit: int) -> str:
    """Whole sentences of `text` up to `limit` characters (at least the first, cut at `limit`): CUDA's
    message names what was asked, what is free and who holds the rest, and a cut mid-word reads badly."""
    out = ""
    for sentence in text.replace(". ", ".\n").splitlines():
        if out and len(out) + 1 + len(sentence) > limit:
            break
        out = f"{out} {sentence}" if out else sentence
    return out[:limit]


def oom_reason(step: str, error: BaseException | str, plan: Any, knobs: str) -> str:
    """One line: what ran out, the plan's estimate against the device, and what to lower.

    `knobs` names the flags of this step that shrink memory (e.g. "--batch-size or --prompt-len")."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    p = _plan_dict(plan)
    parts = [f"out of memory during {step}: {_sentences(detail, 200)}"]
    if p:
        dev = p.get("device_memory_gb")
        parts.append(
            f"memory plan: weights {p.get('weights_gb', 0):.2f} + KV {p.get('kv_cache_gb', 0):.2f} + "
            f"activations {p.get('activations_gb', 0):.2f} + reserve {p.get('reserve_gb', 0):.1f} = "
            f"{p.get('total_gb', 0):.2f} GB for batch {p.get('batch_size')} x {p.get('max_seq_len')} tokens"
            + (f" on {dev:.1f} GB" if dev else "")
        )
    free = p.get("device_free_gb_at_failure")
    if free is not None:
        parts.append(
            f"the device had {free:.1f} GB free when it failed: if that is far below the plan's device size, "
            "another process holds the memory (nvidia-smi shows which)"
        )
    hint = f"lower {knobs}"
    if p.get("suggestions"):
        hint += " (the planner suggests: " + ", ".join(p["suggestions"]) + ")"
    parts.append(hint + "; run `lab plan` to check a shape before the drill")
    return "; ".join(parts)
