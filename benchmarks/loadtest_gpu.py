"""GPU evidence for issue 5 (run on the H100 host; about 5-8 minutes for llama-8b bf16):

  1. the playbook's fallback load test (20 s, 3 QPS, 4 new tokens, prompts 32-64) -> DIR/load_test.json
  2. the engine's OFFLINE tokens/s at batch 16: a closed batch of 16 requests submitted at once
  3. SERVED tokens/s at saturation: open-loop arrivals at 1.5x the offline request capacity
     (ratio served / offline; goal >= 0.9)                                  -> DIR/saturation/load_test.json
  4. a search for the highest QPS meeting the stated SLO (prompts 32-64, 128 new tokens;
     TTFT <= 500 ms and TPOT <= 50 ms for 99 % of requests, failures count) -> DIR/sweep/load_test.json

One engine (compiled and CUDA-graph captured once) serves every part. Everything lands in
DIR/loadtest_gpu.json with the environment fingerprint.

    python benchmarks/loadtest_gpu.py --out reports/examples/benchmarks/loadtest-h100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lab.engine.batching import EngineConfig
from lab.env import fingerprint
from lab.loadtest.runner import LoadTestConfig
from lab.loadtest.session import build_engine, describe, engine_info, offline_batch, run_loadtest
from lab.results import write_json


def main() -> int:
    ap = argparse.ArgumentParser(
        description="issue 5 GPU evidence: playbook load test, saturation, SLO sweep"
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--mode",
        default="compile-cudagraphs",
        help="eager, eager-cudagraphs, compile, compile-cudagraphs, regional, regional-cudagraphs",
    )
    ap.add_argument(
        "--max-seq-len",
        type=int,
        default=256,
        help="KV-cache length per slot (default 256: prompts <= 64 + up to 128 new tokens; lab serve uses 4096)",
    )
    ap.add_argument(
        "--kv-buckets",
        type=int,
        default=1,
        help="EngineConfig.kv_buckets (1: the decode reads the whole cache)",
    )
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--sweep-new-tokens", type=int, default=128)
    ap.add_argument("--sweep-duration", type=float, default=15.0)
    ap.add_argument("--sweep-max-runs", type=int, default=6)
    ap.add_argument("--slo-ttft-ms", type=float, default=500.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=50.0)
    ap.add_argument("--saturation-duration", type=float, default=20.0)
    args = ap.parse_args()
    out = Path(args.out)
    t_start = time.monotonic()
    ecfg = EngineConfig(
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        max_new_tokens=max(128, args.sweep_new_tokens),
        max_queue=64,
        queue_timeout_s=5.0,
        # Prompts are <= 64 tokens: prefill two of them per tick at the fixed compiled shape [2, 64].
        prefill_chunk_tokens=128,
        prefill_rows=2,
        mode=args.mode,
        kv_buckets=args.kv_buckets,
    )
    engine, prepared = build_engine(args.preset, args.model_path, args.device, args.dtype, 0, ecfg)
    engine.start(warmup=True)
    engine.ready.wait()
    if engine.crashed:
        print(f"engine failed: {engine.crashed}", file=sys.stderr)
        return 1
    info = engine_info(engine, prepared)
    print(
        f"engine ready: {args.preset} {args.dtype} {args.mode}, warm-up {engine.warmup_s:.1f} s", flush=True
    )
    result: dict = {"benchmark": "loadtest_gpu", "engine": info, "environment": fingerprint().model_dump()}
    try:
        # 1. The playbook's command, in-process.
        playbook = LoadTestConfig(
            duration_s=20,
            target_qps=3,
            max_new_tokens=4,
            prompt_len_min=32,
            prompt_len_max=64,
            progress=False,
        )
        art = run_loadtest(
            playbook,
            engine,
            output_json=out / "load_test.json",
            info=info,
            params={
                "playbook": "--duration 20 --target-qps 3 --max-new-tokens 4 "
                "--prompt-len-min 32 --prompt-len-max 64 --allow-smaller-world"
            },
        )
        print(describe(art, out / "load_test.json"), flush=True)
        result["playbook"] = art.summary

        # 2. Offline tokens/s at the same batch size (and the same request shape as the saturation run).
        offline_batch(engine, args.max_batch_size, 64, 16)  # settle allocator and clocks
        offline = offline_batch(engine, args.max_batch_size, 48, args.sweep_new_tokens)
        result["offline"] = offline
        print(
            f"offline batch {args.max_batch_size}: {offline['tokens_per_s_aggregate']:.0f} tok/s aggregate "
            f"(decode-only {offline['decode_tokens_per_s_aggregate']:.0f})",
            flush=True,
        )

        # 3. Served at saturation: 1.5x the offline request capacity.
        capacity_rps = offline["tokens_per_s_aggregate"] / args.sweep_new_tokens
        sat_cfg = LoadTestConfig(
            duration_s=args.saturation_duration,
            target_qps=round(1.5 * capacity_rps, 2),
            max_new_tokens=args.sweep_new_tokens,
            prompt_len_min=32,
            prompt_len_max=64,
            warmup_s=4.0,
            cooldown_s=2.0,
            slo_e2e_ms=None,
            progress=False,
        )
        sat = run_loadtest(sat_cfg, engine, output_json=out / "saturation" / "load_test.json", info=info)
        print(describe(sat, out / "saturation" / "load_test.json"), flush=True)
        served = sat.summary["output_tokens_per_s"]
        result["saturation"] = {
            "target_qps": sat_cfg.target_qps,
            "served_tokens_per_s": served,
            "offline_tokens_per_s": offline["tokens_per_s_aggregate"],
            "served_over_offline": served / offline["tokens_per_s_aggregate"] if served else None,
            "goal": ">= 0.9",
            "valid": sat.summary["valid"],
            "requests_ok": sat.summary["requests_ok"],
            "requests_rejected": sat.summary["requests_rejected"],
            "requests_timed_out": sat.summary["requests_timed_out"],
        }

        # 4. Capacity under the stated SLO.
        sweep_cfg = LoadTestConfig(
            duration_s=args.sweep_duration,
            target_qps=max(1.0, round(capacity_rps / 4, 1)),
            max_new_tokens=args.sweep_new_tokens,
            prompt_len_min=32,
            prompt_len_max=64,
            slo_ttft_ms=args.slo_ttft_ms,
            slo_tpot_ms=args.slo_tpot_ms,
            slo_e2e_ms=None,
            slo_attainment_target=0.99,
            progress=False,
        )
        sw = run_loadtest(
            sweep_cfg,
            engine,
            sweep="search",
            sweep_max_runs=args.sweep_max_runs,
            output_json=out / "sweep" / "load_test.json",
            info=info,
        )
        print(describe(sw, out / "sweep" / "load_test.json"), flush=True)
        result["sweep"] = {
            "slo": f"TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms for 99% of requests "
            f"(failures count), prompts 32-64, {args.sweep_new_tokens} new tokens",
            "max_qps_meeting_slo": sw.sweep["max_qps_meeting_slo"],
            "curve": sw.sweep["curve"],
        }
    except Exception as e:  # keep what was measured before the failure
        result["error"] = f"{type(e).__name__}: {e}"[:800]
        result["wall_s"] = time.monotonic() - t_start
        write_json(out / "loadtest_gpu.json", result)
        raise
    finally:
        engine.stop()
    result["wall_s"] = time.monotonic() - t_start
    write_json(out / "loadtest_gpu.json", result)
    s = result["saturation"]
    print(
        f"served/offline at batch {args.max_batch_size}: {s['served_tokens_per_s']:.0f} / "
        f"{s['offline_tokens_per_s']:.0f} tok/s = {s['served_over_offline']:.2f} (goal >= 0.9); "
        f"max QPS under SLO: {result['sweep']['max_qps_meeting_slo']}; wall {result['wall_s']:.0f} s -> "
        f"{out / 'loadtest_gpu.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
