"""`lab gate REPORT_DIR`: exit 0 within expectations and not regressed, 3 otherwise (one line each)."""

from __future__ import annotations

import argparse

GATE_HELP = """Judges a drill report (or any directory of step artifacts, e.g. a nightly warm-up) against a
capacity-expectation profile and, with --baseline, against an earlier report. Prints one line per
violated metric (FAIL / REGRESSED), then warnings. Exit codes: 0 pass; 3 violated; 2 usage error."""


def register(sub) -> None:
    p = sub.add_parser(
        "gate", help="CI guardrail: check a report against expectations and a baseline", description=GATE_HELP
    )
    p.add_argument("report_dir", metavar="REPORT_DIR", help="a reports/<run-id> directory")
    p.add_argument(
        "--profile",
        default=None,
        help="profile name or YAML path (default: the report's expectations.json / the drill's profile)",
    )
    p.add_argument(
        "--baseline", default=None, metavar="REPORT_DIR", help="an earlier report to compare against"
    )
    p.add_argument(
        "--calibrate-to",
        default=None,
        metavar="PATH.yaml",
        help="instead of gating: write a profile (based on --profile) whose expected values are this "
        "report's measurements",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lab.errors import LabError
    from lab.gate import calibrated_profile_yaml, gate
    from lab.results import atomic_write_text

    if args.calibrate_to:
        if not args.profile:
            raise LabError("--calibrate-to needs --profile NAME: the profile whose metrics and bands to keep")
        path = atomic_write_text(args.calibrate_to, calibrated_profile_yaml(args.report_dir, args.profile))
        print(f"profile written: {path}")
        return 0
    res = gate(args.report_dir, profile=args.profile, baseline=args.baseline)
    for line in res.violations + res.warnings + res.notes:
        print(line)
    status = "PASS" if not res.violations else f"FAIL ({len(res.violations)} violation(s))"
    print(f"gate: {status}; profile {res.profile}; report {args.report_dir}")
    return res.exit_code
