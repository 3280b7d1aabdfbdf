"""Issue 9 on a GPU: provoke real out-of-memory errors and check each is reported, not a crash.

A ballast process takes the card's memory down to --leave-gb free (another tenant on the card: the
memory plan covers only our process, so the shapes below "fit" on paper). Then, each as its own CLI run:

  warmup-oversized    `lab warmup` llama-8b, batch 16 x 2048-token prompts: the KV cache (~9 GB) does not
                      fit what is left -> exit 1, warmup.json failed, reason with the plan and free memory
  loadtest-oversized  `lab loadtest` llama-8b, max batch 16, max seq 2048 + 128: OOM in the engine's warm-up
                      -> exit 1, load_test.json failed with the plan, every request accounted for
  load-no-room        `lab warmup` with the ballast raised to leave less than the weights: OOM while
                      loading the model -> exit 1, failed artifact naming "loading the model"
  recovered           ballast gone: `lab warmup` llama-8b eager runs ok (nothing left behind)

    python benchmarks/oom_gpu.py --out DIR        # on the GPU host, about 3 minutes
Writes DIR/oom_gpu.json (fingerprint, per-case exit code, status, reason, wall time, checks) and the
artifacts under DIR/<case>/; prints a table last.
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
BALLAST = """
import sys, time, torch
leave = float(sys.argv[1]) * 1e9
free, total = torch.cuda.mem_get_info()
take = max(0, int(free - leave))
blocks = []
while take > 0:  # in 1 GiB pieces so the allocator can place them
    n = min(take, 1 << 30)
    blocks.append(torch.empty(n, dtype=torch.uint8, device="cuda"))
    take -= n
torch.cuda.synchronize()
print(f"ballast holds {sum(b.numel() for b in blocks) / 1e9:.1f} GB; "
      f"free now {torch.cuda.mem_get_info()[0] / 1e9:.1f} GB", flush=True)
time.sleep(3600)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MODEL_PATH", None)
    return env


class Ballast:
    def __init__(self, leave_gb: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BALLAST, str(leave_gb)], stdout=subprocess.PIPE, text=True, env=_env()
        )
        self.line = self.proc.stdout.readline().strip()  # waits until the memory is held
        print(self.line, flush=True)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_case(name: str, argv: list[str], out: Path, artifact: str, timeout_s: float) -> dict:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lab", *argv, "--output-json", str(d / artifact)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout_s)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = 124, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else ""
    (d / "stderr.log").write_text(err)
    res: dict = {"command": cmd[1:], "exit_code": rc, "wall_s": round(time.perf_counter() - t0, 1)}
    res["traceback"] = "Traceback (most recent call last)" in err
    try:
        art = json.loads((d / artifact).read_text())
        res["status"], res["reason"] = art.get("status"), art.get("reason")
        s = art.get("summary") or {}
        if "requests_sent" in s:
            parts = ("requests_ok", "requests_rejected", "requests_timed_out", "requests_errored")
            res["accounted"] = sum(s.get(k) or 0 for k in parts) + (s.get("requests_cancelled") or 0)
            res["requests_sent"] = s["requests_sent"]
    except (OSError, json.JSONDecodeError) as e:
        res["status"], res["reason"] = None, f"no artifact: {e}"
    print(f"  -> exit {rc}, {res['status']}: {(res['reason'] or '')[:300]}", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument(
        "--leave-gb", type=float, default=20.0, help="free memory the ballast leaves (default 20)"
    )
    ap.add_argument("--no-room-gb", type=float, default=6.0, help="free memory for the load-no-room case")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("oom_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    from lab.env import fingerprint

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ["--preset", a.preset, "--device", "cuda"]
    res: dict = {"fingerprint": fingerprint().model_dump(mode="json"), "leave_gb": a.leave_gb, "cases": {}}
    cases = res["cases"]
    b = Ballast(a.leave_gb)
    try:
        res["ballast"] = b.line
        cases["warmup-oversized"] = run_case(
            "warmup-oversized",
            ["warmup", *model, "--batch-size", "16", "--prompt-len", "2048", "--max-new-tokens", "64"]
            + ["--mode", "eager", "--iters", "1", "--no-roofline"],
            out,
            "warmup.json",
            300,
        )
        cases["loadtest-oversized"] = run_case(
            "loadtest-oversized",
            [
                "loadtest",
                *model,
                "--max-batch-size",
                "16",
                "--max-seq-len",
                "2176",
                "--prompt-len-min",
                "1024",
            ]
            + ["--prompt-len-max", "2048", "--max-new-tokens", "128", "--duration", "10", "--target-qps", "4"]
            + ["--mode", "eager", "--allow-smaller-world", "--no-progress"],
            out,
            "load_test.json",
            300,
        )
    finally:
        b.stop()
    b = Ballast(a.no_room_gb)
    try:
        cases["load-no-room"] = run_case(
            "load-no-room", ["warmup", *model, "--mode", "eager", "--no-roofline"], out, "warmup.json", 300
        )
    finally:
        b.stop()
    cases["recovered"] = run_case(
        "recovered", ["warmup", *model, "--mode", "eager", "--no-roofline"], out, "warmup.json", 300
    )
    checks = {}
    for name in ("warmup-oversized", "loadtest-oversized", "load-no-room"):
        c = cases[name]
        checks[name] = (
            c["exit_code"] == 1
            and c["status"] == "failed"
            and "out of memory" in (c["reason"] or "")
            and "memory plan" in (c["reason"] or "")
            and not c["traceback"]
            and c.get("accounted", 0) == c.get("requests_sent", 0)
        )
    checks["recovered"] = cases["recovered"]["exit_code"] == 0 and cases["recovered"]["status"] == "ok"
    res["checks"], res["ok"] = checks, all(checks.values())
    (out / "oom_gpu.json").write_text(json.dumps(res, indent=1))
    print(f"\n{'case':22s} {'exit':>4s} {'status':8s} {'wall s':>7s} check")
    for name, c in cases.items():
        print(f"{name:22s} {c['exit_code']:4d} {str(c['status']):8s} {c['wall_s']:7.1f} {checks[name]}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
