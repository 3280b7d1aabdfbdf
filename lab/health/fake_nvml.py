"""A fake NVML with pynvml's API and error codes, for tests and drill rehearsals on machines without
NVIDIA GPUs: describe GPUs (NVLink links down, uncorrected ECC errors, thermal slowdown, no NVLink at
all) and lab.health.nvml reads them through exactly the calls it makes on a real driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

H100_MEMORY_BYTES = 85_520_809_984  # what NVML reports for an H100 80GB HBM3


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total_bytes: int = H100_MEMORY_BYTES
    memory_used_bytes: int = 600_000_000
    compute_capability: tuple[int, int] = (9, 0)
    power_mw: int = 72_000
    power_limit_mw: int = 700_000
    temperature_c: int = 33
    pcie: tuple[int, int, int, int] = (5, 5, 16, 16)  # gen current, gen max, width current, width max
    nvlink_links: int | None = 18  # None: the device has no NVLink
    nvlink_down: tuple[int, ...] = ()  # link indices that are not active
    link_count_field: bool = True  # whether NVML_FI_DEV_NVLINK_LINK_COUNT answers
    ecc_enabled: bool | None = True  # None: ECC not supported
    ecc_uncorrected_volatile: int = 0
    ecc_uncorrected_aggregate: int = 0
    remapped_rows: tuple[int, int, int, int] | None = (0, 0, 0, 0)  # corr, unc, pending, failure
    clock_event_reasons: int = 0x1  # gpu_idle


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


@dataclass
class FakeNvml:
    """Stands in for the `pynvml` module (after nvmlInit). Constants and NVMLError are pynvml's own."""

    gpus: list[FakeGpu] = field(default_factory=list)
    driver_version: str = "570.124.06"
    cuda_driver_version: int = 12080

    def __getattr__(self, name: str) -> Any:  # constants and error classes come from pynvml itself
        if name.startswith("NVML"):
            return getattr(pynvml, name)
        raise AttributeError(name)

    # --- system ---------------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def _g(self, h: int) -> FakeGpu:
        return self.gpus[h]

    # --- identity and load ------------------------------------------------------------------------
    def nvmlDeviceGetName(self, h: int) -> str:
        return self._g(h).name

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-00000000-0000-0000-0000-{h:012d}"

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return SimpleNamespace(busId=f"00000000:{0x18 + 0x10 * h:02X}:00.0")

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        g = self._g(h)
        return SimpleNamespace(
            total=g.memory_total_bytes,
            used=g.memory_used_bytes,
            free=g.memory_total_bytes - g.memory_used_bytes,
        )

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return self._g(h).compute_capability

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._g(h).power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return self._g(h).power_limit_mw

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return self._g(h).temperature_c

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: int) -> int:
        return self._g(h).pcie[0]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: int) -> int:
        return self._g(h).pcie[1]

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: int) -> int:
        return self._g(h).pcie[2]

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: int) -> int:
        return self._g(h).pcie[3]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        return self._g(h).clock_event_reasons

    # --- NVLink ------------------------------------------------------------------------------------
    def nvmlDeviceGetFieldValues(self, h: int, field_ids: list[int]) -> list[Any]:
        g = self._g(h)
        out = []
        for fid in field_ids:
            if fid == pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT and g.link_count_field:
                ret, val = pynvml.NVML_SUCCESS, g.nvlink_links or 0
            else:
                ret, val = pynvml.NVML_ERROR_NOT_SUPPORTED, 0
            out.append(SimpleNamespace(fieldId=fid, nvmlReturn=ret, value=SimpleNamespace(uiVal=val)))
        return out

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        g = self._g(h)
        if g.nvlink_links is None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < g.nvlink_links:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_FEATURE_DISABLED if link in g.nvlink_down else pynvml.NVML_FEATURE_ENABLED

    def nvmlDeviceGetP2PStatus(self, h1: int, h2: int, index: int) -> int:
        if index != pynvml.NVML_P2P_CAPS_INDEX_NVLINK:
            return pynvml.NVML_P2P_STATUS_OK
        a, b = self._g(h1), self._g(h2)
        linked = all(g.nvlink_links and len(g.nvlink_down) < g.nvlink_links for g in (a, b))
        return pynvml.NVML_P2P_STATUS_OK if linked else pynvml.NVML_P2P_STATUS_NOT_SUPPORTED

    # --- errors -------------------------------------------------------------------------------------
    def nvmlDeviceGetEccMode(self, h: int) -> list[int]:
        g = self._g(h)
        if g.ecc_enabled is None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        state = pynvml.NVML_FEATURE_ENABLED if g.ecc_enabled else pynvml.NVML_FEATURE_DISABLED
        return [state, state]

    def nvmlDeviceGetTotalEccErrors(self, h: int, error_type: int, counter_type: int) -> int:
        g = self._g(h)
        if error_type != pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
            return 0
        if counter_type == pynvml.NVML_VOLATILE_ECC:
            return g.ecc_uncorrected_volatile
        return max(g.ecc_uncorrected_aggregate, g.ecc_uncorrected_volatile)

    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple[int, int, int, int]:
        g = self._g(h)
        if g.remapped_rows is None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return g.remapped_rows


def h100_node(n: int = 8, **overrides: Any) -> FakeNvml:
    """n healthy H100 SXM GPUs with 18 NVLink links each; `overrides` apply to every GPU."""
    return FakeNvml(gpus=[FakeGpu(**overrides) for _ in range(n)])
