"""`run_health`: every health check in order, the fallback decision, the fix lines, and the exit code.

The sources of truth (NVML, the kernel log, CUDA's device count and peer access, the environment, the
collective probe) come in through `Sources`, so tests drive faults through the same code paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lab.errors import LabError
from lab.health import nvml as nvml_mod
from lab.health.nccl import UNSET_P2P, cuda_visible_check, nccl_env_check, peer_access
from lab.health.probe import ProbeResult, run_collective_probe
from lab.health.report import (
    EXIT_CHECK_ERROR,
    EXIT_FALLBACK,
    EXIT_HEALTHY,
    Check,
    GpuHealth,
    HealthArtifact,
)
from lab.health.triggers import LoadTestNumbers, decide, pcie_only, qps_drop_check, read_load_test
from lab.results import finish, new_artifact, write_artifact

MEMORY_FRACTION_MAX = 0.80  # playbook: keep GPU memory below 80 %
NVML_CHECKS = ("nvlink", "ecc", "remapped_rows", "clocks", "pcie", "xid")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass
class HealthOptions:
    min_nvlink_links: int = 18
    collective_timeout_s: float = 30.0
    world_size: int | None = None  # None: one NCCL rank per GPU when 2+ GPUs; 0: no probe
    baseline: str | None = None
    current: str | None = None
    qps_drop_threshold: float = 0.30
    fits_anywhere: bool = False
    preset: str | None = None
    model_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    max_seq_len: int | None = None  # None: min(4096, the model's context)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _cuda_peer(i: int, j: int) -> bool:
    import torch

    return bool(torch.cuda.can_device_access_peer(i, j))


@dataclass
class Sources:
    load_nvml: Callable[[], Any] = nvml_mod.load_nvml
    kernel_log: Callable[[], list[str]] = nvml_mod.read_kernel_log
    cuda_device_count: Callable[[], int] = _cuda_count
    cuda_peer: Callable[[int, int], bool] = _cuda_peer
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    probe: Callable[..., ProbeResult] = run_collective_probe


def default_sources() -> Sources:
    """The real machine: NVML, the kernel log, torch.cuda, os.environ and the real probe."""
    return Sources()


def _validate(o: HealthOptions) -> tuple[LoadTestNumbers | None, LoadTestNumbers | None]:
    if o.min_nvlink_links < 0:
        raise LabError("--min-nvlink-links must be >= 0")
    if not o.collective_timeout_s > 0:
        raise LabError("--collective-timeout-s must be > 0")
    if not 0 < o.qps_drop_threshold < 1:
        raise LabError("--qps-drop-threshold must be a fraction between 0 and 1, e.g. 0.30")
    if o.world_size is not None and o.world_size < 0:
        raise LabError("--world-size must be >= 0 (0 turns the collective probe off)")
    if o.batch_size < 1:
        raise LabError("--batch-size must be >= 1")
    if (o.baseline is None) != (o.current is None):
        raise LabError("--baseline and --current go together: pass both load_test.json files, or neither")
    if o.baseline is None:
        return None, None
    return read_load_test(o.baseline, "--baseline"), read_load_test(o.current, "--current")


# --- per-GPU checks ---------------------------------------------------------------------------------
def gpu_checks(g: GpuHealth, min_links: int) -> list[Check]:
    out: list[Check] = []
    i = g.index
    if g.nvlink_supported and g.nvlink_active_links == 0 and "pcie" in (g.name or "").lower():
        # A PCIe card reports its bridge links even with no bridge fitted: PCIe-only, not degraded.
        out.append(
            Check(
                name="nvlink",
                status="skipped",
                gpu=i,
                detail=f"PCIe card with no NVLink bridge connected (0 of {g.nvlink_links_reported} links active): "
                "PCIe-only",
                value=0,
                threshold=min_links,
            )
        )
    elif g.nvlink_supported:
        txt = f"{g.nvlink_active_links} of {g.nvlink_links_reported} NVLink links active"
        if g.nvlink_inactive:
            txt += f" (down: {', '.join(map(str, g.nvlink_inactive))})"
        if g.nvlink_active_links < min_links:
            hint = ""
            if g.nvlink_links_reported < min_links:
                hint = f"; this device has only {g.nvlink_links_reported} links: set --min-nvlink-links"
            out.append(
                Check(
                    name="nvlink",
                    status="fail",
                    gpu=i,
                    detail=f"{txt}, below --min-nvlink-links {min_links}{hint}",
                    value=g.nvlink_active_links,
                    threshold=min_links,
                    trigger="nvlink_degraded",
                )
            )
        else:
            out.append(
                Check(
                    name="nvlink",
                    status="ok",
                    gpu=i,
                    detail=txt,
                    value=g.nvlink_active_links,
                    threshold=min_links,
                )
            )
    else:
        out.append(
            Check(
                name="nvlink",
                status="skipped",
                gpu=i,
                detail=g.unavailable.get("nvlink", nvml_mod.NVLINK_UNSUPPORTED),
                value=0,
                threshold=min_links,
            )
        )

    if g.ecc_uncorrected_volatile:
        out.append(
            Check(
                name="ecc",
                status="fail",
                gpu=i,
                detail=f"{g.ecc_uncorrected_volatile} uncorrected ECC errors since the driver loaded: "
                "take this GPU out of the tensor-parallel group",
                value=g.ecc_uncorrected_volatile,
                threshold=0,
                trigger="gpu_fault",
            )
        )
    elif g.ecc_uncorrected_aggregate:
        out.append(
            Check(
                name="ecc",
                status="warn",
                gpu=i,
                detail=f"{g.ecc_uncorrected_aggregate} uncorrected ECC errors over the GPU's lifetime, none since "
                "the driver loaded",
                value=g.ecc_uncorrected_aggregate,
                threshold=0,
            )
        )
    elif g.ecc_uncorrected_volatile == 0:
        out.append(
            Check(name="ecc", status="ok", gpu=i, detail="no uncorrected ECC errors", value=0, threshold=0)
        )
    else:
        out.append(
            Check(
                name="ecc", status="skipped", gpu=i, detail=f"ECC: {g.unavailable.get('ecc', 'not readable')}"
            )
        )

    if g.remapped_rows_failure:
        out.append(
            Check(
                name="remapped_rows",
                status="fail",
                gpu=i,
                detail="row remapping failed: the GPU has run out of spare rows; replace or RMA it",
                value=True,
                threshold=False,
                trigger="gpu_fault",
            )
        )
    elif g.remapped_rows_pending:
        out.append(
            Check(
                name="remapped_rows",
                status="warn",
                gpu=i,
                detail="a row remap is pending: drain the GPU and reset it to apply it",
                value=True,
                threshold=False,
            )
        )
    elif g.remapped_rows_failure is False:
        out.append(
            Check(
                name="remapped_rows",
                status="ok",
                gpu=i,
                detail=f"no pending remaps or remap failures ({g.remapped_rows_uncorrectable} rows remapped "
                "for uncorrectable errors)",
                value=False,
                threshold=False,
            )
        )
    else:
        out.append(
            Check(
                name="remapped_rows",
                status="skipped",
                gpu=i,
                detail=f"row remapping: {g.unavailable.get('remapped_rows', 'not readable')}",
            )
        )

    if g.clock_event_reasons is None:
        out.append(
            Check(
                name="clocks",
                status="skipped",
                gpu=i,
                detail=f"clock event reasons: {g.unavailable.get('clock_event_reasons', 'not readable')}",
            )
        )
    else:
        slow = [r for r in g.clock_event_reasons if r in nvml_mod.SLOWDOWN_REASONS]
        if slow:
            out.append(
                Check(
                    name="clocks",
                    status="warn",
                    gpu=i,
                    detail=f"clocks slowed by {', '.join(slow)}"
                    + (f" at {g.temperature_c} C" if g.temperature_c is not None else "")
                    + ": performance measured now is not representative",
                    value=",".join(slow),
                    threshold="no hw/thermal/power-brake slowdown",
                )
            )
        else:
            out.append(
                Check(
                    name="clocks",
                    status="ok",
                    gpu=i,
                    detail=f"no slowdown ({', '.join(g.clock_event_reasons) or 'no event reasons'})",
                    value="",
                    threshold="no hw/thermal/power-brake slowdown",
                )
            )

    if g.pcie_width_current is not None and g.pcie_width_max is not None:
        link = f"PCIe gen {g.pcie_gen_current}/{g.pcie_gen_max} x{g.pcie_width_current}/x{g.pcie_width_max}"
        if g.pcie_width_current < g.pcie_width_max:
            out.append(
                Check(
                    name="pcie",
                    status="warn",
                    gpu=i,
                    detail=f"{link}: the link trained narrower than the slot; reseat the card or check the riser",
                    value=g.pcie_width_current,
                    threshold=g.pcie_width_max,
                )
            )
        else:
            note = ""
            if (g.pcie_gen_current or 0) < (g.pcie_gen_max or 0):
                note = " (an idle GPU drops its PCIe generation to save power)"
            out.append(
                Check(
                    name="pcie",
                    status="ok",
                    gpu=i,
                    detail=f"{link}{note}",
                    value=g.pcie_width_current,
                    threshold=g.pcie_width_max,
                )
            )
    else:
        out.append(
            Check(
                name="pcie",
                status="skipped",
                gpu=i,
                detail=f"PCIe: {g.unavailable.get('pcie_width', 'not readable')}",
            )
        )
    return out


def xid_checks(gpus: list[GpuHealth], kernel_log: Callable[[], list[str]]) -> list[Check]:
    try:
        lines = kernel_log()
    except (OSError, PermissionError) as e:
        return [
            Check(
                name="xid", status="skipped", detail=f"kernel log not readable here ({e}); XIDs not checked"
            )
        ]
    by_bus = nvml_mod.parse_xids(lines)
    out = []
    for g in gpus:
        xids = by_bus.get(nvml_mod.bus_key(g.pci_bus_id or ""), [])
        g.xids = xids
        if xids:
            uniq = sorted(set(xids))
            out.append(
                Check(
                    name="xid",
                    status="warn",
                    gpu=g.index,
                    detail=f"{len(xids)} XID event(s) in the kernel log since boot: XID {', '.join(map(str, uniq))}",
                    value=len(xids),
                    threshold=0,
                )
            )
        else:
            out.append(
                Check(
                    name="xid",
                    status="ok",
                    gpu=g.index,
                    detail="no XID events in the kernel log",
                    value=0,
                    threshold=0,
                )
            )
    return out


# --- the whole run ------------------------------------------------------------------------------------
def run_health(opts: HealthOptions, sources: Sources | None = None) -> HealthArtifact:
    """Run every check and decide. Usage errors raise LabError before anything is measured."""
    src = sources or default_sources()
    baseline, current = _validate(opts)
    cuda_n = src.cuda_device_count()

    nv = None
    nvml_reason = None
    try:
        nv = src.load_nvml()
    except nvml_mod.NvmlUnavailable as e:
        nvml_reason = str(e)

    # The model and load the drill will use: resolve now so a bad preset is a usage error.
    from lab.model import resolve_spec
    from lab.model.plan import BYTES

    nvml_n = 0
    if nv is not None:
        try:
            nvml_n = nv.nvmlDeviceGetCount()
        except nv.NVMLError:
            nvml_n = 0  # reported by the NVML check below
    on_gpu = opts.device != "cpu" and (cuda_n > 0 or nvml_n > 0)
    if opts.device.startswith("cuda") and not on_gpu:
        raise LabError(f"--device {opts.device} asked for but no NVIDIA GPU is visible; use --device cpu")
    import torch

    spec = resolve_spec(opts.preset, opts.model_path, torch.device("cuda" if on_gpu else "cpu"))
    dtype = DTYPE_ALIASES.get(opts.dtype, opts.dtype)
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu else "float32"
    if dtype not in BYTES:
        raise LabError(f"unknown --dtype '{opts.dtype}'; choose auto, {', '.join(BYTES)}")
    max_seq = opts.max_seq_len or min(4096, spec.args.max_seq_len)
    if max_seq > spec.args.max_seq_len:
        raise LabError(
            f"--max-seq-len {max_seq} exceeds the model's context of {spec.args.max_seq_len} tokens; lower it"
        )
    backend, world = _probe_plan(opts, cuda_n)

    art = new_artifact(HealthArtifact, asdict(opts))
    try:
        _run_checks(
            art,
            opts,
            src,
            nv,
            nvml_reason,
            cuda_n,
            spec,
            dtype,
            max_seq,
            on_gpu,
            backend,
            world,
            baseline,
            current,
        )
    except LabError:
        raise
    except Exception as e:  # a bug or an unexpected driver state: a failed artifact, not a traceback
        art.exit_code = EXIT_CHECK_ERROR
        finish(art, "failed", f"health check crashed: {type(e).__name__}: {e}")
    return art


def run_and_write(
    opts: HealthOptions, path: str | os.PathLike[str] | None, sources: Sources | None = None
) -> HealthArtifact:
    """Run the health check and write `health.json` atomically (nothing is written on a usage error)."""
    art = run_health(opts, sources)
    if path is not None:
        write_artifact(path, art)
    return art


def _run_checks(
    art: HealthArtifact,
    opts: HealthOptions,
    src: Sources,
    nv: Any,
    nvml_reason: str | None,
    cuda_n: int,
    spec: Any,
    dtype: str,
    max_seq: int,
    on_gpu: bool,
    backend: str | None,
    world: int,
    baseline: LoadTestNumbers | None,
    current: LoadTestNumbers | None,
) -> None:
    checks: list[Check] = []
    gpus: list[GpuHealth] = []

    # NVML: inventory, NVLink, errors, clocks, PCIe, XIDs.
    if nv is None:
        if cuda_n > 0:
            checks.append(
                Check(
                    name="nvml",
                    status="fail",
                    detail=f"CUDA sees {cuda_n} GPU(s) but {nvml_reason}; fix the driver install",
                    could_not_run=True,
                )
            )
        else:
            why = f"no NVIDIA GPU on this machine: {nvml_reason}"
            checks += [Check(name=n, status="skipped", detail=why) for n in ("nvml", *NVML_CHECKS)]
    else:
        try:
            gpus = nvml_mod.inventory(nv)
            nvlink_matrix = nvml_mod.nvlink_p2p(nv, len(gpus))
        except nv.NVMLError as e:
            checks.append(
                Check(name="nvml", status="fail", detail=f"NVML query failed: {e}", could_not_run=True)
            )
            nvlink_matrix = None
        if gpus:
            names = sorted({g.name or "?" for g in gpus})
            checks.append(
                Check(
                    name="nvml",
                    status="ok",
                    detail=f"{len(gpus)} GPU(s): {', '.join(names)}; driver {gpus[0].driver_version}, "
                    f"CUDA {gpus[0].cuda_driver_version}",
                    value=len(gpus),
                )
            )
            for g in gpus:
                checks += gpu_checks(g, opts.min_nvlink_links)
            checks += xid_checks(gpus, src.kernel_log)
        elif not any(c.could_not_run for c in checks):
            checks.append(Check(name="nvml", status="skipped", detail="NVML sees no GPUs", value=0))
        art.peer_access["nvlink"] = nvlink_matrix
        try:
            nv.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down is best effort
            pass
    art.gpus = gpus

    # Environment hygiene (playbook step 2).
    env_check, fixes = nccl_env_check(src.env)
    checks.append(env_check)
    checks.append(cuda_visible_check(src.env, len(gpus) if gpus else None))

    # Peer access and the collective probe.
    peer, matrix = peer_access(cuda_n, src.cuda_peer)
    checks.append(peer)
    art.peer_access["cuda"] = matrix
    checks.append(_probe_check(opts, src, backend, world, cuda_n, art))

    # Memory headroom for the drill's model and load, on the GPU the fallback would use.
    fault_gpus = {
        c.gpu
        for c in checks
        if c.trigger == "gpu_fault"
        or (c.name == "remapped_rows" and c.status != "ok" and c.status != "skipped")
    }
    healthy = [g for g in gpus if g.index not in fault_gpus]
    fallback_gpu = healthy[0] if healthy else None
    plan_gpu = fallback_gpu or (gpus[0] if gpus else None)  # all faulty: still say whether it fits
    checks.append(_memory_check(spec, dtype, opts.batch_size, max_seq, on_gpu, plan_gpu, art))

    if opts.fits_anywhere:
        checks.append(
            Check(
                name="fits_anywhere",
                status="warn",
                detail="asked for with --fits-anywhere: capacity planning wants a deployment that fits one GPU",
                value=True,
                trigger="fits_anywhere",
            )
        )
    if baseline is not None and current is not None:
        checks.append(qps_drop_check(baseline, current, opts.qps_drop_threshold, pcie_only(gpus)))

    # The decision.
    d = decide(checks)
    d.fallback_gpu = fallback_gpu.index if fallback_gpu is not None else None
    mem = next(c for c in checks if c.name == "memory_headroom")
    if gpus and fallback_gpu is None:
        d.blockers.append("no healthy GPU left for the single-GPU pool")
    if mem.status == "fail":
        d.blockers.append(mem.detail)
    d.fallback_viable = not d.blockers
    art.decision = d

    fix = list(fixes)
    if d.fallback_recommended:
        if UNSET_P2P not in fix:
            fix.append(UNSET_P2P)
        idx = d.fallback_gpu or 0
        if idx != 0:
            fix.append("export CUDA_DEVICE_ORDER=PCI_BUS_ID  # so CUDA numbers GPUs as NVML does")
        fix.append(f"export CUDA_VISIBLE_DEVICES={idx}")
    for c in checks:
        if c.name == "remapped_rows" and c.status == "warn":
            fix.append(
                f"nvidia-smi --gpu-reset -i {c.gpu}  # after draining GPU {c.gpu}: applies the pending row remap"
            )
    art.fix_commands = fix
    art.checks = checks

    broken = [c for c in checks if c.could_not_run]
    art.exit_code = (
        EXIT_FALLBACK if d.fallback_recommended else (EXIT_CHECK_ERROR if broken else EXIT_HEALTHY)
    )
    _summarise(art)
    if broken:
        finish(art, "failed", "; ".join(f"{c.name}: {c.detail}" for c in broken))
    else:
        finish(art)


def _probe_plan(o: HealthOptions, cuda_n: int) -> tuple[str | None, int]:
    use_nccl = cuda_n >= 2 and o.device != "cpu"
    if o.world_size is None:
        return ("nccl", cuda_n) if use_nccl else (None, 0)
    if o.world_size == 0:
        return None, 0
    if use_nccl:
        if o.world_size > cuda_n:
            raise LabError(
                f"--world-size {o.world_size} needs one GPU per rank but {cuda_n} are visible; lower it"
            )
        return "nccl", o.world_size
    return "gloo", o.world_size


def _probe_check(
    o: HealthOptions, src: Sources, backend: str | None, world: int, cuda_n: int, art: HealthArtifact
) -> Check:
    if backend is None:
        why = (
            "turned off with --world-size 0"
            if o.world_size == 0
            else f"needs 2 or more GPUs ({cuda_n} visible to CUDA); pass --world-size N to probe with gloo on CPU"
        )
        return Check(name="collective", status="skipped", detail=why)
    res = src.probe(world, backend, o.collective_timeout_s)
    art.collective = res.to_dict()
    th = f"finishes within {o.collective_timeout_s:g} s"
    if res.outcome == "ok":
        return Check(name="collective", status="ok", detail=res.detail, value=res.busbw_gbps, threshold=th)
    if res.outcome == "could_not_run":
        return Check(name="collective", status="fail", detail=res.detail, threshold=th, could_not_run=True)
    return Check(
        name="collective",
        status="fail",
        detail=res.detail,
        value=res.outcome,
        threshold=th,
        trigger="nccl_hang",
    )


def _memory_check(
    spec, dtype: str, batch: int, max_seq: int, on_gpu: bool, gpu: GpuHealth | None, art: HealthArtifact
) -> Check:
    import torch

    from lab.model.plan import device_memory_gb, plan_memory

    if on_gpu and gpu is not None and gpu.memory_total_gb:
        mem_gb, where = gpu.memory_total_gb, f"GPU {gpu.index} ({gpu.name})"
    elif on_gpu:
        mem_gb, where = device_memory_gb(torch.device("cuda")), "cuda"
    else:
        mem_gb, where = device_memory_gb(torch.device("cpu")), "cpu (host RAM)"
    plan = plan_memory(spec.args, dtype, batch, max_seq, mem_gb, "cuda" if on_gpu else "cpu", spec.preset)
    art.memory_plan = plan.to_dict()
    th = f"fits with <= {MEMORY_FRACTION_MAX:.0%} of memory"
    base = (
        f"{plan.preset or 'model'} {dtype} batch {batch} x {max_seq} tokens needs {plan.total_gb:.2f} GB "
        f"(weights {plan.weights_gb:.2f} + KV {plan.kv_cache_gb:.2f} + activations {plan.activations_gb:.2f} "
        f"+ reserve {plan.reserve_gb:.0f}) on {where}, {mem_gb} GB"
    )
    if plan.fits is None:
        return Check(
            name="memory_headroom", status="skipped", detail=f"{base}: device size unknown", threshold=th
        )
    if not plan.fits:
        return Check(
            name="memory_headroom",
            status="fail",
            detail=f"{base}: does not fit; what would fit: {', '.join(plan.suggestions)}",
            value=plan.headroom_gb,
            threshold=th,
        )
    frac = plan.total_gb / mem_gb
    if frac > MEMORY_FRACTION_MAX:
        return Check(
            name="memory_headroom",
            status="warn",
            detail=f"{base}: fits but uses {frac:.0%}, above the playbook's 80 %",
            value=plan.headroom_gb,
            threshold=th,
        )
    return Check(
        name="memory_headroom",
        status="ok",
        detail=f"{base}: {plan.headroom_gb:.2f} GB headroom ({frac:.0%} used)",
        value=plan.headroom_gb,
        threshold=th,
    )


def _summarise(art: HealthArtifact) -> None:
    s: dict[str, Any] = {}
    un: dict[str, str] = {}
    d = art.decision
    s["fallback_recommended"] = d.fallback_recommended
    s["triggers"] = ",".join(d.triggers)
    s["exit_code"] = art.exit_code
    s["fallback_gpu"] = d.fallback_gpu
    s["fallback_viable"] = d.fallback_viable
    s["gpu_count"] = len(art.gpus)
    links = [g.nvlink_active_links for g in art.gpus if g.nvlink_supported]
    s["nvlink_active_links_min"] = min(links) if links else None
    if not links:
        un["nvlink_active_links_min"] = "no GPU with NVLink seen by NVML"
    ecc = [g.ecc_uncorrected_volatile for g in art.gpus if g.ecc_uncorrected_volatile is not None]
    s["ecc_uncorrected_volatile_total"] = sum(ecc) if ecc else None
    if not ecc:
        un["ecc_uncorrected_volatile_total"] = "ECC counters not readable (no NVIDIA GPU or ECC off)"
    col = art.collective or {}
    s["collective_outcome"] = col.get("outcome")
    s["collective_busbw_gbps"] = col.get("busbw_gbps")
    if col.get("busbw_gbps") is None:
        c = next(c for c in art.checks if c.name == "collective")
        un["collective_busbw_gbps"] = (
            "single rank: no data crosses a link" if col.get("outcome") == "ok" else c.detail
        )
    q = next((c for c in art.checks if c.name == "qps_drop"), None)
    s["qps_drop_fraction"] = q.value if q else None
    if q is None:
        un["qps_drop_fraction"] = "no --baseline/--current load tests given"
    m = art.memory_plan or {}
    s["memory_headroom_gb"] = m.get("headroom_gb")
    s["checks_warn"] = sum(c.status == "warn" for c in art.checks)
    s["checks_fail"] = sum(c.status == "fail" for c in art.checks)
    art.summary = s
    art.unavailable = un
