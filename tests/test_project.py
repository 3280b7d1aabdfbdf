"""The project's packaging stays consistent: environment.yml agrees with pyproject.toml, the `lab` console
script and `python -m lab` are the same CLI, the Makefile has the user's targets and CI runs `make test`.
Also a CPU smoke run of benchmarks/decode_modes.py (that it runs and writes its artifact, never a speed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def conda_env() -> dict:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert isinstance(env, dict) and env.get("name"), "environment.yml needs a name"
    assert isinstance(env.get("dependencies"), list)
    return env


def test_environment_python_satisfies_requires_python(conda_env, pyproject):
    pins = [d for d in conda_env["dependencies"] if isinstance(d, str) and re.match(r"python\b", d)]
    assert len(pins) == 1, f"environment.yml should pin python once, found {pins}"
    m = re.fullmatch(r"python\s*(?:==?|>=)?\s*(\d+(?:\.\d+)*)(?:\.\*)?", pins[0].strip())
    assert m, f"unrecognised python pin '{pins[0]}'"
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    assert Version(m.group(1)) in requires, f"{pins[0]} does not satisfy requires-python {requires}"


def test_environment_installs_the_project_with_existing_extras(conda_env, pyproject):
    deps = conda_env["dependencies"]
    assert "pip" in deps, "environment.yml must install pip to run its pip section"
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1
    installs = [
        m
        for line in pip_sections[0]
        if (m := re.fullmatch(r"(?:-e\s+)?\.(?:\[([\w,\s-]+)\])?", line.strip()))
    ]
    assert installs, f"the pip section must install the project itself (-e .[dev]); got {pip_sections[0]}"
    extras = {e.strip() for e in (installs[0].group(1) or "").split(",") if e.strip()}
    declared = set(pyproject["project"].get("optional-dependencies", {}))
    assert "dev" in extras, "the conda environment should bring the dev extras (tests, ruff)"
    assert extras <= declared, f"extras {sorted(extras - declared)} are not in pyproject.toml"
    # Dependencies live in pyproject.toml only: nothing else is pip-installed here.
    assert len(pip_sections[0]) == 1, f"install dependencies through pyproject.toml, not {pip_sections[0]}"


def test_console_script_is_declared_and_importable(pyproject):
    target = pyproject["project"]["scripts"]["lab"]
    module, func = target.split(":")
    assert module == "lab.cli"
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def test_lab_and_python_m_lab_agree():
    script = Path(sys.executable).parent / ("lab.exe" if os.name == "nt" else "lab")
    assert script.exists(), (
        f"the lab console script is not installed next to {sys.executable}; run make setup"
    )
    env = {k: v for k, v in os.environ.items() if k != "MODEL_PATH"}
    via_script = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=120)
    via_module = subprocess.run(
        [sys.executable, "-m", "lab", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    assert via_script.returncode == via_module.returncode == 0, (via_script.stderr, via_module.stderr)
    assert via_script.stdout == via_module.stdout
    for command in ("generate", "plan"):
        assert command in via_script.stdout


def test_makefile_targets_and_ci():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.M))
    missing = {"setup", "drill", "test", "dashboard"} - targets
    assert not missing, f"Makefile lacks targets {sorted(missing)}"
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n?)+)", makefile, flags=re.M)
    assert test_recipe and "pytest" in test_recipe.group(1) and "ruff" in test_recipe.group(1)
    assert re.search(r"^test:.*\bsetup\b", makefile, flags=re.M), "make test should depend on setup"
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    lines = [
        ln.strip() for ln in ci.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    assert "make test" in lines, ".ci/run must call make test"
    assert any(ln.startswith("set -e") for ln in lines), ".ci/run must fail when a command fails"


# --- benchmarks/decode_modes.py on the CPU (it runs; speed is not asserted) ----------------------------


def _bench(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MODEL_PATH"}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_modes.py"), *argv, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )


def test_decode_modes_benchmark_cpu_smoke(tmp_path):
    r = _bench(
        *("--presets", "tiny", "--device", "cpu", "--dtype", "float32", "--modes", "eager"),
        *("--batches", "1,2", "--new-tokens", "5", "--prompt-len", "4", "--repeats", "2"),
        tmp_path=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "decode_modes.json").read_text())
    assert data["kind"] == "decode_modes" and data["status"] == "ok"
    assert data["environment"]["python"] and data["params"]["presets"] == ["tiny"]
    assert [(row["mode"], row["batch"], row["status"]) for row in data["rows"]] == [
        ("eager", 1, "ok"),
        ("eager", 2, "ok"),
    ]
    for row in data["rows"]:
        assert row["decode_tokens_per_s_per_user"] > 0
        assert row["decode_tokens_per_s_aggregate"] == pytest.approx(
            row["decode_tokens_per_s_per_user"] * row["batch"]
        )
        p10, p90 = row["decode_tokens_per_s_per_user_p10"], row["decode_tokens_per_s_per_user_p90"]
        assert p10 <= row["decode_tokens_per_s_per_user"] <= p90
        assert row["decode_step_ms"]["count"] == 2 * 4  # 2 repeats x (5 new tokens - 1 from prefill)
        assert row["ttft_ms"] > 0 and row["bytes_per_step"] > 0
        assert row["mbu"] is None  # no copy bandwidth on the CPU: said, not zero
    assert "copy_bandwidth_gb_s" in data["unavailable"] and "mbu" in data["unavailable"]
    assert r.stdout.strip().splitlines()[-1].startswith("tiny ")  # the table comes last


def test_decode_modes_benchmark_rejects_cudagraphs_on_cpu(tmp_path):
    r = _bench("--presets", "tiny", "--device", "cpu", "--modes", "compile-cudagraphs", tmp_path=tmp_path)
    assert r.returncode == 2
    assert "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "decode_modes.json").exists()


def test_startup_profile_benchmark_cpu_smoke(tmp_path):
    """benchmarks/startup_profile.py runs and writes its phases and import times (never a speed asserted)."""
    env = {**{k: v for k, v in os.environ.items() if k != "MODEL_PATH"}, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "startup_profile.py"), "--out", str(tmp_path)]
        + ["--device", "cpu", "--preset", "tiny", "--max-seq-len", "128", "--slots", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "startup_profile.json").read_text())
    assert data["benchmark"] == "startup_profile" and data["environment"]["python"]
    assert list(data["build"]["phases_s"])[-2:] == ["engine_built", "engine_warmup"]
    assert any(m["module"] == "torch" for m in data["imports"]["slowest_cumulative_us"])
