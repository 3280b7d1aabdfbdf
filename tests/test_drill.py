"""`lab drill`: papermill orchestration, the manifest, parameter validation, environment hygiene,
traces, and the notebooks under the plain papermill CLI. Real kernels on tiny CPU notebooks."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lab.drill import (
    COMMON_PARAMS,
    STEP_NOTEBOOKS,
    child_environment,
    coerce,
    inspect_parameters,
    make_run_id,
    parse_steps,
    plan_drill,
)
from lab.errors import LabError
from lab.expectations import load_profile
from lab.results import read_artifact
from tests.drill_fixtures import make_notebook

ROOT = Path(__file__).resolve().parent.parent
REAL_NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
PAPERMILL = [sys.executable, "-m", "papermill"]


@pytest.fixture
def fake_notebooks(tmp_path) -> Path:
    d = tmp_path / "nbs"
    make_notebook(d / STEP_NOTEBOOKS["warmup"], "warmup.json")
    make_notebook(d / STEP_NOTEBOOKS["compare"], "compare.json", "raise")
    make_notebook(d / STEP_NOTEBOOKS["loadtest"], "load_test.json", "die")
    return d  # no health notebook: that step must fail with the reason


def test_drill_records_every_outcome_and_scopes_the_kernel_env(tmp_path, fake_notebooks, monkeypatch, capsys):
    from lab.cli import main

    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    monkeypatch.setenv("NCCL_P2P_LEVEL", "NVL")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    before = dict(os.environ)
    rc = main(
        [
            "drill",
            "--notebooks-dir",
            str(fake_notebooks),
            "--output-dir",
            str(tmp_path / "reports"),
            "--run-id",
            "t1",
            "--trace",
            "-p",
            "iters",
            "2",
            "-p",
            "warmup.ratio",
            "0.25",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1, out
    assert dict(os.environ) == before, "the caller's environment is untouched"
    for line in (
        "[1/4] health: failed",
        "[2/4] warmup: ok",
        "[3/4] compare: failed",
        "[4/4] loadtest: failed",
    ):
        assert line in out
    report = tmp_path / "reports" / "t1"
    assert f"report: {report}" in out and "make dashboard" in out
    m = json.loads((report / "manifest.json").read_text())
    assert read_artifact(report / "manifest.json").kind == "manifest"
    assert m["status"] == "failed" and m["profile"] == "cpu-tiny"
    steps = {s["step"]: s for s in m["steps"]}
    assert "not found" in steps["health"]["reason"]

    w = steps["warmup"]
    assert w["status"] == "ok" and w["artifact"] == "warmup.json"
    assert w["parameters"]["iters"] == 2 and w["parameters"]["ratio"] == 0.25
    assert w["parameters"]["output_dir"] == str(report.resolve())
    # The profile's drill parameters reach a notebook only where it declares them.
    assert w["ignored_parameters"]["max_new_tokens"] == 8
    assert (report / w["executed_notebook"]).exists() and (report / w["kernel_log"]).exists()
    assert w["cells"] and all(c["duration_s"] is not None for c in w["cells"])
    trace = json.loads((report / w["trace"]).read_text())
    assert trace["traceEvents"], "the Perfetto trace holds events"

    c = steps["compare"]
    assert c["status"] == "failed" and "RuntimeError: boom on purpose" in c["reason"]
    assert c["failing_cell"]["error"] == "RuntimeError: boom on purpose"
    assert "raise RuntimeError" in c["failing_cell"]["source"]
    assert "ratio" not in c["parameters"]  # -p warmup.ratio reaches the warm-up only

    lt = steps["loadtest"]
    assert lt["status"] == "failed" and "kernel died" in lt["reason"]
    assert "os._exit(1)" in lt["failing_cell"]["source"]

    # The kernels saw the playbook's hygiene; the manifest says what was changed.
    seen = json.loads((report / "warmup.json").read_text())["env_seen"]
    assert seen == {"NCCL_P2P_DISABLE": None, "NCCL_P2P_LEVEL": None, "CUDA_VISIBLE_DEVICES": "3"}
    assert m["env_hygiene"]["unset"] == {"NCCL_P2P_DISABLE": "1", "NCCL_P2P_LEVEL": "NVL"}
    assert m["env_hygiene"]["caller_cuda_visible_devices"] == "3,5"
    assert m["environment"]["nccl_env"]["NCCL_P2P_DISABLE"] == "1"  # the drill's own fingerprint
    ev = read_artifact(report / "expectations.json")
    assert ev.kind == "expectations" and m["expectations_verdict"] == ev.verdict


def test_child_environment_scopes_one_gpu():
    env, hyg, dev = child_environment(
        "cuda:1", {"CUDA_VISIBLE_DEVICES": "4,6", "NCCL_P2P_LEVEL": "SYS", "X": "1"}
    )
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and "NCCL_P2P_LEVEL" not in env and env["X"] == "1"
    assert dev == "cuda" and hyg["unset"] == {"NCCL_P2P_LEVEL": "SYS"}
    env, _, dev = child_environment("auto", {})
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and dev == "auto"
    with pytest.raises(LabError, match="exposes 1 GPU"):
        child_environment("cuda:2", {"CUDA_VISIBLE_DEVICES": "0"})


@pytest.mark.parametrize(
    ("value", "type_name", "default", "expected"),
    [
        ("3", "int", "3", 3),
        ("0.5", "float", "1.0", 0.5),
        (2, "float", "1.0", 2.0),
        ("true", "bool", "False", True),
        ("No", "bool", "True", False),
        ("a,b", "str", '""', "a,b"),
        ("[1, 2]", "list", "[]", [1, 2]),
        ("None", "Optional[int]", "None", None),
        ("7", "int | None", "None", 7),
        ("5", "None", "3", 5),  # no annotation: the default's type
        ("x: 1", "None", "None", {"x": 1}),  # unknown type: YAML, like papermill's -y
    ],
)
def test_coerce_to_the_declared_type(value, type_name, default, expected):
    assert coerce(value, type_name, default, "p") == expected


@pytest.mark.parametrize(
    ("value", "type_name"), [("abc", "int"), ("1.5", "int"), ("maybe", "bool"), (True, "int"), ("x", "list")]
)
def test_coerce_rejects_wrong_types(value, type_name):
    with pytest.raises(LabError, match=f"is {type_name}"):
        coerce(value, type_name, "0", "-p n")


def test_parameters_validated_before_anything_runs(tmp_path, fake_notebooks):
    prof = load_profile("cpu-tiny")

    def plan(*params: tuple[str, str], steps=("warmup", "compare"), run_id="r"):
        return plan_drill(
            prof,
            steps=list(steps),
            output_root=tmp_path / "reports",
            run_id=run_id,
            user_params=list(params),
            notebooks_dir=fake_notebooks,
        )

    with pytest.raises(LabError, match="no selected notebook declares a parameter 'itres'.*iters"):
        plan(("itres", "3"))
    with pytest.raises(LabError, match="parameter 'iters' of 02_warmup.ipynb is int; 'three'"):
        plan(("iters", "three"))
    with pytest.raises(LabError, match="step 'loadtest' is not selected"):
        plan(("loadtest.iters", "3"))
    with pytest.raises(LabError, match="--output-dir"):
        plan(("output_dir", "/tmp/x"))
    p = plan(("compare.iters", "4"), ("verbose", "yes"))
    by = {sp.step: sp for sp in p.steps}
    assert by["compare"].parameters["iters"] == 4 and by["warmup"].parameters["iters"] == 2
    assert by["warmup"].parameters["verbose"] is True and by["compare"].parameters["verbose"] is True
    assert not (tmp_path / "reports").exists(), "planning writes nothing"
    with pytest.raises(LabError, match="--steps: unknown step"):
        parse_steps("warmup,bogus")
    assert parse_steps("loadtest,health") == ["health", "loadtest"]
    (tmp_path / "reports" / "taken").mkdir(parents=True)
    (tmp_path / "reports" / "taken" / "manifest.json").write_text("{}")
    with pytest.raises(LabError, match="already exists"):
        plan(run_id="taken")


def test_profile_parameter_of_the_wrong_type_is_a_usage_error(tmp_path, fake_notebooks):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ndrill: {parameters: {warmup: {iters: 'many'}}}\n"
        "metrics:\n  t: {source: warmup.decode_tokens_per_s, expected: 1, direction: higher, warn: 0, fail: 0.5}\n"
    )
    with pytest.raises(LabError, match="profile bad: warmup.iters is int"):
        plan_drill(
            load_profile(str(bad)), steps=["warmup"], output_root=tmp_path, notebooks_dir=fake_notebooks
        )


def test_unparseable_parameter_line_gets_a_hint(tmp_path):
    nb_path = make_notebook(tmp_path / "nbs" / STEP_NOTEBOOKS["warmup"], "warmup.json")
    nb = nbformat.read(str(nb_path), as_version=4)
    nb.cells[1].source += "prompt_len: int = 8  # tokens (default = 8)\n"
    nbformat.write(nb, str(nb_path))
    with pytest.raises(LabError, match="papermill cannot parse"):
        plan_drill(
            load_profile("cpu-tiny"),
            steps=["warmup"],
            output_root=tmp_path,
            user_params=[("prompt_len", "4")],
            notebooks_dir=tmp_path / "nbs",
        )


def test_cli_usage_errors_exit_2_without_a_report(tmp_path, fake_notebooks, lab_cli):
    r = lab_cli(
        "drill",
        *(
            "--profile",
            "cpu-tiny",
            "--notebooks-dir",
            str(fake_notebooks),
            "--output-dir",
            str(tmp_path / "rep"),
        ),
        *("-p", "nope", "1"),
    )
    assert r.returncode == 2 and r.stderr.startswith("lab: error: -p nope") and "Traceback" not in r.stderr
    assert not (tmp_path / "rep").exists()
    r = lab_cli("drill", "--profile", "no-such", "--output-dir", str(tmp_path / "rep"))
    assert r.returncode == 2 and "unknown expectation profile" in r.stderr


def test_run_id_is_timestamp_and_host():
    from datetime import datetime, timezone

    assert (
        make_run_id(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "gpu box_1")
        == "20260102T030405Z-gpu-box-1"
    )


def test_tmp_notebook_under_plain_papermill_cli(tmp_path):
    nb = make_notebook(tmp_path / "02_warmup.ipynb", "warmup.json")
    help_ = subprocess.run(
        [*PAPERMILL, "--help-notebook", str(nb)], capture_output=True, text=True, timeout=60
    )
    assert help_.returncode == 0
    for line in ("iters: int (default 3)", "timed iterations", "ratio: float (default 0.5)", "verbose: bool"):
        assert line in help_.stdout
    out = tmp_path / "out"
    r = subprocess.run(
        [*PAPERMILL, str(nb), str(tmp_path / "ran.ipynb"), "-p", "iters", "4", "-p", "output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert read_artifact(out / "warmup.json").summary["decode_tokens_per_s"] == 400.0


# --- the project's real notebooks -------------------------------------------------------------------


def _assigned(nb_path: Path) -> list[str]:
    nb = nbformat.read(str(nb_path), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = []
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.AnnAssign), (
            f"{nb_path.name}: parameters must be typed: {ast.unparse(node)}"
        )
        names.append(node.target.id)
    return names


@pytest.mark.parametrize("nb_path", REAL_NOTEBOOKS, ids=lambda p: p.name)
def test_real_notebook_parameters_are_typed_helped_and_visible_to_papermill(nb_path):
    declared = inspect_parameters(nb_path)
    assert set(_assigned(nb_path)) == set(declared), "papermill must see every parameter (no '=' in help)"
    for name, d in declared.items():
        assert d["inferred_type_name"] not in ("None", ""), f"{name} has no type"
        assert d["help"], f"{name} has no help comment"
    assert set(COMMON_PARAMS) <= set(declared)
    types = {n: declared[n]["inferred_type_name"] for n in COMMON_PARAMS}
    assert types == {
        "output_dir": "str",
        "preset": "str",
        "model_path": "str",
        "device": "str",
        "dtype": "str",
        "seed": "int",
    }
    help_ = subprocess.run(
        [*PAPERMILL, "--help-notebook", str(nb_path)], capture_output=True, text=True, timeout=60
    )
    assert help_.returncode == 0
    for name, d in declared.items():
        assert f"{name}: {d['inferred_type_name']} (default" in help_.stdout
    nb = nbformat.read(str(nb_path), as_version=4)
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"
    )
    assert nb.metadata.kernelspec.name == "python3"


def test_real_warmup_notebook_under_plain_papermill_cli(tmp_path):
    nb = ROOT / "notebooks" / STEP_NOTEBOOKS["warmup"]
    out = tmp_path / "out"
    r = subprocess.run(
        [
            *PAPERMILL,
            str(nb),
            str(tmp_path / "ran.ipynb"),
            "-k",
            "python3",
            "-p",
            "iters",
            "2",
            "-p",
            "max_new_tokens",
            "4",
            "-p",
            "prompt_len",
            "8",
            "-p",
            "output_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    art = read_artifact(out / "warmup.json")
    assert art.status == "ok" and art.params["iters"] == 2


@pytest.mark.slow
def test_default_drill_on_the_real_notebooks(tmp_path, lab_cli):
    """`make drill`'s command on the tiny CPU default, over every step whose notebook exists."""
    steps = [s for s, nb in STEP_NOTEBOOKS.items() if (ROOT / "notebooks" / nb).exists()]
    r = lab_cli(
        "drill", "--steps", ",".join(steps), "--output-dir", str(tmp_path), "--run-id", "d", timeout=400
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = read_artifact(tmp_path / "d" / "manifest.json")
    assert m.status == "ok" and {s.step for s in m.steps if s.status == "ok"} == set(steps)
    ev = read_artifact(tmp_path / "d" / "expectations.json")
    # Every metric was measured and judged; the verdict itself depends on this machine's speed, which
    # tests never assert: the gate must agree with it (exit 0 within expectations, 3 outside).
    assert ev.metrics and all(x.measured is not None for x in ev.metrics), [x.detail for x in ev.metrics]
    assert ev.verdict in ("pass", "warn", "fail")
    g = lab_cli("gate", str(tmp_path / "d"))
    assert g.returncode == (3 if ev.verdict == "fail" else 0), g.stdout


def test_lab_notebooks_serves_jupyterlab_on_localhost(tmp_path):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "lab.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab", "notebooks", "--port", str(port), "--no-browser"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
            "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
        },
    )
    try:
        deadline = time.monotonic() + 90
        body = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=2) as resp:
                    body = json.loads(resp.read())
                    break
            except OSError:
                time.sleep(0.5)
        assert body is not None and "version" in body, "JupyterLab did not answer on 127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token=x", timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()  # the lab process became JupyterLab: this stops the server itself
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert f"http://127.0.0.1:{port}/lab" in out
    assert str(ROOT / "notebooks") in out
