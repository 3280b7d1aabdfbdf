"""The health artifact (`health.json`, kind "health"): every check, the GPU inventory, the peer-access
matrix, the collective probe, the fallback decision and the shell lines that fix what was found."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from lab.results import Artifact, register

CheckStatus = Literal["ok", "warn", "fail", "skipped"]

# The playbook's "When to Trigger the Fallback", plus `gpu_fault` (a GPU with uncorrected memory
# errors cannot stay in a tensor-parallel group; serve from a healthy one).
TRIGGERS = ("nvlink_degraded", "nccl_hang", "pcie_only_qps_drop", "fits_anywhere", "gpu_fault")

EXIT_HEALTHY = 0
EXIT_CHECK_ERROR = 1
EXIT_USAGE = 2
EXIT_FALLBACK = 3


class Check(BaseModel):
    """One row of the report. `trigger` names the fallback trigger this check fired, if any;
    `could_not_run` marks a check that should have run here and did not (exit code 1)."""

    name: str
    status: CheckStatus
    detail: str
    value: Any = None
    threshold: Any = None
    gpu: int | None = None
    trigger: str | None = None
    could_not_run: bool = False


class GpuHealth(BaseModel):
    """What NVML says about one GPU; a field NVML cannot read is None, with the reason in `unavailable`."""

    index: int
    name: str | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    memory_total_gb: float | None = None
    memory_used_gb: float | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    compute_capability: str | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    temperature_c: float | None = None
    pcie_gen_current: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_current: int | None = None
    pcie_width_max: int | None = None
    nvlink_supported: bool | None = None
    nvlink_links_reported: int | None = None
    nvlink_active_links: int | None = None
    nvlink_inactive: list[int] = Field(default_factory=list)
    ecc_enabled: bool | None = None
    ecc_uncorrected_volatile: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    clock_event_reasons: list[str] | None = None
    xids: list[int] | None = None
    unavailable: dict[str, str] = Field(default_factory=dict)


class Decision(BaseModel):
    fallback_recommended: bool
    triggers: list[str] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    # The GPU the single-GPU pool should use (NVML index), and whether the fallback can serve at all.
    fallback_gpu: int | None = None
    fallback_viable: bool | None = None
    blockers: list[str] = Field(default_factory=list)


@register
class HealthArtifact(Artifact):
    kind: str = "health"
    checks: list[Check] = Field(default_factory=list)
    gpus: list[GpuHealth] = Field(default_factory=list)
    peer_access: dict[str, Any] = Field(default_factory=dict)
    collective: dict[str, Any] | None = None
    memory_plan: dict[str, Any] | None = None
    decision: Decision = Field(default_factory=lambda: Decision(fallback_recommended=False))
    fix_commands: list[str] = Field(default_factory=list)
    exit_code: int = EXIT_HEALTHY
