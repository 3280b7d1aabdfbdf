"""The collective probe: an all_reduce across N child processes under one deadline, with the measured
bus bandwidth. A rank that hangs or dies is detected within the deadline, every child's process group
is killed, and the outcome becomes the `nccl_hang` trigger. The health check never hangs.

NCCL runs one process per GPU; gloo runs N processes on the CPU (`--world-size N` on machines without
GPUs). NVLink SHARP / multicast are kept off in every child (NCCL_NVLS_ENABLE=0 and friends).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lab.env import REPO_ROOT

Outcome = Literal["ok", "hang", "rank_failed", "wrong_result", "could_not_run"]

# Multicast / NVLS off in every child: the probe measures the plain NCCL ring/tree path.
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DEFAULT_SIZE_BYTES = {"gloo": 4 * 2**20, "nccl": 256 * 2**20}
DEFAULT_ITERS = {"gloo": 5, "nccl": 20}


@dataclass
class ProbeResult:
    outcome: Outcome
    backend: str
    world_size: int
    timeout_s: float
    elapsed_s: float
    detail: str
    size_bytes: int = 0
    iter_s_median: float | None = None
    iter_s_min: float | None = None
    iter_s_max: float | None = None
    algbw_gbps: float | None = None
    busbw_gbps: float | None = None
    ranks: list[dict[str, Any]] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the child leads its own group: grandchildren go too
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int = 400) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-n:]


def run_collective_probe(
    world_size: int,
    backend: str,
    timeout_s: float = 30.0,
    size_bytes: int | None = None,
    iters: int | None = None,
    warmup: int = 2,
) -> ProbeResult:
    """Spawn `world_size` ranks, wait at most `timeout_s` (start-up included), clean up, report."""
    size_bytes = size_bytes or DEFAULT_SIZE_BYTES[backend]
    iters = iters or DEFAULT_ITERS[backend]
    env = dict(os.environ)
    env.update(CHILD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if backend == "gloo":
        env.setdefault("OMP_NUM_THREADS", "1")
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    with tempfile.TemporaryDirectory(prefix="lab-probe-") as tmp:
        tmpd = Path(tmp)
        outs = [tmpd / f"rank{r}.json" for r in range(world_size)]
        errs = [tmpd / f"rank{r}.err" for r in range(world_size)]
        outcome: Outcome | None = None
        detail = ""
        try:
            try:
                for r in range(world_size):
                    with open(errs[r], "wb") as ef:
                        procs.append(
                            subprocess.Popen(
                                [
                                    sys.executable,
                                    "-m",
                                    "lab.health.probe_worker",
                                    f"--rank={r}",
                                    f"--world-size={world_size}",
                                    f"--backend={backend}",
                                    f"--init-file={tmpd / 'store'}",
                                    f"--size-bytes={size_bytes}",
                                    f"--warmup={warmup}",
                                    f"--iters={iters}",
                                    f"--timeout-s={timeout_s}",
                                    f"--out={outs[r]}",
                                ],
                                stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL,
                                stderr=ef,
                                env=env,
                                cwd=str(REPO_ROOT),
                                start_new_session=True,
                            )
                        )
            except OSError as e:
                outcome, detail = "could_not_run", f"could not start probe processes: {e}"
            while outcome is None:
                codes = [p.poll() for p in procs]
                dead = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if dead:
                    r, c = dead[0]
                    why = _tail(errs[r])
                    outcome = "rank_failed"
                    detail = f"rank {r} exited with code {c} during the all_reduce" + (
                        f": {why}" if why else ""
                    )
                elif all(c == 0 for c in codes):
                    outcome = "ok"
                elif time.monotonic() >= deadline:
                    waiting = [str(r) for r, c in enumerate(codes) if c is None]
                    outcome = "hang"
                    detail = (
                        f"all_reduce over {world_size} {backend} ranks did not finish within "
                        f"{timeout_s:g} s (rank(s) {', '.join(waiting)} still running; killed)"
                    )
                else:
                    time.sleep(0.05)
        finally:
            for p in procs:
                _kill_group(p)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        elapsed = time.monotonic() - t0
        res = ProbeResult(
            outcome=outcome,
            backend=backend,
            world_size=world_size,
            timeout_s=timeout_s,
            elapsed_s=round(elapsed, 3),
            detail=detail,
            size_bytes=size_bytes,
            pids=[p.pid for p in procs],
        )
        if outcome == "ok":
            _measure(res, outs)
    return res


def _measure(res: ProbeResult, outs: list[Path]) -> None:
    ranks = [json.loads(p.read_text(encoding="utf-8")) for p in outs]
    res.ranks = [{k: v for k, v in r.items() if k != "iter_s"} for r in ranks]
    if not all(r["correct"] for r in ranks):
        res.outcome = "wrong_result"
        bad = [str(r["rank"]) for r in ranks if not r["correct"]]
        res.detail = f"all_reduce returned a wrong sum on rank(s) {', '.join(bad)}"
        return
    # A collective ends when its slowest rank does: per-iteration max over ranks, then the median.
    per_iter = [max(vals) for vals in zip(*(r["iter_s"] for r in ranks))]
    med = statistics.median(per_iter)
    n = res.world_size
    res.size_bytes = ranks[0]["size_bytes"]
    res.iter_s_median, res.iter_s_min, res.iter_s_max = med, min(per_iter), max(per_iter)
    res.algbw_gbps = round(res.size_bytes / med / 1e9, 3)
    # nccl-tests convention: all_reduce moves 2(n-1)/n of the buffer per rank.
    res.busbw_gbps = round(res.algbw_gbps * 2 * (n - 1) / n, 3) if n > 1 else None
    bw = f"bus bandwidth {res.busbw_gbps:.2f} GB/s" if n > 1 else "single rank: no data crosses a link"
    res.detail = (
        f"all_reduce of {res.size_bytes / 2**20:.0f} MiB over {n} {res.backend} rank(s): median "
        f"{med * 1e3:.3f} ms (min {res.iter_s_min * 1e3:.3f}, max {res.iter_s_max * 1e3:.3f}) over "
        f"{len(per_iter)} iterations, {bw}"
    )
