"""The continuous-batching engine with the playbook's back-pressure (step 5), used in-process by the
server and by the load test.

One thread owns the model. The KV cache has `max_batch_size` slots; every tick it
  1. expires waiting requests older than the queue timeout (`timed_out_in_queue`),
  2. admits waiting requests into free slots (FIFO; long prompts only in batch windows at least
     `long_context_window_s` apart; never above the GPU-memory guard),
  3. prefills at most `prefill_chunk_tokens` prompt tokens (chunked, into the request's slot), which
     bounds how long running requests wait for their next token,
  4. runs ONE fixed-shape decode step over all slots (idle slots compute a throwaway token), the shape
     torch.compile / CUDA graphs capture once, and
  5. hands every new token to its request's callback (one host sync per tick).

A bounded waiting queue rejects at once when full (`rejected_queue_full`); a drain stops admitting new
requests and finishes the accepted ones. Every request ends in exactly one outcome.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lab import startup
from lab.engine.generate import (
    check_mode,
    compile_fn,
    compiles,
    decode_step,
    no_recompile,
    sample,
    tune_inductor,
)
from lab.errors import LabError
from lab.model.llama import Transformer

GB = 1e9
START_MODES = ("eager", "eager-cudagraphs")  # EngineConfig.start_mode: nothing to compile
UPGRADE_MODES = ("regional", "regional-cudagraphs")  # compiled beside the live engine (regional_copy)
MAX_KV_BUCKETS = 8  # EngineConfig.kv_buckets: one compiled, captured decode per length (see tune_inductor)
COMPILING_SWITCH_INTERVAL_S = 0.0002  # sys.setswitchinterval while the compile thread runs (see there)
OUTCOMES = (
    "ok",
    "rejected_queue_full",
    "rejected_draining",
    "timed_out_in_queue",
    "error",
    "cancelled",
)


@dataclass
class EngineConfig:
    """Back-pressure and shape settings. Defaults are the playbook's (step 5)."""

    max_batch_size: int = 16  # playbook: 8-16 requests
    max_seq_len: int = 4096  # prompt + generated tokens per slot (the static KV cache length)
    max_new_tokens: int = 256  # cap per request; playbook: 128-256
    max_queue: int = 64  # waiting requests beyond the running batch; one more is rejected at once
    queue_timeout_s: float = 5.0  # playbook: a request still waiting after this is rejected
    long_context_tokens: int = 2048  # prompts longer than this go to the long-context lane
    long_context_window_s: float = 4.0  # playbook: long-context batch windows >= 4 s apart
    max_gpu_memory_fraction: float = 0.8  # playbook: keep GPU memory below 80 %
    prefill_chunk_tokens: int = 512  # prompt tokens prefilled per tick (bounds decode stalls)
    prefill_rows: int = 4  # requests prefilled together per tick at most
    # Fixed-shape prefill [prefill_rows, prefill_chunk_tokens // prefill_rows], compiled like the decode
    # step (eager prefill of a large model is launch-bound: ~4 decode steps). None: on in compiled modes.
    prefill_fixed_shape: bool | None = None
    mode: str = "eager"  # the decode step: one of lab.engine.generate.MODES
    # Serve in this mode (eager or eager-cudagraphs: nothing to compile, ready in seconds) while `mode`
    # (regional or regional-cudagraphs) compiles in a background thread; the engine switches between two
    # ticks once it is compiled. The fallback's time to first token then no longer waits for the compiler
    # (issue 10). None: serve in `mode` from the start.
    start_mode: str | None = None
    # The decode step reads the KV cache only up to the smallest of this many lengths (max_seq_len, half
    # of it, a quarter, ...) that holds every running request, instead of the whole static cache of
    # every slot: each length is a step of its own (compiled and captured at warm-up). 1: the whole cache.
    kv_buckets: int = 1
    step_delay_s: float = 0.0  # drills/tests only: sleep per tick to simulate a slower GPU
    # Inductor's on-disk cache (lab.engine.compile_cache), already pointed at by the caller; recorded here
    # so the artifact says where a restart loads its compiled graphs from. None: the process default.
    compile_cache_dir: str | None = None

    def validate(self, model_context: int) -> None:
        checks = [
            (self.max_batch_size >= 1, "--max-batch-size must be >= 1"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
            (self.max_queue >= 0, "--max-queue must be >= 0"),
            (self.queue_timeout_s > 0, "--queue-timeout-s must be > 0"),
            (self.long_context_window_s >= 0, "--long-context-window-s must be >= 0"),
            (0 < self.max_gpu_memory_fraction <= 1, "--max-gpu-memory-fraction must be in (0, 1]"),
            (self.prefill_chunk_tokens >= 1, "--prefill-chunk-tokens must be >= 1"),
            (
                1 <= self.prefill_rows <= self.prefill_chunk_tokens,
                "--prefill-rows must be between 1 and --prefill-chunk-tokens",
            ),
            (self.max_seq_len >= 2, "--max-seq-len must be >= 2"),
            (
                self.max_seq_len <= model_context,
                f"--max-seq-len {self.max_seq_len} exceeds the model's context of {model_context} tokens",
            ),
        ]
        checks.append(
            (
                1 <= self.kv_buckets <= MAX_KV_BUCKETS,
                f"--kv-buckets must be between 1 (read the whole cache) and {MAX_KV_BUCKETS} (each length is a "
                "compiled and captured step of its own)",
            )
        )
        if self.kv_buckets > 1:
            checks.append(
                (
                    self.mode not in ("compile", "compile-cudagraphs"),
                    f"--kv-buckets needs --mode eager, eager-cudagraphs, regional or regional-cudagraphs, not "
                    f"{self.mode} (whole-step compile would turn the lengths into one dynamic graph)",
                )
            )
        if self.start_mode is not None:
            checks += [
                (
                    self.start_mode in START_MODES,
                    f"--start-mode {self.start_mode} is not one of: {', '.join(START_MODES)} (modes with nothing "
                    "to compile)",
                ),
                (
                    self.mode in UPGRADE_MODES,
                    f"--start-mode {self.start_mode} needs --mode {' or '.join(UPGRADE_MODES)} (the mode compiled in "
                    f"the background), not {self.mode}; or drop --start-mode",
                ),
            ]
        for ok, msg in checks:
            if not ok:
                raise LabError(msg)


@dataclass(eq=False)
class Request:
    """One completion request and everything that happened to it (times on time.monotonic())."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    ignore_eos: bool = False
    id: str = ""
    # Called from the engine thread: (request, event) with event in admitted / token / done.
    callback: Callable[[Request, str], None] | None = None
    t_submitted: float | None = None
    t_admitted: float | None = None
    t_first_token: float | None = None
    t_done: float | None = None
    token_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    outcome: str | None = None
    finish_reason: str | None = None  # length / stop (OpenAI's names)
    reason: str | None = None  # why it was rejected, timed out or failed
    long_context: bool = False
    # Engine-private state.
    _slot: int = -1
    _prefilled: int = 0
    _cancel: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.outcome is not None


_ids = itertools.count()


class Engine:
    """Continuous batching over a model with a static KV cache of `max_batch_size` slots."""

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig | None = None,
        eos_id: int | None = None,
    ):
        self.config = cfg = config or EngineConfig()
        self.model = model
        self.device = model.output.weight.device
        self.vocab_size = model.args.vocab_size
        self.eos_id = eos_id
        cfg.validate(model.args.max_seq_len)
        check_mode(cfg.mode, self.device)
        if cfg.start_mode:
            check_mode(cfg.start_mode, self.device)
        self.fixed_prefill = (
            compiles(cfg.mode) if cfg.prefill_fixed_shape is None else cfg.prefill_fixed_shape
        )
        self.prefill_width = cfg.prefill_chunk_tokens // cfg.prefill_rows
        # A fixed-shape prefill fills its unused rows with throwaway work that writes one scratch cache
        # row past the batch slots (no request ever reads it; the decode step covers slots 0..B-1 only).
        self.scratch_row = cfg.max_batch_size
        # The KV lengths the decode reads now. A start mode reads the whole cache (one graph to capture
        # before the first token: capturing 4 lengths took the warm-up from 0.8 to 1.8-3.7 s on an H100);
        # the switch to `mode` brings in every length (compiled and captured by then).
        self.kv_lengths_target = kv_bucket_lengths(cfg.max_seq_len, cfg.kv_buckets)
        self.kv_lengths = [cfg.max_seq_len] if cfg.start_mode else self.kv_lengths_target
        model.setup_caches(cfg.max_batch_size + (1 if self.fixed_prefill else 0), cfg.max_seq_len)
        # The steps run on `step_model` in `self.mode`; a background upgrade (cfg.start_mode) swaps all three.
        self.step_model, self.mode = model, cfg.start_mode or cfg.mode
        self.decode_fn = compile_fn(decode_step, self.mode)
        self.prefill_fn = prefill_logits
        if self.fixed_prefill and compiles(self.mode):
            # One static shape: plain compile (no CUDA graphs, so no second graph tree beside the decode);
            # in the regional modes the compiled blocks serve the prefill shape too.
            prefill_mode = "regional" if cfg.mode.startswith("regional") else "compile"
            self.prefill_fn = compile_fn(prefill_logits, prefill_mode)
        self.memory_guard = _MemoryGuard(model, cfg, self.device)
        self.memory_guard.check_startup()

        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()  # short prompts, FIFO
        self._long: deque[Request] = deque()  # long-context lane
        self._slots: list[Request | None] = [None] * cfg.max_batch_size
        self._prefilling: deque[int] = deque()  # slots still prefilling, in admission order
        self._last_long_release = -float("inf")
        self._draining = False
        self._drain_start: tuple[Counter[str], int, float] | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.crashed: str | None = None
        self.warmup_s: float | None = None
        self.compile_cache_state: str | None = None  # set by warmup(): hit, miss, partial or none
        self.outcomes: Counter[str] = Counter()
        self.tokens_generated = 0
        self.decode_steps = 0
        self.listeners: list[Callable[[Request], None]] = []  # called once per finished request
        # Tensor parallel (lab.distributed): on rank 0 of a multi-GPU tier this engine is the leader and
        # broadcasts every step's plan; the other ranks run it in lab.distributed.follow_engine.
        from lab.distributed import send_plan, tp_leader, world_size

        self.tp_leader, self._send_plan = tp_leader(), send_plan
        if cfg.start_mode and world_size() > 1:
            raise LabError(
                "--start-mode is single-GPU only (every rank would have to switch at the same step); "
                "use --start-mode none with --tensor-parallel-gpus > 1"
            )
        if cfg.kv_buckets > 1 and world_size() > 1:
            raise LabError(
                "--kv-buckets is single-GPU only; use --kv-buckets 1 with --tensor-parallel-gpus > 1"
            )
        # The background upgrade: pending -> compiling -> done | failed (None without a start mode).
        self.upgrade: dict[str, Any] | None = (
            {"state": "pending", "from": cfg.start_mode, "to": cfg.mode} if cfg.start_mode else None
        )
        self.upgraded = threading.Event()  # set once the upgrade is done or failed
        # (twin, cache state, seconds per phase) or the compile's exception
        self._upgrade_result: tuple[Transformer, str, dict[str, float]] | BaseException | None = None

    # --- public API (any thread) -------------------------------------------------------------------
    def start(self, warmup: bool = True) -> Engine:
        """Start the model thread; `ready` is set once warm-up (compile + capture) is done."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(warmup,), name="lab-engine", daemon=True)
            self._thread.start()
        return self

    def validate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0) -> None:
        """Raise LabError (a 400 for the server) for a request the engine can never serve."""
        cfg = self.config
        if not prompt_ids:
            raise LabError("the prompt is empty; send at least one token")
        if max_new_tokens < 1:
            raise LabError("max_tokens must be at least 1")
        if max_new_tokens > cfg.max_new_tokens:
            raise LabError(f"max_tokens {max_new_tokens} exceeds the server's cap of {cfg.max_new_tokens}")
        if not temperature >= 0:
            raise LabError("temperature must be >= 0")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise LabError(f"token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_ids) + max_new_tokens > cfg.max_seq_len:
            raise LabError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens {max_new_tokens} exceeds the context of "
                f"{cfg.max_seq_len} tokens; shorten the prompt or lower max_tokens"
            )

    def submit(self, req: Request) -> Request:
        """Queue a request. A full queue or a drain rejects it at once (its outcome is set before this
        returns); otherwise it is admitted, times out in the queue, or finishes later."""
        self.validate(req.prompt_ids, req.max_new_tokens, req.temperature)
        req.id = req.id or f"req-{next(_ids)}"
        req.t_submitted = req.t_submitted or time.monotonic()
        req.long_context = req.prompt_len > self.config.long_context_tokens
        with self._cv:
            if self.crashed:
                self._finish(req, "error", reason=f"engine failed: {self.crashed}")
            elif self._draining or self._stop:
                self._finish(req, "rejected_draining", reason="the server is draining; retry elsewhere")
            elif len(self._waiting) + len(self._long) >= self.config.max_queue:
                self._finish(
                    req,
                    "rejected_queue_full",
                    reason=f"waiting queue full ({self.config.max_queue} requests)",
                )
            else:
                (self._long if req.long_context else self._waiting).append(req)
                self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: free its slot (or queue place) at the next tick."""
        with self._cv:
            req._cancel = True
            self._cv.notify()

    def begin_drain(self) -> None:
        """Stop admitting new requests; accepted ones (waiting or running) still finish."""
        with self._cv:
            if not self._draining:
                self._drain_start = (Counter(self.outcomes), self._in_flight(), time.monotonic())
            self._draining = True
            self._cv.notify()

    def _in_flight(self) -> int:
        return len(self._waiting) + len(self._long) + sum(s is not None for s in self._slots)

    @property
    def draining(self) -> bool:
        return self._draining

    def idle(self) -> bool:
        with self._cv:
            return not (self._waiting or self._long or any(self._slots))

    def drain(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Stop admitting, wait for accepted requests to finish (up to `timeout_s`; the rest are
        cancelled), stop the thread, and report what happened."""
        self.begin_drain()
        before, in_flight, t_start = self._drain_start
        deadline = time.monotonic() + timeout_s
        while not self.idle() and time.monotonic() < deadline and self._thread_alive():
            time.sleep(0.01)
        self.stop()
        after = self.outcomes - before
        return {
            "in_flight_at_drain": in_flight,
            "finished_during_drain": after.get("ok", 0),
            "cancelled": after.get("cancelled", 0),
            "outcomes_during_drain": dict(after),
            "outcomes_total": dict(self.outcomes),
            "drain_timeout_s": timeout_s,
            "drain_s": round(time.monotonic() - t_start, 3),
        }

    def stop(self) -> None:
        """Stop the thread; anything still waiting or running is cancelled (accounted, not dropped)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread_alive():
            self._thread.join(timeout=60)
        with self._cv:
            for req in list(self._waiting) + list(self._long) + [s for s in self._slots if s]:
                self._finish(req, "cancelled", reason="engine stopped")
            self._waiting.clear()
            self._long.clear()
            self._slots = [None] * self.config.max_batch_size
            self._prefilling.clear()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            running = sum(s is not None for s in self._slots)
            out = {
                "ready": self.ready.is_set(),
                "mode": self.mode,
                "draining": self._draining,
                "waiting": len(self._waiting),
                "waiting_long_context": len(self._long),
                "running": running,
                "prefilling": len(self._prefilling),
                "outcomes": dict(self.outcomes),
                "tokens_generated": self.tokens_generated,
                "decode_steps": self.decode_steps,
                "memory_guard_deferrals": self.memory_guard.deferrals,
            }
            if self.upgrade is not None:
                out["upgrade"] = dict(self.upgrade)
        out.update(self.memory_guard.peak())
        return out

    # --- the model thread -------------------------------------------------------------------------
    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self, warmup: bool) -> None:
        try:
            if compiles(self.mode):
                # Inductor's config overrides are per thread from torch 2.12 (ContextVars): set in the thread
                # that built the engine, they did not reach this one, so the server compiled without the
                # tuning (and with other cache keys than `lab warmup`'s prime, which then missed).
                # Not for a start mode: importing Inductor's config imports Dynamo (1.1 s on this 2-core
                # host) before the first token; the compile thread and the switch (compile_fn) tune their own.
                tune_inductor()
            if self.config.mode == "compile-cudagraphs":
                _cudagraph_state_for_this_thread()
            with torch.inference_mode():
                if warmup or self.mode != "eager":  # compiled modes must not compile under load
                    self._send_plan({"op": "warmup"})
                    self.warmup_s = self.warmup()
                startup.mark("ready")
                self.ready.set()
                if self.upgrade is not None and not self._serve_while_compiling():
                    return
                # After an upgrade only: set_stance is process-wide, and the compile thread must compile.
                guard = no_recompile() if compiles(self.mode) else _nullcontext()
                with guard:
                    while self._loop_once():
                        pass
        except Exception as e:  # fail every request loudly rather than hang them
            with self._cv:
                self.crashed = f"{type(e).__name__}: {e}"
                for req in list(self._waiting) + list(self._long) + [s for s in self._slots if s]:
                    self._finish(req, "error", reason=f"engine failed: {self.crashed}")
                self._waiting.clear()
                self._long.clear()
                self._slots = [None] * self.config.max_batch_size
                self._prefilling.clear()
        finally:
            if self.tp_leader:  # release the follower ranks (best effort: the group may be broken)
                try:
                    self._send_plan({"op": "stop"})
                except Exception:
                    pass

    def _serve_while_compiling(self) -> bool:
        """Serve in the start mode while `config.mode` compiles in a thread of its own, then switch between
        two ticks. False when the engine stopped first (the compile thread, a daemon, is left behind)."""
        thread = threading.Thread(target=self._compile_upgrade, name="lab-compile", daemon=True)
        with self._cv:
            self.upgrade["state"] = "compiling"
        t0 = time.monotonic()
        # Every torch op releases the GIL while it runs, and taking it back from a busy thread waits for the
        # switch interval (5 ms by default): with the compile thread (Dynamo, Python through and through)
        # holding it, each op of an eager prefill and each step's sync in the engine could wait 5 ms. With
        # 0.2 ms, the slowest first token of a request served while compiling fell from 177-351 ms to
        # 46-54 ms (tiny model, 2-core dev host). On the H100 host the start mode's rate did not change:
        # there the compile thread's imports, compiled from source without a bytecode cache, dominate.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, COMPILING_SWITCH_INTERVAL_S))
        try:
            thread.start()
            while thread.is_alive():
                if not self._loop_once():
                    return False
        finally:
            sys.setswitchinterval(switch)
        self._finish_upgrade(time.monotonic() - t0)
        return True

    def _compile_upgrade(self) -> None:
        """The compile thread: compile the blocks of `config.mode` for the decode and prefill shapes, on a
        twin of the model (regional_copy: shared weights and cache, blocks of its own), running each step
        for real beside the live engine. What it writes is never read: the prefill writes the scratch row
        only, and the decode writes every slot's cache at the last position, which no request reaches
        (validate: prompt + new tokens <= max_seq_len, so the last token fed sits at max_seq_len - 2).
        Both threads queue kernels on the same stream, so the kernels never overlap."""
        from lab.engine.compile_cache import cache_counters, cache_state
        from lab.engine.generate import regional_copy

        # Seconds per phase, so a slow switch (or a slow start-mode request meanwhile) says where it went.
        phases, t = {}, time.monotonic()

        def lap(name: str) -> None:
            nonlocal t
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            phases[name], t = time.monotonic() - t, time.monotonic()

        try:
            before = cache_counters()
            with torch.inference_mode():
                twin = regional_copy(self.model)
                lap("twin")
                for _ in range(2):
                    prefill_logits(twin, *self._scratch_prefill_inputs())
                lap("prefill")
                for kw in self._decode_variants(self.kv_lengths_target):
                    for _ in range(2):
                        decode_step(twin, *self._scratch_decode_inputs(), **kw)
                    lap(f"decode_kv{kw['kv_len']}" if kw else "decode")
            self._upgrade_result = (twin, cache_state(before, cache_counters())[0], phases)
        except BaseException as e:  # the engine keeps serving in its start mode; the reason is reported
            self._upgrade_result = e

    def _decode_variants(self, lengths: list[int] | None = None) -> list[dict[str, int]]:
        """The decode step's keyword arguments, one per compiled/captured variant: one per KV length (those
        read now, or `lengths`)."""
        lengths = self.kv_lengths if lengths is None else lengths
        return [{"kv_len": n} for n in lengths] if len(lengths) > 1 else [{}]

    def _kv_kwargs(self, positions: list[int]) -> dict[str, int]:
        """The shortest KV length that holds every decoding row's position (and its own new key)."""
        if len(self.kv_lengths) == 1:
            return {}
        need = max(positions) + 1
        return {"kv_len": next(n for n in self.kv_lengths if n >= need)}

    def _scratch_prefill_inputs(self):
        r, w, dev = self.config.prefill_rows, self.prefill_width, self.device
        last = self.config.max_seq_len - 1
        pos = torch.arange(w, device=dev).clamp(max=last).expand(r, w).contiguous()
        return (
            torch.zeros(r, w, dtype=torch.long, device=dev),
            pos,
            torch.full((r,), self.scratch_row, dtype=torch.long, device=dev),
            torch.full((r,), w - 1, dtype=torch.long, device=dev),
        )

    def _scratch_decode_inputs(self):
        b, dev = self.config.max_batch_size, self.device
        pos = torch.full((b, 1), self.config.max_seq_len - 1, dtype=torch.long, device=dev)
        return torch.zeros(b, 1, dtype=torch.long, device=dev), pos, None, 0.0, None

    def _finish_upgrade(self, seconds: float) -> None:
        """In the engine thread, between two ticks: capture the compiled decode (regional-cudagraphs) and
        switch every step to it; or, if the compile failed, keep serving in the start mode and say why."""
        result, info = self._upgrade_result, {"compile_s": seconds}
        if not isinstance(result, BaseException):
            twin, info["compile_cache"], info["phases_s"] = result
            try:
                t0 = time.monotonic()
                decode_fn = compile_fn(decode_step, self.config.mode)  # Regional; captures on its first call
                for kw in self._decode_variants(self.kv_lengths_target):
                    decode_fn(twin, *self._scratch_decode_inputs(), **kw)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                info["capture_s"] = time.monotonic() - t0
                self.step_model, self.decode_fn, self.prefill_fn = twin, decode_fn, prefill_logits
                self.kv_lengths = self.kv_lengths_target
            except Exception as e:
                result = e
        with self._cv:
            if isinstance(result, BaseException):
                info.update(state="failed", reason=f"{type(result).__name__}: {result}"[:500])
            else:
                self.mode = self.config.mode
                info["state"] = "done"
                startup.mark("upgraded")
            self.upgrade.update(info)
        self.upgraded.set()

    def _loop_once(self) -> bool:
        with self._cv:
            if self._stop:
                return False
            now = time.monotonic()
            self._expire(now)
            self._admit(now)
            if not any(self._slots):
                self._cv.wait(timeout=self._next_wakeup(now))
                if self.tp_leader:
                    self._send_plan({"op": "idle"})  # keep-alive, at most once a second
                return True
        self._tick()
        return True

    def _next_wakeup(self, now: float) -> float:
        """Sleep until the next queue deadline or long-context window, at most 50 ms."""
        wake = 0.05
        for req in itertools.chain(self._waiting, self._long):
            wake = min(wake, max(0.0, self._deadline(req) - now))
        if self._long:
            wake = min(wake, max(0.0, self._last_long_release + self.config.long_context_window_s - now))
        return max(wake, 0.0005)

    def _deadline(self, req: Request) -> float:
        # Long-context requests are routed to batch windows on purpose: their queue timeout starts
        # counting after the window they were made to wait for.
        extra = self.config.long_context_window_s if req.long_context else 0.0
        return req.t_submitted + self.config.queue_timeout_s + extra

    def _expire(self, now: float) -> None:
        for q in (self._waiting, self._long):
            keep = deque()
            for req in q:
                if req._cancel:
                    self._finish(req, "cancelled", reason="client cancelled while waiting")
                elif now >= self._deadline(req):
                    self._finish(
                        req,
                        "timed_out_in_queue",
                        reason=f"waited {now - req.t_submitted:.2f} s in the queue "
                        f"(--queue-timeout-s {self.config.queue_timeout_s:g})",
                    )
                else:
                    keep.append(req)
            q.clear()
            q.extend(keep)
        for slot, req in enumerate(self._slots):
            if req is not None and req._cancel:
                self._release(slot)
                self._finish(req, "cancelled", reason="client cancelled while running")

    def _admit(self, now: float) -> None:
        if self._stop:
            return
        free = [i for i, s in enumerate(self._slots) if s is None]
        cfg = self.config
        # The long-context lane: released together, at most once per window.
        if self._long and free and now - self._last_long_release >= cfg.long_context_window_s:
            released = 0
            while self._long and free:
                if not self.memory_guard.admit():
                    break
                self._place(self._long.popleft(), free.pop(0), now)
                released += 1
            if released:
                self._last_long_release = now
        while self._waiting and free:
            if not self.memory_guard.admit():
                break
            self._place(self._waiting.popleft(), free.pop(0), now)

    def _place(self, req: Request, slot: int, now: float) -> None:
        req._slot, req._prefilled, req.t_admitted = slot, 0, now
        self._slots[slot] = req
        self._prefilling.append(slot)
        self._notify(req, "admitted")

    def _release(self, slot: int) -> None:
        self._slots[slot] = None
        if slot in self._prefilling:
            self._prefilling.remove(slot)

    def _tick(self) -> None:
        """One engine tick: a bounded prefill chunk, then one decode step over every slot."""
        if self.config.step_delay_s:
            time.sleep(self.config.step_delay_s)
        dev, cfg = self.device, self.config
        budget = cfg.prefill_chunk_tokens
        first_tokens: list[tuple[Request, Any]] = []
        with self._cv:
            # Chunks of several requests share one right-padded forward; its padded size (rows x the
            # longest chunk) stays within the budget, so the workspace the memory guard plans for holds.
            work: list[tuple[Request, int, int]] = []
            width = 0
            for slot in list(self._prefilling):
                if len(work) >= cfg.prefill_rows:
                    break
                req = self._slots[slot]
                if self.fixed_prefill:
                    work.append(
                        (req, req._prefilled, min(req.prompt_len - req._prefilled, self.prefill_width))
                    )
                    continue
                n = min(req.prompt_len - req._prefilled, budget)
                w = max(width, n)
                if work and (len(work) + 1) * w > budget:
                    break
                work.append((req, req._prefilled, n))
                width = w
        if work:
            # One forward for every prefill chunk of this tick, right-padded to the longest. A pad writes
            # the cache at positions the row has not reached yet: later chunks or decode steps overwrite
            # them before any query can see them (the causal mask hides keys past the query position).
            toks, pos, rows, logits_at = self._prefill_batch(work)
            if self.tp_leader:  # the follower ranks run the very same forward (lab.distributed)
                from lab.distributed import forward_plan

                self._send_plan(forward_plan(toks, pos, rows, logits_at))
            logits = self.prefill_fn(
                self.step_model,
                torch.tensor(toks, dtype=torch.long, device=dev),
                torch.tensor(pos, dtype=torch.long, device=dev),
                torch.tensor(rows, dtype=torch.long, device=dev),
                torch.tensor(logits_at, dtype=torch.long, device=dev),
            )
            done_rows = []
            for i, (req, s, n) in enumerate(work):
                req._prefilled = s + n
                if req._prefilled == req.prompt_len:
                    done_rows.append(i)
            if done_rows:
                reqs = [work[i][0] for i in done_rows]
                sampled = _sample_rows(logits[done_rows], [r.temperature for r in reqs])
                first_tokens.extend((r, sampled[j]) for j, r in enumerate(reqs))
        # Decode: every slot, fixed shape. A slot's throwaway write goes where it is harmless: an idle
        # slot at position 0, a slot mid-prefill at the next position its prefill will overwrite.
        decoding = [r for r in self._slots if r is not None and r._prefilled == r.prompt_len and r.tokens]
        cur = [0] * cfg.max_batch_size
        pos = [0] * cfg.max_batch_size
        temps = [0.0] * cfg.max_batch_size
        for r in self._slots:
            if r is None:
                continue
            if r in decoding:
                cur[r._slot], pos[r._slot] = r.tokens[-1], r.prompt_len + len(r.tokens) - 1
                temps[r._slot] = r.temperature
            else:
                pos[r._slot] = min(r._prefilled, cfg.max_seq_len - 1)
        next_tok = None
        if decoding:
            if self.tp_leader:
                self._send_plan({"op": "decode", "cur": cur, "pos": pos})
            tok, logits = self.decode_fn(
                self.step_model,
                torch.tensor(cur, device=dev).view(-1, 1),
                torch.tensor(pos, device=dev).view(-1, 1),
                None,
                0.0,
                None,
                # The rows not decoding (idle, mid-prefill) may sit past the length: their token is thrown away.
                **self._kv_kwargs([pos[r._slot] for r in decoding]),
            )
            next_tok = _sample_rows(logits, temps, greedy=tok) if any(t > 0 for t in temps) else tok
            self.decode_steps += 1
        # One host sync for everything this tick produced.
        firsts = [(r, int(t.item())) for r, t in first_tokens]
        step = next_tok.tolist() if next_tok is not None else None
        now = time.monotonic()
        with self._cv:
            for r in decoding:
                if self._slots[r._slot] is r:
                    self._emit(r, step[r._slot], now)
            for r, t in firsts:
                if self._slots[r._slot] is r:
                    self._prefilling.remove(r._slot)
                    r.t_first_token = now
                    self._emit(r, t, now)

    def _prefill_batch(self, work: list[tuple[Request, int, int]]):
        """The prefill forward's inputs: each chunk right-padded to the width; with a fixed shape, the
        unused rows are throwaway work on the scratch row."""
        last = self.config.max_seq_len - 1
        width = self.prefill_width if self.fixed_prefill else max(n for _, _, n in work)
        toks = [req.prompt_ids[s : s + n] + [0] * (width - n) for req, s, n in work]
        pos = [[min(s + j, last) for j in range(width)] for _, s, _ in work]
        rows = [req._slot for req, _, _ in work]
        logits_at = [n - 1 for _, _, n in work]
        if self.fixed_prefill:
            spare = self.config.prefill_rows - len(work)
            toks += [[0] * width] * spare
            pos += [[min(j, last) for j in range(width)]] * spare
            rows += [self.scratch_row] * spare
            logits_at += [0] * spare
        return toks, pos, rows, logits_at

    def _emit(self, req: Request, token: int, now: float) -> None:
        req.tokens.append(token)
        req.token_times.append(now)
        self.tokens_generated += 1
        self._notify(req, "token")
        final = self.final_reason(req, len(req.tokens), token)
        if final is not None:
            self._release(req._slot)
            self._finish(req, "ok", finish_reason=final)

    def final_reason(self, req: Request, n_tokens: int, token: int) -> str | None:
        """Whether the n-th generated token ends the request: "stop" (EOS), "length", or None."""
        if self.eos_id is not None and token == self.eos_id and not req.ignore_eos:
            return "stop"
        if n_tokens >= req.max_new_tokens or req.prompt_len + n_tokens >= self.config.max_seq_len:
            return "length"
        return None

    def _finish(self, req: Request, outcome: str, reason: str | None = None, finish_reason=None) -> None:
        if req.outcome is not None:
            return
        req.outcome, req.reason, req.finish_reason = outcome, reason, finish_reason
        req.t_done = time.monotonic()
        self.outcomes[outcome] += 1
        self._notify(req, "done")
        for fn in self.listeners:
            try:
                fn(req)
            except Exception:  # a metrics hook must never take the engine down
                pass

    def _notify(self, req: Request, event: str) -> None:
        if req.callback is not None:
            try:
                req.callback(req, event)
            except Exception:
                pass

    # --- warm-up and offline throughput --------------------------------------------------------------
    def warmup(self) -> float:
        """Compile and capture the decode shape (3+ calls for CUDA graphs) and the prefill, so the first
        real request pays no compile. Leaves the cache contents irrelevant (overwritten)."""
        from lab.engine.compile_cache import cache_counters, cache_state

        t0 = time.monotonic()
        before = cache_counters()
        b, dev = self.config.max_batch_size, self.device
        if self.fixed_prefill:
            r, w = self.config.prefill_rows, self.prefill_width
            # Three calls compile the prefill shape (and settle its guards); an eager start mode's prefill
            # needs one, to set up cuBLAS before the first request.
            calls = [(r, w, [self.scratch_row] * r)] * (3 if compiles(self.mode) else 1)
        else:
            n = min(8, self.config.prefill_chunk_tokens, self.config.max_seq_len - 1)
            calls = [(1, n, [0])]
        for rows_n, width, rows in calls:
            pos = torch.arange(width, device=dev).clamp(max=self.config.max_seq_len - 1).expand(rows_n, width)
            self.prefill_fn(
                self.step_model,
                torch.zeros(rows_n, width, dtype=torch.long, device=dev),
                pos.contiguous(),
                torch.tensor(rows, dtype=torch.long, device=dev),
                torch.full((rows_n,), width - 1, dtype=torch.long, device=dev),
            )
        cur = torch.zeros(b, 1, dtype=torch.long, device=dev)
        for kw in self._decode_variants():
            last = kw.get("kv_len", self.config.max_seq_len) - 1
            for i in range(4 if self.config.mode == "eager" else 5):
                pos = torch.full((b, 1), min(i, last), dtype=torch.long, device=dev)
                tok, _ = self.decode_fn(self.step_model, cur, pos, None, 0.0, None, **kw)
                tok.tolist()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        # hit: every graph came from the on-disk cache (a restart after `lab warmup`/an earlier serve);
        # miss: compiled from scratch; none: eager, nothing compiled.
        self.compile_cache_state = cache_state(before, cache_counters())[0]
        return time.monotonic() - t0


def kv_bucket_lengths(max_seq_len: int, buckets: int) -> list[int]:
    """max_seq_len, half of it, a quarter, ... (`buckets` lengths at most, none below 1), shortest first."""
    lengths = [max_seq_len]
    while len(lengths) < buckets and lengths[-1] // 2 >= 1:
        lengths.append(lengths[-1] // 2)
    return sorted(lengths)


def prefill_logits(model: Transformer, tokens, input_pos, rows, logits_at):
    """The prefill forward: one logits row per request, at its last real (unpadded) token."""
    return model(tokens, input_pos, rows, logits_at=logits_at)[:, 0]


def _sample_rows(logits: torch.Tensor, temps: list[float], greedy: torch.Tensor | None = None):
    """Per-row temperature: greedy rows take the argmax, the others sample (no host sync)."""
    if greedy is None:
        greedy = logits.argmax(dim=-1)
    if all(t <= 0 for t in temps):
        return greedy
    t = torch.tensor([max(x, 1e-6) for x in temps], device=logits.device, dtype=logits.dtype)
    sampled = sample(logits / t[:, None], temperature=1.0)
    mask = torch.tensor([x > 0 for x in temps], device=logits.device)
    return torch.where(mask, sampled, greedy)


def _cudagraph_state_for_this_thread() -> None:
    """CUDA graph trees keep their per-device state in a thread-local that older torch releases (before
    the fix for pytorch#123177) create only in the thread that imported the module, so the first replay in
    a model thread of our own would assert. Give this thread its state, as newer releases do lazily."""
    from collections import defaultdict

    from torch._inductor import cudagraph_trees as ct

    local = ct.local
    if hasattr(local, "tree_manager_containers"):
        return
    init = getattr(ct, "_initialize_tls", None)
    if init is not None:
        init(local)
        return
    if torch._C._is_key_in_tls("tree_manager_containers"):
        return
    local.tree_manager_containers = {}
    local.tree_manager_locks = defaultdict(threading.Lock)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _MemoryGuard:
    """No admission that would take the card above `max_gpu_memory_fraction` (playbook: below 80 %).

    The KV cache is static (allocated once for every slot), so what admission adds is the prefill
    workspace of one chunk; the check uses the whole card's use (other processes included). On the CPU
    the guard does not apply and says so."""

    def __init__(self, model: Transformer, cfg: EngineConfig, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.cuda = device.type == "cuda"
        self.deferrals = 0
        self.not_applicable = None if self.cuda else f"not applicable on {device.type} (no GPU memory)"

    def prefill_bytes(self) -> float:
        """Workspace of the largest prefill forward a tick runs (`prefill_chunk_tokens` padded tokens)."""
        a, cfg = self.model.args, self.cfg
        per = self.model.output.weight.element_size()
        t = cfg.prefill_chunk_tokens
        proj = max(2 * a.ffn_dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim) + 2 * a.dim
        hidden = t * proj * per * 2
        scores = a.n_heads * t * cfg.max_seq_len * (per + 1)  # scores + the boolean mask
        return hidden + scores + a.vocab_size * 4 * 2

    def _projected_fraction(self, extra_bytes: float) -> float:
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        others = (total - free) - reserved
        ours = max(reserved, allocated + extra_bytes)
        return (others + ours) / total

    def check_startup(self) -> None:
        if not self.cuda:
            return
        frac = self._projected_fraction(self.prefill_bytes())
        if frac > self.cfg.max_gpu_memory_fraction:
            raise LabError(
                f"weights + KV cache ({self.cfg.max_batch_size} slots x {self.cfg.max_seq_len} tokens) + one "
                f"prefill chunk would use {frac:.0%} of the GPU, above --max-gpu-memory-fraction "
                f"{self.cfg.max_gpu_memory_fraction:g}; lower --max-batch-size, --max-seq-len or "
                "--prefill-chunk-tokens"
            )

    def admit(self) -> bool:
        if not self.cuda:
            return True
        if self._projected_fraction(self.prefill_bytes()) <= self.cfg.max_gpu_memory_fraction:
            return True
        self.deferrals += 1
        return False

    def peak(self) -> dict[str, Any]:
        if not self.cuda:
            return {"peak_memory_gb": None, "memory_fraction_limit": self.cfg.max_gpu_memory_fraction}
        total = torch.cuda.get_device_properties(self.device).total_memory
        peak = torch.cuda.max_memory_reserved(self.device)
        return {
            "peak_memory_gb": round(peak / GB, 3),
            "peak_memory_fraction": round(peak / total, 4),
            "memory_fraction_limit": self.cfg.max_gpu_memory_fraction,
        }


def config_dict(cfg: EngineConfig) -> dict[str, Any]:
    return asdict(cfg)
