"""NVML inventory and health per GPU through nvidia-ml-py (never nvidia-smi text): identity, memory,
power, temperature, PCIe link, NVLink per-link state, ECC, remapped rows, clock event reasons, and XID
errors from the kernel log where it is readable.

Everything takes the NVML module as an argument (`nv`), so tests pass a fake with the same API
(lab.health.fake_nvml) and drive the same code the real driver does.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from typing import Any

from lab.health.report import GpuHealth
from lab.telemetry import decode_clock_reasons

GB = 1e9
# Clock event reasons that mean the GPU is running slower than it should (idle and the power cap
# under load are normal and not flagged).
SLOWDOWN_REASONS = ("hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")
NVLINK_UNSUPPORTED = "NVLink not supported on this device"


class NvmlUnavailable(Exception):
    """NVML could not be initialised: no driver, no library, or a driver/library mismatch."""


def load_nvml() -> Any:
    """Initialise the real NVML and return the module; NvmlUnavailable says why not."""
    try:
        import pynvml
    except ImportError as e:
        raise NvmlUnavailable(f"nvidia-ml-py not installed ({e})") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise NvmlUnavailable(f"NVML not available: {e}") from None
    except OSError as e:  # a broken libnvidia-ml.so
        raise NvmlUnavailable(f"NVML library failed to load: {e}") from None
    return pynvml


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _why(nv: Any, e: Exception) -> str:
    if getattr(e, "value", None) == nv.NVML_ERROR_NOT_SUPPORTED:
        return "not supported on this device"
    if getattr(e, "value", None) == getattr(nv, "NVML_ERROR_NO_PERMISSION", -1):
        return "no permission to read it"
    return f"NVML error: {e}"


def _read(nv: Any, unavailable: dict[str, str], key: str, fn) -> Any:
    try:
        return fn()
    except nv.NVMLError as e:
        unavailable[key] = _why(nv, e)
        return None


@dataclass
class NvLinkState:
    supported: bool
    links_reported: int = 0
    active: int = 0
    inactive: list[int] = field(default_factory=list)
    reason: str | None = None


def read_nvlink(nv: Any, handle: Any) -> NvLinkState:
    """Count active links from NVML's per-link state. The number of links comes from the device:
    NVML_FI_DEV_NVLINK_LINK_COUNT when the driver answers it, else every link index up to
    NVML_NVLINK_MAX_LINKS that answers (an index past the device's last link is an invalid argument
    or not supported)."""
    count = None
    try:
        fv = nv.nvmlDeviceGetFieldValues(handle, [nv.NVML_FI_DEV_NVLINK_LINK_COUNT])[0]
        if fv.nvmlReturn == nv.NVML_SUCCESS:
            count = int(fv.value.uiVal)
    except (nv.NVMLError, AttributeError, IndexError):
        count = None
    if count == 0:
        return NvLinkState(False, reason=f"{NVLINK_UNSUPPORTED} (it reports 0 links)")
    end_codes = (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_INVALID_ARGUMENT)
    st = NvLinkState(True)
    for link in range(count if count is not None else nv.NVML_NVLINK_MAX_LINKS):
        try:
            on = nv.nvmlDeviceGetNvLinkState(handle, link) == nv.NVML_FEATURE_ENABLED
        except nv.NVMLError as e:
            if count is None and e.value in end_codes:
                if link == 0:
                    return NvLinkState(False, reason=NVLINK_UNSUPPORTED)
                break  # past the device's last link
            on = False  # a link the device has but cannot report counts as not active
            st.reason = f"link {link}: {_why(nv, e)}"
        st.links_reported += 1
        if on:
            st.active += 1
        else:
            st.inactive.append(link)
    return st


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def read_gpu(nv: Any, index: int, driver: str | None, cuda: str | None) -> GpuHealth:
    """Everything NVML can say about GPU `index`; what it cannot read lands in `unavailable`."""
    h = nv.nvmlDeviceGetHandleByIndex(index)
    un: dict[str, str] = {}
    g = GpuHealth(index=index, driver_version=driver, cuda_driver_version=cuda)
    g.name = _read(nv, un, "name", lambda: _text(nv.nvmlDeviceGetName(h)))
    g.uuid = _read(nv, un, "uuid", lambda: _text(nv.nvmlDeviceGetUUID(h)))
    g.pci_bus_id = _read(nv, un, "pci_bus_id", lambda: _text(nv.nvmlDeviceGetPciInfo(h).busId))
    mem = _read(nv, un, "memory", lambda: nv.nvmlDeviceGetMemoryInfo(h))
    if mem is not None:
        g.memory_total_gb = round(mem.total / GB, 2)
        g.memory_used_gb = round(mem.used / GB, 2)
    cc = _read(nv, un, "compute_capability", lambda: nv.nvmlDeviceGetCudaComputeCapability(h))
    if cc is not None:
        g.compute_capability = f"{cc[0]}.{cc[1]}"
    p = _read(nv, un, "power_w", lambda: nv.nvmlDeviceGetPowerUsage(h))
    g.power_w = None if p is None else p / 1e3
    pl = _read(nv, un, "power_limit_w", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
    g.power_limit_w = None if pl is None else pl / 1e3
    g.temperature_c = _read(
        nv, un, "temperature_c", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
    )
    g.pcie_gen_current = _read(nv, un, "pcie_gen", lambda: nv.nvmlDeviceGetCurrPcieLinkGeneration(h))
    g.pcie_gen_max = _read(nv, un, "pcie_gen_max", lambda: nv.nvmlDeviceGetMaxPcieLinkGeneration(h))
    g.pcie_width_current = _read(nv, un, "pcie_width", lambda: nv.nvmlDeviceGetCurrPcieLinkWidth(h))
    g.pcie_width_max = _read(nv, un, "pcie_width_max", lambda: nv.nvmlDeviceGetMaxPcieLinkWidth(h))

    link = read_nvlink(nv, h)
    g.nvlink_supported = link.supported
    if link.supported:
        g.nvlink_links_reported, g.nvlink_active_links, g.nvlink_inactive = (
            link.links_reported,
            link.active,
            link.inactive,
        )
    if link.reason:
        un["nvlink"] = link.reason

    mode = _read(nv, un, "ecc", lambda: nv.nvmlDeviceGetEccMode(h))
    if mode is not None:
        g.ecc_enabled = mode[0] == nv.NVML_FEATURE_ENABLED
        if g.ecc_enabled:
            unc = nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
            g.ecc_uncorrected_volatile = _read(
                nv, un, "ecc", lambda: nv.nvmlDeviceGetTotalEccErrors(h, unc, nv.NVML_VOLATILE_ECC)
            )
            g.ecc_uncorrected_aggregate = _read(
                nv, un, "ecc_aggregate", lambda: nv.nvmlDeviceGetTotalEccErrors(h, unc, nv.NVML_AGGREGATE_ECC)
            )
        else:
            un["ecc"] = "ECC is disabled on this device"
    rows = _read(nv, un, "remapped_rows", lambda: nv.nvmlDeviceGetRemappedRows(h))
    if rows is not None:
        g.remapped_rows_uncorrectable = int(rows[1])
        g.remapped_rows_pending = bool(rows[2])
        g.remapped_rows_failure = bool(rows[3])
    fn = (
        getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        or nv.nvmlDeviceGetCurrentClocksThrottleReasons
    )
    mask = _read(nv, un, "clock_event_reasons", lambda: fn(h))
    if mask is not None:
        g.clock_event_reasons = decode_clock_reasons(int(mask))
    g.unavailable = un
    return g


def inventory(nv: Any) -> list[GpuHealth]:
    driver = cuda = None
    try:
        driver = _text(nv.nvmlSystemGetDriverVersion())
    except nv.NVMLError:
        pass
    try:
        cuda = _cuda_version(int(nv.nvmlSystemGetCudaDriverVersion()))
    except nv.NVMLError:
        pass
    return [read_gpu(nv, i, driver, cuda) for i in range(nv.nvmlDeviceGetCount())]


def nvlink_p2p(nv: Any, n: int) -> list[list[bool | None]] | None:
    """NVML's view of NVLink P2P between every pair of GPUs (None on the diagonal or when unreadable)."""
    if n < 2:
        return None
    handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
    out: list[list[bool | None]] = []
    for i in range(n):
        row: list[bool | None] = []
        for j in range(n):
            if i == j:
                row.append(None)
                continue
            try:
                s = nv.nvmlDeviceGetP2PStatus(handles[i], handles[j], nv.NVML_P2P_CAPS_INDEX_NVLINK)
                row.append(s == nv.NVML_P2P_STATUS_OK)
            except nv.NVMLError:
                row.append(None)
        out.append(row)
    return out


# --- XID errors from the kernel log ------------------------------------------------------------------
_XID = re.compile(r"NVRM: Xid \(PCI:([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)[^)]*\): (\d+)")


def bus_key(bus_id: str) -> tuple[int, int, int] | None:
    """'00000000:3B:00.0' (NVML) and '0000:3b:00' (kernel log) -> (domain, bus, device)."""
    m = re.match(r"([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)", bus_id or "")
    return None if m is None else (int(m[1], 16), int(m[2], 16), int(m[3], 16))


def parse_xids(lines: list[str]) -> dict[tuple[int, int, int], list[int]]:
    out: dict[tuple[int, int, int], list[int]] = {}
    for line in lines:
        m = _XID.search(line)
        if m:
            out.setdefault((int(m[1], 16), int(m[2], 16), int(m[3], 16)), []).append(int(m[4]))
    return out


def read_kernel_log() -> list[str]:
    """The kernel log through dmesg, then journalctl -k. Raises PermissionError (with the reason) when
    neither is readable, as in most containers."""
    reasons = []
    for cmd in (["dmesg"], ["journalctl", "-k", "-q", "--no-pager", "-b"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as e:
            reasons.append(f"{cmd[0]}: {e}")
            continue
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.splitlines()
        reasons.append(f"{cmd[0]}: {(r.stderr.strip() or 'no output').splitlines()[0]}")
    raise PermissionError("; ".join(reasons))
