"""Percentile summaries with the sample count. Never average percentiles: merge samples instead."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

QUANTILES = (50, 90, 95, 99)


def summarize(values: Iterable[float], quantiles: Sequence[int] = QUANTILES) -> dict[str, float | int | None]:
    """p50/p90/p95/p99/min/max/mean and `count` of `values`; None everywhere when empty.

    With fewer than 100 samples p99 is interpolated towards the max; `count` lets a reader say so."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    out: dict[str, float | int | None] = {"count": int(arr.size)}
    if arr.size == 0:
        out.update({f"p{q}": None for q in quantiles})
        out.update(min=None, max=None, mean=None)
        return out
    for q in quantiles:
        out[f"p{q}"] = float(np.percentile(arr, q))
    out.update(min=float(arr.min()), max=float(arr.max()), mean=float(arr.mean()))
    return out
