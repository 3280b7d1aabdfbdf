"""GPU evidence for issue 6: one full drill (notebooks 01-04 under papermill) with the H100 profile
(llama-8b bf16, the playbook's warm-up and load-test settings), then the gate, a calibrated profile,
the Prometheus textfile and alerting rules, all inside the report. Writes drill_gpu.json beside it
(fingerprint, commands, exit codes, wall times, gate lines).

    python benchmarks/drill_gpu.py --out reports/examples            # -> reports/examples/<run-id>/
    python benchmarks/drill_gpu.py --out DIR --steps health,warmup   # a shorter run
    python benchmarks/drill_gpu.py --out DIR --trace --steps warmup  # a Perfetto trace of the warm-up

Needs papermill, ipykernel and a `python3` kernel (docs/offline-gpu.md). About 6-9 minutes on an
H100 (compiles dominate; the compile cache in .compile-cache makes a second run faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def lab(argv: list[str], log: Path, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "lab", *argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"$ lab {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")) + (
            f"\ntimed out after {timeout_s} s"
        )
    wall_s = round(time.perf_counter() - t0, 2)
    with log.open("a") as f:
        f.write(
            f"$ lab {' '.join(argv)}\n--- rc {rc}, {wall_s} s\n--- stdout\n{out}\n--- stderr\n{err[-20000:]}\n"
        )
    print(out[-4000:], flush=True)
    if rc:
        print(err[-3000:], file=sys.stderr, flush=True)
    return {"command": "lab " + " ".join(argv), "rc": rc, "wall_s": wall_s, "stdout_tail": out[-3000:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="reports root; the run goes to OUT/<run-id>/")
    ap.add_argument("--profile", default="h100-llama8b")
    ap.add_argument("--run-id", default=None, help="default: <profile>-drill-<UTC timestamp>")
    ap.add_argument("--steps", default="health,warmup,compare,loadtest")
    ap.add_argument("--trace", action="store_true", help="torch.profiler traces of warmup/loadtest")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--timeout-s", type=float, default=570, help="for the drill command")
    a = ap.parse_args()

    from lab.env import fingerprint

    out_root = Path(a.out)
    out_root.mkdir(parents=True, exist_ok=True)
    run_id = a.run_id or f"{a.profile}-drill-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    report = out_root / run_id
    log = out_root / f"{run_id}.log"
    drill_argv = ["drill", "--profile", a.profile, "--steps", a.steps, "--output-dir", str(out_root)]
    drill_argv += ["--run-id", run_id, *(["--trace"] if a.trace else [])]
    for name, value in a.p:
        drill_argv += ["-p", name, value]
    results: dict = {"drill": lab(drill_argv, log, a.timeout_s)}
    if report.is_dir():
        results["gate"] = lab(["gate", str(report)], log, 120)
        calibrated = report / f"{a.profile}.calibrated.yaml"
        results["calibrate"] = lab(
            ["gate", str(report), "--profile", a.profile, "--calibrate-to", str(calibrated)], log, 120
        )
        if calibrated.exists():
            results["gate_calibrated"] = lab(["gate", str(report), "--profile", str(calibrated)], log, 120)
        prom = report / "lab_drill.prom"
        rules = report / "lab_alerts.yml"
        results["export"] = lab(["metrics", "export", str(report), "--textfile", str(prom)], log, 120)
        results["rules"] = lab(["metrics", "rules", str(report), "--out", str(rules)], log, 120)
        promtool = shutil.which("promtool")
        if promtool and prom.exists() and rules.exists():
            m = subprocess.run(
                [promtool, "check", "metrics"], stdin=prom.open(), capture_output=True, text=True
            )
            r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
            results["promtool"] = {
                "metrics_rc": m.returncode,
                "metrics_out": m.stdout + m.stderr,
                "rules_rc": r.returncode,
            }
        else:
            results["promtool"] = "promtool not found on this host: checked in CI instead"
        manifest = report / "manifest.json"
        if manifest.exists():
            m = json.loads(manifest.read_text())
            results["steps"] = {
                s["step"]: {
                    "status": s["status"],
                    "reason": s.get("reason"),
                    "duration_s": s.get("duration_s"),
                }
                for s in m["steps"]
            }
    summary = {
        "what": "issue 6 GPU evidence: full drill with the H100 profile, gate, calibration, Prometheus export",
        "report": str(report),
        "environment": fingerprint().model_dump(),
        "results": results,
    }
    (out_root / f"{run_id}.drill_gpu.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"summary: {out_root / f'{run_id}.drill_gpu.json'}")
    return results["drill"]["rc"]


if __name__ == "__main__":
    raise SystemExit(main())
