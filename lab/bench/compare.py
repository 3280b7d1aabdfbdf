"""Eager vs compiled inference (the playbook's step 4): `compare_inference_methods()` runs one workload
through each decode method, checks each against eager, and hands back the ready-to-serve handles.

Methods (decode step only; prefill is eager cuBLAS for all, so TTFT is the same up to noise):
  eager            the model as written
  eager-cudagraph  eager decode captured by hand into a CUDA graph (torch.cuda.graphs; GPU only)
  compile          torch.compile, default mode
  reduce-overhead  torch.compile(mode="reduce-overhead"): Inductor kernels replayed as CUDA graphs (GPU only)
  max-autotune     torch.compile(mode="max-autotune"), only when asked (long compile)
  flex-attention   decode with FlexAttention over a per-row block mask that skips unfilled cache blocks,
                   compiled (with CUDA graphs on a GPU); a method-local attention path, llama.py unchanged

A method that fails (unsupported here, out of memory, a recompile inside the timed window) is recorded
as failed with its reason; the others still run. Eager is always run first: it is the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lab.engine.cudagraph import CudaGraphDecode  # noqa: F401 - the eager-cudagraph method
from lab.errors import LabError
from lab.results import Artifact, register
from lab.stats import summarize

METHODS = (
    "eager",
    "eager-cudagraph",
    "compile",
    "reduce-overhead",
    "regional",
    "regional-cudagraphs",
    "max-autotune",
    "flex-attention",
)
# regional-cudagraphs is what `lab serve` runs on a GPU (--mode auto), so the comparison shows it by default.
DEFAULT_METHODS = (
    "eager",
    "eager-cudagraph",
    "compile",
    "reduce-overhead",
    "regional-cudagraphs",
    "flex-attention",
)
GPU_ONLY = {
    "eager-cudagraph": "torch.cuda.graphs",
    "reduce-overhead": "CUDA graphs",
    "regional-cudagraphs": "CUDA graphs",
}
# Largest logit difference vs eager, relative to eager's largest |logit|, still counted as correct.
REL_LOGIT_TOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}
GB = 1e9

# A custom method: (model, max_batch_size, max_seq_len) -> a Generator whose decode_fn is the method.
MethodFactory = Callable[[Any, int, int], Any]


class MethodUnavailable(Exception):
    """The method cannot run here (e.g. needs a CUDA GPU or a newer torch); recorded as failed."""


@register
class CompareArtifact(Artifact):
    """compare.json: one row per method with latency, throughput, memory, compile time, speedup vs
    eager and correctness vs eager."""

    kind: str = "compare"
    methods: list[dict[str, Any]] = []
    workload: dict[str, Any] = {}
    memory_plan: dict[str, Any] = {}


@dataclass
class MethodResult:
    name: str
    status: str = "ok"  # ok | failed
    reason: str | None = None
    prime_s: float | None = None  # build + first short generate: compile, capture, priming steps (host clock)
    compile_s: float | None = None  # prime_s for compiled / captured methods; None for eager
    cache_state: str | None = None  # compile cache: hit / miss / partial / none
    ttft_ms: dict[str, Any] = field(default_factory=dict)  # summarize() over iterations
    decode_ms_per_token: dict[str, Any] = field(default_factory=dict)  # over every decode step
    decode_tokens_per_s_per_user: float | None = None
    decode_tokens_per_s_aggregate: float | None = None
    peak_memory_gb: float | None = None
    peak_memory_reserved_gb: float | None = None
    extra_memory_gb: float | None = None  # peak minus what was allocated before (weights, earlier handles)
    speedup_vs_eager: float | None = None  # eager decode p50 / this decode p50
    max_logit_diff: float | None = None  # teacher-forced on eager's tokens, every generated position
    rel_logit_diff: float | None = None  # max_logit_diff / eager's max |logit|
    forced_argmax_agreement: float | None = None  # same inputs: fraction of positions with eager's argmax
    greedy_token_agreement: float | None = None  # free-running greedy tokens equal to eager's
    first_divergence: int | None = None  # first generated position that differs from eager (None: none)
    correct: bool | None = None
    iterations: list[dict[str, Any]] = field(default_factory=list)
    handle: Any = field(default=None, repr=False)  # the Generator, ready to reuse

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "handle"}
        # Flat copies for readers (dashboard, gate) that want one number per method.
        out["ttft_ms_p50"] = self.ttft_ms.get("p50")
        for q in ("p50", "p90", "p99"):
            out[f"decode_ms_per_token_{q}"] = self.decode_ms_per_token.get(q)
        out["decode_tokens_per_s"] = self.decode_tokens_per_s_aggregate
        return out


@dataclass
class CompareResult:
    """What `compare_inference_methods` returns: per-method results and the reusable handles."""

    methods: dict[str, MethodResult]
    workload: dict[str, Any]
    device: str
    dtype: str
    preset: str | None = None
    memory_plan: dict[str, Any] = field(default_factory=dict)

    def handle(self, method: str):
        """The method's Generator (compiled / captured, warm): `.generate(prompt_ids, max_new_tokens)`
        or its `.decode_fn(model, tokens, input_pos, rows, temperature, top_k)` step."""
        r = self.methods.get(method)
        if r is None:
            raise LabError(f"method '{method}' was not run; run one of: {', '.join(self.methods)}")
        if r.status != "ok":
            raise LabError(
                f"method '{method}' failed ({r.reason}); use one that succeeded: {', '.join(self.ok)}"
            )
        return r.handle

    @property
    def ok(self) -> list[str]:
        return [n for n, r in self.methods.items() if r.status == "ok"]

    def speedups(self) -> dict[str, float | None]:
        return {n: r.speedup_vs_eager for n, r in self.methods.items()}

    def best(self) -> str | None:
        """The fastest method that is correct against eager."""
        good = [r for r in self.methods.values() if r.status == "ok" and r.correct and r.speedup_vs_eager]
        return max(good, key=lambda r: r.speedup_vs_eager).name if good else None

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per method (for a table or a DataFrame)."""
        out = []
        for r in self.methods.values():
            out.append(
                {
                    "method": r.name,
                    "status": r.status,
                    "reason": r.reason,
                    "compile_s": r.compile_s,
                    "ttft_ms_p50": r.ttft_ms.get("p50"),
                    "decode_ms_per_token_p50": r.decode_ms_per_token.get("p50"),
                    "decode_ms_per_token_p90": r.decode_ms_per_token.get("p90"),
                    "decode_ms_per_token_min": r.decode_ms_per_token.get("min"),
                    "decode_ms_per_token_max": r.decode_ms_per_token.get("max"),
                    "decode_tokens_per_s_per_user": r.decode_tokens_per_s_per_user,
                    "decode_tokens_per_s_aggregate": r.decode_tokens_per_s_aggregate,
                    "peak_memory_gb": r.peak_memory_gb,
                    "extra_memory_gb": r.extra_memory_gb,
                    "speedup_vs_eager": r.speedup_vs_eager,
                    "max_logit_diff": r.max_logit_diff,
                    "greedy_token_agreement": r.greedy_token_agreement,
                    "correct": r.correct,
                }
            )
        return out

    def summary(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "methods_ok": len(self.ok),
            "methods_failed": len(self.methods) - len(self.ok),
            "best_method": self.best(),
        }
        best = self.best()
        s["best_speedup_vs_eager"] = self.methods[best].speedup_vs_eager if best else None
        for r in self.methods.values():
            s[f"{r.name}.decode_ms_per_token_p50"] = r.decode_ms_per_token.get("p50")
            s[f"{r.name}.decode_tokens_per_s_aggregate"] = r.decode_tokens_per_s_aggregate
            s[f"{r.name}.speedup_vs_eager"] = r.speedup_vs_eager
            s[f"{r.name}.compile_s"] = r.compile_s
            s[f"{r.name}.correct"] = r.correct
        return s

    def to_artifact(self, params: dict[str, Any] | None = None) -> CompareArtifact:
        from lab.results import finish, new_artifact

        art = new_artifact(CompareArtifact, params or {"workload": self.workload})
        art.methods = [r.to_dict() for r in self.methods.values()]
        art.workload = dict(self.workload, device=self.device, dtype=self.dtype, preset=self.preset)
        art.memory_plan = self.memory_plan
        art.summary = self.summary()
        for r in self.methods.values():
            if r.status != "ok":
                art.unavailable[r.name] = r.reason or "failed"
        if not self.device.startswith("cuda"):
            art.unavailable["peak_memory_gb"] = (
                f"per-method peak memory needs the CUDA allocator's statistics; not available on {self.device}"
            )
        eager = self.methods.get("eager")
        if eager is None or eager.status != "ok":
            return finish(
                art, "failed", f"eager (the reference) failed: {eager.reason if eager else 'not run'}"
            )
        return finish(art)


# --- method implementations --------------------------------------------------------------------------


FLEX_BLOCK = 128


def flex_available() -> str | None:
    """None when this torch has FlexAttention with block masks built from tensors; else why not."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as e:
        return f"this torch has no torch.nn.attention.flex_attention ({e})"
    if not hasattr(BlockMask, "from_kv_blocks"):
        return "this torch's FlexAttention has no BlockMask.from_kv_blocks"
    return None


def flex_decode_step(model, tokens, input_pos, rows, temperature: float, top_k: int | None):
    """decode_step with FlexAttention in place of SDPA over the dense mask: each row reads only the
    cache blocks up to its position (the block mask) and the mask_mod trims the last block. Uses the
    model's own weights and cache; the model's default forward is untouched."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from lab.engine.generate import sample
    from lab.model.llama import apply_rope

    b, t = tokens.shape
    x = model.tok_embeddings(tokens)
    cos = model.rope_cos[input_pos].unsqueeze(2)
    sin = model.rope_sin[input_pos].unsqueeze(2)
    kv_len = model.max_seq_len
    n_blocks = (kv_len + FLEX_BLOCK - 1) // FLEX_BLOCK

    def mask_mod(bi, hi, qi, ki):
        return ki <= input_pos[bi, qi]

    filled = (input_pos.max(dim=1, keepdim=True).values // FLEX_BLOCK + 1).to(torch.int32).view(b, 1, 1)
    idx = torch.arange(n_blocks, dtype=torch.int32, device=tokens.device).expand(b, 1, 1, n_blocks)
    block_mask = BlockMask.from_kv_blocks(
        filled, idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(t, kv_len)
    )
    for layer in model.layers:
        attn = layer.attention
        h, hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
        q, k, v = attn.wqkv(layer.attention_norm(x)).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q = apply_rope(q.view(b, t, h, hd), cos, sin)
        k = apply_rope(k.view(b, t, hkv, hd), cos, sin)
        keys, values = attn.kv_cache.update(input_pos, k, v.view(b, t, hkv, hd), rows)
        y = flex_attention(q.transpose(1, 2), keys, values, block_mask=block_mask, enable_gqa=hkv != h)
        x = x + attn.wo(y.transpose(1, 2).reshape(b, t, h * hd))
        x = x + layer.feed_forward(layer.ffn_norm(x))
    logits = model.output(model.norm(x)).float()[:, -1]
    return sample(logits, temperature, top_k), logits


def build_method(name: str, model, max_batch: int, max_seq: int):
    """A Generator whose decode step is the method. Raises MethodUnavailable where it cannot run."""
    import torch

    from lab.engine.generate import Generator, decode_step

    cuda = model.output.weight.device.type == "cuda"
    if name in GPU_ONLY and not cuda:
        raise MethodUnavailable(f"needs a CUDA GPU ({GPU_ONLY[name]}); not available on cpu")
    if name == "eager":
        return Generator(model, "eager", max_batch, max_seq)
    if name == "compile":
        return Generator(model, "compile", max_batch, max_seq)
    if name == "reduce-overhead":
        return Generator(model, "compile-cudagraphs", max_batch, max_seq)
    if name in ("regional", "regional-cudagraphs"):
        from lab.engine.generate import regional_copy

        # On a twin (shared weights and cache): compiling the blocks in place would make every method
        # measured after this one run compiled blocks.
        model.setup_caches(max_batch, max_seq)
        return Generator(regional_copy(model), name, max_batch, max_seq)
    gen = Generator(model, "eager", max_batch, max_seq)
    if name == "eager-cudagraph":
        gen.decode_fn = CudaGraphDecode()
    elif name == "max-autotune":
        gen.decode_fn = torch.compile(decode_step, mode="max-autotune", fullgraph=True)
    elif name == "flex-attention":
        why = flex_available()
        if why:
            raise MethodUnavailable(why)
        gen.decode_fn = torch.compile(
            flex_decode_step, mode="reduce-overhead" if cuda else None, fullgraph=True
        )
    else:
        raise LabError(f"unknown method '{name}'; choose from: {', '.join(METHODS)}")
    gen.mode = name
    return gen


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """Comma-separated or a list; eager always first (the reference); unknown names are a LabError."""
    if text is None:
        names = list(DEFAULT_METHODS)
    elif isinstance(text, str):
        names = [m.strip() for m in text.split(",") if m.strip()]
    else:
        names = [str(m).strip() for m in text]
    if text is not None and not names:
        raise LabError(f"--methods is empty; choose from: {', '.join(METHODS)}")
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise LabError(f"unknown method(s) {', '.join(bad)}; choose from: {', '.join(METHODS)}")
    names = ["eager"] + [m for m in dict.fromkeys(names) if m != "eager"]
    return names


# --- measurement -------------------------------------------------------------------------------------


def _forced_logits(gen, prompt, forced):
    """Logits of every generated position with the inputs fixed to `forced` (eager's tokens), so the
    comparison is like for like even after a near-tie flips a greedy choice."""
    import torch

    with torch.inference_mode():
        b, t = prompt.shape
        dev = gen.device
        pos = torch.arange(t, device=dev).expand(b, t)
        _, logits = gen.prefill_fn(gen.model, prompt.to(dev), pos, None, 0.0, None)
        out = [logits.float().cpu()]
        input_pos = torch.full((b, 1), t, dtype=torch.long, device=dev)
        for i in range(1, forced.shape[1]):
            cur = forced[:, i - 1 : i].to(dev)
            _, logits = gen.decode_fn(gen.model, cur, input_pos, None, 0.0, None)
            out.append(logits.float().cpu())
            input_pos = input_pos + 1
        return torch.stack(out, dim=1)  # [b, n, vocab]


def _check_against(r: MethodResult, ref_tokens, ref_logits, tokens, logits, dtype: str) -> None:
    diff = (logits - ref_logits).abs().max().item()
    scale = max(ref_logits.abs().max().item(), 1e-12)
    r.max_logit_diff = diff
    r.rel_logit_diff = diff / scale
    r.forced_argmax_agreement = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    same = tokens == ref_tokens
    r.greedy_token_agreement = same.float().mean().item()
    cols = (~same).any(dim=0).nonzero()
    r.first_divergence = int(cols[0, 0]) if cols.numel() else None
    r.correct = bool(math.isfinite(diff) and r.rel_logit_diff <= REL_LOGIT_TOL.get(dtype, 5e-2))


def _run_method(
    name: str,
    factory: MethodFactory | None,
    model,
    prompt,
    max_new_tokens: int,
    iters: int,
    warmup: int,
):
    """Build, prime, time one method. Returns (result, the first timed iteration's tokens)."""
    import time

    import torch

    from lab.bench.warmup import cache_counters, cache_state, iteration_record
    from lab.engine.generate import no_recompile

    r = MethodResult(name)
    b, t = prompt.shape
    max_seq = t + max(max_new_tokens, 4)
    device = model.output.weight.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    before = cache_counters()
    t0 = time.perf_counter()
    gen = factory(model, b, max_seq) if factory else build_method(name, model, b, max_seq)
    gen.warmup(b, t, steps=min(max_new_tokens, 4))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prime_s = time.perf_counter() - t0
    r.cache_state, _ = cache_state(before, cache_counters())
    r.prime_s = prime_s
    r.compile_s = None if name == "eager" else prime_s
    for _ in range(warmup):
        gen.generate(prompt, max_new_tokens)
    with no_recompile():
        results = [gen.generate(prompt, max_new_tokens, keep_logits=False) for _ in range(iters)]
    r.iterations = [iteration_record(i, res, b) for i, res in enumerate(results)]
    r.ttft_ms = summarize([it["ttft_ms"] for it in r.iterations])
    r.decode_ms_per_token = summarize([s for it in r.iterations for s in it["decode_step_ms"]])
    decode_s = sum(sum(it["decode_step_ms"]) for it in r.iterations) / 1e3
    n = sum(it["decode_steps"] for it in r.iterations)
    r.decode_tokens_per_s_per_user = n / decode_s if decode_s > 0 else None
    r.decode_tokens_per_s_aggregate = n * b / decode_s if decode_s > 0 else None
    if device.type == "cuda":
        r.peak_memory_gb = torch.cuda.max_memory_allocated(device) / GB
        r.peak_memory_reserved_gb = torch.cuda.max_memory_reserved(device) / GB
        r.extra_memory_gb = (torch.cuda.max_memory_allocated(device) - base_alloc) / GB
    r.handle = gen
    return r, results[0].tokens


def _failed(name: str, e: BaseException) -> MethodResult:
    import torch

    if isinstance(e, MethodUnavailable):
        reason = str(e)
    elif isinstance(e, torch.cuda.OutOfMemoryError):
        reason = "out of memory: " + str(e).strip().splitlines()[0]
    else:
        text = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {text[0] if text else ''}".strip()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return MethodResult(name, status="failed", reason=reason[:500])


def compare_inference_methods(
    model: Any = None,
    *,
    methods: str | Sequence[str] | None = None,
    batch_size: int = 1,
    prompt_len: int = 128,
    max_new_tokens: int = 64,
    iters: int = 5,
    warmup: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    model_path: str | None = None,
    seed: int = 0,
    compile_cache_dir: str | None = None,
    custom_methods: Mapping[str, MethodFactory] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompareResult:
    """Run one workload through each decode method and compare against eager.

    model: a built `lab.model.Transformer` (its device and dtype are used), a preset name, or None
    (the default preset, or the checkpoint in `model_path` / $MODEL_PATH). methods: names from METHODS
    (default DEFAULT_METHODS; eager always runs first). custom_methods: extra {name: factory(model,
    max_batch_size, max_seq_len) -> Generator} run and checked like the built-in ones.

    Returns a CompareResult; `result.handle("reduce-overhead")` is the warm Generator to serve with.
    All handles share the model and its KV cache: serve from one handle per process.
    """
    import torch

    from lab.model import dtype_name
    from lab.model.llama import Transformer

    names = parse_methods(methods)
    custom = dict(custom_methods or {})
    clash = [n for n in custom if n in METHODS]
    if clash:
        raise LabError(f"custom method name(s) {', '.join(clash)} shadow built-in methods; rename them")
    for what, v, lo in (("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1), ("iters", iters, 1)):
        if v < lo:
            raise LabError(f"{what} must be >= {lo}")
    if warmup < 0:
        raise LabError("warmup must be >= 0")
    if max_new_tokens < 2:
        raise LabError("max_new_tokens must be >= 2 so that at least one decode step is timed")
    max_seq = prompt_len + max(max_new_tokens, 4)
    plan: dict[str, Any] = {}
    if isinstance(model, Transformer):
        from lab.model.plan import device_memory_gb, plan_memory

        preset = None
        if max_seq > model.args.max_seq_len:
            raise LabError(
                f"prompt_len + max_new_tokens = {max_seq} exceeds the model's context {model.args.max_seq_len}"
            )
        w = model.output.weight
        plan = plan_memory(
            model.args, dtype_name(w.dtype), batch_size, max_seq, device_memory_gb(w.device), str(w.device)
        ).to_dict()
    else:
        from lab.model import prepare

        if model is not None and not isinstance(model, str):
            raise LabError("model must be a lab Transformer, a preset name, or None")
        prepared = prepare(model, model_path, device, dtype, seed, batch_size, max_seq)
        model, preset, plan = prepared.model, prepared.spec.preset, prepared.plan.to_dict()
    if (
        compile_cache_dir
    ):  # after every check and the model build (bad input leaves no directory), before compiling
        from lab.engine.compile_cache import use_compile_cache

        use_compile_cache(compile_cache_dir)
    dev, dt = model.output.weight.device, model.output.weight.dtype
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.args.vocab_size, (batch_size, prompt_len), generator=gen)

    results: dict[str, MethodResult] = {}
    ref_tokens = ref_logits = None
    for name in names + list(custom):
        if progress:
            progress(name)
        try:
            r, tokens = _run_method(name, custom.get(name), model, prompt, max_new_tokens, iters, warmup)
            logits = _forced_logits(r.handle, prompt, ref_tokens if ref_tokens is not None else tokens)
            if name == "eager":
                ref_tokens, ref_logits = tokens, logits
            if ref_tokens is not None:
                _check_against(r, ref_tokens, ref_logits, tokens, logits, dtype_name(dt))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # LabError too: a custom method's misuse fails that method only
            r = _failed(name, e)
        results[name] = r
    eager = results.get("eager")
    if eager and eager.status == "ok":
        base = eager.decode_ms_per_token.get("p50")
        for r in results.values():
            p50 = r.decode_ms_per_token.get("p50")
            if r.status == "ok" and base and p50:
                r.speedup_vs_eager = base / p50
    workload = {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "max_new_tokens": max_new_tokens,
        "iters": iters,
        "warmup": warmup,
        "seed": seed,
        "methods": names + list(custom),
        "max_seq_len": max_seq,
    }
    return CompareResult(results, workload, str(dev), dtype_name(dt), preset, plan)


def compare_figures(art: CompareArtifact) -> dict[str, Any]:
    """Plotly figures for a compare artifact: decode latency per iteration and its distribution per
    method, speedup normalised to eager = 1x, memory per method (GPU), TTFT vs decode per method."""
    import plotly.graph_objects as go

    ok = [m for m in art.methods if m["status"] == "ok"]
    figs: dict[str, Any] = {}
    fig = go.Figure()
    for m in ok:
        its = m["iterations"]
        fig.add_scatter(
            x=[it["iteration"] for it in its],
            y=[it["decode_ms_per_token"] for it in its],
            name=m["name"],
            mode="lines+markers",
        )
    fig.update_layout(
        title="Decode ms/token per timed iteration", xaxis_title="iteration", yaxis_title="ms per token"
    )
    figs["latency_per_iteration"] = fig

    fig = go.Figure()
    for m in ok:
        fig.add_box(
            name=m["name"],
            y=[s for it in m["iterations"] for s in it["decode_step_ms"]],
            boxpoints="outliers",
        )
    fig.update_layout(title="Decode step latency distribution (every step)", yaxis_title="ms per token")
    figs["decode_distribution"] = fig

    fig = go.Figure()
    fig.add_bar(
        x=[m["name"] for m in ok],
        y=[m["speedup_vs_eager"] for m in ok],
        text=[f"{m['speedup_vs_eager']:.2f}x" if m["speedup_vs_eager"] else "" for m in ok],
        marker_color=["#888" if m["name"] == "eager" else ("#2a7" if m["correct"] else "#c33") for m in ok],
    )
    fig.add_hline(y=1.0, line_dash="dash", annotation_text="eager = 1x")
    failed = [m["name"] for m in art.methods if m["status"] != "ok"]
    title = "Decode speedup vs eager (p50 ms/token; red = not correct vs eager)"
    fig.update_layout(title=title + (f"<br><sub>failed: {', '.join(failed)}</sub>" if failed else ""))
    figs["speedup"] = fig

    fig = go.Figure()
    if any(m.get("peak_memory_gb") is not None for m in ok):
        fig.add_bar(name="peak allocated", x=[m["name"] for m in ok], y=[m.get("peak_memory_gb") for m in ok])
        fig.add_bar(
            name="extra over the model", x=[m["name"] for m in ok], y=[m.get("extra_memory_gb") for m in ok]
        )
        fig.update_layout(title="GPU memory per method", barmode="group", yaxis_title="GB")
    else:
        fig.update_layout(
            title=f"GPU memory per method: {art.unavailable.get('peak_memory_gb', 'not measured')}"
        )
    figs["memory"] = fig

    fig = go.Figure()
    names = [m["name"] for m in ok]
    fig.add_bar(name="TTFT p50 (prefill)", x=names, y=[m["ttft_ms"].get("p50") for m in ok])
    fig.add_bar(
        name="decode (p50 x decode steps)",
        x=names,
        y=[
            (m["decode_ms_per_token"].get("p50") or 0) * (art.workload.get("max_new_tokens", 1) - 1)
            for m in ok
        ],
    )
    fig.update_layout(
        title="Time to first token vs decode time, per method", barmode="group", yaxis_title="ms"
    )
    figs["ttft_vs_decode"] = fig
    return figs
