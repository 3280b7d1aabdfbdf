"""GPU telemetry over an exact time window: NVML's energy counter read at the window's start and end
(tokens/joule must divide by the energy of the same window that produced the tokens), plus a sampled
time series of power, memory, utilisation, temperature, SM clock and clock-event reasons.

On machines without NVIDIA GPUs (or with CPU devices) the same object works as a no-op twin whose
fields are None and whose `unavailable` says why.

    with Telemetry(device) as tel:   # synchronises the device at both edges
        ... timed work ...
    tel.energy_j, tel.power_w_mean, tel.samples, tel.unavailable
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

NVML_NOTE = "NVML updates power about every 100 ms: windows under 1 s give noisy power and energy"


def _torch_device(device: Any):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def _nvml():
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def _nvml_handle(pynvml, device) -> Any:
    """Map a torch CUDA device to its NVML handle by UUID (robust to CUDA_VISIBLE_DEVICES), else by index."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        if not uuid.startswith("GPU-"):
            uuid = "GPU-" + uuid
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:
        return pynvml.nvmlDeviceGetHandleByIndex(index)


CLOCK_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def decode_clock_reasons(mask: int) -> list[str]:
    return [name for bit, name in CLOCK_REASONS.items() if mask & bit]


@dataclass
class Telemetry:
    device: Any = None
    interval_s: float = 0.1
    samples: list[dict[str, Any]] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    energy_j: float | None = None
    duration_s: float | None = None
    power_w_max: float | None = None
    _power_w_sampled_mean: float | None = None

    def __post_init__(self) -> None:
        self._dev = _torch_device(self.device)
        self._nv = None
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._e0_mj: int | None = None
        self._t0 = 0.0
        if self._dev.type != "cuda":
            reason = f"not available on {self._dev.type} (no NVIDIA GPU in use)"
            self.unavailable.update(power=reason, energy=reason, gpu_memory=reason)
            return
        try:
            self._nv = _nvml()
            self._handle = _nvml_handle(self._nv, self._dev)
        except Exception as e:  # driver missing or NVML broken: report, don't crash
            reason = f"NVML not available: {e}"
            self.unavailable.update(power=reason, energy=reason)
            self._nv = None

    # --- the window -----------------------------------------------------------------------------
    def __enter__(self) -> Telemetry:
        self._sync()
        if self._nv is not None:
            try:
                self._e0_mj = self._nv.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            except Exception as e:
                self.unavailable["energy"] = f"NVML energy counter not supported on this device: {e}"
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="lab-telemetry", daemon=True)
            self._thread.start()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.duration_s = time.monotonic() - self._t0
        if self._nv is None:
            return
        if self._e0_mj is not None:
            try:
                e1 = self._nv.nvmlDeviceGetTotalEnergyConsumption(self._handle)
                self.energy_j = (e1 - self._e0_mj) / 1e3
            except Exception as e:
                self.unavailable["energy"] = f"NVML energy counter failed: {e}"
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._sample()  # at least one sample even for very short windows
        powers = [s["power_w"] for s in self.samples if s.get("power_w") is not None]
        if powers:
            self.power_w_max = max(powers)
            self._power_w_sampled_mean = sum(powers) / len(powers)
        if self.duration_s is not None and self.duration_s < 1.0:
            self.unavailable.setdefault("note", NVML_NOTE)

    def _sync(self) -> None:
        if self._dev.type == "cuda":
            import torch

            torch.cuda.synchronize(self._dev)

    # --- sampling -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        nv, h = self._nv, self._handle
        s: dict[str, Any] = {"t_s": time.monotonic() - self._t0}
        for key, fn in (
            ("power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1e3),
            ("mem_used_gb", lambda: nv.nvmlDeviceGetMemoryInfo(h).used / 1e9),
            ("util_gpu_pct", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
            ("temp_c", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            ("sm_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            ("clock_event_reasons", lambda: decode_clock_reasons(_clock_reasons(nv, h))),
        ):
            try:
                s[key] = fn()
            except Exception:
                s[key] = None
        self.samples.append(s)

    # --- results --------------------------------------------------------------------------------
    @property
    def power_w_mean(self) -> float | None:
        """Mean power over the window: energy / duration when the counter exists (exact), else the
        mean of the samples."""
        if self.energy_j is not None and self.duration_s:
            return self.energy_j / self.duration_s
        return self._power_w_sampled_mean

    def tokens_per_joule(self, tokens: int) -> float | None:
        if self.energy_j is None or self.energy_j <= 0:
            return None
        return tokens / self.energy_j

    def summary(self, tokens: int | None = None) -> dict[str, Any]:
        out = {
            "duration_s": self.duration_s,
            "energy_j": self.energy_j,
            "power_w_mean": self.power_w_mean,
            "power_w_max": self.power_w_max,
            "n_samples": len(self.samples),
        }
        if tokens is not None:
            out["tokens_per_joule"] = self.tokens_per_joule(tokens)
        return out


def _clock_reasons(nv, h) -> int:
    fn = (
        getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        or nv.nvmlDeviceGetCurrentClocksThrottleReasons
    )
    return fn(h)
