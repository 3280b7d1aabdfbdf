"""A seeded, precomputed arrival schedule. The generator replays it against absolute deadlines, so the
offered load never depends on how fast the server answers (open loop).

Patterns: poisson (exponential gaps), constant (equal gaps), bursty (gamma gaps with a coefficient of
variation > 1: clumps of arrivals and long silences at the same mean rate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lab.errors import LabError

PATTERNS = ("poisson", "constant", "bursty")


@dataclass
class Arrival:
    index: int
    t_s: float  # offset from the start of the run
    prompt_len: int
    max_new_tokens: int
    phase: str  # warmup / measure / cooldown (only `measure` counts in the metrics)


@dataclass
class Schedule:
    pattern: str
    target_qps: float
    duration_s: float
    warmup_s: float
    cooldown_s: float
    seed: int
    burst_cv: float
    prompt_len_min: int
    prompt_len_max: int
    max_new_tokens: int
    vocab_size: int
    arrivals: list[Arrival] = field(default_factory=list)

    @property
    def measure_window_s(self) -> tuple[float, float]:
        return self.warmup_s, self.duration_s - self.cooldown_s

    def prompt_ids(self, index: int) -> list[int]:
        """The prompt of arrival `index`: reproducible from the seed, never stored."""
        rng = np.random.default_rng([self.seed, 7, index])
        n = self.arrivals[index].prompt_len
        return rng.integers(0, self.vocab_size, size=n).tolist()

    def to_dict(self) -> dict[str, Any]:
        """Compact form for the artifact: parameters plus columns (t_s, prompt_len, max_new_tokens, phase)."""
        d = asdict(self)
        d.pop("arrivals")
        d["arrivals"] = {
            "t_s": [round(a.t_s, 6) for a in self.arrivals],
            "prompt_len": [a.prompt_len for a in self.arrivals],
            "max_new_tokens": [a.max_new_tokens for a in self.arrivals],
            "phase": [a.phase for a in self.arrivals],
        }
        return d


def _gaps(pattern: str, qps: float, n: int, cv: float, rng: np.random.Generator) -> np.ndarray:
    mean = 1.0 / qps
    if pattern == "poisson":
        return rng.exponential(mean, size=n)
    if pattern == "constant":
        return np.full(n, mean)
    if pattern == "bursty":
        shape = 1.0 / (cv * cv)  # gamma with CV = 1/sqrt(shape); mean = shape * scale
        return rng.gamma(shape, mean / shape, size=n)
    raise LabError(f"unknown arrival pattern '{pattern}'; choose one of: {', '.join(PATTERNS)}")


def make_schedule(
    target_qps: float,
    duration_s: float,
    seed: int = 0,
    pattern: str = "poisson",
    prompt_len_min: int = 32,
    prompt_len_max: int = 64,
    max_new_tokens: int = 4,
    warmup_s: float = 2.0,
    cooldown_s: float = 2.0,
    burst_cv: float = 2.0,
    vocab_size: int = 256,
) -> Schedule:
    """Arrivals over [0, duration_s); those in the first `warmup_s` and the last `cooldown_s` are sent
    (they keep the load steady at the edges) but excluded from the metrics."""
    if target_qps <= 0:
        raise LabError("--target-qps must be > 0")
    if duration_s <= 0:
        raise LabError("--duration must be > 0")
    if warmup_s < 0 or cooldown_s < 0 or warmup_s + cooldown_s >= duration_s:
        raise LabError(
            f"--warmup-s {warmup_s:g} + --cooldown-s {cooldown_s:g} must be less than --duration {duration_s:g}"
        )
    if not 1 <= prompt_len_min <= prompt_len_max:
        raise LabError("need 1 <= --prompt-len-min <= --prompt-len-max")
    if max_new_tokens < 1:
        raise LabError("--max-new-tokens must be >= 1")
    if pattern == "bursty" and burst_cv <= 1:
        raise LabError("--burst-cv must be > 1 for bursty arrivals (1 is poisson)")
    rng = np.random.default_rng([seed, 1])
    expected = target_qps * duration_s
    times: list[float] = []
    if pattern == "constant":  # first arrival at 0, then every 1/qps
        times = [i / target_qps for i in range(int(np.ceil(expected)) + 1) if i / target_qps < duration_s]
    t = 0.0
    while pattern != "constant":  # draw gaps in blocks until past the end
        for g in _gaps(pattern, target_qps, max(16, int(expected * 0.25) + 1), burst_cv, rng):
            t += float(g)
            if t >= duration_s:
                break
            times.append(t)
        else:
            continue
        break
    lens = np.random.default_rng([seed, 2]).integers(prompt_len_min, prompt_len_max + 1, size=len(times))
    lo, hi = warmup_s, duration_s - cooldown_s
    arrivals = [
        Arrival(
            index=i,
            t_s=x,
            prompt_len=int(lens[i]),
            max_new_tokens=max_new_tokens,
            phase="warmup" if x < lo else ("cooldown" if x >= hi else "measure"),
        )
        for i, x in enumerate(times)
    ]
    return Schedule(
        pattern=pattern,
        target_qps=target_qps,
        duration_s=duration_s,
        warmup_s=warmup_s,
        cooldown_s=cooldown_s,
        seed=seed,
        burst_cv=burst_cv,
        prompt_len_min=prompt_len_min,
        prompt_len_max=prompt_len_max,
        max_new_tokens=max_new_tokens,
        vocab_size=vocab_size,
        arrivals=arrivals,
    )
