"""GPU evidence for issue 4: the playbook's warm-up command (cold compile cache, then a restart that
loads it) and `lab compare`, for llama-8b in bf16 on one GPU. Writes every artifact under --out plus
summary.json (fingerprint, commands, exit codes, wall times, the headline numbers).

    python benchmarks/warmup_compare_gpu.py --out reports/examples/h100-llama8b-warmup
    python benchmarks/warmup_compare_gpu.py --out DIR --steps compare     # one step at a time

About 6-8 minutes on an H100 (two cold compiles dominate). Each step runs as its own process, the way an
operator runs it, so the restart really is a new process reading the compile cache from disk.
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

STEPS = ("warmup", "restart", "compare")


def run_step(name: str, argv: list[str], out: Path, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "lab", *argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = 124, e.stdout or "", (e.stderr or "") + f"\ntimed out after {timeout_s} s"
        stdout = stdout if isinstance(stdout, str) else stdout.decode(errors="replace")
        stderr = stderr if isinstance(stderr, str) else stderr.decode(errors="replace")
    wall_s = time.perf_counter() - t0
    (out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    print(stdout[-3000:], flush=True)
    if rc:
        print(stderr[-3000:], file=sys.stderr, flush=True)
    return {"command": " ".join(["lab", *argv]), "rc": rc, "wall_s": wall_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the artifacts")
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument(
        "--methods",
        default="eager,eager-cudagraph,compile,reduce-overhead,flex-attention",
        help="methods for lab compare (add max-autotune if there is time: about +5 min)",
    )
    ap.add_argument("--timeout-s", type=float, default=420, help="per step")
    a = ap.parse_args()
    steps = [s for s in a.steps.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        ap.error(f"unknown step(s) {bad}; choose from {STEPS}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "compile-cache"
    model = ["--preset", a.preset, "--dtype", a.dtype, "--device", "cuda"]
    playbook = ["warmup", "--iters", "3", "--warmup", "1", "--tensor-parallel-gpus", "1"]
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"steps": {}}

    from lab.env import fingerprint

    summary["environment"] = fingerprint().model_dump()
    summary["note"] = "random weights (no checkpoint); batch 1, prompt 128, 128 new tokens; see the artifacts"
    if "warmup" in steps:
        # The cold run: a fresh cache directory, so the compile is the first one this card has seen.
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        summary["steps"]["warmup"] = run_step(
            "warmup",
            [
                *playbook,
                "--output-json",
                str(out / "fallback_benchmark.json"),
                *model,
                "--compile-cache-dir",
                str(cache),
            ],
            out,
            a.timeout_s,
        )
    if "restart" in steps:
        summary["steps"]["restart"] = run_step(
            "restart",
            [
                *playbook,
                "--output-json",
                str(out / "fallback_benchmark_restart.json"),
                *model,
                "--compile-cache-dir",
                str(cache),
            ],
            out,
            a.timeout_s,
        )
    if "compare" in steps:
        # max_new_tokens 128 keeps the cache length (256) equal to the warm-up's, so reduce-overhead
        # loads the warm-up's compiled graph from the cache.
        summary["steps"]["compare"] = run_step(
            "compare",
            [
                "compare",
                *model,
                "--methods",
                a.methods,
                "--prompt-len",
                "128",
                "--max-new-tokens",
                "128",
                "--iters",
                "5",
                "--output-json",
                str(out / "compare.json"),
                "--compile-cache-dir",
                str(cache),
            ],
            out,
            a.timeout_s,
        )
    summary["headline"] = headline(out)
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary["headline"], indent=2))
    return max((s["rc"] for s in summary["steps"].values()), default=0)


def headline(out: Path) -> dict:
    h: dict = {}
    for name in ("fallback_benchmark.json", "fallback_benchmark_restart.json"):
        p = out / name
        if p.exists():
            s = json.loads(p.read_text()).get("summary", {})
            h[name] = {
                k: s.get(k)
                for k in (
                    "ttft_ms_p50",
                    "ttft_ms_p99",
                    "decode_ms_per_token_p50",
                    "decode_ms_per_token_p99",
                    "decode_tokens_per_s",
                    "peak_memory_gb",
                    "compile_s",
                    "compile_s_cold",
                    "compile_s_warm",
                    "compile_cache_hit",
                    "power_w_mean",
                    "energy_j",
                    "tokens_per_joule",
                    "mbu",
                    "copy_bandwidth_gb_s",
                )
            }
    p = out / "compare.json"
    if p.exists():
        art = json.loads(p.read_text())
        h["compare"] = {
            m["name"]: {
                "status": m["status"],
                "reason": m.get("reason"),
                "decode_ms_per_token_p50": (m.get("decode_ms_per_token") or {}).get("p50"),
                "speedup_vs_eager": m.get("speedup_vs_eager"),
                "compile_s": m.get("compile_s"),
                "max_logit_diff": m.get("max_logit_diff"),
                "greedy_token_agreement": m.get("greedy_token_agreement"),
                "correct": m.get("correct"),
            }
            for m in art.get("methods", [])
        }
    return h


if __name__ == "__main__":
    raise SystemExit(main())
