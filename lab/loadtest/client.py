"""Targets the load generator sends to: the in-process engine, or any OpenAI-compatible server over HTTP
(`--endpoint`). Each fills one `RequestRecord`; all times are time.monotonic(), the generator's clock."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestRecord:
    index: int
    phase: str
    t_scheduled: float
    prompt_tokens: int
    max_new_tokens: int
    t_sent: float | None = None
    t_admitted: float | None = None  # known in-process only
    t_first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    t_done: float | None = None
    output_tokens: int = 0
    outcome: str = "not_sent"
    reason: str | None = None
    http_status: int | None = None

    def to_row(self, t0: float, run: str | None = None) -> dict[str, Any]:
        """One JSONL line: times in seconds from the run start, plus the derived latencies in ms."""

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 6)

        d = asdict(self)
        for k in ("t_scheduled", "t_sent", "t_admitted", "t_first_token", "t_done"):
            d[k] = rel(d[k])
        d["token_times"] = [rel(t) for t in self.token_times]
        d.update(derived_ms(self))
        if run is not None:
            d["run"] = run
        return d


def derived_ms(r: RequestRecord) -> dict[str, Any]:
    """Latencies from the SCHEDULED time (coordinated omission cannot hide a slow server)."""

    def ms(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else (b - a) * 1e3

    ok = r.outcome == "ok"
    ttft = ms(r.t_scheduled, r.t_first_token) if ok else None
    e2e = ms(r.t_scheduled, r.t_done) if ok else None
    tpot = None
    if ok and ttft is not None and e2e is not None and r.output_tokens > 1:
        tpot = (e2e - ttft) / (r.output_tokens - 1)
    return {
        "dispatch_lag_ms": ms(r.t_scheduled, r.t_sent),
        "queue_wait_ms": ms(r.t_scheduled, r.t_admitted),
        "ttft_ms": ttft,
        "tpot_ms": tpot,
        "e2e_ms": e2e,
        "itl_ms": (np.diff(r.token_times) * 1e3).tolist() if ok and len(r.token_times) > 1 else [],
    }


class InProcessTarget:
    """The lab's own engine in this process: requests go straight into its queue."""

    name = "in-process"

    def __init__(self, engine):
        self.engine = engine
        self.pending: set = set()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def depth(self) -> dict[str, Any]:
        s = self.engine.stats()
        return {"waiting": s["waiting"] + s["waiting_long_context"], "running": s["running"]}

    async def send(self, prompt_ids: list[int], rec: RequestRecord) -> None:
        from lab.engine.batching import Request
        from lab.errors import LabError

        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def callback(req, event: str) -> None:
            if event == "done":
                loop.call_soon_threadsafe(_resolve, done)

        req = Request(prompt_ids, rec.max_new_tokens, temperature=0.0, ignore_eos=True, callback=callback)
        rec.t_sent = time.monotonic()
        req.t_submitted = rec.t_sent
        try:
            self.engine.submit(req)
        except LabError as e:
            rec.outcome, rec.reason, rec.t_done = "error", str(e), time.monotonic()
            return
        try:
            await done
        except asyncio.CancelledError:
            self.engine.cancel(req)
            rec.outcome, rec.reason = "cancelled", "still running when the drain timeout ended the test"
            rec.t_done = time.monotonic()
            raise
        finally:
            _copy(req, rec)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _copy(req, rec: RequestRecord) -> None:
    if req.outcome is None:
        return
    rec.t_admitted, rec.t_first_token, rec.t_done = req.t_admitted, req.t_first_token, req.t_done
    rec.token_times = list(req.token_times)
    rec.output_tokens = len(req.tokens)
    rec.outcome, rec.reason = req.outcome, req.reason


FULL_SPEED_TIMEOUT_S = 900.0


def base_url(endpoint: str) -> str:
    """The server's root: --endpoint may be given with or without the OpenAI /v1 suffix."""
    return endpoint.rstrip("/").removesuffix("/v1")


def wait_for_full_speed(endpoint: str, timeout_s: float = FULL_SPEED_TIMEOUT_S, poll_s: float = 0.5):
    """A `lab serve` still compiling its --mode (serving in its --start-mode meanwhile) would mix two speeds
    in one measurement: wait until its /health says the switch is done, or failed. Returns what /health said
    about the serving mode ({"mode", "upgrade"}), or None for a server that does not say (another
    OpenAI-compatible server, or a lab server without a start mode). Raises LabError past `timeout_s`."""
    import sys

    import httpx

    from lab.errors import LabError

    base = base_url(endpoint)

    def health() -> dict | None:
        try:
            body = httpx.get(base + "/health", timeout=5.0).json()
        except (httpx.HTTPError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    deadline, said = time.monotonic() + timeout_s, False
    body = health()
    while body and (body.get("upgrade") or {}).get("state") in ("pending", "compiling"):
        if time.monotonic() > deadline:
            raise LabError(
                f"the server at {endpoint} still serves in its start mode after {timeout_s:.0f} s (compiling "
                f"{body['upgrade'].get('to')}); wait for /health's upgrade.state to be done, or restart it with "
                "--start-mode none"
            )
        if not said:
            print(
                f"loadtest: the server is compiling {body['upgrade'].get('to')} (serving in "
                f"{body['upgrade'].get('from')} meanwhile); waiting for the switch before measuring",
                file=sys.stderr,
                flush=True,
            )
            said = True
        time.sleep(poll_s)
        body = health() or body
    if not body or "mode" not in body:
        return None
    return {"mode": body["mode"], "upgrade": body.get("upgrade")}


class HTTPTarget:
    """Any OpenAI-compatible server: POST /v1/completions with stream=true; one SSE event per token
    (usage.completion_tokens, when the server sends it, corrects the count)."""

    name = "http"

    def __init__(
        self, endpoint: str, model: str = "lab", timeout_s: float = 600.0, prompt_format: str = "ids"
    ):
        self.base = base_url(endpoint)
        self.model, self.timeout_s, self.prompt_format = model, timeout_s, prompt_format
        self.client = None
        self.in_flight = 0

    async def start(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            base_url=self.base,
            timeout=httpx.Timeout(self.timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def depth(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight}

    async def send(self, prompt_ids: list[int], rec: RequestRecord) -> None:
        prompt: Any = prompt_ids if self.prompt_format == "ids" else _ids_to_text(prompt_ids)
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": rec.max_new_tokens,
            "temperature": 0.0,
            "stream": True,
            "ignore_eos": True,  # fixed output lengths (vLLM and the lab's server honour it)
        }
        self.in_flight += 1
        rec.t_sent = time.monotonic()
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as resp:
                rec.http_status = resp.status_code
                if resp.status_code != 200:
                    text = (await resp.aread()).decode("utf-8", "replace")
                    rec.outcome, rec.reason = _classify(resp.status_code, text)
                    rec.t_done = time.monotonic()
                    return
                usage_tokens = None
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.monotonic()
                    try:
                        event = json.loads(data)
                    except json.JSONDecodeError:
                        continue
                    if event.get("error"):
                        rec.outcome, rec.reason = "error", str(event["error"])[:300]
                        rec.t_done = now
                        return
                    if event.get("choices"):
                        if rec.t_first_token is None:
                            rec.t_first_token = now
                        rec.token_times.append(now)
                    usage = event.get("usage") or {}
                    if usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        rec.prompt_tokens = int(usage["prompt_tokens"])
                rec.t_done = time.monotonic()
                rec.output_tokens = usage_tokens if usage_tokens is not None else len(rec.token_times)
                if rec.output_tokens == 0:
                    rec.outcome, rec.reason = "error", "the stream ended without a token"
                else:
                    rec.outcome = "ok"
        except asyncio.CancelledError:
            rec.outcome, rec.reason = "cancelled", "still running when the drain timeout ended the test"
            rec.t_done = time.monotonic()
            raise
        except Exception as e:  # connection refused, reset, timeout: an errored request, not a crash
            rec.outcome, rec.reason = "error", f"{type(e).__name__}: {e}"[:300]
            rec.t_done = time.monotonic()
        finally:
            self.in_flight -= 1


def _classify(status: int, text: str) -> tuple[str, str]:
    try:
        err = json.loads(text).get("error") or {}
        code, msg = err.get("code"), err.get("message", text)
    except (json.JSONDecodeError, AttributeError):
        code, msg = None, text
    msg = f"HTTP {status}: {msg}"[:300]
    if status == 429:
        return "rejected_queue_full", msg
    if status == 503 and code == "queue_timeout":
        return "timed_out_in_queue", msg
    if status == 503 and code == "draining":
        return "rejected_draining", msg
    return "error", msg


def _ids_to_text(ids: list[int]) -> str:
    # Printable ASCII, one character per id: about one token per character on a byte-level tokenizer.
    return "".join(chr(97 + (i % 26)) for i in ids)
