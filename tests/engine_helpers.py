"""Shared by the engine and server tests: wait for engine requests, and start a real `lab serve` process."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def wait_done(reqs, timeout_s: float = 120) -> None:
    """Until every request has its outcome; fails with the outcomes so far after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not all(r.done for r in reqs):
        assert time.monotonic() < deadline, [r.outcome for r in reqs]
        time.sleep(0.01)


def lab_serve(*flags: str) -> subprocess.Popen:
    """`lab serve --preset tiny --device cpu FLAGS...` with text pipes, unbuffered, no $MODEL_PATH."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MODEL_PATH", None)
    cmd = [sys.executable, "-m", "lab", "serve", "--preset", "tiny", "--device", "cpu", *flags]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
