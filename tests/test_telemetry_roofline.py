"""Telemetry's no-op twin and its NVML path (with a fake NVML), and roofline arithmetic."""

import pytest

from lab.bench.roofline import decode_bytes_per_step, decode_mfu, mbu
from lab.model import get_preset
from lab.telemetry import Telemetry, decode_clock_reasons


def test_cpu_telemetry_says_what_it_cannot_measure():
    with Telemetry("cpu") as t:
        pass
    assert t.energy_j is None and t.power_w_mean is None and t.tokens_per_joule(100) is None
    assert "not available" in t.unavailable["energy"] and t.duration_s is not None


class FakeNvml:
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self):
        self.energy_mj = 1_000_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self.energy_mj += 250_000  # 250 J per read
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, h):
        return 500_000  # mW

    def nvmlDeviceGetMemoryInfo(self, h):
        class M:
            used = 40e9

        return M()

    def nvmlDeviceGetUtilizationRates(self, h):
        class U:
            gpu = 97

        return U()

    def nvmlDeviceGetTemperature(self, h, kind):
        return 61

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0x4 | 0x40


def test_energy_is_the_counter_difference_over_the_window():
    t = Telemetry("cpu")
    t._dev = type("D", (), {"type": "fake"})()  # bypass the device sync
    t.unavailable.clear()
    t._nv, t._handle = FakeNvml(), object()
    with t:
        pass
    # The counter moved 250 J between the window's two reads; samples carry watts, not milliwatts.
    assert t.energy_j == pytest.approx(250.0)
    assert t.tokens_per_joule(500) == pytest.approx(2.0)
    assert t.samples and t.samples[-1]["power_w"] == 500.0
    assert t.samples[-1]["clock_event_reasons"] == ["sw_power_cap", "hw_thermal_slowdown"]
    assert t.power_w_max == 500.0


def test_clock_reason_decoding():
    assert decode_clock_reasons(0) == []
    assert decode_clock_reasons(0x8 | 0x1) == ["gpu_idle", "hw_slowdown"]


def test_decode_bytes_count_weights_kv_read_and_written():
    a = get_preset("llama-8b")
    kv_row = 2 * 32 * 8 * 128 * 2  # k+v, layers, kv heads, head dim, bf16
    emb = a.vocab_size * a.dim * 2
    b1 = decode_bytes_per_step(a, "bfloat16", 1, 1000)
    assert b1 == pytest.approx(a.num_params() * 2 - emb + a.dim * 2 + 1000 * kv_row + kv_row)
    b16 = decode_bytes_per_step(a, "bfloat16", 16, 1000)
    assert b16 - b1 == pytest.approx(15 * (a.dim * 2 + 1001 * kv_row))
    assert mbu(3e9, 1e-3, 3e12) == pytest.approx(1.0)
    assert decode_mfu(1_000_000_000, 100, 1e12) == pytest.approx(0.2)
