"""Synthetic drill reports for the expectations, gate and metrics tests (no kernels, no models):
step artifacts written through lab.results exactly as the notebooks write them."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from lab.results import Artifact, finish, new_artifact, write_artifact, write_json

WARMUP = {
    "decode_tokens_per_s": 1900.0,
    "ttft_ms_p50": 40.0,
    "ttft_ms_p99": 55.0,
    "decode_ms_per_token_p50": 0.5,
    "decode_ms_per_token_p99": 0.6,
    "peak_memory_gb": 41.0,
    "compile_s": 30.0,
    "power_w_mean": 505.0,
    "energy_j": 1000.0,
    "tokens_per_joule": 3.7,
    "mbu": 0.7,
}
LOADTEST = {
    "requests_sent": 60,
    "requests_ok": 60,
    "requests_rejected": 0,
    "requests_timed_out": 0,
    "requests_errored": 0,
    "target_qps": 3.0,
    "achieved_qps": 2.98,
    "output_tokens_per_s": 12.0,
    "ttft_ms_p50": 300.0,
    "ttft_ms_p99": 900.0,
    "tpot_ms_p50": 30.0,
    "tpot_ms_p99": 60.0,
    "e2e_ms_p50": 900.0,
    "e2e_ms_p99": 2400.0,
    "e2e_ms_count": 60,
    "dispatch_lag_ms_p99": 0.4,
    "goodput_rps": 2.9,
    "slo_attainment": 0.97,
    "tokens_per_joule": 0.5,
    "valid": True,
}


def step_artifact(path: Path, summary: dict[str, Any], status: str = "ok", **extra: Any) -> Path:
    art = new_artifact(Artifact, {"synthetic": True}, kind="fake-step", summary=summary, **extra)
    finish(art, status, None if status == "ok" else "synthetic failure")
    return write_artifact(path, art)


def make_report(
    root: Path,
    name: str = "run",
    warmup: dict[str, Any] | None = None,
    loadtest: dict[str, Any] | None = None,
    manifest_status: str | None = "ok",
    failed_step: str | None = None,
    gpu_memory_gb: float | None = 180.0,
    profile: str = "b200-gpt40b",
    finished_offset_s: float = 0.0,
) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    w = step_artifact(d / "warmup.json", WARMUP if warmup is None else warmup)
    if gpu_memory_gb is not None:
        # Pretend the warm-up ran on a GPU of this size (the fingerprint is otherwise CPU here).
        import json

        data = json.loads(w.read_text())
        data["environment"]["gpus"] = [{"index": 0, "name": "NVIDIA B200", "memory_total_gb": gpu_memory_gb}]
        data["environment"]["gpu_count"] = 1
        write_json(w, data)
    step_artifact(d / "load_test.json", LOADTEST if loadtest is None else loadtest)
    health = new_artifact(Artifact, {}, kind="fake-step")
    health.decision = {"fallback_recommended": True, "triggers": [{"name": "nvlink_degraded"}]}
    write_artifact(d / "health.json", finish(health))
    if manifest_status is not None:
        m = new_artifact(Artifact, {"profile": profile}, kind="manifest")
        m.finished_at = m.started_at + timedelta(seconds=90 + finished_offset_s)
        m.started_at = m.started_at + timedelta(seconds=finished_offset_s)
        m.status = manifest_status
        steps = []
        for s in ("health", "warmup", "compare", "loadtest"):
            st = "skipped" if s == "compare" else "failed" if s == failed_step else "ok"
            steps.append(
                {"step": s, "status": st, "reason": "boom" if st == "failed" else None, "duration_s": 10.0}
            )
        m.steps = steps
        m.profile = profile
        write_artifact(d / "manifest.json", m)
    return d


def make_notebook(path: Path, artifact_file: str, behaviour: str = "ok") -> Path:
    """A small drill-shaped notebook: the common parameters, `iters` and `behaviour` (ok, raise, die),
    writing `artifact_file` through lab.results; it records the environment its kernel saw."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(
        'output_dir: str = "out"  # where the artifact goes\n'
        'preset: str = ""  # model preset, empty for the default\n'
        'model_path: str = ""  # checkpoint path\n'
        'device: str = "auto"  # auto, cpu, cuda\n'
        'dtype: str = "auto"  # auto, float32, bfloat16\n'
        "seed: int = 0  # seed\n"
        "iters: int = 3  # timed iterations\n"
        "ratio: float = 0.5  # a float parameter\n"
        "verbose: bool = False  # a bool parameter\n"
        f'behaviour: str = "{behaviour}"  # ok, raise, die\n'
    )
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import os\n"
        "from pathlib import Path\n"
        "from lab.results import Artifact, finish, new_artifact, write_artifact\n"
        "if behaviour == 'raise':\n"
        "    raise RuntimeError('boom on purpose')\n"
        "if behaviour == 'die':\n"
        "    os._exit(1)\n"
        "art = new_artifact(Artifact, {'iters': iters, 'ratio': ratio, 'preset': preset}, kind='fake-step',\n"
        "    summary={'decode_tokens_per_s': 100.0 * iters, 'valid': True, 'requests_errored': 0})\n"
        "art.env_seen = {k: os.environ.get(k) for k in ('NCCL_P2P_DISABLE', 'NCCL_P2P_LEVEL', 'CUDA_VISIBLE_DEVICES')}\n"
        f"write_artifact(Path(output_dir) / {artifact_file!r}, finish(art))\n"
    )
    nb.cells = [nbformat.v4.new_markdown_cell("# A drill-shaped test notebook"), params, body]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path
