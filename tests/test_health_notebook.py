"""notebooks/01_health_check.ipynb under real papermill on CPU: parameters documented, a one-rank gloo
probe, the decision on top, the checks table, and a valid health.json."""

from __future__ import annotations

import json
import subprocess
import sys

from lab.health import HealthArtifact
from lab.results import read_artifact

NOTEBOOK = "notebooks/01_health_check.ipynb"


def test_parameters_are_typed_and_documented(repo_root):
    r = subprocess.run(
        [sys.executable, "-m", "papermill", "--help-notebook", NOTEBOOK],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for name in (
        "output_dir: str",
        "preset: str",
        "model_path: str",
        "device: str",
        "dtype: str",
        "seed: int",
        "min_nvlink_links: int",
        "collective_timeout_s: float",
        "world_size: int",
        "baseline: str",
        "qps_drop_threshold: float",
        "fits_anywhere: bool",
    ):
        assert name in r.stdout, f"{name} missing from papermill --help-notebook"


def test_notebook_runs_under_papermill_and_writes_health_json(repo_root, tmp_path):
    import papermill as pm

    nb = json.loads((repo_root / NOTEBOOK).read_text())
    assert all(
        not c.get("outputs") and c.get("execution_count") is None
        for c in nb["cells"]
        if c["cell_type"] == "code"
    )
    out = tmp_path / "report"
    pm.execute_notebook(
        str(repo_root / NOTEBOOK),
        str(tmp_path / "01_out.ipynb"),
        parameters={
            "output_dir": str(out),
            "world_size": 1,
            "collective_timeout_s": 60.0,
            "fits_anywhere": True,
        },
        kernel_name="python3",
        cwd=str(repo_root),
        progress_bar=False,
    )
    art = read_artifact(out / "health.json")
    assert isinstance(art, HealthArtifact) and art.status == "ok"
    assert art.decision.fallback_recommended and art.decision.triggers == ["fits_anywhere"]
    assert art.exit_code == 3
    assert art.collective["outcome"] == "ok" and art.collective["world_size"] == 1
    assert art.params["collective_timeout_s"] == 60.0
    executed = json.loads((tmp_path / "01_out.ipynb").read_text())
    texts = []
    for c in executed["cells"]:
        for o in c.get("outputs", []):
            data = o.get("data", {})
            texts.append("".join(data.get("text/markdown", "")) + "".join(data.get("text/html", "")))
            texts.append("".join(o.get("text", "")))
    joined = "\n".join(texts)
    assert "FALLBACK RECOMMENDED" in joined  # the decision on top
    assert "memory_headroom" in joined and "<table" in joined  # the checks as a table
    assert "export CUDA_VISIBLE_DEVICES=0" in joined  # the fix commands
