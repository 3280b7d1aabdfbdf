"""`lab health`: is the multi-GPU tier healthy, or should traffic fall back to one GPU?

NVML inventory and NVLink/ECC/clock health, NCCL environment hygiene, peer access, a collective probe
under a deadline, memory headroom for the drill's model, and the playbook's triggers -> health.json.
"""

from __future__ import annotations

import argparse
import sys

from lab.commands._common import (
    add_model_args,
    add_output_json,
    fraction,
    nonneg_int,
    positive_float,
    positive_int,
)
from lab.errors import LabError

EPILOG = """exit codes:
  0  healthy: no fallback trigger fired (warnings may still be listed)
  1  a check could not run (e.g. CUDA sees GPUs but NVML fails; the probe could not start)
  2  usage error: the message says what to change; nothing is written
  3  fallback recommended: a trigger fired (nvlink_degraded, nccl_hang, pcie_only_qps_drop,
     fits_anywhere, gpu_fault); the report prints the shell lines for the single-GPU unit

On a machine without NVIDIA GPUs the NVML checks are 'skipped' with the reason and the command exits 0.
LAB_PROBE_FAULT=hang:R or die:R makes probe rank R hang or die (rehearses the nccl_hang path)."""


def register(sub) -> None:
    p = sub.add_parser(
        "health",
        help="health check and the fallback decision (exit 3 = fall back to one GPU)",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_output_json(p, "health.json")
    p.add_argument(
        "--json", action="store_true", help="print the artifact as JSON instead of the summary table"
    )
    g = p.add_argument_group("triggers")
    g.add_argument(
        "--min-nvlink-links",
        type=nonneg_int,
        default=18,
        help="active NVLink links each GPU needs, else nvlink_degraded (default 18, an H100 SXM's count)",
    )
    g.add_argument(
        "--collective-timeout-s",
        type=positive_float,
        default=30.0,
        help="deadline for the whole collective probe, start-up included; past it: nccl_hang (default 30)",
    )
    g.add_argument(
        "--world-size",
        type=nonneg_int,
        default=None,
        help="collective probe ranks: NCCL, one per GPU, with 2+ GPUs; gloo on CPU otherwise; 0 = no probe "
        "(default: every GPU when 2+ are visible, else no probe)",
    )
    g.add_argument("--baseline", default=None, help="load_test.json from the healthy tier (lab loadtest)")
    g.add_argument("--current", default=None, help="load_test.json from now, compared with --baseline")
    g.add_argument(
        "--qps-drop-threshold",
        type=fraction,
        default=0.30,
        help="achieved-QPS drop vs --baseline that fires pcie_only_qps_drop on PCIe-only GPUs (default 0.30)",
    )
    g.add_argument(
        "--fits-anywhere",
        action="store_true",
        help="capacity planning wants a deployment that fits one GPU: fires the fits_anywhere trigger",
    )
    add_model_args(p)
    m = p.add_argument_group("load for the memory headroom check")
    m.add_argument("--batch-size", type=positive_int, default=8, help="concurrent requests (default 8)")
    m.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=None,
        help="prompt + new tokens per request (default: 4096 or the model's context if shorter)",
    )
    p.set_defaults(func=run)


def options_from_args(args) -> object:
    from lab.health import HealthOptions

    return HealthOptions(
        min_nvlink_links=args.min_nvlink_links,
        collective_timeout_s=args.collective_timeout_s,
        world_size=args.world_size,
        baseline=args.baseline,
        current=args.current,
        qps_drop_threshold=args.qps_drop_threshold,
        fits_anywhere=args.fits_anywhere,
        preset=args.preset,
        model_path=args.model_path,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
    )


def run(args, sources=None) -> int:
    from lab.health import format_report, run_and_write

    if args.qps_drop_threshold >= 1:
        raise LabError("--qps-drop-threshold must be below 1, e.g. 0.30")
    art = run_and_write(options_from_args(args), args.output_json, sources)
    if args.json:
        print(art.model_dump_json(indent=2))
    else:
        print(format_report(art))
        if args.output_json:
            print(f"\nwrote {args.output_json}")
    sys.stdout.flush()
    return art.exit_code
