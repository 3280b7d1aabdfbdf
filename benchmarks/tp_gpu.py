"""GPU evidence for issue 8 (tensor parallel under torchrun) on one multi-GPU host: correctness of TP=N
against TP=1, the hang-safety drills on NCCL (a killed and a hung rank), and the tier comparison (the same
warm-up and load at TP=N and on one GPU: tokens/s, p99 latency and tokens/joule as ratios).

    python benchmarks/tp_gpu.py --out reports/examples/h100x2-tp                 # TP = every visible GPU
    python benchmarks/tp_gpu.py --out DIR --steps correctness,drills             # one part at a time
    python benchmarks/tp_gpu.py --out DIR --steps tiers --tp 8                   # the 8-GPU tier (issue 11)

NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 are exported before anything starts; torchrun passes them to every rank).
Writes under --out: correctness.json, drills.json, tiers/ (tiers.json, tp<N>/, tp1/), flight_recorder/,
and tp_gpu.json (fingerprint, commands, exit codes, wall times, headline numbers). Budget: correctness +
drills about 3 minutes; each tier of the comparison about 4-5 minutes (three cold compiles of llama-8b:
warm-up decode, serving decode, fixed-shape prefill). Under a 10-minute limit per command run
`--steps correctness,drills`, then `--steps tier-multi`, then `--steps tier-fallback` (which compares).
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

MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
STEPS = ("correctness", "drills", "tiers", "tier-multi", "tier-fallback")
# (preset, dtype): float32 must match TP=1 token for token; bfloat16 is reported (reduction order differs).
CORRECTNESS_MODELS = (("llama-1b", "float32"), ("llama-8b", "bfloat16"))
NEW_TOKENS = 32


def _env(out: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MODEL_PATH", None)
    env.update(MULTICAST_OFF)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["LAB_FLIGHT_RECORDER_DIR"] = str(out / "flight_recorder")
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout_s: float, log: Path) -> dict:
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout_s)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall_s = round(time.perf_counter() - t0, 1)
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = ("lab:", "Watchdog", "rank      :", "exitcode", "Error", "error")
    print(f"  -> exit {rc} in {wall_s} s (log {log})", flush=True)
    return {
        "command": cmd,
        "exit_code": rc,
        "wall_s": wall_s,
        "log": log.name,
        "tail": lines[-15:],
        "lines": [x[:400] for x in lines if any(k in x for k in keep)][-20:],
    }


def _first_gpu() -> str:
    """The fallback's single GPU: the first visible one (the playbook's CUDA_VISIBLE_DEVICES=0)."""
    visible = [x for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return visible[0] if visible else "0"


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


# --- correctness: TP=N against TP=1 -------------------------------------------------------------------


def worker(out: Path, n: int, device: str, models) -> None:
    """Under torchrun: generate greedily with each correctness model; rank 0 saves tokens and logits."""
    import torch

    from lab.distributed import is_rank0, prepare_tp
    from lab.engine.generate import Generator

    for preset, dtype in models:
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, 500, (2, 16), generator=g)
        p = prepare_tp(preset, None, device, dtype, 0, 2, 16 + NEW_TOKENS, n)
        gen = Generator(p.model, "eager", 2, 16 + NEW_TOKENS)
        gen.generate(prompt, 4)  # untimed
        res = gen.generate(prompt, NEW_TOKENS, keep_logits=True)
        if is_rank0():
            torch.save(
                {
                    "tokens": res.tokens,
                    "logits": torch.stack(res.logits),
                    "decode_ms_per_token": res.decode_s / max(1, len(res.decode_step_s)) * 1e3,
                },
                out / f"tp{n}_{preset}_{dtype}.pt",
            )
        del gen, p
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def correctness(out: Path, n: int, timeout_s: float, device: str, models) -> dict:
    import shutil
    import tempfile

    import torch

    d = out / "correctness"
    d.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="tp_gpu_"))  # tokens + logits (tens of MB): compared, not kept
    me = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--out",
        str(scratch),
        "--device",
        device,
    ]
    me += ["--correctness-models", ",".join(f"{p}:{t}" for p, t in models)]
    runs = {
        f"tp{n}": _run([*_torchrun(n), *me[1:], "--tp", str(n)], _env(out), timeout_s, d / f"tp{n}.log"),
        "tp1": _run(
            [*_torchrun(1), *me[1:], "--tp", "1"],
            _env(out, CUDA_VISIBLE_DEVICES=_first_gpu()),
            timeout_s,
            d / "tp1.log",
        ),
    }
    results = {}
    for preset, dtype in models:
        try:
            a = torch.load(scratch / f"tp{n}_{preset}_{dtype}.pt", weights_only=True)
            b = torch.load(scratch / f"tp1_{preset}_{dtype}.pt", weights_only=True)
        except FileNotFoundError as e:
            results[f"{preset}/{dtype}"] = {"error": f"missing result: {e.filename}"}
            continue
        same = a["tokens"] == b["tokens"]
        mismatch = (~same).nonzero()
        # Logits while the two runs still see the same tokens (after a divergence the inputs differ).
        upto = int(mismatch[:, 1].min()) + 1 if mismatch.numel() else a["logits"].shape[0]
        la, lb = a["logits"][:upto].float(), b["logits"][:upto].float()
        results[f"{preset}/{dtype}"] = {
            "tokens_equal": bool(same.all()),
            "token_match_fraction": float(same.float().mean()),
            "first_divergence_step": None if not mismatch.numel() else int(mismatch[:, 1].min()),
            "logits_max_abs_diff": float((la - lb).abs().max()),
            "logits_std": float(lb.std()),
            "argmax_agreement_same_inputs": float((la.argmax(-1) == lb.argmax(-1)).float().mean()),
            f"decode_ms_per_token_tp{n}_eager": a["decode_ms_per_token"],
            "decode_ms_per_token_tp1_eager": b["decode_ms_per_token"],
        }
    shutil.rmtree(scratch, ignore_errors=True)
    exact = [v.get("tokens_equal") for k, v in results.items() if k.endswith("/float32")]
    ok = all(r["exit_code"] == 0 for r in runs.values()) and exact and all(exact)
    return {"ok": bool(ok), "tp": n, "new_tokens": NEW_TOKENS, "runs": runs, "models": results}


# --- drills: a killed and a hung rank on NCCL --------------------------------------------------------------


def drills(out: Path, n: int, timeout_s: float, deadline_s: int, device: str) -> dict:
    d = out / "drills"
    d.mkdir(parents=True, exist_ok=True)
    res = {}
    for kind in ("kill", "hang"):
        cmd = [*_torchrun(n), "-m", "lab", "generate", "--tensor-parallel-gpus", str(n), "--preset", "tiny"]
        cmd += ["--device", device, "--prompt-ids", "1,2,3,4", "--max-new-tokens", "500"]
        env = _env(out, LAB_INJECT_FAULT=f"{kind}:rank=1:step=5", LAB_DIST_TIMEOUT_S=str(deadline_s))
        r = _run(cmd, env, timeout_s, d / f"{kind}.log")
        text = "\n".join(r["lines"])
        r["ended_within_deadline_plus_60s"] = r["exit_code"] not in (0, 124) and r["wall_s"] < deadline_s + 60
        r["names_rank_1"] = "rank 1" in text or "rank      : 1" in text
        res[kind] = r
    fr = (
        sorted(p.name for p in (out / "flight_recorder").glob("*"))
        if (out / "flight_recorder").exists()
        else []
    )
    return {"deadline_s": deadline_s, "drills": res, "flight_recorder_files": fr}


# --- the tier comparison ---------------------------------------------------------------------------------


def tiers(
    out: Path, n: int, preset: str, timeout_s: float, qps: float, device: str, only: str | None
) -> dict:
    d = out / "tiers"
    cmd = [sys.executable, "-m", "lab", "compare-tiers", "--preset", preset, "--tensor-parallel-gpus", str(n)]
    cmd += ["--device", device] + (["--only", only] if only else [])
    cmd += ["--out", str(d), "--iters", "3", "--warmup", "1", "--prompt-len", "128", "--max-new-tokens", "64"]
    cmd += ["--duration", "20", "--target-qps", str(qps), "--load-max-new-tokens", "128"]
    cmd += ["--prompt-len-min", "32", "--prompt-len-max", "64", "--max-batch-size", "16"]
    cmd += ["--compile-cache-dir", str(ROOT / ".compile-cache"), "--tier-timeout-s", str(timeout_s / 2)]
    d.mkdir(parents=True, exist_ok=True)
    r = _run(cmd, _env(out), timeout_s, d / f"compare-tiers{'-' + only if only else ''}.log")
    try:
        t = json.loads((d / "tiers.json").read_text())
        r["summary"] = t.get("summary")
        r["status"], r["reason"] = t.get("status"), t.get("reason")
    except (OSError, json.JSONDecodeError) as e:
        r["summary"], r["status"], r["reason"] = None, "failed", f"no tiers.json: {e}"
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=None, help="GPUs of the multi-GPU tier (default: all visible)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    ap.add_argument("--preset", default="llama-8b", help="model of the tier comparison (default llama-8b)")
    ap.add_argument("--target-qps", type=float, default=8.0, help="load of the tier comparison (default 8)")
    ap.add_argument(
        "--deadline-s", type=int, default=20, help="collective deadline in the drills (default 20)"
    )
    ap.add_argument(
        "--device", default="cuda", help="cuda (default); cpu runs a gloo smoke test of this script"
    )
    ap.add_argument(
        "--correctness-models",
        default=",".join(f"{p}:{t}" for p, t in CORRECTNESS_MODELS),
        help="preset:dtype list for the correctness step (float32 ones must match TP=1 exactly)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out).resolve()
    models = [tuple(x.split(":", 1)) for x in a.correctness_models.split(",") if x]
    if a.worker:
        worker(out, a.tp, a.device, models)
        return 0
    os.environ.update(MULTICAST_OFF)
    import torch

    from lab.env import fingerprint

    n = a.tp or torch.cuda.device_count()
    if n < 2 and a.device == "cuda":
        print(f"tp_gpu: needs at least 2 GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    steps = [s for s in a.steps.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        print(f"tp_gpu: unknown steps {bad}; choose from {STEPS}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "tp_gpu.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update(fingerprint=fingerprint().model_dump(), tp=n, multicast_env=MULTICAST_OFF)
    t0 = time.perf_counter()
    if "correctness" in steps:
        summary["correctness"] = correctness(out, n, 300, a.device, models)
        (out / "correctness.json").write_text(json.dumps(summary["correctness"], indent=2))
    if "drills" in steps:
        summary["drills"] = drills(out, n, 150, a.deadline_s, a.device)
        (out / "drills.json").write_text(json.dumps(summary["drills"], indent=2))
    for step, only in (("tiers", None), ("tier-multi", "multi"), ("tier-fallback", "fallback")):
        if step in steps:  # tier-multi then tier-fallback: one tier per call under a 10-minute limit
            summary[step] = tiers(out, n, a.preset, 1200, a.target_qps, a.device, only)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "fingerprint"}, indent=1, default=str)[-6000:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
