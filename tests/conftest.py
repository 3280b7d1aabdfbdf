"""Shared fixtures: tiny models on CPU, one torch thread budget for a 2-core machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def lab_cli():
    """Run the real CLI in a subprocess; returns CompletedProcess."""
    import subprocess

    def run(*argv: str, env: dict | None = None, timeout: float = 300, cwd=None):
        e = dict(os.environ)
        e.pop("MODEL_PATH", None)
        if env:
            e.update(env)
        return subprocess.run(
            [sys.executable, "-m", "lab", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=e,
            cwd=cwd or ROOT,
        )

    return run


@pytest.fixture(scope="session")
def tiny_model():
    import torch

    from lab.model import ModelSpec, build_model, get_preset

    torch.manual_seed(0)
    spec = ModelSpec(args=get_preset("tiny"), preset="tiny", model_path=None)
    return build_model(spec, torch.device("cpu"), torch.float32, seed=0)
