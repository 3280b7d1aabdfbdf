"""Bad input to every CLI command: exit 2, exactly one line on stderr saying what to change, no
traceback, and nothing written (the output path does not exist afterwards, the working directory
holds no new file). Table-driven over every command `lab --help` lists, plus hypothesis properties
for the numeric flags. In-process through `lab.cli.main` for speed; a few rows also as a real process.

Unreadable files: the tests may run as root, for whom file permissions do not apply, so "unreadable"
is a directory where a file is expected, binary garbage, and corrupt JSON/YAML.
Checkpoint refusals (truncated, wrong shapes, code-running pickles) live in tests/test_checkpoint.py.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.cli import build_parser, main

OUT = "out/artifact.json"  # every row that writes something is pointed here; it must never appear


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


COMMANDS = _commands()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A scratch cwd with a few bad inputs in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MODEL_PATH", raising=False)
    (tmp_path / "a_dir.json").mkdir()
    (tmp_path / "garbage.pt").write_bytes(os.urandom(64))
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 16)
    (tmp_path / "corrupt.json").write_text('{"kind": "loadtest", "summary": ')
    (tmp_path / "corrupt.yaml").write_text("name: x\nmetrics: [\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "empty_report").mkdir()
    return tmp_path


LT = ["loadtest", "--allow-smaller-world", "--no-progress", "--output-json", OUT]

# (id, argv, a fragment the one line must contain)
CASES: list[tuple[str, list[str], str]] = [
    # compare
    ("compare-batch-0", ["compare", "--batch-size", "0", "--output-json", OUT], "--batch-size"),
    ("compare-preset", ["compare", "--preset", "nope", "--output-json", OUT], "unknown preset"),
    ("compare-warmup-neg", ["compare", "--warmup", "-3", "--output-json", OUT], "--warmup"),
    ("compare-missing-ckpt", ["compare", "--model-path", "nope.pt", "--output-json", OUT], "not found"),
    ("compare-dtype", ["compare", "--dtype", "float99", "--output-json", OUT], "unknown dtype"),
    # compare-tiers
    ("tiers-duration-0", ["compare-tiers", "--duration", "0", "--out", "out"], "--duration"),
    ("tiers-qps-neg", ["compare-tiers", "--target-qps", "-2", "--out", "out"], "--target-qps"),
    (
        "tiers-prompt-min-max",
        ["compare-tiers", "--prompt-len-min", "64", "--prompt-len-max", "32", "--out", "out"],
        "--prompt-len-min",
    ),
    ("tiers-batch-0", ["compare-tiers", "--batch-size", "0", "--out", "out"], "--batch-size"),
    # dashboard
    ("dashboard-port-0", ["dashboard", "--port", "0"], "--port"),
    ("dashboard-port-text", ["dashboard", "--port", "http"], "--port"),
    # drill
    ("drill-profile", ["drill", "--profile", "nope", "--output-dir", "out"], "unknown expectation profile"),
    ("drill-profile-corrupt", ["drill", "--profile", "corrupt.yaml", "--output-dir", "out"], "corrupt.yaml"),
    ("drill-profile-list", ["drill", "--profile", "list.yaml", "--output-dir", "out"], "list.yaml"),
    ("drill-profile-dir", ["drill", "--profile", "a_dir.json", "--output-dir", "out"], "a_dir.json"),
    ("drill-seed-neg", ["drill", "--seed", "-1", "--output-dir", "out"], "--seed"),
    ("drill-steps", ["drill", "--steps", "health,bogus", "--output-dir", "out"], "bogus"),
    ("drill-preset", ["drill", "--preset", "nope", "--output-dir", "out"], "nope"),
    # gate
    ("gate-missing", ["gate", "no_such_report"], "no_such_report"),
    ("gate-empty", ["gate", "empty_report"], "empty_report"),
    ("gate-not-a-dir", ["gate", "corrupt.json"], "corrupt.json"),
    # generate
    ("generate-ids", ["generate", "--prompt-ids", "a,b"], "--prompt-ids"),
    ("generate-new-0", ["generate", "--prompt-ids", "1,2", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("generate-batch-0", ["generate", "--prompt-ids", "1,2", "--batch-size", "0"], "--batch-size"),
    ("generate-preset", ["generate", "--prompt-ids", "1,2", "--preset", "nope"], "unknown preset"),
    ("generate-mode", ["generate", "--prompt-ids", "1,2", "--mode", "bogus"], "unknown mode"),
    ("generate-garbage-ckpt", ["generate", "--prompt-ids", "1", "--model-path", "garbage.pt"], "garbage.pt"),
    ("generate-no-ids", ["generate"], "--prompt-ids"),
    # health
    ("health-batch-0", ["health", "--batch-size", "0", "--output-json", OUT], "--batch-size"),
    ("health-preset", ["health", "--preset", "nope", "--output-json", OUT], "unknown preset"),
    (
        "health-missing-baseline",
        ["health", "--baseline", "nope.json", "--current", "nope2.json", "--output-json", OUT],
        "nope.json",
    ),
    (
        "health-corrupt-baseline",
        ["health", "--baseline", "corrupt.json", "--current", "corrupt.json", "--output-json", OUT],
        "corrupt.json",
    ),
    (
        "health-dir-baseline",
        ["health", "--baseline", "a_dir.json", "--current", "a_dir.json", "--output-json", OUT],
        "a_dir.json",
    ),
    ("health-links-neg", ["health", "--min-nvlink-links", "-1", "--output-json", OUT], "--min-nvlink-links"),
    # loadtest
    ("loadtest-qps-neg", [*LT, "--target-qps", "-1"], "--target-qps"),
    ("loadtest-qps-0", [*LT, "--target-qps", "0"], "--target-qps"),
    ("loadtest-duration-0", [*LT, "--duration", "0"], "--duration"),
    ("loadtest-duration-nan", [*LT, "--duration", "nan"], "--duration"),
    (
        "loadtest-prompt-min-max",
        [*LT, "--prompt-len-min", "64", "--prompt-len-max", "32"],
        "--prompt-len-min",
    ),
    ("loadtest-batch-0", [*LT, "--max-batch-size", "0"], "--max-batch-size"),
    ("loadtest-preset", [*LT, "--preset", "nope"], "unknown preset"),
    ("loadtest-missing-ckpt", [*LT, "--model-path", "nope.pt"], "not found"),
    ("loadtest-garbage-ckpt", [*LT, "--model-path", "garbage.safetensors"], "garbage.safetensors"),
    ("loadtest-world", ["loadtest", "--output-json", OUT], "--allow-smaller-world"),
    ("loadtest-endpoint-not-url", [*LT, "--endpoint", "notaurl"], "--endpoint"),
    ("loadtest-endpoint-nobody", [*LT, "--endpoint", "http://127.0.0.1:9"], "--endpoint"),
    ("loadtest-sweep", [*LT, "--sweep", "fast"], "--sweep"),
    ("loadtest-pattern", [*LT, "--pattern", "zigzag"], "zigzag"),
    ("loadtest-mem-fraction", [*LT, "--max-gpu-memory-fraction", "1.5"], "--max-gpu-memory-fraction"),
    # metrics
    ("metrics-export-missing", ["metrics", "export", "nope_dir", "--textfile", "out/m.prom"], "nope_dir"),
    (
        "metrics-export-empty",
        ["metrics", "export", "empty_report", "--textfile", "out/m.prom"],
        "empty_report",
    ),
    ("metrics-rules-profile", ["metrics", "rules", "--profile", "nope", "--out", "out/r.yml"], "nope"),
    (
        "metrics-rules-corrupt",
        ["metrics", "rules", "--profile", "corrupt.yaml", "--out", "out/r.yml"],
        "corrupt.yaml",
    ),
    ("metrics-rules-stale", ["metrics", "rules", "--stale-after-h", "-1", "--out", "out/r.yml"], "--stale"),
    ("metrics-no-sub", ["metrics"], "metrics"),
    ("metrics-push-no-gw", ["metrics", "push", "empty_report"], "--gateway"),
    # notebooks
    ("notebooks-port-neg", ["notebooks", "--port", "-1"], "--port"),
    ("notebooks-dir-missing", ["notebooks", "--notebooks-dir", "nope_dir", "--no-browser"], "nope_dir"),
    # plan
    ("plan-batch-0", ["plan", "--batch-size", "0"], "--batch-size"),
    ("plan-preset", ["plan", "--preset", "nope"], "unknown preset"),
    ("plan-dtype", ["plan", "--dtype", "nope"], "unknown dtype"),
    ("plan-seq-0", ["plan", "--max-seq-len", "0"], "--max-seq-len"),
    # serve
    ("serve-batch-0", ["serve", "--max-batch-size", "0"], "--max-batch-size"),
    ("serve-preset", ["serve", "--preset", "nope"], "unknown preset"),
    ("serve-port-neg", ["serve", "--port", "-1"], "--port"),
    ("serve-mode", ["serve", "--mode", "bogus"], "unknown mode"),
    ("serve-queue-timeout-0", ["serve", "--queue-timeout-s", "0"], "--queue-timeout-s"),
    ("serve-missing-ckpt", ["serve", "--model-path", "nope.pt"], "not found"),
    ("serve-dir-ckpt", ["serve", "--model-path", "empty_report"], "empty_report"),
    # warmup
    ("warmup-iters-0", ["warmup", "--iters", "0", "--output-json", OUT], "--iters"),
    ("warmup-batch-neg", ["warmup", "--batch-size", "-1", "--output-json", OUT], "--batch-size"),
    ("warmup-preset", ["warmup", "--preset", "nope", "--output-json", OUT], "unknown preset"),
    ("warmup-missing-ckpt", ["warmup", "--model-path", "nope.pt", "--output-json", OUT], "not found"),
    ("warmup-garbage-ckpt", ["warmup", "--model-path", "garbage.pt", "--output-json", OUT], "garbage.pt"),
    ("warmup-dtype", ["warmup", "--dtype", "float99", "--output-json", OUT], "unknown dtype"),
    ("warmup-device", ["warmup", "--device", "tpu", "--output-json", OUT], "unknown device"),
    ("warmup-too-big", ["warmup", "--preset", "llama-70b", "--device", "cpu", "--output-json", OUT], "fit"),
]
# Every command also gets an unknown flag.
REQUIRED = {
    "gate": ["empty_report"],
    "generate": ["--prompt-ids", "1"],
    "metrics": ["rules", "--out", "out/r.yml"],
}
CASES += [
    (f"{cmd}-unknown-flag", [cmd, *REQUIRED.get(cmd, []), "--no-such-flag"], "--no-such-flag")
    for cmd in COMMANDS
]
CASES += [("drill-missing-ckpt", ["drill", "--model-path", "nope.pt", "--output-dir", "out"], "nope.pt")]


def _files(root: Path) -> set[str]:
    # Everything counts, the Inductor cache directory included: commands point it only after their checks.
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_bad(argv: list[str], root: Path, capsys) -> str:
    """Run in-process; assert the usage-error contract; return the one line."""
    before = _files(root)
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert rc == 2, f"{argv}: rc {rc}, stderr {captured.err!r}"
    assert len(lines) == 1, f"{argv}: expected one line, got {captured.err!r}"
    assert lines[0].startswith("lab: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not (root / "out").exists(), f"{argv} left {sorted(_files(root / 'out'))}"
    assert _files(root) == before, f"{argv} wrote {sorted(_files(root) - before)}"
    return lines[0]


def test_the_table_covers_every_command() -> None:
    covered = {argv[0] for _, argv, _ in CASES if not argv[-1] == "--no-such-flag"}
    assert set(COMMANDS) <= covered, f"commands with no bad-value row: {set(COMMANDS) - covered}"


@pytest.mark.parametrize("argv,needle", [(a, n) for _, a, n in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, needle, workdir, capsys) -> None:
    line = run_bad(argv, workdir, capsys)
    assert needle.lower() in line.lower(), line


@pytest.mark.parametrize(
    "argv",
    [
        ["loadtest", "--allow-smaller-world", "--target-qps", "-1", "--output-json", OUT],
        ["warmup", "--model-path", "garbage.pt", "--output-json", OUT],
        ["gate", "corrupt.json"],
    ],
    ids=["qps", "checkpoint", "gate"],
)
def test_a_real_process_prints_one_line_and_no_traceback(argv, workdir, lab_cli) -> None:
    r = lab_cli(*argv, cwd=workdir, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lab: error: "), r.stderr
    assert "Traceback" not in r.stderr and not (workdir / "out").exists()


# --- properties over the numeric flags ------------------------------------------------------------
# (command prefix, flag, kind): kind positive = must be > 0, nonneg = must be >= 0, fraction = (0, 1].
NUMERIC: list[tuple[list[str], str, str]] = [
    (["loadtest", "--allow-smaller-world"], "--target-qps", "positive"),
    (["loadtest", "--allow-smaller-world"], "--duration", "positive"),
    (["loadtest", "--allow-smaller-world"], "--max-batch-size", "positive"),
    (["loadtest", "--allow-smaller-world"], "--max-new-tokens", "positive"),
    (["loadtest", "--allow-smaller-world"], "--prompt-len-min", "positive"),
    (["loadtest", "--allow-smaller-world"], "--queue-timeout-s", "positive"),
    (["loadtest", "--allow-smaller-world"], "--max-gpu-memory-fraction", "fraction"),
    (["serve"], "--max-queue", "nonneg"),
    (["serve"], "--port", "nonneg"),
    (["warmup"], "--iters", "positive"),
    (["warmup"], "--batch-size", "positive"),
    (["warmup"], "--prompt-len", "positive"),
    (["compare"], "--warmup", "nonneg"),
    (["health"], "--batch-size", "positive"),
    (["plan"], "--max-seq-len", "positive"),
    (["compare-tiers"], "--duration", "positive"),
    (["dashboard"], "--port", "positive"),
]


def _bad_values(kind: str):
    numbers = st.one_of(
        st.integers(min_value=-(10**12), max_value=-1),
        st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
    )
    if kind == "positive":
        numbers = st.one_of(numbers, st.just(0), st.just(0.0))
    if kind == "fraction":
        numbers = st.one_of(numbers, st.just(0), st.floats(min_value=1.0001, max_value=1e9))
    text = st.text(alphabet="abcxyz!@#%^&*()_=,;:", min_size=1, max_size=8)
    special = st.sampled_from(["nan", "inf", "-inf", "1e999", "", " "])
    return st.one_of(numbers.map(str), text, special)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=st.sampled_from(NUMERIC), data=st.data())
def test_out_of_range_numbers_are_refused_naming_the_flag(case, data, workdir, capsys) -> None:
    prefix, flag, kind = case
    value = data.draw(_bad_values(kind), label="value")
    if kind == "nonneg" and value in ("0", "0.0"):
        return
    if flag == "--port" and value.strip() and value.lstrip("-").isdigit() and int(value) >= 0:
        return
    line = run_bad(
        [*prefix, f"{flag}={value}", "--output-json", OUT]
        if "--output-json" in _flags(prefix[0])
        else [*prefix, f"{flag}={value}"],
        workdir,
        capsys,
    )
    assert flag in line, line


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lo=st.integers(2, 10**6), gap=st.integers(1, 10**6))
def test_prompt_len_min_above_max_is_refused(lo, gap, workdir, capsys) -> None:
    hi = lo - 1 if gap % 2 else max(1, lo - gap)
    argv = ["loadtest", "--allow-smaller-world", "--prompt-len-min", str(lo), "--prompt-len-max", str(hi)]
    line = run_bad([*argv, "--output-json", OUT], workdir, capsys)
    assert "--prompt-len-min" in line


def _flags(command: str) -> set[str]:
    return {s for a in COMMANDS[command]._actions for s in a.option_strings}


def test_help_is_the_only_way_out_with_exit_0(capsys) -> None:
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


# --- notebook parameters ------------------------------------------------------------------------


def test_notebook_parameters_are_checked_against_their_annotations() -> None:
    from lab.errors import LabError
    from lab.params import validate_notebook_params

    def ns(**values):
        ann = {"iters": int, "ratio": float, "flag": bool, "name": str}
        return {"__annotations__": ann, "iters": 3, "ratio": 0.5, "flag": False, "name": "x", **values}

    good = ns(iters="4", ratio=1, flag="true")
    assert validate_notebook_params(good, positive=("iters",), fraction=("ratio",)) == {
        "iters": 4,
        "ratio": 1.0,
        "flag": True,
        "name": "x",
    }
    assert good["iters"] == 4 and good["flag"] is True  # converted in the notebook's globals
    for values, kw, needle in [
        ({"iters": "abc"}, {}, "parameter iters: 'abc' is not an integer"),
        ({"iters": 2.5}, {}, "parameter iters: 2.5 is not an integer"),
        ({"iters": True}, {}, "is not an integer"),
        ({"ratio": "nan"}, {}, "parameter ratio: 'nan' is not a finite number"),
        ({"ratio": [1]}, {}, "is not a number"),
        ({"flag": "maybe"}, {}, "parameter flag: 'maybe' is not true or false"),
        ({"name": 5}, {}, "parameter name: 5 is not text"),
        ({"iters": 0}, {"positive": ("iters",)}, "parameter iters: 0 must be > 0"),
        ({"iters": -1}, {"nonneg": ("iters",)}, "must be >= 0"),
        ({"ratio": 1.5}, {"fraction": ("ratio",)}, "must be a fraction in (0, 1]"),
    ]:
        with pytest.raises(LabError) as e:
            validate_notebook_params(ns(**values), **kw)
        assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "notebook,params,needle",
    [
        ("02_warmup.ipynb", ["-p", "iters", "abc"], "parameter iters: 'abc' is not an integer"),
        ("04_load_test.ipynb", ["-p", "target_qps", "-2"], "parameter target_qps: -2.0 must be > 0"),
    ],
)
def test_a_bad_notebook_parameter_fails_in_the_first_cell_and_writes_nothing(
    notebook, params, needle, tmp_path, repo_root
) -> None:
    import subprocess
    import sys

    import nbformat

    out_dir = tmp_path / "out"
    executed = tmp_path / "executed.ipynb"
    r = subprocess.run(
        [sys.executable, "-m", "papermill", str(repo_root / "notebooks" / notebook), str(executed)]
        + ["-k", "python3", "--cwd", str(repo_root), "-p", "output_dir", str(out_dir), "-p", "device", "cpu"]
        + params,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode != 0 and needle in r.stderr, r.stderr[-2000:]
    nb = nbformat.read(str(executed), as_version=4)
    ran = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count")]
    failed = [c for c in ran if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert len(failed) == 1 and "validate_notebook_params" in failed[0].source
    # Only the parameters, papermill's injected parameters and the check ran: nothing was measured or written.
    assert len(ran) == 3 and not out_dir.exists()
