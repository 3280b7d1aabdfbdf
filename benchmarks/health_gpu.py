"""GPU evidence for `lab health` (issue 3). Runs the real CLI on this host and writes every artifact to --out:

  health.json / health.txt          the real NVML path (inventory, NVLink, ECC, clocks, PCIe, XIDs), exit code
  with 2+ GPUs additionally:
  health_nccl_hang.json             LAB_PROBE_FAULT=hang:1: a rank sleeps past --collective-timeout-s -> nccl_hang, exit 3
  health_rank_died.json             LAB_PROBE_FAULT=die:1: a rank exits mid-probe -> nccl_hang, exit 3
  health_p2p_disabled.json          NCCL_P2P_DISABLE=1 left over: nccl_env warns, bus bandwidth without CUDA P2P
  health_gpu_bench.json             fingerprint, exit codes, wall times, probe bus bandwidths (P2P on / off as a ratio
                                    from the same run) and a check that no probe process outlived any run

    python benchmarks/health_gpu.py --out reports/examples/health-h100x1     # one H100
    python benchmarks/health_gpu.py --out reports/examples/health-h100x2     # two H100s (NCCL probe)

NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set in every probe child
(lab.health.probe.CHILD_ENV) and exported here too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.env import fingerprint  # noqa: E402
from lab.health.probe import CHILD_ENV  # noqa: E402
from lab.results import write_json  # noqa: E402


def leftover_probe_processes() -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "lab.health.probe_worker" in cmd:
            found.append(f"{p.info['pid']}: {cmd[:200]}")
    return found


def run_health(out: Path, name: str, extra_env: dict[str, str], argv: list[str], limit_s: float) -> dict:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    env.update(extra_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    art_path = out / f"{name}.json"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "lab", "health", "--output-json", str(art_path), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=limit_s,
    )
    wall_s = time.monotonic() - t0
    (out / f"{name}.txt").write_text(r.stdout + ("\n[stderr]\n" + r.stderr if r.stderr else ""))
    rec: dict = {
        "name": name,
        "argv": ["lab", "health", *argv],
        "env": extra_env,
        "exit_code": r.returncode,
        "wall_s": round(wall_s, 3),
        "leftover_probe_processes": leftover_probe_processes(),
    }
    if art_path.exists():
        art = json.loads(art_path.read_text())
        rec.update(
            decision=art["decision"],
            collective=art.get("collective"),
            summary=art["summary"],
            non_ok_checks=[c for c in art["checks"] if c["status"] in ("warn", "fail")],
        )
    print(
        f"{name}: exit {r.returncode} in {wall_s:.1f} s; triggers {rec.get('decision', {}).get('triggers')}"
    )
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the artifacts")
    ap.add_argument(
        "--timeout-s", type=float, default=60.0, help="--collective-timeout-s for the healthy runs"
    )
    ap.add_argument(
        "--fault-timeout-s", type=float, default=20.0, help="--collective-timeout-s for the hang rehearsal"
    )
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(CHILD_ENV)

    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    runs = [run_health(out, "health", {}, ["--collective-timeout-s", str(a.timeout_s)], a.timeout_s + 240)]
    if n >= 2:
        ft = ["--collective-timeout-s", str(a.fault_timeout_s), "--world-size", "2"]
        runs.append(
            run_health(out, "health_nccl_hang", {"LAB_PROBE_FAULT": "hang:1"}, ft, a.fault_timeout_s + 240)
        )
        runs.append(
            run_health(out, "health_rank_died", {"LAB_PROBE_FAULT": "die:1"}, ft, a.fault_timeout_s + 240)
        )
        runs.append(
            run_health(
                out,
                "health_p2p_disabled",
                {"NCCL_P2P_DISABLE": "1"},
                ["--collective-timeout-s", str(a.timeout_s)],
                a.timeout_s + 240,
            )
        )

    def busbw(name: str):
        r = next((r for r in runs if r["name"] == name), None)
        return ((r or {}).get("collective") or {}).get("busbw_gbps")

    on, off = busbw("health"), busbw("health_p2p_disabled")
    result = {
        "kind": "health_gpu_bench",
        "environment": fingerprint().model_dump(),
        "cuda_gpus": n,
        "runs": runs,
        "busbw_gbps_p2p_on": on,
        "busbw_gbps_p2p_disabled": off,
        "p2p_disabled_over_on": round(off / on, 3) if on and off else None,
        "no_probe_process_left": all(not r["leftover_probe_processes"] for r in runs),
        "expected": {
            "health": "exit 0 (healthy) or 3 (a real trigger fired; see decision)",
            "health_nccl_hang": "exit 3, triggers [nccl_hang], collective.outcome hang, wall < timeout + start-up",
            "health_rank_died": "exit 3, triggers [nccl_hang], collective.outcome rank_failed, well before the timeout",
            "health_p2p_disabled": "nccl_env warn with the unset line in fix_commands",
        },
    }
    write_json(out / "health_gpu_bench.json", result)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "cuda_gpus",
                    "busbw_gbps_p2p_on",
                    "busbw_gbps_p2p_disabled",
                    "p2p_disabled_over_on",
                    "no_probe_process_left",
                )
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
