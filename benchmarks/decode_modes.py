"""Decode tokens/s per generation mode (issue 2): presets x batches x modes on one GPU, with the
copy bandwidth measured in the same run and MBU computed as MEASUREMENT.md says.

For every (preset, mode, batch): decode tokens/s per user and aggregate (median and p10/p90 of repeats,
CUDA events per step), per-step time percentiles, time to first token, compile time (cold: a fresh,
empty inductor + triton cache for every configuration; warm: recompiled after a dynamo reset with that
cache filled) and CUDA-graph capture time, each separately, and the peak memory. Timed windows forbid
recompiles.

    python benchmarks/decode_modes.py --out DIR                       # on the GPU host (defaults below)
    python benchmarks/decode_modes.py --presets tiny --device cpu --dtype float32 --modes eager --out DIR

Writes DIR/decode_modes.json (an artifact with the environment fingerprint) and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _list(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--presets", type=_list(str), default=["llama-1b", "llama-8b"])
    ap.add_argument("--batches", type=_list(int), default=[1, 16])
    ap.add_argument("--modes", type=_list(str), default=["eager", "compile", "compile-cudagraphs"])
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per timed call")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per configuration")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--warm-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a recompile with the warm inductor cache (compiled modes, first batch size)",
    )
    ap.add_argument(
        "--compile-cache",
        default=None,
        help="share this inductor/triton cache directory across configurations (default: a fresh empty one "
        "per configuration, so compile_cold_s is truly cold)",
    )
    ap.add_argument(
        "--time-budget-s",
        type=float,
        default=420.0,
        help="configurations not started within this many seconds are recorded as skipped",
    )
    ap.add_argument("--out", required=True, help="output directory for decode_modes.json")
    a = ap.parse_args(argv)
    for name in ("new_tokens", "prompt_len", "repeats"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in a.batches):
        ap.error("--batches must be positive")
    return a


def _pct(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of the repeats."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def compile_cache(directory: Path) -> Iterator[None]:
    """Point inductor and triton (and inductor's compile workers, which receive these variables with each
    task) at `directory`, clearing inductor's in-memory caches on the way in and out."""
    try:
        from torch._inductor.utils import clear_caches
    except ImportError:  # very old torch: the environment alone has to do

        def clear_caches() -> None:
            return None

    keys = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
    clear_caches()
    try:
        yield
    finally:
        clear_caches()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_config(
    prepared, mode: str, batch: int, a: argparse.Namespace, bandwidth: float | None
) -> dict[str, Any]:
    """One (model, mode, batch): warm-up (compile, capture), then timed repeats with recompiles forbidden."""
    import torch

    from lab.bench.roofline import decode_bytes_per_step, mbu
    from lab.engine.generate import Generator, no_recompile
    from lab.model import dtype_name
    from lab.stats import summarize

    model, device, args = prepared.model, prepared.device, prepared.spec.args
    seq = a.prompt_len + a.new_tokens
    torch._dynamo.reset()
    model.max_batch_size = 0  # a fresh static cache of exactly this shape
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    gen = Generator(model, mode, batch, seq)
    prompt = torch.randint(
        0, args.vocab_size, (batch, a.prompt_len), generator=torch.Generator().manual_seed(0)
    )

    def timed_call(g: Generator):
        _sync(device)
        t0 = time.perf_counter()
        r = g.generate(prompt, a.new_tokens)
        _sync(device)
        return r, time.perf_counter() - t0

    # Call 1 compiles the decode step (cold cache); calls 2-3 record the CUDA graphs (reduce-overhead
    # needs 3 untimed calls per shape) and settle the allocator.
    _, first_call_s = timed_call(gen)
    _, second_call_s = timed_call(gen)
    _, third_call_s = timed_call(gen)

    per_user, ttft_s, call_s, steps_s = [], [], [], []
    with no_recompile():
        for _ in range(a.repeats):
            r, wall_s = timed_call(gen)
            n = len(r.decode_step_s)
            per_user.append(n / r.decode_s)
            ttft_s.append(r.prefill_s)
            call_s.append(wall_s)
            steps_s.extend(r.decode_step_s)
    steady_call_s = statistics.median(call_s)
    row: dict[str, Any] = {
        "status": "ok",
        "mode": mode,
        "batch": batch,
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "kv_len_allocated": seq,
        "repeats": a.repeats,
        "decode_tokens_per_s_per_user": statistics.median(per_user),
        "decode_tokens_per_s_per_user_p10": _pct(per_user, 10),
        "decode_tokens_per_s_per_user_p90": _pct(per_user, 90),
        "decode_tokens_per_s_aggregate": statistics.median(per_user) * batch,
        "decode_tokens_per_s_aggregate_p10": _pct(per_user, 10) * batch,
        "decode_tokens_per_s_aggregate_p90": _pct(per_user, 90) * batch,
        "decode_step_ms": {
            k: (v * 1e3 if isinstance(v, float) else v) for k, v in summarize(steps_s).items()
        },
        "ttft_ms": statistics.median(ttft_s) * 1e3,
        "ttft_ms_p10": _pct(ttft_s, 10) * 1e3,
        "ttft_ms_p90": _pct(ttft_s, 90) * 1e3,
        "steady_call_s": steady_call_s,
        "first_call_s": first_call_s,
        # Compile and capture beyond what a steady call costs (0 for eager up to noise).
        "compile_cold_s": max(0.0, first_call_s - steady_call_s) if mode != "eager" else None,
        "cudagraph_capture_s": max(0.0, second_call_s + third_call_s - 2 * steady_call_s)
        if mode == "compile-cudagraphs"
        else None,
        "compile_warm_s": None,
        "tokens_sample": r.tokens[0, :8].tolist(),
    }
    step_s = 1.0 / row["decode_tokens_per_s_per_user"]
    bytes_per_step = decode_bytes_per_step(args, dtype_name(prepared.dtype), batch, seq)
    row["bytes_per_step"] = bytes_per_step
    row["achieved_bandwidth_gb_s"] = bytes_per_step / step_s / 1e9
    row["mbu"] = mbu(bytes_per_step, step_s, bandwidth) if bandwidth else None
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9

    if a.warm_compile and mode != "eager" and batch == a.batches[0]:
        torch._dynamo.reset()  # in-memory graphs gone; the on-disk inductor cache stays warm
        warm = Generator(model, mode, batch, seq)
        _, warm_first_s = timed_call(warm)
        row["compile_warm_s"] = max(0.0, warm_first_s - steady_call_s)
        del warm
    del gen
    return row


def table(rows: list[dict[str, Any]], card: str) -> str:
    head = f"{'preset':<10} {'mode':<19} {'b':>3} {'tok/s/user':>11} {'tok/s agg':>10} {'ttft ms':>8} "
    head += f"{'MBU':>6} {'cold s':>7} {'warm s':>7} {'graph s':>7}"
    lines = [f"decode_modes on {card}", head]

    def f(v, fmt):
        width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()) or 0)
        return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(width)

    for r in rows:
        if r.get("status") != "ok":
            lines.append(
                f"{r['preset']:<10} {r['mode']:<19} {r['batch']:>3} {r['status']}: {r.get('reason', '')}"
            )
            continue
        lines.append(
            f"{r['preset']:<10} {r['mode']:<19} {r['batch']:>3} {f(r['decode_tokens_per_s_per_user'], '11.1f')} "
            f"{f(r['decode_tokens_per_s_aggregate'], '10.1f')} {f(r['ttft_ms'], '8.1f')} "
            f"{f(r['mbu'], '6.1%')} {f(r['compile_cold_s'], '7.1f')} {f(r['compile_warm_s'], '7.1f')} "
            f"{f(r['cudagraph_capture_s'], '7.1f')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch
    from pydantic import Field

    from lab.bench.roofline import decode_mfu, measure_copy_bandwidth, measure_matmul_flops
    from lab.engine.generate import MODES, check_mode
    from lab.errors import LabError
    from lab.model import prepare, resolve_device
    from lab.results import Artifact, new_artifact, recording

    class DecodeModes(Artifact):
        kind: str = "decode_modes"
        rows: list[dict[str, Any]] = Field(default_factory=list)

    out_path = Path(a.out) / "decode_modes.json"
    params = {k: v for k, v in vars(a).items() if k != "out"}
    # Decode speed does not depend on the weights' values: presets with seeded random weights, always.
    ignored = os.environ.pop("MODEL_PATH", None)
    if ignored:
        params["model_path_env_ignored"] = ignored
    params["compile_cache_state"] = (
        "shared across configurations (user-given): later compiles may reuse earlier kernels"
        if a.compile_cache
        else "fresh and empty per configuration: compile_cold_s is a cold compile"
    )
    artifact = new_artifact(DecodeModes, params)
    try:
        device = resolve_device(a.device)
        for m in a.modes:
            check_mode(m, device)
    except LabError as e:
        print(f"decode_modes: error: {e} (modes: {', '.join(MODES)})", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    cache_root = Path(a.compile_cache) if a.compile_cache else Path(tempfile.mkdtemp(prefix="decode_modes_"))
    try:
        with recording(artifact, out_path):
            bandwidth = peak_flops = None
            card = "cpu"
            if device.type == "cuda":
                card = torch.cuda.get_device_name(device)
                bandwidth = measure_copy_bandwidth(device)
                peak_flops = measure_matmul_flops(device)
                artifact.summary["copy_bandwidth_gb_s"] = bandwidth / 1e9
                artifact.summary["matmul_bf16_tflops"] = peak_flops / 1e12
            else:
                for k in ("copy_bandwidth_gb_s", "matmul_bf16_tflops", "mbu", "mfu"):
                    artifact.unavailable[k] = "measured on a CUDA device only; this run is on the CPU"
            artifact.summary["card"] = card
            for preset in a.presets:
                remaining = [(m, b) for m in a.modes for b in a.batches]
                if time.perf_counter() - t_start > a.time_budget_s:
                    for m, b in remaining:
                        artifact.rows.append(
                            dict(preset=preset, mode=m, batch=b, status="skipped", reason="time budget spent")
                        )
                    continue
                try:
                    prepared = prepare(
                        preset, None, str(device), a.dtype, 0, max(a.batches), a.prompt_len + a.new_tokens
                    )
                except LabError as e:
                    for m, b in remaining:
                        artifact.rows.append(
                            dict(preset=preset, mode=m, batch=b, status="failed", reason=str(e))
                        )
                    continue
                for m, b in remaining:
                    base = dict(preset=preset, dtype=a.dtype, params=prepared.spec.args.num_params())
                    if time.perf_counter() - t_start > a.time_budget_s:
                        artifact.rows.append(
                            base | dict(mode=m, batch=b, status="skipped", reason="time budget spent")
                        )
                        continue
                    print(
                        f"[{time.perf_counter() - t_start:6.0f}s] {preset} {m} batch {b}",
                        file=sys.stderr,
                        flush=True,
                    )
                    cache_dir = cache_root if a.compile_cache else cache_root / f"{preset}-{m}-b{b}"
                    try:
                        with compile_cache(cache_dir):
                            row = base | run_config(prepared, m, b, a, bandwidth)
                    except torch.OutOfMemoryError as e:
                        row = base | dict(
                            mode=m, batch=b, status="failed", reason=f"out of memory: {str(e)[:200]}"
                        )
                    finally:
                        if not a.compile_cache:
                            shutil.rmtree(cache_dir, ignore_errors=True)
                    if row.get("status") == "ok":
                        if peak_flops:
                            row["mfu"] = decode_mfu(
                                row["params"], row["decode_tokens_per_s_aggregate"], peak_flops
                            )
                        key = f"{preset}/{m}/b{b}"
                        artifact.summary[f"{key}/decode_tokens_per_s_per_user"] = row[
                            "decode_tokens_per_s_per_user"
                        ]
                        artifact.summary[f"{key}/decode_tokens_per_s_aggregate"] = row[
                            "decode_tokens_per_s_aggregate"
                        ]
                        artifact.summary[f"{key}/mbu"] = row["mbu"]
                    artifact.rows.append(row)
                del prepared
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            artifact.summary["wall_s"] = time.perf_counter() - t_start
            if any(r.get("status") != "ok" for r in artifact.rows):
                artifact.reason = "some configurations did not run; see rows[].reason"
    finally:
        if not a.compile_cache:
            shutil.rmtree(cache_root, ignore_errors=True)
    print(f"wrote {out_path}", file=sys.stderr)
    print(table(artifact.rows, artifact.summary.get("card", "?")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
