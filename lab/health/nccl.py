"""NCCL environment hygiene (playbook step 2) and the CUDA peer-access matrix.

Leftover `NCCL_P2P_DISABLE` / `NCCL_P2P_LEVEL` from an earlier incident silently route tensor-parallel
traffic through host memory; the report names them and prints the playbook's exact fix lines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from lab.health.report import Check

P2P_VARS = ("NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL")
UNSET_P2P = "unset NCCL_P2P_DISABLE NCCL_P2P_LEVEL"


def nccl_env_check(env: Mapping[str, str]) -> tuple[Check, list[str]]:
    """The NCCL_* variables in `env`; a leftover P2P override is a warning with the fix line."""
    nccl = {k: v for k, v in sorted(env.items()) if k.startswith("NCCL_")}
    leftover = [k for k in P2P_VARS if k in env]
    others = {k: v for k, v in nccl.items() if k not in P2P_VARS}
    other_txt = ", ".join(f"{k}={v}" for k, v in others.items()) or "none"
    if leftover:
        set_txt = ", ".join(f"{k}={env[k]}" for k in leftover)
        return (
            Check(
                name="nccl_env",
                status="warn",
                detail=f"{set_txt} left over: it restricts or disables CUDA P2P for NCCL "
                f"(run: {UNSET_P2P}); other NCCL_* set: {other_txt}",
                value=nccl,
                threshold="NCCL_P2P_DISABLE and NCCL_P2P_LEVEL unset",
            ),
            [UNSET_P2P],
        )
    return (
        Check(
            name="nccl_env",
            status="ok",
            detail=f"NCCL_P2P_DISABLE and NCCL_P2P_LEVEL unset; other NCCL_* set: {other_txt}",
            value=nccl,
            threshold="NCCL_P2P_DISABLE and NCCL_P2P_LEVEL unset",
        ),
        [],
    )


def cuda_visible_check(env: Mapping[str, str], nvml_gpus: int | None) -> Check:
    """CUDA_VISIBLE_DEVICES scope: the fallback unit pins one GPU; the health check of the multi-GPU
    tier wants all of them visible."""
    v = env.get("CUDA_VISIBLE_DEVICES")
    th = "unset for the multi-GPU check; one GPU in the fallback unit"
    if v is None:
        return Check(
            name="cuda_visible_devices",
            status="ok",
            detail="unset: every GPU is visible; scope the single-GPU unit with export CUDA_VISIBLE_DEVICES=0",
            value=None,
            threshold=th,
        )
    items = [x.strip() for x in v.split(",") if x.strip()]
    if not items:
        return Check(
            name="cuda_visible_devices",
            status="warn",
            detail="set but empty: CUDA sees no GPU at all; run: unset CUDA_VISIBLE_DEVICES",
            value=v,
            threshold=th,
        )
    bad = [x for x in items if x.isdigit() and nvml_gpus is not None and int(x) >= nvml_gpus]
    if bad:
        return Check(
            name="cuda_visible_devices",
            status="warn",
            detail=f"={v} names GPU(s) {', '.join(bad)} but NVML sees {nvml_gpus}: CUDA stops at the "
            "first invalid entry; fix the list",
            value=v,
            threshold=th,
        )
    if len(items) == 1:
        detail = (
            f"={v}: scoped to one GPU as the fallback unit wants; the peer-access matrix and the "
            "collective probe see only that GPU (NVML checks still cover all)"
        )
    else:
        detail = f"={v}: {len(items)} GPUs visible to CUDA"
    return Check(name="cuda_visible_devices", status="ok", detail=detail, value=v, threshold=th)


def peer_access(
    n: int, can_access: Callable[[int, int], bool]
) -> tuple[Check, list[list[bool | None]] | None]:
    """CUDA peer access between every pair of visible GPUs (i reads j's memory directly)."""
    if n < 2:
        return (
            Check(
                name="peer_access",
                status="skipped",
                detail=f"needs 2 or more CUDA-visible GPUs; {n} visible",
                value=n,
            ),
            None,
        )
    matrix: list[list[bool | None]] = [
        [None if i == j else bool(can_access(i, j)) for j in range(n)] for i in range(n)
    ]
    missing = [f"{i}->{j}" for i in range(n) for j in range(n) if matrix[i][j] is False]
    if missing:
        return (
            Check(
                name="peer_access",
                status="warn",
                detail=f"no CUDA peer access for {', '.join(missing)}: traffic between them goes through host memory",
                value=len(missing),
                threshold=0,
            ),
            matrix,
        )
    return (
        Check(
            name="peer_access",
            status="ok",
            detail=f"all {n * (n - 1)} GPU pairs have CUDA peer access",
            value=0,
            threshold=0,
        ),
        matrix,
    )
