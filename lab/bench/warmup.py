"""The playbook's warm-up benchmark (step 3): prime the compiled decode step, confirm memory headroom and
record the latency envelope that fallback alerts are pinned to.

One run: build the model (after the memory plan), compile and capture the decode step with the compile
cache in `compile_cache_dir` (so the next process loads it instead of recompiling), run `warmup` untimed
iterations, then `iters` timed iterations inside one telemetry window with recompiles forbidden. Every
iteration records time to first token (prefill) and each decode step (CUDA events on the GPU).
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lab.engine.compile_cache import (  # noqa: F401 - re-exported: lab.bench.warmup.use_compile_cache
    DEFAULT_COMPILE_CACHE_DIR,
    cache_counters,
    cache_state,
    use_compile_cache,
)
from lab.errors import LabError
from lab.results import Artifact, read_json, register, write_json
from lab.stats import summarize

CACHE_HISTORY_FILE = "lab-compile-times.json"
MODES = (
    "auto",
    "eager",
    "eager-cudagraphs",
    "compile",
    "compile-cudagraphs",
    "regional",
    "regional-cudagraphs",
)
MEMORY_ALERT_FRACTION = 0.8  # playbook: keep GPU memory below 80 %
GB = 1e9

# Keys every warm-up summary carries (null + a reason in `unavailable` where not measurable).
SUMMARY_KEYS = (
    "ttft_ms_p50",
    "ttft_ms_p99",
    "decode_ms_per_token_p50",
    "decode_ms_per_token_p99",
    "decode_tokens_per_s",
    "peak_memory_gb",
    "compile_s",
    "power_w_mean",
    "energy_j",
    "tokens_per_joule",
    "mbu",
)


@register
class WarmupArtifact(Artifact):
    """warmup.json: the latency envelope, memory, compile times, energy and roofline of one warm-up."""

    kind: str = "warmup"
    iterations: list[dict[str, Any]] = []
    memory_plan: dict[str, Any] = {}
    compile: dict[str, Any] = {}
    telemetry: dict[str, Any] = {}
    roofline: dict[str, Any] = {}


@dataclass
class WarmupConfig:
    """What to warm up and how. Field names match the CLI flags."""

    preset: str | None = None
    model_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    batch_size: int = 1
    prompt_len: int = 128
    max_new_tokens: int = 128
    iters: int = 3
    warmup: int = 1
    mode: str = "auto"
    compile_cache_dir: str | None = DEFAULT_COMPILE_CACHE_DIR
    tensor_parallel_gpus: int = 1
    measure_roofline: bool = True
    # Also compile the serving engine's decode and prefill steps into the compile cache, at the shapes
    # `lab serve` uses (these flags must match its --max-batch-size / --max-seq-len), so the server that
    # the playbook starts next (step 4) loads them instead of compiling. Compiled modes, one GPU only.
    prime_serving: bool = True
    serve_max_batch_size: int = 16
    serve_max_seq_len: int | None = None  # None: as `lab serve`, min(4096, the model's context)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise LabError(f"unknown mode '{self.mode}'; choose one of: {', '.join(MODES)}")
        for name in ("batch_size", "prompt_len", "iters", "tensor_parallel_gpus", "serve_max_batch_size"):
            if getattr(self, name) < 1:
                raise LabError(f"--{name.replace('_', '-')} must be >= 1")
        if self.warmup < 0:
            raise LabError("--warmup must be >= 0")
        if self.max_new_tokens < 2:
            raise LabError("--max-new-tokens must be >= 2 so that at least one decode step is timed")
        if self.serve_max_seq_len is not None and self.serve_max_seq_len < 2:
            raise LabError("--serve-max-seq-len must be >= 2")

    def to_params(self) -> dict[str, Any]:
        return asdict(self)


# --- the compile cache -------------------------------------------------------------------------------


def record_compile_time(cache_dir: Path, key: str, state: str, compile_s: float) -> dict[str, Any]:
    """Remember cold (cache miss) and warm (cache hit) compile times per workload key in the cache
    directory, so an artifact can quote both: the cold one from the first process, the warm one from
    the restart. Returns the entry for `key` after the update."""
    path = cache_dir / CACHE_HISTORY_FILE
    history: dict[str, Any] = {}
    if path.exists():
        try:
            data = read_json(path)
            history = data if isinstance(data, dict) else {}
        except LabError:
            history = {}  # a corrupt history only loses old timings; the cache itself is unaffected
    entry = dict(history.get(key) or {})
    now = datetime.now(timezone.utc).isoformat()
    if state == "miss":
        entry.update(cold_s=compile_s, cold_at=now)
    elif state == "hit":
        entry.update(warm_s=compile_s, warm_at=now)
    history[key] = entry
    write_json(path, history)
    return entry


# --- measurement helpers -----------------------------------------------------------------------------


def peak_memory(device) -> dict[str, Any]:
    """Peak memory of the run: the CUDA allocator's on a GPU; on the CPU the process's peak resident set
    (labelled as such: it includes the interpreter and libraries, not just tensors)."""
    import torch

    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        reserved = torch.cuda.max_memory_reserved(device)
        return {
            "peak_memory_kind": "cuda_max_memory_allocated",
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / GB,
            "peak_memory_reserved_gb": reserved / GB,
            "device_memory_gb": total / GB,
            "memory_used_fraction": reserved / total,
        }
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = rss_kb * (1 if sys.platform == "darwin" else 1024)
    return {
        "peak_memory_kind": "process_rss_peak",
        "peak_memory_gb": rss / GB,
        "peak_memory_reserved_gb": None,
        "device_memory_gb": None,
        "memory_used_fraction": None,
    }


def iteration_record(index: int, res, batch_size: int) -> dict[str, Any]:
    """One timed iteration: TTFT, every decode step, and the per-user / aggregate decode rates."""
    steps_ms = [s * 1e3 for s in res.decode_step_s]
    decode_s = sum(res.decode_step_s)
    n = len(steps_ms)
    return {
        "iteration": index,
        "ttft_ms": res.prefill_s * 1e3,
        "decode_steps": n,
        "decode_ms_per_token": decode_s / n * 1e3,
        "decode_step_ms": steps_ms,
        "decode_tokens_per_s_per_user": n / decode_s if decode_s > 0 else None,
        "decode_tokens_per_s_aggregate": n * batch_size / decode_s if decode_s > 0 else None,
        "e2e_ms": (res.prefill_s + decode_s) * 1e3,
        "tokens_generated": int(res.tokens.numel()),
    }


def latency_summary(iterations: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """The envelope: TTFT percentiles over iterations, decode percentiles over every step of every
    iteration (samples merged, never percentiles averaged), with min/max as the spread."""
    out: dict[str, Any] = {}
    ttft = summarize([it["ttft_ms"] for it in iterations])
    steps = summarize([s for it in iterations for s in it["decode_step_ms"]])
    for name, stats in (("ttft_ms", ttft), ("decode_ms_per_token", steps)):
        for q in ("p50", "p90", "p99", "min", "max", "mean"):
            out[f"{name}_{q}"] = stats[q]
    out["iters"] = ttft["count"]
    out["decode_step_samples"] = steps["count"]
    decode_s = sum(sum(it["decode_step_ms"]) for it in iterations) / 1e3
    n_steps = sum(it["decode_steps"] for it in iterations)
    out["decode_tokens_per_s_per_user"] = n_steps / decode_s if decode_s > 0 else None
    out["decode_tokens_per_s_aggregate"] = n_steps * batch_size / decode_s if decode_s > 0 else None
    # The alerting key: aggregate over the batch (equal to per user at the playbook's batch 1).
    out["decode_tokens_per_s"] = out["decode_tokens_per_s_aggregate"]
    return out


def resolve_mode(mode: str, device, dtype: str = "auto") -> str:
    if mode == "auto":
        from lab.engine.generate import auto_mode

        return auto_mode(device, dtype)  # as `lab serve`
    return mode


def _tp_prepare(cfg: WarmupConfig, batch_size: int, max_seq_len: int):
    """TENSOR-PARALLEL HOOK: the one call site for --tensor-parallel-gpus > 1 (lab.distributed)."""
    try:
        from lab.distributed import tp_prepare
    except ImportError:
        raise LabError(
            f"--tensor-parallel-gpus {cfg.tensor_parallel_gpus} needs the tensor-parallel runtime, which this "
            f"install lacks; run under torchrun --nproc_per_node={cfg.tensor_parallel_gpus} with lab.distributed, "
            "or use --tensor-parallel-gpus 1 (the single-GPU fallback)"
        ) from None
    return tp_prepare(cfg, batch_size, max_seq_len)


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# --- the run -----------------------------------------------------------------------------------------


def prepare_warmup(cfg: WarmupConfig):
    """Validate, set up the compile cache and build the model. Every user error surfaces here, before
    anything is measured or written."""
    from lab.engine.generate import check_mode, compiles
    from lab.model import prepare, resolve_device

    cfg.validate()
    device = resolve_device(cfg.device)
    mode = resolve_mode(cfg.mode, device, cfg.dtype)
    check_mode(mode, device)
    max_seq = cfg.prompt_len + max(cfg.max_new_tokens, 4)  # Generator.warmup primes 4 tokens
    if cfg.prime_serving and cfg.serve_max_seq_len is not None and compiles(mode):
        from lab.model import resolve_spec

        context = resolve_spec(cfg.preset, cfg.model_path, device).args.max_seq_len
        if cfg.serve_max_seq_len > context:
            raise LabError(
                f"--serve-max-seq-len {cfg.serve_max_seq_len} exceeds the model's context of {context} tokens; "
                "use the --max-seq-len you serve with (at most the context)"
            )
    if cfg.tensor_parallel_gpus > 1:
        prepared = _tp_prepare(cfg, cfg.batch_size, max_seq)
    else:
        prepared = prepare(
            cfg.preset, cfg.model_path, cfg.device, cfg.dtype, cfg.seed, cfg.batch_size, max_seq
        )
    cache_dir = None
    if cfg.compile_cache_dir and compiles(mode):  # after every check: bad input leaves no directory
        cache_dir = use_compile_cache(cfg.compile_cache_dir)
    return prepared, cache_dir


def run_warmup(cfg: WarmupConfig, prepared=None, cache_dir: Path | None = None) -> WarmupArtifact:
    """Run the warm-up and return the finished artifact (status ok). Raises LabError for bad input;
    other exceptions (OOM, a recompile inside the timed window) propagate for the caller to record."""
    import torch

    from lab.engine.generate import Generator, compiles, no_recompile
    from lab.results import finish, new_artifact

    if prepared is None:
        prepared, cache_dir = prepare_warmup(cfg)
    device, model, args = prepared.device, prepared.model, prepared.spec.args
    mode = resolve_mode(cfg.mode, device, cfg.dtype)
    art = new_artifact(WarmupArtifact, cfg.to_params())
    art.params["resolved"] = {
        "mode": mode,
        "preset": prepared.spec.preset,
        "model_path": prepared.spec.model_path,
        "device": str(device),
        "dtype": weight_dtype(prepared),
        "compile_cache_dir": str(cache_dir) if cache_dir else None,
    }
    art.memory_plan = prepared.plan.to_dict()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    max_seq = cfg.prompt_len + max(cfg.max_new_tokens, 4)  # Generator.warmup primes 4 tokens
    gen = Generator(model, mode, cfg.batch_size, max_seq)
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, args.vocab_size, (cfg.batch_size, cfg.prompt_len), generator=g)

    # Compile + capture (the "primes TorchDynamo graphs" step), timed on the host clock.
    before = cache_counters()
    prime_s = gen.warmup(cfg.batch_size, cfg.prompt_len, steps=min(cfg.max_new_tokens, 4))
    state, delta = cache_state(before, cache_counters())
    art.compile = {"mode": mode, "prime_s": prime_s, "cache_state": state, "cache_counters": delta}
    if compiles(mode):
        art.compile["compile_s"] = prime_s
        if cache_dir is not None:
            key = "|".join(
                str(x)
                for x in (
                    prepared.spec.preset or prepared.spec.model_path,
                    weight_dtype(prepared),
                    f"b{cfg.batch_size}",
                    f"s{max_seq}",
                    mode,
                    torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    f"torch{torch.__version__}",
                )
            )
            entry = record_compile_time(cache_dir, key, state, prime_s) if is_rank_zero() else {}
            art.compile.update(key=key, cold_s=entry.get("cold_s"), warm_s=entry.get("warm_s"))

    for _ in range(cfg.warmup):
        gen.generate(prompt, cfg.max_new_tokens)

    results = []
    from lab.distributed import tier_telemetry, world_size

    # tier_telemetry: this GPU's Telemetry, or on rank 0 of a multi-GPU tier every rank's GPU summed.
    with no_recompile(), tier_telemetry(device) as tel:
        for _ in range(cfg.iters):
            results.append(gen.generate(prompt, cfg.max_new_tokens))
    art.iterations = [iteration_record(i, r, cfg.batch_size) for i, r in enumerate(results)]
    tokens = sum(it["tokens_generated"] for it in art.iterations)

    s: dict[str, Any] = latency_summary(art.iterations, cfg.batch_size)
    s.update(peak_memory(device))
    if s["memory_used_fraction"] is not None:
        s["memory_below_80pct"] = s["memory_used_fraction"] < MEMORY_ALERT_FRACTION
    s["memory_plan_gb"] = prepared.plan.total_gb
    s["memory_plan_headroom_gb"] = prepared.plan.headroom_gb
    s["compile_s"] = art.compile.get("compile_s")
    s["compile_s_cold"] = art.compile.get("cold_s")
    s["compile_s_warm"] = art.compile.get("warm_s")
    s["compile_cache_hit"] = {"hit": True, "miss": False}.get(state) if compiles(mode) else None
    if s["compile_s_cold"] and s["compile_s_warm"]:
        s["compile_restart_speedup"] = s["compile_s_cold"] / s["compile_s_warm"]
    s["prime_s"] = prime_s
    s["timed_window_s"] = tel.duration_s
    s["timed_tokens"] = tokens
    s["power_w_mean"] = tel.power_w_mean
    s["power_w_max"] = tel.power_w_max
    s["energy_j"] = tel.energy_j
    s["tokens_per_joule"] = tel.tokens_per_joule(tokens)
    art.telemetry = {**tel.summary(tokens), "samples": tel.samples, "unavailable": dict(tel.unavailable)}

    un = art.unavailable
    if not compiles(mode):
        why = f"mode {mode} compiles nothing (use --mode compile or compile-cudagraphs to prime graphs)"
        for k in ("compile_s", "compile_s_cold", "compile_s_warm"):
            un[k] = why
    else:
        if cache_dir is None:
            un["compile_s_cold"] = un["compile_s_warm"] = "no --compile-cache-dir: nothing persisted"
        elif s["compile_s_warm"] is None:
            un["compile_s_warm"] = (
                "no warm-cache run yet: run the same command again with the same --compile-cache-dir"
            )
        elif s["compile_s_cold"] is None:
            un["compile_s_cold"] = "the cache was already warm before this directory recorded a cold compile"
    for metric, source in (
        ("power_w_mean", "power"),
        ("power_w_max", "power"),
        ("energy_j", "energy"),
        ("tokens_per_joule", "energy"),
    ):
        if s[metric] is None:
            un[metric] = tel.unavailable.get(source, "not available: no NVML reading in the window")
    if s["peak_memory_reserved_gb"] is None:
        un["peak_memory_reserved_gb"] = "not available on cpu: peak_memory_gb is the process RSS peak"
        un["memory_used_fraction"] = "not available on cpu (no device memory to fill)"

    # Peak memory is read before the roofline probes allocate their buffers.
    art.roofline = roofline(prepared, gen.max_seq_len, cfg.batch_size, s, cfg.measure_roofline, un)
    if world_size() > 1:  # tensor parallel: each step's bytes and FLOPs are spread over N GPUs
        for key in ("mbu", "decode_mfu"):
            if art.roofline.get(key) is not None:
                art.roofline[key] /= world_size()
        art.roofline["tensor_parallel_gpus"] = world_size()
    s["mbu"] = art.roofline.get("mbu")
    s["decode_mfu"] = art.roofline.get("decode_mfu")
    s["copy_bandwidth_gb_s"] = art.roofline.get("copy_bandwidth_gb_s")
    del gen
    art.compile["serving"] = prime_serving(cfg, prepared, mode, cache_dir)
    s["serving_prime_s"] = art.compile["serving"].get("prime_s")
    if s["serving_prime_s"] is None:
        un["serving_prime_s"] = art.compile["serving"]["reason"]
    art.summary = s
    return finish(art)


def serving_shapes(cfg: WarmupConfig, prepared) -> tuple[int, int]:
    """(max batch, max sequence length) of the engine `lab serve` builds with the same flags."""
    seq = cfg.serve_max_seq_len or min(4096, prepared.spec.args.max_seq_len)
    return cfg.serve_max_batch_size, seq


def prime_serving(cfg: WarmupConfig, prepared, mode: str, cache_dir: Path | None) -> dict[str, Any]:
    """Compile the serving engine's steps (what `lab serve` compiles at start) into the compile cache, so
    the server started after the warm-up loads them: the playbook's "primes TorchDynamo graphs" for the
    server, and the fallback's time to ready. Returns what was done, or why not (never fails the warm-up:
    its figures are already measured; a skipped or failed prime only costs the server a cold compile)."""
    from lab.distributed import world_size
    from lab.engine.batching import Engine, EngineConfig
    from lab.engine.generate import auto_kv_buckets, compiles
    from lab.faults import is_oom

    batch, seq = serving_shapes(cfg, prepared)
    info: dict[str, Any] = {
        "max_batch_size": batch,
        "max_seq_len": seq,
        "kv_buckets": auto_kv_buckets(prepared.device, mode),
        "prime_s": None,
    }
    why = None
    if not cfg.prime_serving:
        why = "not asked (--no-prime-serving)"
    elif not compiles(mode):
        why = f"mode {mode} compiles nothing: the server has nothing to load"
    elif cache_dir is None:
        why = "no --compile-cache-dir: nothing would persist for the server"
    elif world_size() > 1:
        why = "tensor parallel: the TP server compiles its own sharded steps"
    if why:
        return {**info, "status": "skipped", "reason": why}
    import torch

    # Forget the warm-up's compiled frames: dynamo would otherwise see decode_step called again at another
    # batch size, mark the dimension dynamic (automatic dynamic shapes) and compile a different graph from
    # the static one `lab serve` compiles, which would then miss the cache.
    torch._dynamo.reset()
    before = cache_counters()
    try:
        engine = Engine(
            prepared.model,
            EngineConfig(
                max_batch_size=batch,
                max_seq_len=seq,
                mode=mode,
                compile_cache_dir=str(cache_dir),
                kv_buckets=auto_kv_buckets(prepared.device, mode),  # lab serve's default: a step per length
            ),
            eos_id=prepared.spec.args.eos_token_id,
        )
        with torch.inference_mode():  # as the engine's own thread runs it (Engine._run): the same graphs
            prime_s = engine.warmup()
    except LabError as e:  # the serving shapes do not fit beside this process (the memory guard)
        return {**info, "status": "skipped", "reason": f"the serving shapes do not fit: {e}"}
    except Exception as e:
        if not is_oom(e):
            raise
        return {**info, "status": "failed", "reason": f"out of memory compiling the serving steps: {e}"[:400]}
    state, delta = cache_state(before, cache_counters())
    return {**info, "status": "ok", "prime_s": prime_s, "cache_state": state, "cache_counters": delta}


def weight_dtype(prepared) -> str:
    """The weights' storage type: fp8/int8 for weight-only quantised models, else the model dtype."""
    from lab.model import dtype_name

    return getattr(prepared, "quant", None) or dtype_name(prepared.dtype)


def roofline(prepared, kv_len: int, batch: int, s: dict[str, Any], measure: bool, un: dict[str, str]):
    """MBU against the copy bandwidth measured now, on this card; decode MFU against measured bf16
    matmul FLOP/s. The dense mask over the static cache reads the allocated cache length."""
    from lab.bench.roofline import (
        decode_bytes_per_step,
        decode_mfu,
        mbu,
        measure_copy_bandwidth,
        measure_matmul_flops,
    )

    args, device = prepared.spec.args, prepared.device
    out: dict[str, Any] = {
        "bytes_per_step": decode_bytes_per_step(args, weight_dtype(prepared), batch, kv_len),
        "kv_len_read": kv_len,
        "params": args.num_params(),
    }
    step_s = (s.get("decode_ms_per_token_p50") or 0) / 1e3
    if device.type != "cuda":
        why = f"not available on {device.type}: MBU and MFU are quoted against a measured CUDA card"
        for k in ("mbu", "decode_mfu", "copy_bandwidth_gb_s"):
            un[k] = why
        return out
    if not measure:
        for k in ("mbu", "decode_mfu", "copy_bandwidth_gb_s"):
            un[k] = "roofline measurement switched off"
        return out
    import torch

    bw = measure_copy_bandwidth(device)
    flops = measure_matmul_flops(device)
    out.update(
        card=torch.cuda.get_device_name(device),
        copy_bandwidth_gb_s=bw / GB,
        matmul_tflops=flops / 1e12,
        decode_step_s_p50=step_s,
        mbu=mbu(out["bytes_per_step"], step_s, bw) if step_s > 0 else None,
        decode_mfu=decode_mfu(args.num_params(), batch / step_s, flops) if step_s > 0 else None,
    )
    return out


def describe(art: WarmupArtifact) -> str:
    """A few human lines for the terminal."""
    s = art.summary

    def f(key: str, fmt: str = "{:.2f}") -> str:
        v = s.get(key)
        return "n/a" if v is None else fmt.format(v)

    r = art.params.get("resolved", {})
    return "\n".join(
        [
            f"warmup {art.status}: {r.get('preset') or r.get('model_path')} {r.get('dtype')} on {r.get('device')}, "
            f"mode {r.get('mode')}, {s.get('iters')} timed iterations",
            f"  TTFT ms p50 {f('ttft_ms_p50')} p99 {f('ttft_ms_p99')} | decode ms/token p50 "
            f"{f('decode_ms_per_token_p50', '{:.3f}')} p99 {f('decode_ms_per_token_p99', '{:.3f}')} | "
            f"{f('decode_tokens_per_s', '{:.1f}')} tokens/s aggregate",
            f"  peak memory {f('peak_memory_gb')} GB ({s.get('peak_memory_kind')}) | compile {f('compile_s')} s "
            f"(cache {art.compile.get('cache_state')}; cold {f('compile_s_cold')} s, warm {f('compile_s_warm')} s)",
            f"  power {f('power_w_mean', '{:.0f}')} W | energy {f('energy_j', '{:.1f}')} J | "
            f"{f('tokens_per_joule')} tokens/J | MBU {f('mbu', '{:.1%}')}",
            serving_line(art.compile.get("serving")),
        ]
    )


def serving_line(p: dict[str, Any] | None) -> str:
    if not p:
        return "  serving steps: not primed (an artifact from before priming existed)"
    shape = f"batch {p['max_batch_size']} x {p['max_seq_len']} tokens"
    if p.get("status") == "ok":
        return (
            f"  serving steps ({shape}) primed in {p['prime_s']:.1f} s (cache {p.get('cache_state')}): "
            "`lab serve` with the same --max-batch-size/--max-seq-len and --compile-cache-dir loads them"
        )
    return f"  serving steps ({shape}) {p.get('status')}: {p.get('reason')}"


def run_and_write(cfg: WarmupConfig, path: str | os.PathLike[str]) -> WarmupArtifact:
    """Prepare, run and write the artifact to `path` (rank 0 only). Bad input raises LabError before
    anything is written; a run that breaks (OOM, a recompile in the timed window) is written as a failed
    artifact with the reason and returned, so callers check `.status`."""
    from lab.faults import free_gb, is_oom, oom_plan, oom_reason
    from lab.results import finish, new_artifact, write_artifact

    knobs = "--batch-size, --prompt-len or --max-new-tokens"
    try:
        prepared, cache_dir = prepare_warmup(cfg)
    except LabError:
        raise
    except Exception as e:
        if not is_oom(e):
            raise
        # Out of memory while loading the model (the plan fitted the card; something else holds memory).
        art = finish(new_artifact(WarmupArtifact, cfg.to_params()), "failed", "")
        art.memory_plan = oom_plan(e)
        art.reason = oom_reason(getattr(e, "lab_step", "loading the model"), e, art.memory_plan, knobs)
        if is_rank_zero():
            write_artifact(path, art)
        return art
    try:
        art = run_warmup(cfg, prepared, cache_dir)
    except LabError:
        raise
    except Exception as e:
        lines = str(e).strip().splitlines()
        art = finish(
            new_artifact(WarmupArtifact, cfg.to_params()),
            "failed",
            f"{type(e).__name__}: {lines[0] if lines else ''}",
        )
        if is_oom(e):  # the plan and what to lower, so the failed artifact says the next move
            art.memory_plan = oom_plan(e, prepared.plan.to_dict())
            free = free_gb(prepared.device)
            if free is not None:
                art.memory_plan["device_free_gb_at_failure"] = free
            art.reason = oom_reason("warm-up", e, art.memory_plan, knobs)
    if is_rank_zero():
        write_artifact(path, art)
    return art


def warmup_figures(art: WarmupArtifact) -> dict[str, Any]:
    """Plotly figures for a warm-up artifact: per-iteration latency, decode-step distribution, TTFT vs
    decode, memory against the plan, and power over the timed window when it was sampled."""
    import plotly.graph_objects as go

    its = art.iterations
    names = [f"iter {it['iteration']}" for it in its]
    figs: dict[str, Any] = {}
    fig = go.Figure()
    fig.add_bar(name="TTFT (ms)", x=names, y=[it["ttft_ms"] for it in its])
    fig.add_bar(name="decode ms/token x 10", x=names, y=[it["decode_ms_per_token"] * 10 for it in its])
    fig.update_layout(title="Latency per timed iteration", barmode="group", yaxis_title="ms")
    figs["latency_per_iteration"] = fig

    fig = go.Figure()
    for name, it in zip(names, its):
        fig.add_box(name=name, y=it["decode_step_ms"], boxpoints="outliers")
    s = art.summary
    for q, dash in (("p50", "solid"), ("p99", "dash")):
        v = s.get(f"decode_ms_per_token_{q}")
        if v is not None:
            fig.add_hline(y=v, line_dash=dash, annotation_text=f"{q} {v:.3f} ms")
    fig.update_layout(title="Decode step latency (every step, per iteration)", yaxis_title="ms per token")
    figs["decode_distribution"] = fig

    fig = go.Figure()
    fig.add_bar(name="prefill (TTFT)", x=names, y=[it["ttft_ms"] for it in its])
    fig.add_bar(name="decode", x=names, y=[sum(it["decode_step_ms"]) for it in its])
    fig.update_layout(title="Time to first token vs decode, per iteration", barmode="stack", yaxis_title="ms")
    figs["ttft_vs_decode"] = fig

    plan = art.memory_plan
    parts = ["weights_gb", "kv_cache_gb", "activations_gb", "reserve_gb"]
    fig = go.Figure()
    for part in parts:
        fig.add_bar(name=f"plan: {part.removesuffix('_gb')}", x=["memory plan"], y=[plan.get(part, 0)])
    kind = s.get("peak_memory_kind") or "peak"
    fig.add_bar(name=f"measured: {kind}", x=["measured"], y=[s.get("peak_memory_gb") or 0])
    if s.get("peak_memory_reserved_gb") is not None:
        fig.add_bar(name="measured: reserved", x=["reserved"], y=[s["peak_memory_reserved_gb"]])
    if s.get("device_memory_gb"):
        fig.add_hline(
            y=s["device_memory_gb"] * MEMORY_ALERT_FRACTION,
            line_dash="dash",
            annotation_text="80 % of the GPU",
        )
    fig.update_layout(title="Memory: plan vs measured peak", barmode="stack", yaxis_title="GB")
    figs["memory"] = fig

    samples = [x for x in art.telemetry.get("samples", []) if x.get("power_w") is not None]
    if samples:
        fig = go.Figure()
        fig.add_scatter(x=[x["t_s"] for x in samples], y=[x["power_w"] for x in samples], name="power (W)")
        fig.update_layout(title="Power over the timed window", xaxis_title="s", yaxis_title="W")
        figs["power"] = fig
    return figs
