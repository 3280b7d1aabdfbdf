"""Prefill then decode, in six modes: eager; eager captured by hand in a CUDA graph (`eager-cudagraphs`,
no compiler); torch.compile of the whole step (`compile`), with CUDA graph
trees (`compile-cudagraphs`); and regional compilation, where each transformer block is compiled and
the identical blocks share one graph (`regional`), with the whole step captured by hand in one CUDA
graph (`regional-cudagraphs`).

The decode step (`decode_step`) is the whole hot path: one token for every row, sampled on the device
(no host synchronisation inside the loop). Timing uses CUDA events on the GPU and a host clock on the CPU
(where work is synchronous).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lab.errors import LabError
from lab.model.llama import Transformer

MODES = ("eager", "eager-cudagraphs", "compile", "compile-cudagraphs", "regional", "regional-cudagraphs")
CUDA_ONLY_MODES = ("eager-cudagraphs", "compile-cudagraphs", "regional-cudagraphs")
COMPILING_MODES = ("compile", "compile-cudagraphs", "regional", "regional-cudagraphs")


def compiles(mode: str) -> bool:
    """Whether `mode` runs torch.compile: it then uses the compile cache, and must not recompile under
    load. `eager-cudagraphs` only captures eager kernels in a CUDA graph: nothing to compile or cache."""
    return mode in COMPILING_MODES


EOS_CHECK_EVERY = 8  # one host sync per this many decode steps, only when an EOS id is set


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None) -> Tensor:
    """Greedy when temperature <= 0; else temperature/top-k sampling via the exponential-race trick
    (argmax of p/q with q ~ Exp(1)), which needs no host sync unlike torch.multinomial."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
        logits = torch.where(logits < v[..., -1:], torch.full_like(logits, -float("inf")), logits)
    probs = torch.softmax(logits, dim=-1)
    q = torch.empty_like(probs).exponential_(1)
    return (probs / q).argmax(dim=-1)


def prefill(
    model: Transformer,
    tokens: Tensor,
    input_pos: Tensor,
    rows: Tensor | None,
    temperature: float,
    top_k: int | None,
) -> tuple[Tensor, Tensor]:
    logits = model(tokens, input_pos, rows, last_only=True)[:, -1]
    return sample(logits, temperature, top_k), logits


def decode_step(
    model: Transformer,
    tokens: Tensor,
    input_pos: Tensor,
    rows: Tensor | None,
    temperature: float,
    top_k: int | None,
    kv_len: int | None = None,
) -> tuple[Tensor, Tensor]:
    """tokens, input_pos: [b, 1]. Returns the next token [b] and its logits [b, vocab]. kv_len: read only
    that much of the KV cache (Transformer.forward; the engine's --kv-buckets)."""
    logits = model(tokens, input_pos, rows, kv_len=kv_len)[:, -1]
    return sample(logits, temperature, top_k), logits


@contextlib.contextmanager
def no_recompile() -> Iterator[None]:
    """Inside a timed window a recompile must fail loudly instead of silently timing eager code."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("fail_on_recompile"):
        yield


# Dynamo graphs per code object (see tune_inductor); EngineConfig caps --kv-buckets well below it.
REGIONAL_GRAPHS_LIMIT = 64


def tune_inductor() -> None:
    """Inductor settings gpt-fast uses for decode. Coordinate-descent tuning of the GEMV-like reduction
    kernels is what lifts batch-1 decode toward the bandwidth roofline; the FX graph cache lets a restart
    reuse compiled graphs."""
    import torch._dynamo.config as dynamo_cfg
    import torch._inductor.config as cfg

    cfg.coordinate_descent_tuning = True
    cfg.triton.unique_kernel_names = True
    cfg.fx_graph_cache = True
    # Regional compilation keeps one static graph per shape of the one block code object: the prefill,
    # and the decode at each --kv-buckets length. Past Dynamo's default of 8 graphs it would run the
    # block uncompiled, with a warning only (seen on an H100: kv_read.py's arms and two engines).
    dynamo_cfg.recompile_limit = max(dynamo_cfg.recompile_limit, REGIONAL_GRAPHS_LIMIT)


def compile_fn(fn: Callable, mode: str) -> Callable:
    if mode == "eager":
        return fn
    if mode == "eager-cudagraphs":
        # No compiler at all: the eager step captured by hand in one CUDA graph per shape. Ready in
        # seconds (nothing to compile); the compare step measured it at 3.39x eager, batch 1, on an H100.
        from lab.engine.cudagraph import CudaGraphDecode

        return CudaGraphDecode(fn)
    tune_inductor()
    if mode == "compile":
        return torch.compile(fn)
    if mode == "compile-cudagraphs":
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    if mode in ("regional", "regional-cudagraphs"):
        return Regional(fn, cudagraphs=mode == "regional-cudagraphs")
    raise LabError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")


def compile_blocks(model: Transformer) -> None:
    """Regional compilation: torch.compile each transformer block, in place. The blocks are the same module
    type with the same shapes and parameters passed as graph inputs, so dynamo traces one block and every
    layer reuses that graph: compile (and coordinate-descent tuning) cost one block per input shape, not
    the whole model. Embedding, mask, final norm, head and sampling stay eager (a few kernels).
    `dynamic=False`: the decode and the prefill shapes each get a static graph, never a dynamic one."""
    if getattr(model, "_lab_regional", False):
        return
    tune_inductor()
    for layer in model.layers:
        layer.compile(fullgraph=True, dynamic=False)
    model._lab_regional = True


def regional_copy(model: Transformer) -> Transformer:
    """The model with its blocks compiled as compile_blocks does, but on shallow copies: the copies share
    every parameter, buffer and KV cache with `model`, whose own blocks stay eager. The engine's background
    upgrade (EngineConfig.start_mode) compiles these while it keeps serving from `model` uncompiled, so a
    step of the start mode never runs (or compiles) a compiled block by accident."""
    import copy

    tune_inductor()
    blocks = []
    for layer in model.layers:
        block = copy.copy(layer)  # a new __dict__; _parameters, _buffers and _modules stay shared
        block.compile(fullgraph=True, dynamic=False)
        blocks.append(block)
    twin = copy.copy(model)
    twin._modules = {**model._modules, "layers": torch.nn.ModuleList(blocks)}
    twin._lab_regional = True
    return twin


class Regional:
    """`fn(model, ...)` with the model's blocks compiled (compile_blocks); with `cudagraphs`, a decode step
    (decode_step's signature) captured by hand into one CUDA graph per shape (CudaGraphDecode's warm-up
    calls, before the capture, compile the blocks for that shape)."""

    def __init__(self, fn: Callable, cudagraphs: bool):
        self.fn = fn
        self.graphs = None
        if cudagraphs:
            from lab.engine.cudagraph import CudaGraphDecode

            self.graphs = CudaGraphDecode(fn)

    def __call__(self, model: Transformer, *args, **kwargs):
        compile_blocks(model)
        return (self.graphs or self.fn)(model, *args, **kwargs)


def auto_mode(device: torch.device, dtype: str = "auto") -> str:
    """`--mode auto`, the one rule every command uses. On a GPU: regional-cudagraphs, which decodes within 4 %
    of compile-cudagraphs and compiles in seconds, not minutes (H100, llama-8b: batch 1 157.5 vs 164.3
    tok/s, batch 16 2,303 vs 2,336; a cold `lab serve` full speed at 50 s against 194 s; gpt-40b fp8 batch
    16 735 vs 751). int8 weights keep compile-cudagraphs: compiling their blocks one by one stops on an
    Inductor assertion with torch 2.11 (H100), and compiled whole they decode gpt-40b at MBU 0.76. So does a
    tensor-parallel tier (under torchrun): its GPU figures were measured compiled whole, regional is not.
    On the CPU: eager."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "eager"
    from lab.distributed import launched_world_size

    if dtype == "int8" or (launched_world_size() or 1) > 1:
        return "compile-cudagraphs"
    return "regional-cudagraphs"


GPU_KV_BUCKETS = 4  # --kv-buckets auto on one GPU: the whole cache, a half, a quarter, an eighth


def auto_kv_buckets(device: torch.device, mode: str) -> int:
    """`--kv-buckets auto`. On one GPU, in a mode that can bucket (not a whole-step compile, not tensor
    parallel): 4 lengths, so a short request's decode reads an eighth of the 4,096-token cache, not all of
    it. Bandwidth-bound: the whole read of `lab serve`'s llama-8b cache is 8.6 GB per step beside 16 GB of
    weights, 2.9 ms of a 12.7 ms batch-16 step on an H100 (benchmarks/kv_read.py). On the CPU: 1, the
    whole cache (no compile per length in the tests and the drill)."""
    if device.type != "cuda" or mode in ("compile", "compile-cudagraphs"):
        return 1
    from lab.distributed import launched_world_size

    return 1 if (launched_world_size() or 1) > 1 else GPU_KV_BUCKETS


def check_mode(mode: str, device: torch.device) -> None:
    if mode not in MODES:
        raise LabError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
    if mode in CUDA_ONLY_MODES and device.type != "cuda":
        raise LabError(f"mode {mode} needs a CUDA GPU; use --mode eager, compile or regional on CPU")


class _Clock:
    """CUDA events on the GPU (device work is asynchronous); perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_s(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


@dataclass
class GenerationResult:
    tokens: Tensor  # [b, n_new] on the CPU
    prefill_s: float  # time to first token (prefill + first sample)
    decode_step_s: list[float] = field(default_factory=list)  # one entry per decode step
    logits: list[Tensor] = field(default_factory=list)  # per generated token, when asked for

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def decode_s(self) -> float:
        return sum(self.decode_step_s)

    def to_dict(self) -> dict:
        n = len(self.decode_step_s)
        return {
            "token_ids": self.tokens.tolist() if self.batch_size > 1 else self.tokens[0].tolist(),
            "batch_size": self.batch_size,
            "ttft_ms": self.prefill_s * 1e3,
            "decode_steps": n,
            "decode_ms_per_token": (self.decode_s / n * 1e3) if n else None,
            "decode_tokens_per_s_per_user": (n / self.decode_s) if n and self.decode_s > 0 else None,
            "decode_tokens_per_s_aggregate": (n * self.batch_size / self.decode_s)
            if n and self.decode_s > 0
            else None,
        }


class Generator:
    """A model with its static cache and (optionally compiled) decode step. Reuse one per process:
    compiled graphs and captured CUDA graphs live as long as it does."""

    def __init__(
        self, model: Transformer, mode: str = "eager", max_batch_size: int = 1, max_seq_len: int = 256
    ):
        self.device = model.output.weight.device
        check_mode(mode, self.device)
        self.model, self.mode = model, mode
        model.setup_caches(max_batch_size, max_seq_len)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.prefill_fn = prefill  # prefill is compute-bound and variable-length: eager cuBLAS serves it
        self.decode_fn = compile_fn(decode_step, mode)

    @torch.inference_mode()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        eos_id: int | None = None,
        keep_logits: bool = False,
    ) -> GenerationResult:
        """prompt: [b, T] token ids (same length per row). Returns the new tokens and the timings."""
        if prompt.dim() == 1:
            prompt = prompt[None]
        b, t = prompt.shape
        if b > self.max_batch_size:
            raise LabError(f"batch {b} exceeds the generator's max batch size {self.max_batch_size}")
        if t + max_new_tokens > self.max_seq_len:
            raise LabError(
                f"prompt {t} + max new tokens {max_new_tokens} exceeds the cache length {self.max_seq_len}"
            )
        if max_new_tokens < 1:
            raise LabError("max new tokens must be at least 1")
        if seed is not None:
            torch.manual_seed(seed)
        prompt = prompt.to(self.device)
        out = torch.empty(b, max_new_tokens, dtype=torch.long, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        kept: list[Tensor] = []
        clock = _Clock(self.device)

        clock.mark()
        pos = torch.arange(t, device=self.device).expand(b, t)
        tok, logits = self.prefill_fn(self.model, prompt, pos, None, temperature, top_k)
        out[:, 0] = tok
        if keep_logits:
            kept.append(logits.clone())
        clock.mark()
        input_pos = torch.full((b, 1), t, dtype=torch.long, device=self.device)
        cur = tok.view(b, 1).clone()
        n = 1
        for i in range(1, max_new_tokens):
            if eos_id is not None:
                done |= cur.view(b) == eos_id
                if i % EOS_CHECK_EVERY == 0 and bool(done.all()):
                    break
            tok, logits = self.decode_fn(self.model, cur, input_pos, None, temperature, top_k)
            # CUDA-graph outputs live in static memory the next replay overwrites: copy them out.
            out[:, i] = tok
            if keep_logits:
                kept.append(logits.clone())
            cur = tok.view(b, 1).clone()
            input_pos = input_pos + 1
            clock.mark()
            n += 1
        intervals = clock.intervals_s()
        tokens = out[:, :n].cpu()
        if eos_id is not None:  # everything after a row's EOS is padding
            for r in range(b):
                hits = (tokens[r] == eos_id).nonzero()
                if hits.numel():
                    tokens[r, hits[0, 0] + 1 :] = eos_id
        return GenerationResult(
            tokens=tokens,
            prefill_s=intervals[0],
            decode_step_s=intervals[1:],
            logits=[x.float().cpu() for x in kept],
        )

    def warmup(self, batch_size: int, prompt_len: int, steps: int = 4) -> float:
        """Compile and capture the shapes used later: three untimed generate calls, so each CUDA-graph
        shape is recorded and replayed before anything is timed. Returns seconds."""
        t0 = time.perf_counter()
        prompt = torch.zeros(batch_size, prompt_len, dtype=torch.long)
        n = max(1, min(max(steps, 4), self.max_seq_len - prompt_len))
        for _ in range(3):
            self.generate(prompt, max_new_tokens=n)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
