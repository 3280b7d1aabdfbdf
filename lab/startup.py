"""Wall-clock marks of this process's start, for the fallback's time to ready (issue 10): `lab serve`
reports them in /health, so a slow start says where its seconds went (interpreter and imports, model
build, KV cache, compile/warm-up) instead of one number."""

from __future__ import annotations

import time

MARKS: dict[str, float] = {}  # name -> time.time() when first reached (epoch seconds)


def mark(name: str) -> None:
    MARKS.setdefault(name, time.time())


def phases() -> dict[str, float]:
    """Seconds between consecutive marks, in the order they were reached."""
    names = sorted(MARKS, key=MARKS.get)
    return {f"{a}->{b}": MARKS[b] - MARKS[a] for a, b in zip(names, names[1:])}
