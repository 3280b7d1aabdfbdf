"""torch.distributed under torchrun for the multi-GPU (tensor-parallel) tier: process-group setup with hang
safety, rank helpers, a JSON control plane, the model's collectives, and `tp_prepare`.

    ctx = init_tp(n)             # torchrun --nproc_per_node=n; NCCL on GPUs, gloo on CPU; n == 1: no group
    if is_rank0(): ...           # only rank 0 receives requests, schedules, records and writes artifacts
    plan = broadcast_object(plan)  # rank 0's step plan to every rank (JSON, never pickle)

Hang safety, in layers:
- `init_process_group` gets a finite timeout (`--dist-timeout-s`, default 300 s); gloo collectives honour it.
- NCCL: asynchronous error handling (the watchdog tears the process down on a timeout or error) and the
  flight recorder (the last collectives per rank, dumped to `$TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank>` on a
  timeout) are configured before the group exists.
- A heartbeat thread per rank publishes liveness and progress (forward passes) through torchrun's store and
  watches its peers: a rank that stops beating (killed, frozen) or stalls behind the others for the
  timeout ends the run with a message naming it, instead of a silent hang.
- A collective that fails in eager code (a peer's socket closed, a gloo timeout) becomes `RankFailure`,
  a LabError naming the ranks at fault; torchrun then tears the other ranks down.

`LAB_INJECT_FAULT="kill:rank=1:step=5"` (or `hang:...`) makes rank 1 kill (SIGKILL) or freeze itself at
its 5th forward pass: the drill for the playbook's "NCCL collectives hang or tear down the server".
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from lab.errors import LabError

DEFAULT_TIMEOUT_S = 300.0
HEARTBEAT_INTERVAL_S = 0.5
DONE = "done"  # the heartbeat value of a rank that left cleanly
EXIT_RANK_FAULT = 3  # exit status of a rank that ended the run because a peer failed
FAULT_ENV = "LAB_INJECT_FAULT"
TIMEOUT_ENV = "LAB_DIST_TIMEOUT_S"
TRACE_DIR_ENV = "LAB_FLIGHT_RECORDER_DIR"


class RankFailure(LabError):
    """A peer rank died, hung or failed a collective. The message names the rank(s)."""


@dataclass
class TPContext:
    """This process's place in the tensor-parallel group."""

    world_size: int
    rank: int
    local_rank: int
    device: Any  # torch.device
    backend: str | None  # None when not distributed (world size 1)
    timeout_s: float
    group: Any = None  # the data-plane group (NCCL on GPUs, gloo on CPU)
    cpu_group: Any = None  # gloo: control-plane messages (plans, results) without touching the GPU
    env: dict[str, str] = field(default_factory=dict)  # hang-safety settings in force
    requested: int = 1  # --tensor-parallel-gpus as asked (may exceed world_size with allow_smaller_world)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """For artifacts' params: how the tier ran."""
        return {
            "tensor_parallel_gpus": self.world_size,
            "tensor_parallel_requested": self.requested,
            "backend": self.backend,
            "dist_timeout_s": self.timeout_s,
            "hang_safety_env": dict(self.env),
        }


_CTX: TPContext | None = None
_WATCHDOG: _Watchdog | None = None
_PROGRESS = 0  # forward passes on this rank (eager), for the watchdog and fault injection
_FAULT: tuple[str, int, int] | None = None
_FAILED = False  # a collective failed: leaving the group could block on the dead peer, so skip it


# --- launch ------------------------------------------------------------------------------------------


def add_tp_args(
    p: argparse.ArgumentParser,
    with_tp_flag: bool = True,
    with_allow_smaller_world: bool = True,
    tp_default: int | None = 1,
) -> None:
    """--tensor-parallel-gpus, --dist-timeout-s and --allow-smaller-world for a command (skip the ones
    it already has)."""
    from lab.commands._common import positive_float, positive_int

    g = p.add_argument_group("tensor parallel (multi-GPU tier)")
    if with_tp_flag:
        g.add_argument(
            "--tensor-parallel-gpus",
            type=positive_int,
            default=tp_default,
            help="shard over N GPUs; N > 1 runs under torchrun --nproc_per_node=N"
            + (" (default: the number of ranks torchrun launched)" if tp_default is None else ""),
        )
    g.add_argument(
        "--dist-timeout-s",
        type=positive_float,
        default=None,
        help=f"collective deadline: a dead or hung rank ends the run after this (default ${TIMEOUT_ENV} "
        f"or {DEFAULT_TIMEOUT_S:g})",
    )
    if not with_allow_smaller_world:
        return
    g.add_argument(
        "--allow-smaller-world",
        action="store_true",
        help="run on fewer ranks than --tensor-parallel-gpus asks (e.g. torchrun --nproc_per_node=1) "
        "instead of failing: the playbook's single-GPU fallback",
    )


def launched_world_size() -> int | None:
    """WORLD_SIZE as torchrun set it, or None when not launched by torchrun."""
    w = os.environ.get("WORLD_SIZE")
    return int(w) if w and w.isdigit() else None


def resolve_timeout_s(timeout_s: float | None) -> float:
    if timeout_s is not None:
        return float(timeout_s)
    raw = os.environ.get(TIMEOUT_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise LabError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
        if value <= 0:
            raise LabError(f"{TIMEOUT_ENV} must be > 0 seconds")
        return value
    return DEFAULT_TIMEOUT_S


def hang_safety_env(timeout_s: float, rank: int, trace_dir: str | None = None) -> dict[str, str]:
    """NCCL watchdog and flight-recorder settings; set before the process group exists. Values a user
    exported win (setdefault)."""
    trace_dir = trace_dir or os.environ.get(TRACE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "lab-nccl")
    wanted = {
        # On a collective error or timeout, tear the process down (3 = skip comm cleanup, which could
        # itself hang on a wedged NCCL communicator) instead of blocking the CUDA stream forever.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        # Flight recorder: keep the last 2000 collectives per rank and dump them when the watchdog fires.
        # (TORCH_FR_* are the newer names of the same settings; both are set for torch 2.6 to 2.14.)
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": os.path.join(trace_dir, "nccl_trace_rank_"),
        "TORCH_FR_DUMP_TEMP_FILE": os.path.join(trace_dir, "nccl_trace_rank_"),
        # The monitor thread kills a watchdog that is itself stuck, a little after the collective deadline.
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(int(timeout_s) + 60),
    }
    applied = {}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
        applied[key] = os.environ[key]
    os.makedirs(os.path.dirname(applied["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"]), exist_ok=True)
    return applied


def init_tp(
    n: int,
    device: str = "auto",
    timeout_s: float | None = None,
    allow_smaller_world: bool = False,
) -> TPContext:
    """Join the tensor-parallel group of `n` ranks that torchrun launched (n == 1: no group at all).
    Idempotent: a second call returns the same context."""
    global _CTX, _FAULT
    import torch

    from lab.model import resolve_device

    if _CTX is not None:
        if n not in (_CTX.world_size, _CTX.requested):
            raise LabError(f"already running with {_CTX.world_size} tensor-parallel ranks, asked for {n}")
        return _CTX
    if n < 1:
        raise LabError("--tensor-parallel-gpus must be >= 1")
    launched = launched_world_size()
    world = launched or 1
    if n != world:
        if world < n and allow_smaller_world:
            if int(os.environ.get("RANK", "0")) == 0:
                print(
                    f"lab: note: --tensor-parallel-gpus {n} but {world} rank(s) launched; "
                    "--allow-smaller-world: serving on the smaller world",
                    file=sys.stderr,
                )
        elif launched is None:
            raise LabError(
                f"--tensor-parallel-gpus {n} needs one process per GPU: run it as "
                f"`torchrun --nproc_per_node={n} -m lab ...` (or pass --allow-smaller-world to fall back "
                "to one GPU)"
            )
        else:
            raise LabError(
                f"torchrun launched {world} rank(s) but --tensor-parallel-gpus is {n}; make them equal "
                f"(torchrun --nproc_per_node={n}) or pass --allow-smaller-world"
            )
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device)
    timeout = resolve_timeout_s(timeout_s)
    _FAULT = _parse_fault(os.environ.get(FAULT_ENV, ""))
    if world == 1:
        _CTX = TPContext(1, 0, 0, dev, None, timeout, requested=n)
        return _CTX
    if dev.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise LabError(
                f"rank {rank} needs GPU {local_rank} but only {visible} GPU(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                "launch as many ranks per node as GPUs"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    env = hang_safety_env(timeout, rank) if backend == "nccl" else {}
    import torch.distributed as dist

    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout)}
    if backend == "nccl":
        kwargs["device_id"] = dev  # eager NCCL init: a broken fabric fails here, not mid-run
    try:
        dist.init_process_group(**kwargs)
        cpu_group = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)) if backend == "nccl" else None
        )
    except Exception as e:  # noqa: BLE001 - any launch failure becomes one line naming this rank
        raise RankFailure(
            f"rank {rank}: could not join the {world}-rank {backend} group within {timeout:g} s: "
            f"{_first_line(e)}"
        ) from None
    group = dist.group.WORLD
    _CTX = TPContext(
        world, rank, local_rank, dev, backend, timeout, group, cpu_group or group, env, requested=n
    )
    _start_watchdog(_CTX)
    if backend == "gloo" and threading.current_thread() is threading.main_thread():
        # CPU ranks return to the interpreter often, so torchrun's SIGTERM (sent when a peer exits) can end
        # this rank with a line instead of silently. (NCCL ranks may sit in a CUDA sync that a Python handler
        # would never interrupt: there the default action, immediate exit, is the right one.)
        signal.signal(signal.SIGTERM, _on_sigterm)
    atexit.register(shutdown)
    return _CTX


def _on_sigterm(signum, frame) -> None:
    global _FAILED
    _FAILED = True
    dead, behind = _WATCHDOG._notes() if _WATCHDOG else ([], [])
    notes = "; ".join(dead or behind) or "torchrun's summary names the rank that failed first"
    raise RankFailure(f"rank {rank()}: stopped by torchrun (SIGTERM) because another rank exited; {notes}")


def current() -> TPContext | None:
    return _CTX


def rank() -> int:
    return _CTX.rank if _CTX else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return _CTX.world_size if _CTX else 1


def is_rank0() -> bool:
    """True on rank 0 and in any single-process run: the one that prints, records and writes."""
    return rank() == 0


def shutdown() -> None:
    """Stop the watchdog and leave the group (registered atexit; safe to call twice)."""
    global _CTX, _WATCHDOG
    if _WATCHDOG is not None:
        _WATCHDOG.stop()
        _WATCHDOG.say_done()
        _WATCHDOG = None
    if _CTX is not None and _CTX.distributed and not _FAILED:
        import torch.distributed as dist

        if dist.is_initialized():
            # Bounded: on 2x H200 a finished NCCL tier sat in teardown for minutes after its artifacts were
            # written. Leaving the group gets 30 s; after that the process exits anyway (exit_process).
            def _leave() -> None:
                try:
                    dist.destroy_process_group()
                except Exception:  # noqa: BLE001 - leaving a broken group must not mask the real error
                    pass

            t = threading.Thread(target=_leave, name="lab-leave-group", daemon=True)
            t.start()
            t.join(timeout=30)
    _CTX = None


def exit_process(rc: int) -> None:
    """End a torchrun rank now: leave the group (bounded), flush, and skip the interpreter's teardown,
    where NCCL communicators and CUDA-graph pools can hang a rank whose work and artifacts are done.
    Returns only when this process never joined an NCCL group (the normal exit is safe there)."""
    ctx = _CTX
    if ctx is None or ctx.backend != "nccl":
        return
    shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not turn a finished run into a crash
            pass
    os._exit(rc)


# --- the model's collectives ---------------------------------------------------------------------------


def all_reduce_sum(x):
    """Sum a row-parallel output over the ranks (identity at world size 1)."""
    ctx = _CTX
    if ctx is None or not ctx.distributed:
        return x
    import torch

    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(x, "sum", ctx.group)
    import torch.distributed as dist

    _guarded("all_reduce", lambda: dist.all_reduce(x, group=ctx.group))
    return x


def all_gather_last_dim(x):
    """Concatenate every rank's slice along the last dimension (the vocabulary-parallel logits)."""
    ctx = _CTX
    if ctx is None or not ctx.distributed:
        return x
    import torch

    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        # Gather along dim 0 and concatenate here: a non-zero gather_dim makes funcol call
        # torch._utils._maybe_view_chunk_cat, which dynamo refuses to trace (a graph break under
        # fullgraph=True; seen on 2x H200, torch 2.11).
        g = funcol.all_gather_tensor(x.contiguous(), 0, ctx.group)
        return torch.cat(torch.chunk(g, ctx.world_size, dim=0), dim=-1)
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    _guarded("all_gather", lambda: dist.all_gather(parts, x.contiguous(), group=ctx.group))
    return torch.cat(parts, dim=-1)


# --- control plane (JSON over gloo) ----------------------------------------------------------------


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank `src`'s JSON-serialisable object on every rank (returned unchanged when not distributed).
    JSON, never pickle: a peer's bytes are parsed, not executed."""
    ctx = _CTX
    if ctx is None or not ctx.distributed:
        return obj
    import torch
    import torch.distributed as dist

    if ctx.rank == src:
        data = json.dumps(obj, allow_nan=False).encode()
        size = torch.tensor([len(data)], dtype=torch.long)
    else:
        size = torch.zeros(1, dtype=torch.long)
    _guarded("broadcast", lambda: dist.broadcast(size, src, group=ctx.cpu_group))
    if ctx.rank == src:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
    if buf.numel():
        _guarded("broadcast", lambda: dist.broadcast(buf, src, group=ctx.cpu_group))
    return json.loads(bytes(buf.numpy()).decode())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's JSON-serialisable object, in rank order, on every rank ([obj] when not distributed)."""
    ctx = _CTX
    if ctx is None or not ctx.distributed:
        return [obj]
    import torch
    import torch.distributed as dist

    data = json.dumps(obj, allow_nan=False).encode()
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(ctx.world_size)]
    mine = torch.tensor([len(data)], dtype=torch.long)
    _guarded("all_gather", lambda: dist.all_gather(sizes, mine, group=ctx.cpu_group))
    width = max(1, max(int(s.item()) for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8)
    if data:
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.empty(width, dtype=torch.uint8) for _ in range(ctx.world_size)]
    _guarded("all_gather", lambda: dist.all_gather(bufs, padded, group=ctx.cpu_group))
    return [json.loads(bytes(b[: int(s.item())].numpy()).decode()) for b, s in zip(bufs, sizes)]


def sum_over_ranks(value: float | None) -> float | None:
    """Sum a per-rank measurement (e.g. each GPU's energy over the same window); None if any rank has
    none. Counts (tokens, requests) are never summed: every rank computes the same ones."""
    values = all_gather_object(value)
    return None if any(v is None for v in values) else float(sum(values))


def barrier() -> None:
    ctx = _CTX
    if ctx is None or not ctx.distributed:
        return
    import torch.distributed as dist

    _guarded("barrier", lambda: dist.barrier(group=ctx.cpu_group))


# --- failure handling ------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line.split(". This is typically caused")[0][:300]  # gloo's boilerplate advice


def _guarded(op: str, call) -> Any:
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - c10d raises RuntimeError/DistError subclasses
        global _FAILED
        _FAILED = True
        ctx = _CTX
        me = ctx.rank if ctx else rank()
        # A killed peer fails our socket at once, before its heartbeat looks stale: give the
        # heartbeats a moment to show who stopped.
        verdict = _WATCHDOG.diagnose(wait_s=5 * HEARTBEAT_INTERVAL_S) if _WATCHDOG else "no peer information"
        raise RankFailure(
            f"rank {me}: {op} failed ({_first_line(e)}); {verdict}. The tensor-parallel tier is down: "
            "follow the single-GPU fallback (torchrun --nproc_per_node=1 ... or --tensor-parallel-gpus 1)"
        ) from None


def note_progress() -> None:
    """One forward pass done on this rank: feeds the watchdog and the fault-injection drill."""
    global _PROGRESS
    if _FAULT is not None and _CTX is not None:
        kind, fault_rank, step = _FAULT
        if _CTX.rank == fault_rank and _PROGRESS + 1 == step:  # before the pass counts as begun
            print(
                f"lab: fault injection: rank {fault_rank} {kind} at forward {step}",
                file=sys.stderr,
                flush=True,
            )
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            while True:  # hang: the main thread is stuck, the process (and its heartbeat) lives on
                time.sleep(3600)
    _PROGRESS += 1


def _parse_fault(spec: str) -> tuple[str, int, int] | None:
    """ "kill:rank=1:step=5" or "hang:rank=1:step=5" (step = the rank's forward pass, from 1)."""
    if not spec:
        return None
    parts = spec.split(":")
    try:
        kind = parts[0]
        fields = dict(p.split("=", 1) for p in parts[1:])
        fault = (kind, int(fields["rank"]), int(fields["step"]))
    except (ValueError, KeyError):
        fault = None
    if fault is None or fault[0] not in ("kill", "hang") or fault[2] < 1:
        raise LabError(f"{FAULT_ENV}={spec!r}: expected kill:rank=R:step=S or hang:rank=R:step=S (S >= 1)")
    return fault


class _Watchdog:
    """Heartbeat through torchrun's store: every interval, publish (beat, progress) and read the peers'.
    A peer whose beat stops changing for the timeout is dead or frozen; a peer whose progress stays behind
    this rank's for the timeout is hung. Either ends this process with a line naming that rank."""

    def __init__(self, ctx: TPContext, store: Any, interval_s: float = HEARTBEAT_INTERVAL_S):
        self.ctx, self.store, self.interval_s = ctx, store, interval_s
        self.beat = 0
        now = time.monotonic()
        # peer -> (last value seen, monotonic time it last changed, progress)
        self.peers: dict[int, tuple[str | None, float, int]] = {
            r: (None, now, 0) for r in range(ctx.world_size) if r != ctx.rank
        }
        self.progress_since: dict[tuple[int, int], float] = {}  # (rank, pass) -> first seen behind
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lab-rank-watchdog", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _key(self, r: int) -> str:
        return f"lab/heartbeat/{r}"

    def say_done(self) -> None:
        """A rank leaving cleanly says so: its silence afterwards is not a fault."""
        try:
            self.store.set(self._key(self.ctx.rank), DONE)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat += 1
                self.store.set(self._key(self.ctx.rank), f"{self.beat} {_PROGRESS}")
                self._read_peers()
            except Exception:  # noqa: BLE001 - the store's host going away is torchrun's to report
                continue
            fault = self._fault()
            if fault:
                sys.stderr.write(f"lab: error: rank {self.ctx.rank}: {fault}; ending this rank\n")
                sys.stderr.flush()
                self._await_flight_recorder()
                os._exit(EXIT_RANK_FAULT)

    def _limit_s(self) -> float:
        # On NCCL this fires a little before the NCCL watchdog's own timeout, so the line naming the rank
        # is printed before NCCL tears the process down (after dumping the flight recorder).
        return self.ctx.timeout_s * (0.9 if self.ctx.backend == "nccl" else 1.0)

    def _await_flight_recorder(self) -> None:
        """NCCL: give the NCCL watchdog time to time out and dump this rank's flight recorder (it then
        aborts the process itself); gloo has none."""
        path = self.ctx.env.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
        if self.ctx.backend != "nccl" or not path:
            return
        deadline = time.monotonic() + self.ctx.timeout_s * 0.1 + 15
        while time.monotonic() < deadline and not os.path.exists(f"{path}{self.ctx.rank}"):
            time.sleep(0.5)
        time.sleep(1.0)  # let a dump in progress finish

    def _read_peers(self) -> None:
        now = time.monotonic()
        for r, (last, since, _) in list(self.peers.items()):
            if not self.store.check([self._key(r)]):
                continue
            value = self.store.get(self._key(r)).decode()
            if value == DONE:
                del self.peers[r]  # finished and left cleanly
                continue
            progress = int(value.split()[1])
            self.peers[r] = (value, now if value != last else since, progress)

    def _fault(self) -> str | None:
        now, limit = time.monotonic(), self._limit_s()
        for r, (last, since, _) in sorted(self.peers.items()):
            if now - since > limit:
                what = "no heartbeat since launch" if last is None else "no heartbeat"
                return (
                    f"rank {r} is not responding ({what} for {now - since:.1f} s, deadline {limit:.3g} s): "
                    "it died, was killed or is frozen"
                )
        # Stalled: some rank behind the most advanced one, with no progress for the deadline.
        ranks = {self.ctx.rank: _PROGRESS, **{r: p for r, (_, _, p) in self.peers.items()}}
        top = max(ranks.values())
        for r, p in ranks.items():
            if p < top:
                self.progress_since.setdefault((r, p), now)
                if now - self.progress_since[(r, p)] > limit:
                    who = "this rank" if r == self.ctx.rank else f"rank {r}"
                    return (
                        f"rank {r} is hung: {who} stayed at forward pass {p} for {limit:.3g} s while another "
                        f"rank reached pass {top}"
                    )
        return None

    def diagnose(self, wait_s: float = 0.0) -> str:
        """What the heartbeats say about the peers (for an error message), waiting up to `wait_s` for a
        peer to show as stale or behind."""
        deadline = time.monotonic() + wait_s
        # torchrun sends SIGTERM once it sees a peer exit; finish this message instead of dying mid-way.
        stopped = threading.Event()
        previous = None
        if wait_s > 0 and threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        try:
            while True:
                dead, behind = self._notes()
                if dead or stopped.is_set() or time.monotonic() >= deadline:
                    break
                time.sleep(self.interval_s / 2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        notes = dead or behind
        if stopped.is_set() and not dead:
            notes = [
                "torchrun is stopping the run because another rank exited (its summary names it)",
                *notes,
            ]
        return "; ".join(notes) if notes else "every peer rank still beats; see the other ranks' errors"

    def _notes(self) -> tuple[list[str], list[str]]:
        now = time.monotonic()
        dead, behind = [], []
        for r, (last, since, progress) in sorted(self.peers.items()):
            age = now - since
            if last is None or age > 3 * self.interval_s:
                dead.append(f"rank {r} not responding (no heartbeat for {age:.1f} s: died, killed or frozen)")
            elif (
                progress < _PROGRESS
                and now - self.progress_since.get((r, progress), now) > 2 * self.interval_s
            ):
                # Behind for a few beats, not just a heartbeat older than the last few passes.
                behind.append(
                    f"rank {r} is hung (stuck at forward pass {progress}, this rank at {_PROGRESS})"
                )
        return dead, behind


def _start_watchdog(ctx: TPContext) -> None:
    global _WATCHDOG
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store, no heartbeat: the collective timeouts still apply
        return
    _WATCHDOG = _Watchdog(ctx, store)
    _WATCHDOG.start()


# --- model ------------------------------------------------------------------------------------------


def prepare_tp(
    preset: str | None,
    model_path: str | None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    batch_size: int = 1,
    max_seq_len: int = 256,
    tensor_parallel_gpus: int = 1,
    timeout_s: float | None = None,
    allow_smaller_world: bool = False,
):
    """lab.model.prepare for the tensor-parallel tier: join the group, plan per rank, then build only this
    rank's shard (block by block). At one rank it is exactly `prepare`. Returns lab.model.Prepared."""
    import torch

    from lab.model import Prepared, build_model, dtype_name, oom_context, prepare, resolve_dtype, resolve_spec
    from lab.model.plan import check_fits, device_memory_gb
    from lab.model.tp import check_divisible, mark_sharded, shard_fn

    ctx = init_tp(tensor_parallel_gpus, device, timeout_s, allow_smaller_world)
    # Every rank draws the same sampling noise: the same seed, the same stream, the same tokens.
    torch.manual_seed(seed)
    if not ctx.distributed:
        return prepare(preset, model_path, str(ctx.device), dtype, seed, batch_size, max_seq_len)
    quant = dtype if dtype in ("fp8", "int8") else None
    dt = torch.bfloat16 if quant else resolve_dtype(dtype, ctx.device)
    spec = resolve_spec(preset, model_path, ctx.device)
    check_divisible(spec.args, ctx.world_size, spec.preset)
    if max_seq_len > spec.args.max_seq_len:
        raise LabError(
            f"prompt + new tokens = {max_seq_len} exceeds the model's context of {spec.args.max_seq_len} "
            "tokens; shorten the prompt or --max-new-tokens"
        )
    plan = plan_per_rank(
        spec.args,
        quant or dtype_name(dt),
        batch_size,
        max_seq_len,
        ctx.world_size,
        device_memory_gb(ctx.device),
        str(ctx.device),
        spec.preset,
    )
    check_fits(plan)
    with oom_context(plan, ctx.device, f"loading rank {ctx.rank}'s shard of the model"):
        model = build_model(
            spec, ctx.device, dt, seed, quant, shard=shard_fn(spec.args, ctx.rank, ctx.world_size)
        )
    mark_sharded(model, ctx.rank, ctx.world_size)
    return Prepared(model=model, spec=spec, device=ctx.device, dtype=dt, plan=plan, quant=quant)


def plan_per_rank(args, dtype: str, batch_size: int, max_seq_len: int, world: int, memory_gb, device, preset):
    """The memory plan of one rank: 1/N of the block weights, KV cache and attention scores; the
    replicated embedding and norms whole."""
    import dataclasses

    from lab.model.plan import GB, plan_memory

    full = plan_memory(args, dtype, batch_size, max_seq_len, memory_gb, device, preset)
    emb_gb = args.vocab_size * args.dim * (2 if dtype in ("fp8", "int8") else _bytes(dtype)) / GB
    head_gb = 0.0 if args.tie_embeddings else emb_gb
    weights = (full.weights_gb - emb_gb - head_gb) / world + emb_gb + head_gb / world
    kv, act = full.kv_cache_gb / world, full.activations_gb / world
    total = weights + kv + act + full.reserve_gb
    fits = None if memory_gb is None else total <= memory_gb
    return dataclasses.replace(
        full,
        preset=f"{preset or 'model'} (1 of {world} tensor-parallel ranks)",
        weights_gb=round(weights, 3),
        kv_cache_gb=round(kv, 3),
        activations_gb=round(act, 3),
        total_gb=round(total, 3),
        fits=fits,
        headroom_gb=None if memory_gb is None else round(memory_gb - total, 3),
        suggestions=[] if fits is not False else ["more --tensor-parallel-gpus", "--dtype int8"],
    )


def _bytes(dtype: str) -> int:
    from lab.model.plan import BYTES

    return BYTES[dtype]


def tp_prepare(args: argparse.Namespace, batch_size: int, max_seq_len: int):
    """`prepare_tp` from a command's parsed flags (the model flags plus --tensor-parallel-gpus, and
    --dist-timeout-s / --allow-smaller-world when the command has them)."""
    from lab.engine.generate import check_mode

    prepared = prepare_tp(
        args.preset,
        args.model_path,
        args.device,
        args.dtype,
        args.seed,
        batch_size,
        max_seq_len,
        args.tensor_parallel_gpus,
        getattr(args, "dist_timeout_s", None),
        getattr(args, "allow_smaller_world", False),
    )
    mode = getattr(args, "mode", None)
    if mode and mode != "auto":
        check_mode(mode, prepared.device)
    return prepared


# --- serving: rank 0 schedules and broadcasts each step; every rank runs it ------------------------------

IDLE_PLAN_EVERY_S = 1.0  # an idle leader still speaks this often, so followers never hit the deadline
_last_plan_s = 0.0


def tp_leader() -> bool:
    """True on rank 0 of a multi-rank tier: the rank whose engine receives requests and schedules."""
    return _CTX is not None and _CTX.distributed and _CTX.rank == 0


def send_plan(plan: dict[str, Any]) -> None:
    """Leader: send one step's plan to every other rank. Ops: warmup, forward (a `forward_plan`: the
    prefill), decode (the fixed-shape step's inputs), idle (keep-alive), stop. A no-op outside a
    multi-rank tier."""
    global _last_plan_s
    if not tp_leader():
        return
    if plan.get("op") == "idle" and time.monotonic() - _last_plan_s < IDLE_PLAN_EVERY_S:
        return
    _last_plan_s = time.monotonic()
    broadcast_object(plan)


def follow_engine(engine) -> dict[str, int]:
    """Ranks other than 0: run every step the leader broadcasts, with the same inputs, so each collective
    inside the model meets its partners, until the leader says stop. Followers sample nothing and count
    nothing: tokens and requests are the leader's alone. Returns how many steps of each kind ran."""
    import torch

    from lab.engine.generate import no_recompile

    dev, model = engine.device, engine.model
    counts = {"warmup": 0, "forward": 0, "decode": 0, "idle": 0}
    if threading.current_thread() is threading.main_thread():
        # torchrun forwards SIGTERM/SIGINT to every rank: a follower keeps stepping until the leader, which
        # drains its in-flight requests first, says stop (a dead leader still ends it via the collectives).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    with torch.inference_mode():
        plan = broadcast_object(None)
        if plan.get("op") == "warmup":
            engine.warmup()
            counts["warmup"] += 1
            plan = broadcast_object(None)
        guard = no_recompile() if engine.config.mode != "eager" else _Null()
        with guard:
            while plan.get("op") != "stop":
                op = plan.get("op")
                if op == "forward":
                    prefill = getattr(engine, "prefill_fn", None)
                    if prefill is not None and plan.get("logits_at") is not None:
                        # The engine's own prefill callable (compiled at a fixed shape in compiled modes),
                        # exactly as the leader calls it.
                        prefill(model, *(_long(plan[k], dev) for k in ("tokens", "pos", "rows", "logits_at")))
                    else:
                        model_forward(model, dev, plan)
                elif op == "decode":
                    tok, _ = engine.decode_fn(
                        model,
                        torch.tensor(plan["cur"], device=dev).view(-1, 1),
                        torch.tensor(plan["pos"], device=dev).view(-1, 1),
                        None,
                        0.0,
                        None,
                    )
                    tok.tolist()  # the leader syncs here too; keeps the two streams in step
                elif op not in ("idle", "warmup"):
                    raise LabError(
                        f"rank {rank()}: unknown plan op {op!r} from rank 0 (mismatched lab versions?)"
                    )
                counts[op] = counts.get(op, 0) + 1
                plan = broadcast_object(None)
    return counts


def forward_plan(
    tokens: list[list[int]],
    pos: list[list[int]],
    rows: list[int] | None = None,
    logits_at: list[int] | None = None,
    last_only: bool = False,
) -> dict[str, Any]:
    """One model forward as plain data: the leader sends it, then both sides call `model_forward` on it,
    so every rank's forward (and so every collective inside it) has the same shapes."""
    return {
        "op": "forward",
        "tokens": tokens,
        "pos": pos,
        "rows": rows,
        "logits_at": logits_at,
        "last_only": last_only,
    }


def model_forward(model, device, plan: dict[str, Any]):
    """Run the forward a `forward_plan` describes; returns the model's logits."""
    import torch

    kwargs: dict[str, Any] = {"last_only": bool(plan.get("last_only"))}
    if plan.get("logits_at") is not None:
        kwargs["logits_at"] = torch.tensor(plan["logits_at"], dtype=torch.long, device=device)
    rows = plan.get("rows")
    return model(
        torch.tensor(plan["tokens"], dtype=torch.long, device=device),
        torch.tensor(plan["pos"], dtype=torch.long, device=device),
        None if rows is None else torch.tensor(rows, dtype=torch.long, device=device),
        **kwargs,
    )


def _long(values: list, device):
    import torch

    return torch.tensor(values, dtype=torch.long, device=device)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_engine_tp(
    preset: str | None,
    model_path: str | None,
    device: str,
    dtype: str,
    seed: int,
    engine_config,
    tensor_parallel_gpus: int,
    timeout_s: float | None = None,
    allow_smaller_world: bool = False,
):
    """The continuous-batching engine on this rank's shard (lab.loadtest.session.build_engine for the
    multi-GPU tier). Rank 0 starts it; the others pass it to `follow_engine`."""
    from lab.engine.batching import Engine

    prepared = prepare_tp(
        preset,
        model_path,
        device,
        dtype,
        seed,
        engine_config.max_batch_size,
        engine_config.max_seq_len,
        tensor_parallel_gpus,
        timeout_s,
        allow_smaller_world,
    )
    from lab.loadtest.session import point_compile_cache

    point_compile_cache(engine_config)
    engine = Engine(prepared.model, engine_config, eos_id=prepared.spec.args.eos_token_id)
    return engine, prepared


def tp_from_env(requested: int | None) -> int:
    """--tensor-parallel-gpus for serve/loadtest: as given, else the world torchrun launched, else 1."""
    return requested or launched_world_size() or 1


# --- energy of the whole tier ------------------------------------------------------------------------


def tier_telemetry(device: Any):
    """lab.telemetry.Telemetry for `device`, or, on rank 0 of a multi-GPU tier on one host, one window over
    every rank's GPU (energy and power summed): tokens/joule of the tier divides by all its GPUs' joules."""
    from lab.telemetry import Telemetry

    ctx = _CTX
    if ctx is None or not ctx.distributed or ctx.device.type != "cuda":
        return Telemetry(device)
    if int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)) != ctx.world_size:
        return Telemetry(device)  # ranks on several hosts: NVML sees only this host's GPUs
    return TierTelemetry(ctx.local_rank, list(range(ctx.world_size)))


class TierTelemetry:
    """The Telemetry interface over several GPUs of this host: this process's GPU synchronised at the
    window's edges, the peers' read through NVML only (they belong to other processes; the collectives
    keep every GPU in step). Energy, power and tokens/joule are the tier's sums."""

    def __init__(self, own_index: int, indices: list[int]):
        import torch

        from lab.telemetry import Telemetry

        class _Peer(Telemetry):
            def _sync(self) -> None:  # not this process's device: no CUDA context on it
                pass

        self.indices = indices
        self.parts = [
            Telemetry(torch.device("cuda", i)) if i == own_index else _Peer(torch.device("cuda", i))
            for i in indices
        ]
        self.own = self.parts[indices.index(own_index)]

    def __enter__(self) -> TierTelemetry:
        for p in self.parts:
            p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for p in self.parts:
            p.__exit__(*exc)

    @property
    def unavailable(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for i, p in zip(self.indices, self.parts):
            for k, v in p.unavailable.items():
                out.setdefault(k, f"GPU {i}: {v}")
        return out

    @property
    def duration_s(self) -> float | None:
        return self.own.duration_s

    @property
    def energy_j(self) -> float | None:
        values = [p.energy_j for p in self.parts]
        return None if any(v is None for v in values) else sum(values)

    @property
    def power_w_mean(self) -> float | None:
        values = [p.power_w_mean for p in self.parts]
        return None if any(v is None for v in values) else sum(values)

    @property
    def power_w_max(self) -> float | None:
        values = [p.power_w_max for p in self.parts]
        return None if any(v is None for v in values) else sum(values)  # upper bound of the tier's peak

    @property
    def samples(self) -> list[dict[str, Any]]:
        """This GPU's time series, each sample with the tier's summed power where every GPU has one."""
        out = []
        for k, s in enumerate(self.own.samples):
            row = dict(s)
            peers = [p.samples[k].get("power_w") if k < len(p.samples) else None for p in self.parts]
            row["tier_power_w"] = None if any(v is None for v in peers) else sum(peers)
            out.append(row)
        return out

    def tokens_per_joule(self, tokens: int) -> float | None:
        e = self.energy_j
        return None if e is None or e <= 0 else tokens / e

    def summary(self, tokens: int | None = None) -> dict[str, Any]:
        out = {
            "duration_s": self.duration_s,
            "energy_j": self.energy_j,
            "power_w_mean": self.power_w_mean,
            "power_w_max": self.power_w_max,
            "n_samples": len(self.own.samples),
            "gpus": self.indices,
            "energy_j_per_gpu": [p.energy_j for p in self.parts],
        }
        if tokens is not None:
            out["tokens_per_joule"] = self.tokens_per_joule(tokens)
        return out
