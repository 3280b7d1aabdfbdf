"""Environment fingerprint carried by every artifact (MEASUREMENT.md): what ran, where, with what."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field

REPO_ROOT = Path(__file__).resolve().parent.parent


class GpuInfo(BaseModel):
    index: int
    name: str
    memory_total_gb: float
    compute_capability: str | None = None


class Fingerprint(BaseModel):
    hostname: str
    platform: str
    python: str
    torch: str | None = None
    cuda: str | None = None
    driver: str | None = None
    gpu_count: int = 0
    gpus: list[GpuInfo] = Field(default_factory=list)
    lab_version: str
    git_commit: str | None = None
    git_dirty: bool | None = None
    cuda_visible_devices: str | None = None
    nccl_env: dict[str, str] = Field(default_factory=dict)


@lru_cache(maxsize=1)
def _git() -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None, None
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else v
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVIDIA driver: not an error, just absent
        return None


def fingerprint() -> Fingerprint:
    """Collect the fingerprint. Cheap enough to call once per artifact."""
    from lab import __version__

    torch_v = cuda_v = None
    gpus: list[GpuInfo] = []
    try:
        import torch

        torch_v = torch.__version__
        cuda_v = torch.version.cuda
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append(
                    GpuInfo(
                        index=i,
                        name=p.name,
                        memory_total_gb=round(p.total_memory / 1e9, 2),
                        compute_capability=f"{p.major}.{p.minor}",
                    )
                )
    except ImportError:
        pass
    commit, dirty = _git()
    return Fingerprint(
        hostname=socket.gethostname(),
        platform=platform.platform(),
        python=sys.version.split()[0],
        torch=torch_v,
        cuda=cuda_v,
        driver=_driver_version() if gpus else None,
        gpu_count=len(gpus),
        gpus=gpus,
        lab_version=__version__,
        git_commit=commit,
        git_dirty=dirty,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        nccl_env={k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")},
    )
