"""Faults are survived and reported: out of memory in warm-up and in a load test (simulated on CPU by
raising torch.OutOfMemoryError in-process), a disk that refuses the write (really read-only and really
full where the kernel lets us, else simulated), a drill whose step runs out of memory or whose kernel
dies, and a server killed with SIGKILL under `lab loadtest --endpoint`.

Covered elsewhere and not repeated here: SIGTERM drains in-flight requests (tests/test_server.py::
test_sigterm_drains_in_flight_requests); a dying kernel is recorded in the manifest (tests/test_drill.py::
test_drill_records_every_outcome_and_scopes_the_kernel_env); checkpoints refused (tests/test_checkpoint.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lab.cli import main
from lab.results import read_artifact
from tests.drill_fixtures import make_notebook

ROOT = Path(__file__).resolve().parent.parent
OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (simulated)"
LOADTEST = [
    "loadtest",
    "--allow-smaller-world",
    "--no-progress",
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--duration",
    "3",
    "--target-qps",
    "6",
    "--warmup-s",
    "0",
    "--cooldown-s",
    "0",
    "--max-new-tokens",
    "4",
    "--prompt-len-min",
    "8",
    "--prompt-len-max",
    "16",
    "--max-batch-size",
    "4",
]


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- out of memory ------------------------------------------------------------------------------


def test_oom_in_warmup_writes_a_failed_artifact_with_the_plan_and_a_suggestion(tmp_path, monkeypatch, capsys):
    import lab.bench.warmup as warmup

    def oom(*a, **kw):
        raise torch.OutOfMemoryError(OOM)

    monkeypatch.setattr(warmup, "run_warmup", oom)
    out = tmp_path / "warmup.json"
    rc = main(
        ["warmup", "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--output-json", str(out)]
    )
    assert rc == 1
    art = read_artifact(out)
    assert art.kind == "warmup" and art.status == "failed"
    assert "out of memory during warm-up" in art.reason and "Tried to allocate 20.00 GiB" in art.reason
    assert "memory plan:" in art.reason and "batch 2 x" in art.reason
    assert "lower --batch-size" in art.reason and "lab plan" in art.reason
    assert art.memory_plan["batch_size"] == 2 and art.memory_plan["total_gb"] > 0
    assert "failed" in one_line(capsys.readouterr().err)


def test_oom_during_the_load_test_fails_every_request_and_the_artifact_says_why(
    tmp_path, monkeypatch, capsys
):
    from lab.engine.batching import Engine

    real = Engine._loop_once
    calls = {"n": 0}

    def loop_once(self):
        busy = any(self._slots) or self._waiting
        if busy:
            calls["n"] += 1
            if calls["n"] > 6:  # a few requests are served first, then the allocator gives out
                raise torch.OutOfMemoryError(OOM)
        return real(self)

    monkeypatch.setattr(Engine, "_loop_once", loop_once)
    out = tmp_path / "load_test.json"
    rc = main([*LOADTEST, "--output-json", str(out)])
    text = capsys.readouterr().out
    assert rc == 1
    art = read_artifact(out)
    s = art.summary
    assert art.status == "failed"
    assert "out of memory during the load test" in art.reason and "memory plan:" in art.reason
    assert "lower --max-batch-size" in art.reason
    # Nothing is lost: every scheduled request has an outcome, the failures are counted as errors.
    assert s["requests_errored"] > 0 and s["accounted"] == s["requests_sent"]
    assert s["requests_sent"] == len(art.schedule["arrivals_s"]) if "arrivals_s" in art.schedule else True
    assert "FAILED: out of memory" in text and "requests errored" in text
    rows = [json.loads(x) for x in (tmp_path / art.requests_file).read_text().splitlines()]
    assert any("engine failed: OutOfMemoryError" in (r.get("reason") or "") for r in rows)


def test_oom_at_engine_warmup_fails_fast_instead_of_waiting(tmp_path, monkeypatch, capsys):
    from lab.engine.batching import Engine

    def oom(self):
        raise torch.OutOfMemoryError(OOM)

    monkeypatch.setattr(Engine, "warmup", oom)
    out = tmp_path / "load_test.json"
    t0 = time.monotonic()
    rc = main([*LOADTEST, "--output-json", str(out)])
    assert time.monotonic() - t0 < 60, "a crashed warm-up must not wait for the 1 h warm-up deadline"
    assert rc == 1
    art = read_artifact(out)
    assert art.status == "failed" and "out of memory during warm-up" in art.reason
    assert art.engine["memory_plan"]["max_seq_len"] > 0 and "lower --max-batch-size" in art.reason


def _oom_at_model_load(monkeypatch):
    """The plan fits the card, but materialising the weights runs out (another process holds memory)."""
    import lab.model as model

    def oom(*a, **kw):
        raise torch.OutOfMemoryError(OOM)

    monkeypatch.setattr(model, "build_model", oom)


def test_oom_while_loading_the_model_for_warmup_is_a_failed_artifact(tmp_path, monkeypatch, capsys):
    _oom_at_model_load(monkeypatch)
    out = tmp_path / "warmup.json"
    rc = main(["warmup", "--preset", "tiny", "--device", "cpu", "--output-json", str(out)])
    assert rc == 1
    art = read_artifact(out)
    assert art.status == "failed" and "out of memory during loading the model" in art.reason
    assert "memory plan:" in art.reason and art.memory_plan["weights_gb"] > 0
    assert "failed" in one_line(capsys.readouterr().err)


def test_oom_while_loading_the_model_for_a_load_test_is_a_failed_artifact(tmp_path, monkeypatch, capsys):
    _oom_at_model_load(monkeypatch)
    out = tmp_path / "load_test.json"
    rc = main([*LOADTEST, "--output-json", str(out)])
    assert rc == 1
    art = read_artifact(out)
    assert art.status == "failed" and "out of memory during loading the model" in art.reason
    assert art.engine["memory_plan"]["weights_gb"] > 0 and "lower --max-batch-size" in art.reason


def test_oom_allocating_the_serving_kv_cache_is_a_failed_artifact(tmp_path, monkeypatch):
    from lab.model.llama import Transformer

    def oom(self, *a, **kw):
        raise torch.OutOfMemoryError(OOM)

    monkeypatch.setattr(Transformer, "setup_caches", oom)
    out = tmp_path / "load_test.json"
    assert main([*LOADTEST, "--output-json", str(out)]) == 1
    art = read_artifact(out)
    assert art.status == "failed" and "out of memory during allocating the KV cache" in art.reason
    assert art.engine["memory_plan"]["max_seq_len"] > 0 and art.engine["memory_plan"]["total_gb"] > 0


def test_oom_in_a_command_without_an_artifact_is_one_line(monkeypatch, capsys):
    _oom_at_model_load(monkeypatch)
    rc = main(
        ["generate", "--preset", "tiny", "--device", "cpu", "--prompt-ids", "1,2", "--max-new-tokens", "2"]
    )
    assert rc == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("lab: error: out of memory during loading the model") and "memory plan:" in line


def test_the_oom_reason_points_at_memory_another_process_holds():
    from lab.faults import oom_reason

    plan = {"weights_gb": 16.1, "total_gb": 25.3, "batch_size": 16, "max_seq_len": 256}
    plan.update(device_memory_gb=85.0, device_free_gb_at_failure=3.2)
    reason = oom_reason("loading the model", OOM, plan, "--batch-size")
    assert "the device had 3.2 GB free when it failed" in reason and "nvidia-smi" in reason
    # CUDA's own message (as an H100 gave it, reports/examples/benchmarks/oom-h100) keeps whole sentences
    cuda = (
        "CUDA out of memory. Tried to allocate 66.00 MiB. GPU 0 has a total capacity of 79.18 GiB of which "
        "36.56 MiB is free. Process 1122 has 60.54 GiB memory in use. Including non-PyTorch memory, this "
        "process has 18.47 GiB memory in use."
    )
    reason = oom_reason("warm-up", cuda, plan, "--batch-size")
    assert "Process 1122 has 60.54 GiB memory in use.; memory plan:" in reason, reason


# --- the disk refuses the write -----------------------------------------------------------------

HEALTH = [sys.executable, "-m", "lab", "health", "--device", "cpu", "--output-json"]


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("MODEL_PATH", None)
    return e


def test_a_read_only_output_directory_is_one_line_and_the_earlier_artifact_is_intact(tmp_path):
    out = tmp_path / "ro" / "health.json"
    first = subprocess.run([*HEALTH, str(out)], capture_output=True, text=True, env=_env(), timeout=120)
    assert first.returncode == 0, first.stderr
    before = out.read_bytes()
    out.chmod(0o444)
    out.parent.chmod(0o555)
    try:
        # Root ignores permissions: drop the capabilities that let it, so the directory is really read-only.
        cmd = [*HEALTH, str(out)]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot make a directory read-only for root")
            cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    finally:
        out.parent.chmod(0o755)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert f"cannot write {out}" in line and "writable output directory" in line
    assert out.read_bytes() == before, "the earlier artifact is untouched"
    assert sorted(p.name for p in out.parent.iterdir()) == ["health.json"], "no temp file left behind"


def test_a_full_disk_is_one_line_and_the_earlier_artifact_is_intact(tmp_path):
    """A real 64 KiB tmpfs in a private mount namespace (gone when the shell exits)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a small tmpfs")
    disk, outside = tmp_path / "disk", tmp_path / "outside"
    disk.mkdir()
    outside.mkdir()
    py = " ".join(HEALTH)
    script = f"""
set -u
mount -t tmpfs -o size=64k tmpfs {disk} || exit 99
{py} {disk}/health.json > /dev/null 2> {outside}/first.err || exit 98
cp {disk}/health.json {outside}/before.json
dd if=/dev/zero of={disk}/fill bs=1k count=1000 2> /dev/null
{py} {disk}/health.json > /dev/null 2> {outside}/second.err
echo $? > {outside}/rc
cp {disk}/health.json {outside}/after.json
ls -a {disk} > {outside}/listing
"""
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=_env(), timeout=180
    )
    if r.returncode == 99:
        pytest.skip("this kernel does not let us mount a tmpfs")
    assert r.returncode == 0, (
        r.stderr,
        (outside / "first.err").read_text() if (outside / "first.err").exists() else "",
    )
    assert (outside / "rc").read_text().strip() == "2"
    line = one_line((outside / "second.err").read_text())
    assert "cannot write" in line and "No space left on device" in line and "free space" in line
    assert (outside / "after.json").read_bytes() == (outside / "before.json").read_bytes()
    listing = set((outside / "listing").read_text().split())
    assert listing == {".", "..", "health.json", "fill"}, f"temp file left behind: {listing}"


def test_a_write_that_fails_midway_leaves_the_earlier_artifact(tmp_path, monkeypatch, capsys):
    """In-process twin of the above (runs everywhere): fsync reports ENOSPC."""
    out = tmp_path / "health.json"
    assert main(["health", "--device", "cpu", "--output-json", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(["health", "--device", "cpu", "--output-json", str(out)]) == 2
    assert "No space left on device" in one_line(capsys.readouterr().err)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["health.json"]


# --- drills -------------------------------------------------------------------------------------


def _oom_warmup_notebook(path: Path) -> None:
    """The warm-up notebook's shape, whose model runs out of memory (patched inside the kernel)."""
    import nbformat

    nb = nbformat.read(str(make_notebook(path, "warmup.json")), as_version=4)
    nb.cells[-1] = nbformat.v4.new_code_cell(
        "from pathlib import Path\n"
        "import torch\n"
        "import lab.bench.warmup as w\n"
        "def oom(*a, **kw):\n"
        f"    raise torch.OutOfMemoryError({OOM!r})\n"
        "w.run_warmup = oom\n"
        "cfg = w.WarmupConfig(preset='tiny', device='cpu', iters=1, warmup=0, prompt_len=8, max_new_tokens=4)\n"
        "art = w.run_and_write(cfg, Path(output_dir) / 'warmup.json')\n"
        "assert art.status == 'ok', art.reason\n"
    )
    nbformat.write(nb, str(path))


def test_drill_survives_an_oom_step_and_a_dead_kernel_and_the_next_drill_runs(tmp_path, capsys):
    from lab.drill import STEP_NOTEBOOKS

    nbs = tmp_path / "nbs"
    make_notebook(nbs / STEP_NOTEBOOKS["health"], "health.json")
    _oom_warmup_notebook(nbs / STEP_NOTEBOOKS["warmup"])
    make_notebook(nbs / STEP_NOTEBOOKS["compare"], "compare.json")
    make_notebook(nbs / STEP_NOTEBOOKS["loadtest"], "load_test.json", "die")
    reports = tmp_path / "reports"
    args = ["drill", "--notebooks-dir", str(nbs), "--output-dir", str(reports), "--cell-timeout-s", "120"]
    assert main([*args, "--run-id", "broken"]) == 1
    m = json.loads((reports / "broken" / "manifest.json").read_text())
    steps = {s["step"]: s for s in m["steps"]}
    assert steps["health"]["status"] == "ok" and steps["compare"]["status"] == "ok"
    w = read_artifact(reports / "broken" / "warmup.json")
    assert w.status == "failed" and "out of memory during warm-up" in w.reason and w.memory_plan
    assert steps["warmup"]["status"] == "failed" and "out of memory" in steps["warmup"]["reason"]
    assert steps["loadtest"]["status"] == "failed" and "kernel died" in steps["loadtest"]["reason"]
    assert m["status"] == "failed"

    # The next drill, with the faults gone, runs normally beside the broken one.
    make_notebook(nbs / STEP_NOTEBOOKS["warmup"], "warmup.json")
    make_notebook(nbs / STEP_NOTEBOOKS["loadtest"], "load_test.json")
    capsys.readouterr()
    assert main([*args, "--run-id", "next"]) in (0, 1)  # 1 only if the cpu-tiny expectations say so
    m2 = json.loads((reports / "next" / "manifest.json").read_text())
    assert all(s["status"] == "ok" for s in m2["steps"]), m2["steps"]
    assert json.loads((reports / "broken" / "manifest.json").read_text()) == m, "the broken run is untouched"


# --- the server dies under load -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finished_ok(url: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lab_requests_total") and 'outcome="ok"' in line
    )


def test_sigkill_of_the_server_counts_lost_requests_as_errored_and_says_so(tmp_path):
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "lab", "serve", "--preset", "tiny", "--device", "cpu", "--port", str(port)]
        + ["--max-seq-len", "128", "--simulate-step-delay-ms", "20"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, "lab serve exited"
            assert time.monotonic() < deadline, "lab serve did not become healthy"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        out = tmp_path / "load_test.json"
        lt = subprocess.Popen(
            [sys.executable, "-m", "lab", "loadtest", "--allow-smaller-world", "--no-progress"]
            + ["--endpoint", url, "--duration", "6", "--target-qps", "5", "--max-new-tokens", "16"]
            + ["--prompt-len-min", "8", "--prompt-len-max", "16", "--warmup-s", "0", "--cooldown-s", "0"]
            + ["--request-timeout-s", "20", "--output-json", str(out)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Kill once a few requests have finished and more are in flight.
        deadline = time.monotonic() + 60
        while _finished_ok(url) < 3:
            assert time.monotonic() < deadline and lt.poll() is None, "the load test never got going"
            time.sleep(0.1)
        os.kill(server.pid, signal.SIGKILL)
        stdout, stderr = lt.communicate(timeout=120)
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    assert "Traceback" not in stderr, stderr
    art = read_artifact(out)
    s = art.summary
    assert s["requests_ok"] > 0, "some requests finished before the kill"
    assert s["requests_errored"] > 0 and s["accounted"] == s["requests_sent"]
    rows = [json.loads(x) for x in (tmp_path / art.requests_file).read_text().splitlines()]
    errored = [r for r in rows if r["outcome"] == "error"]
    assert errored and all(r["reason"] for r in errored)
    assert f"{s['requests_errored']} requests errored" in stdout and "connection" in stdout
