"""Inductor's on-disk compile cache, shared by every command that compiles (warm-up, compare, the serving
engine, generate): the first process compiles and writes it, a restart loads it. This is what makes the
fallback server's restart fast (issue 10's time-to-ready: cold vs warm cache)."""

from __future__ import annotations

import os
from pathlib import Path

from lab.errors import LabError

DEFAULT_COMPILE_CACHE_DIR = ".compile-cache"


def use_compile_cache(cache_dir: str | os.PathLike[str]) -> Path:
    """Point Inductor's on-disk caches (FX graphs, AOTAutograd, Triton kernels, autotuning) at
    `cache_dir`/inductor. Call before the first compile in the process; the next process that does the
    same loads the compiled artifacts instead of recompiling."""
    path = Path(cache_dir).expanduser().resolve()
    try:
        (path / "inductor").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(
            f"--compile-cache-dir {cache_dir}: cannot create it ({e.strerror or e}); choose a writable directory"
        ) from None
    if not os.access(path, os.W_OK):
        raise LabError(f"--compile-cache-dir {cache_dir} is not writable; choose a writable directory")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    return path


def cache_counters() -> dict[str, int]:
    """Inductor's cache hit/miss counters (process-wide, monotonically increasing). All zero, without
    importing Dynamo, while nothing has imported it (nothing compiled yet): that import took 1.1 s on this
    2-core host, on the critical path of a start mode's warm-up (lab serve --start-mode)."""
    import sys

    if "torch._dynamo.utils" not in sys.modules:
        return dict.fromkeys(("fxgraph_hit", "fxgraph_miss", "aot_autograd_hit", "aot_autograd_miss"), 0)
    from torch._dynamo.utils import counters

    return {
        "fxgraph_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
        "aot_autograd_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
        "aot_autograd_miss": int(counters["aot_autograd"]["autograd_cache_miss"]),
    }


def cache_state(before: dict[str, int], after: dict[str, int]) -> tuple[str, dict[str, int]]:
    """'hit' (every compiled graph came from the cache), 'miss' (none did), 'partial', or 'none'
    (nothing was compiled)."""
    delta = {k: after[k] - before.get(k, 0) for k in after}
    hits = delta["fxgraph_hit"] + delta["aot_autograd_hit"]
    misses = delta["fxgraph_miss"] + delta["aot_autograd_miss"]
    if hits and not misses:
        return "hit", delta
    if misses and not hits:
        return "miss", delta
    return ("partial" if hits else "none"), delta
