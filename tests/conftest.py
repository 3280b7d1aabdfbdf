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


@pytest.fixture(scope="module")
def server_url():
    """A real `lab serve` app (tiny model, CPU) on a free localhost port in a thread, warmed up; one per
    test module."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from lab.engine.batching import Engine, EngineConfig
    from lab.engine.server import create_app
    from lab.engine.tokenizer import ByteTokenizer
    from lab.model import prepare

    model = prepare("tiny", None, "cpu", "float32", 0, 4, 256).model
    engine = Engine(model, EngineConfig(max_batch_size=4, max_seq_len=256, max_new_tokens=16, max_queue=64))
    app = create_app(engine, ByteTokenizer(), "tiny", drain_timeout_s=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    th.join(timeout=20)
