"""Issue 10's benchmark: every arm and the Hugging Face reference in one call, one table of ratios.

Arms (select with --arms):
  engine   llama-8b bf16 decode, eager vs compile-cudagraphs, batch 1 and 16 (MBU vs the copy bandwidth
           measured in this run; KV bytes counted at the allocated cache length: dense mask)
  hf       transformers LlamaForCausalLM with the same config and weights: eager, and static cache +
           torch.compile(reduce-overhead, fullgraph) as its documentation recommends; same prompt/call
  quant    gpt-40b weight-only fp8 and int8 on one card: peak memory with a 4K-token prompt, batch-16 decode
           MBU; bf16 vs fp8/int8 agreement (greedy tokens, logit error) on a 4-layer gpt-40b-shaped model
  agreement  only quant's agreement part (4-layer gpt-40b-shaped model, about a minute)
  ready    time to ready: process start -> first token served by `lab serve` (llama-8b, compile-cudagraphs)
           after `lab warmup` primed the cache, on a restart, and cold; with each start's phases

    python benchmarks/perf_decode.py --arms engine,hf --out DIR   # on the GPU host
Writes DIR/perf_decode.json with the environment fingerprint; prints the table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lab.bench.roofline import decode_bytes_per_step, mbu, measure_copy_bandwidth
from lab.engine.generate import Generator, no_recompile
from lab.env import fingerprint
from lab.model import ModelSpec, build_model, get_preset, prepare

ROOT = Path(__file__).resolve().parent.parent
# --smoke (CPU, tiny preset, `compile` instead of CUDA graphs) exercises this script's orchestration on a
# machine without a GPU, so a GPU session never spends its time on a bug here. Its figures mean nothing.
DEV, PRESET, COMPILED = "cuda", "llama-8b", "compile-cudagraphs"
READY_MODE = COMPILED  # --ready-mode


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def engine_run(model, args, mode, batch, prompt_len, new_tokens, repeats, dtype_name, bw):
    torch._dynamo.reset()
    model.max_batch_size = 0  # force a fresh cache of exactly this shape
    seq = prompt_len + new_tokens
    gen = Generator(model, mode, batch, seq)
    prompt = torch.randint(
        0, args.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    t0 = time.perf_counter()
    for _ in range(3):  # 3 untimed calls per CUDA-graph shape
        gen.generate(prompt, 8)
    compile_s = time.perf_counter() - t0
    dec, e2e = [], []
    with no_recompile():
        for _ in range(repeats):
            sync()
            w0 = time.perf_counter()
            r = gen.generate(prompt, new_tokens)
            e2e.append(new_tokens / (time.perf_counter() - w0))
            dec.append(len(r.decode_step_s) / r.decode_s)
    tps = statistics.median(dec)
    b = decode_bytes_per_step(args, dtype_name, batch, seq)
    return {
        "decode_tok_s_per_user": tps,
        "decode_tok_s_p10": sorted(dec)[0],
        "decode_tok_s_p90": sorted(dec)[-1],
        "decode_tok_s_aggregate": tps * batch,
        "e2e_tok_s_per_user": statistics.median(e2e),
        "mbu": mbu(b, 1 / tps, bw),
        "bytes_per_step": b,
        "compile_s": compile_s,
        "ttft_ms": r.prefill_s * 1e3,
        "tokens_sample": r.tokens[0, :8].tolist(),
    }


def to_hf_state(model) -> dict:
    """Our fused layout -> HF LlamaForCausalLM names (split wqkv and w13)."""
    a = model.args
    hd = a.head_dim
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not a.tie_embeddings:
        sd["lm_head.weight"] = model.output.weight
    for i, blk in enumerate(model.layers):
        q, k, v = blk.attention.wqkv.weight.split([a.n_heads * hd, a.n_kv_heads * hd, a.n_kv_heads * hd])
        g, u = blk.feed_forward.w13.weight.split([a.ffn_dim, a.ffn_dim])
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "self_attn.q_proj.weight": q,
                p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v,
                p + "self_attn.o_proj.weight": blk.attention.wo.weight,
                p + "mlp.gate_proj.weight": g,
                p + "mlp.up_proj.weight": u,
                p + "mlp.down_proj.weight": blk.feed_forward.w2.weight,
                p + "input_layernorm.weight": blk.attention_norm.weight,
                p + "post_attention_layernorm.weight": blk.ffn_norm.weight,
            }
        )
    return sd


def hf_runs(model, args, batches, prompt_len, new_tokens, repeats, cd_tuning=False):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=args.max_seq_len,
        rope_theta=args.rope_theta,
        rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings,
        rope_scaling=args.rope_scaling,
    )
    # Built on the GPU directly in bf16, then our weights copied in: same weights, same card.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            hf = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    hf.load_state_dict(to_hf_state(model), strict=True)
    hf = hf.eval()
    hf.generation_config.pad_token_id = 0
    out = {"transformers": transformers.__version__}
    import torch._inductor.config as inductor_config

    static = {
        "cache_implementation": "static",
        "compile_config": transformers.CompileConfig(fullgraph=True, mode="reduce-overhead"),
    }
    plan = [(b, arm, kw) for b in batches for arm, kw in (("hf-eager", {}), ("hf-static-compile", static))]
    # Last, for transparency: HF's compiled path with our inductor tuning too (what it gets in our process).
    if cd_tuning:
        plan.append((1, "hf-static-compile+cd-tuning", static))
    for b, arm, kw in plan:
        ids = torch.randint(
            0, args.vocab_size, (b, prompt_len), generator=torch.Generator().manual_seed(0)
        ).to(DEV)
        if arm.endswith("+cd-tuning"):
            from lab.engine.generate import tune_inductor

            torch._dynamo.reset()
            tune_inductor()
        try:
            gen_kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
            t0 = time.perf_counter()
            for _ in range(2 if arm == "hf-eager" else 3):
                hf.generate(ids, **dict(gen_kw, max_new_tokens=16, min_new_tokens=16))
            warm_s = time.perf_counter() - t0
            rates = []
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                o = hf.generate(ids, **gen_kw)
                sync()
                rates.append((o.shape[1] - prompt_len) / (time.perf_counter() - t0))
            out[f"{arm}/b{b}"] = {
                "e2e_tok_s_per_user": statistics.median(rates),
                "warm_s": warm_s,
                "inductor_coordinate_descent_tuning": bool(inductor_config.coordinate_descent_tuning),
                "tokens_sample": o[0, prompt_len : prompt_len + 8].tolist(),
            }
        except Exception as e:  # record and go on: the other arms still run
            out[f"{arm}/b{b}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(arm, b, out[f"{arm}/b{b}"], flush=True)
    del hf
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return out


@torch.no_grad()
def teacher_forced_logits(model, seq: torch.Tensor) -> torch.Tensor:
    """Logits at every position of `seq` [b, T] in one causal forward pass (float32 [b, T, vocab])."""
    b, t = seq.shape
    model.setup_caches(b, t)
    pos = torch.arange(t, device=seq.device).expand(b, t)
    return model(seq, pos)


def hf_child(o) -> dict:
    """Run the hf arm in a fresh interpreter (default inductor config) and return its results."""
    with tempfile.TemporaryDirectory(prefix="perf_hf_") as d:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-child", "--arms", "hf", "--out", d]
        cmd += ["--prompt-len", str(o.prompt_len), "--new-tokens", str(o.new_tokens)]
        cmd += ["--repeats", str(o.repeats)] + (["--hf-cd-tuning"] if o.hf_cd_tuning else [])
        cmd += ["--smoke"] if o.smoke else []
        r = subprocess.run(cmd, cwd=ROOT, timeout=1800)
        try:
            return json.loads((Path(d) / "perf_decode.json").read_text())["hf"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            return {"error": f"hf child exited {r.returncode}: {e}"}


QUANT_KINDS, QUANT_MODES = ("fp8", "int8"), ("eager", "compile-cudagraphs")


def quant_runs(
    bw,
    repeats,
    new_tokens=128,
    res=None,
    save=lambda: None,
    kinds=QUANT_KINDS,
    modes=QUANT_MODES,
    agreement=True,
):
    """Fills `res` (the result's "quant" entry) and calls `save` after every arm: a run that is killed part
    way (the device's time limit) keeps what it measured. `kinds`/`modes` pick the arms (the regional modes
    compile the blocks in place, so they go last)."""
    res = {} if res is None else res
    modes = [m for m in modes if not m.startswith("regional")] + [
        m for m in modes if m.startswith("regional")
    ]
    # 1. Fit: the full gpt-40b on one card, 4K-token prompt, peak memory.
    for kind in kinds:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            p = prepare("gpt-40b", None, "cuda", kind, 0, 1, 4096 + 64)
            gen = Generator(p.model, "eager", 1, 4096 + 64)
            prompt = torch.randint(0, p.spec.args.vocab_size, (1, 4096))
            r = gen.generate(prompt, 8)
            peak_4k = torch.cuda.max_memory_allocated() / 1e9
            row = {
                "peak_memory_gb_4k_prompt": peak_4k,
                "ttft_ms_4k": r.prefill_s * 1e3,
                "weights_gb_plan": p.plan.weights_gb,
            }
            for mode in modes:
                try:
                    row[mode] = engine_run(p.model, p.spec.args, mode, 16, 32, new_tokens, repeats, kind, bw)
                except Exception as e:
                    row[mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
                print("quant", kind, mode, row[mode], flush=True)
                res[f"gpt-40b-{kind}"] = row
                save()
            row["peak_memory_gb_overall"] = torch.cuda.max_memory_allocated() / 1e9
            res[f"gpt-40b-{kind}"] = row
            del p, gen
        except Exception as e:
            res[f"gpt-40b-{kind}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        save()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    if agreement:
        quant_agreement(res, save)
    return res


def quant_agreement(res, save=lambda: None):
    # 2. Agreement: a 4-layer gpt-40b-shaped model in bf16 vs quantised (random weights). Free-running greedy
    # tokens diverge for good after the first flip, so the main figures are teacher-forced: both models read
    # the bf16 model's own greedy continuation and we compare their next-token argmax and logits per position.
    a = get_preset("gpt-40b")
    a.n_layers = 4
    spec = ModelSpec(a, "gpt-40b-4layer", None)
    ref = build_model(spec, torch.device("cuda"), torch.bfloat16, 0)
    prompt = torch.randint(0, a.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    r_ref = Generator(ref, "eager", 4, 192).generate(prompt, 64, keep_logits=True)
    seq = torch.cat([prompt, r_ref.tokens.cpu()], dim=1).cuda()
    l_ref = teacher_forced_logits(ref, seq)[:, 63:-1]  # predictions of the 64 generated tokens
    del ref
    for kind in ("fp8", "int8"):
        qm = build_model(spec, torch.device("cuda"), torch.bfloat16, 0, quant=kind)
        r_q = Generator(qm, "eager", 4, 192).generate(prompt, 64, keep_logits=True)
        l_q = teacher_forced_logits(qm, seq)[:, 63:-1]
        first = (r_q.logits[0] - r_ref.logits[0]).norm() / r_ref.logits[0].norm()
        res[f"agreement-{kind}"] = {
            "teacher_forced_top1_agreement": float((l_q.argmax(-1) == l_ref.argmax(-1)).float().mean()),
            "teacher_forced_logit_rel_error": float((l_q - l_ref).norm() / l_ref.norm()),
            "free_running_greedy_token_agreement": float((r_q.tokens == r_ref.tokens).float().mean()),
            "first_token_logit_rel_error": float(first),
            "first_token_logit_max_abs_error": float((r_q.logits[0] - r_ref.logits[0]).abs().max()),
            "reference_logit_std": float(l_ref.std()),
            "note": "random weights (no checkpoint reachable offline): logits are nearly tied (small std), "
            "so top-1 flips are likelier than on a trained model",
        }
        print(res[f"agreement-{kind}"], flush=True)
        save()
        del qm
    torch.cuda.empty_cache()
    return res


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _time_to_first_token(cache: str) -> dict:
    """Start `lab serve`, wait for /health 200 (warm-up done), send one completion; seconds from process
    start to each milestone. The server is drained (SIGTERM) afterwards."""
    import signal
    import urllib.error
    import urllib.request

    port = _free_port()
    cmd = [sys.executable, "-m", "lab", "serve", "--preset", PRESET, "--device", DEV, "--dtype", "bfloat16"]
    cmd += ["--mode", READY_MODE, "--port", str(port), "--compile-cache-dir", cache]
    base = f"http://127.0.0.1:{port}"
    t0, epoch0 = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    res: dict = {}
    try:
        health = None
        while time.perf_counter() - t0 < 900:
            if proc.poll() is not None:
                res["error"] = f"lab serve exited {proc.returncode}: {proc.stderr.read()[-800:]}"
                return res
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    health = json.loads(r.read())
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        res["healthy_s"] = time.perf_counter() - t0
        res["engine_warmup_s"] = (health or {}).get("warmup_s")
        res["compile_cache"] = (health or {}).get("compile_cache")
        # Where the seconds went: process start -> the server's own marks (lab.startup), then its phases.
        marks = ((health or {}).get("startup") or {}).get("marks") or {}
        res["startup_marks_s"] = {k: v - epoch0 for k, v in sorted(marks.items(), key=lambda kv: kv[1])}
        res["startup_phases_s"] = ((health or {}).get("startup") or {}).get("phases_s")
        _complete(base, 1)
        res["first_token_s"] = time.perf_counter() - t0
        res["mode_at_first_token"] = (health or {}).get("mode")
        if (health or {}).get("upgrade"):
            # Serving while compiling (--start-mode): one request's decode rate in the start mode, the time
            # the server switched to the compiled mode (its own mark), and the rate after the switch.
            res["start_mode_tok_s"] = _decode_rate(base)
            while time.perf_counter() - t0 < 900 and proc.poll() is None:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    health = json.loads(r.read())
                if health["upgrade"]["state"] in ("done", "failed"):
                    break
                time.sleep(0.2)
            res["upgrade"] = health.get("upgrade")
            up = (health.get("startup") or {}).get("marks", {}).get("upgraded")
            res["full_speed_s"] = up - epoch0 if up else None
            res["upgraded_tok_s"] = _decode_rate(base)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return res


READY_STARTS = ("after_warmup", "warm_cache", "cold")


def _complete(base: str, max_tokens: int) -> dict:
    import urllib.request

    body = json.dumps({"model": PRESET, "prompt": list(range(1, 33)), "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _decode_rate(base: str, n: int = 128) -> float:
    """One request's tokens/s end to end over HTTP (32-token prompt, n new tokens, batch 1): a check of
    which step serves, not a decode benchmark (the engine arm is)."""
    t = time.perf_counter()
    out = _complete(base, n)
    return out["usage"]["completion_tokens"] / (time.perf_counter() - t)


def ready_runs(save=lambda: None, out=None, starts=READY_STARTS):
    """Time to ready for the fallback: process start -> first token served by `lab serve` (after its
    warm-up: /health 200), in the playbook's order and after restarts:
      after_warmup  `lab warmup` (step 3; it primes the server's steps into a fresh cache dir), then serve
      warm_cache    serve again on the cache the previous start used (a restart of the fallback server)
      cold          serve on an empty cache dir (no warm-up ran)
    `starts` picks and orders them: "cold,warm_cache" is a cold start and a restart, with no `lab warmup`."""
    out = {} if out is None else out
    out["command"] = f"lab serve --preset {PRESET} --mode {READY_MODE} --compile-cache-dir DIR"
    out["starts"] = list(starts)
    cache = tempfile.mkdtemp(prefix="compile-cache-")
    for label in starts:
        if label == "after_warmup":
            _lab_warmup(cache, out, save)
        elif label == "cold":
            cache = tempfile.mkdtemp(prefix="compile-cache-")
        out[label] = _time_to_first_token(cache)
        print("ready", label, out[label], flush=True)
        save()
    return out


def _lab_warmup(cache: str, out: dict, save) -> None:
    """`lab warmup` into `cache`, as the drill's step 3 runs it (it primes the server's steps)."""
    warm = [sys.executable, "-m", "lab", "warmup", "--preset", PRESET, "--device", DEV, "--dtype", "bfloat16"]
    warm += ["--mode", READY_MODE, "--compile-cache-dir", cache, "--iters", "1", "--warmup", "0"]
    warm += ["--no-roofline", "--output-json", str(Path(cache) / "warmup.json")]
    t0 = time.perf_counter()
    r = subprocess.run(warm, cwd=ROOT, capture_output=True, text=True)
    out["lab_warmup"] = {"wall_s": time.perf_counter() - t0, "exit_code": r.returncode}
    if r.returncode == 0:
        art = json.loads((Path(cache) / "warmup.json").read_text())
        out["lab_warmup"]["serving_prime"] = art.get("compile", {}).get("serving")
    else:
        out["lab_warmup"]["error"] = r.stderr[-800:]
    print("ready lab_warmup", out["lab_warmup"], flush=True)
    save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="engine,hf,quant,ready")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=".")
    ap.add_argument("--quant-new-tokens", type=int, default=128, help="decode tokens per gpt-40b run")
    ap.add_argument(
        "--hf-cd-tuning", action="store_true", help="also time HF compiled with our inductor tuning"
    )
    ap.add_argument(
        "--modes",
        default=None,
        help="engine arm's modes (default eager,compile-cudagraphs; also eager-cudagraphs, regional-cudagraphs; "
        "--smoke: eager,compile,regional)",
    )
    ap.add_argument(
        "--ready-mode",
        default=None,
        help="the mode `lab serve` runs in for the ready arm (default compile-cudagraphs)",
    )
    ap.add_argument(
        "--ready-starts",
        default=",".join(READY_STARTS),
        help="the ready arm's starts, in order (default after_warmup,warm_cache,cold; "
        "cold,warm_cache: a cold start, then a restart on its cache, without `lab warmup`)",
    )
    ap.add_argument(
        "--quant-kinds", default=",".join(QUANT_KINDS), help="quant arm: weight formats (fp8,int8)"
    )
    ap.add_argument(
        "--quant-modes",
        default=",".join(QUANT_MODES),
        help="quant arm: modes of the batch-16 decode (default eager,compile-cudagraphs; also regional-cudagraphs)",
    )
    ap.add_argument(
        "--no-agreement", action="store_true", help="quant arm: skip the bf16-vs-quantised agreement"
    )
    ap.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--smoke", action="store_true", help="CPU, tiny preset: check the script runs (no figures)"
    )
    o = ap.parse_args()
    global DEV, PRESET, COMPILED
    if o.smoke:
        DEV, PRESET, COMPILED = "cpu", "tiny", "compile"
    o.modes = o.modes or ("eager,compile,regional" if o.smoke else "eager,compile-cudagraphs")
    global READY_MODE
    READY_MODE = o.ready_mode or COMPILED
    arms = o.arms.split(",")
    starts = tuple(o.ready_starts.split(","))
    if not set(starts) <= set(READY_STARTS) or len(set(starts)) != len(starts):
        ap.error(
            f"--ready-starts takes each of {', '.join(READY_STARTS)} at most once, got {o.ready_starts!r}"
        )
    bw = measure_copy_bandwidth("cuda") if DEV == "cuda" else 1e11  # smoke: a placeholder, not a figure
    result = {
        "fingerprint": fingerprint().model_dump(mode="json"),
        "copy_bandwidth_tb_s": bw / 1e12,
        "card": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke: figures mean nothing)",
        "params": vars(o),
    }

    def save() -> None:  # after every arm: a later arm that fails or runs out of time keeps the earlier ones
        Path(o.out).mkdir(parents=True, exist_ok=True)
        (Path(o.out) / "perf_decode.json").write_text(json.dumps(result, indent=1, default=str))

    if "hf" in arms and not o.hf_child:
        # The reference runs in its own process: our engine sets inductor options globally
        # (coordinate-descent tuning, lab.engine.generate.tune_inductor), and HF must get the settings its
        # documentation gives, not ours. Same seed -> same weights; same card.
        result["hf"] = hf_child(o)
        save()
    if "engine" in arms or o.hf_child:
        p = prepare(PRESET, None, DEV, "bfloat16", 0, 16, o.prompt_len + o.new_tokens)
        if "engine" in arms:
            # The regional mode compiles the model's blocks in place, so it runs last (eager after it would not be).
            modes = [m for m in o.modes.split(",") if not m.startswith("regional")]
            modes += [m for m in o.modes.split(",") if m.startswith("regional")]
            for mode in modes:
                for b in (1, 16):
                    key = f"engine-{mode}/b{b}"
                    result[key] = engine_run(
                        p.model, p.spec.args, mode, b, o.prompt_len, o.new_tokens, o.repeats, "bfloat16", bw
                    )
                    print(key, result[key], flush=True)
                    save()
        if o.hf_child:
            try:
                result["hf"] = hf_runs(
                    p.model, p.spec.args, (1, 16), o.prompt_len, o.new_tokens, o.repeats, o.hf_cd_tuning
                )
            except Exception as e:
                result["hf"] = {"error": f"{type(e).__name__}: {e}"[:800]}
                print("hf failed:", result["hf"], flush=True)
        del p
        torch._dynamo.reset()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    if "quant" in arms and o.smoke:
        print("quant: skipped under --smoke (gpt-40b needs the GPU)", flush=True)
    elif "quant" in arms:
        quant_runs(
            bw,
            o.repeats,
            o.quant_new_tokens,
            result.setdefault("quant", {}),
            save,
            tuple(o.quant_kinds.split(",")),
            tuple(o.quant_modes.split(",")),
            not o.no_agreement,
        )
        save()
    elif "agreement" in arms:  # only the bf16-vs-quantised agreement on the 4-layer model (about a minute)
        quant_agreement(result.setdefault("quant", {}), save)
        save()
    if "ready" in arms:
        ready_runs(save, result.setdefault("ready", {}), starts)
    save()
    # The table: ratios against targets.
    print(f"\ncard {result['card']}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'arm':34s} {'tok/s/user':>10s} {'aggregate':>10s} {'MBU':>6s}")
    for k, v in result.items():
        if k.startswith("engine-") and "error" not in v:
            b = int(k.split("/b")[1])
            print(
                f"{k:34s} {v['decode_tok_s_per_user']:10.1f} {v['decode_tok_s_per_user'] * b:10.1f} {v['mbu']:6.2f}"
            )
    for k, v in result.get("quant", {}).items():
        for mode in tuple(QUANT_MODES) + ("regional-cudagraphs", "eager-cudagraphs"):
            if isinstance(v.get(mode), dict) and "mbu" in v[mode]:
                print(
                    f"{k + '/' + mode + '/b16':34s} {v[mode]['decode_tok_s_per_user']:10.1f} "
                    f"{v[mode]['decode_tok_s_aggregate']:10.1f} {v[mode]['mbu']:6.2f}"
                )
        if "teacher_forced_top1_agreement" in v:
            print(
                f"{k}: teacher-forced top-1 {v['teacher_forced_top1_agreement']:.3f}, "
                f"logit rel error {v['teacher_forced_logit_rel_error']:.4f}"
            )
        if "peak_memory_gb_4k_prompt" in v:
            print(f"{k}: peak {v['peak_memory_gb_4k_prompt']:.1f} GB at a 4K prompt")
    hf = result.get("hf", {})
    for b in (1, 16):
        ours = result.get(f"engine-{COMPILED}/b{b}", {}).get("e2e_tok_s_per_user")
        for arm in ("hf-eager", "hf-static-compile", "hf-static-compile+cd-tuning"):
            theirs = hf.get(f"{arm}/b{b}", {}).get("e2e_tok_s_per_user")
            if ours and theirs:
                print(f"ours/{arm} b{b}: {ours / theirs:.2f}x  ({ours:.1f} vs {theirs:.1f} tok/s/user, e2e)")
    if "ready" in result:
        for label in result["ready"].get("starts", READY_STARTS):
            r = result["ready"].get(label, {})
            print(
                f"time to ready ({label}): first token {r.get('first_token_s', float('nan')):.1f} s, "
                f"/health 200 at {r.get('healthy_s', float('nan')):.1f} s, cache {r.get('compile_cache')}"
                + (f"; error: {r['error'][:200]}" if "error" in r else "")
            )
            if r.get("startup_marks_s"):
                print("    " + ", ".join(f"{k} {v:.1f} s" for k, v in r["startup_marks_s"].items()))
            if r.get("upgrade"):
                up = r["upgrade"]
                print(
                    f"    served in {up.get('from')} from the first token ({r.get('start_mode_tok_s', 0):.1f} tok/s), "
                    f"{up.get('to')} {up.get('state')} at {r.get('full_speed_s') or float('nan'):.1f} s "
                    f"({r.get('upgraded_tok_s', 0):.1f} tok/s; compile {up.get('compile_s', 0):.1f} s, "
                    f"cache {up.get('compile_cache')})"
                )


if __name__ == "__main__":
    main()
