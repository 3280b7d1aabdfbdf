"""Health check and the fallback decision (issue 3): NVML inventory and NVLink/ECC/clock health, NCCL
environment hygiene, peer access, a collective probe under a deadline, memory headroom, and the
playbook's triggers -> `health.json` with a decision and exit code.

Importing this package registers the "health" artifact kind with lab.results.
"""

from lab.health.check import HealthOptions, Sources, run_and_write, run_health
from lab.health.format import format_report
from lab.health.report import Check, Decision, GpuHealth, HealthArtifact

__all__ = [
    "Check",
    "Decision",
    "GpuHealth",
    "HealthArtifact",
    "HealthOptions",
    "Sources",
    "format_report",
    "run_and_write",
    "run_health",
]
