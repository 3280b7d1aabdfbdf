"""`lab metrics export|push|rules`: a drill report as Prometheus gauges, and alerting rules."""

from __future__ import annotations

import argparse

from lab.commands._common import positive_float


def register(sub) -> None:
    p = sub.add_parser("metrics", help="export a drill report to Prometheus; build alerting rules")
    msub = p.add_subparsers(dest="metrics_command", metavar="ACTION", parser_class=sub._parser_class)
    msub.required = True

    e = msub.add_parser("export", help="write a node_exporter textfile (atomic) for a report")
    e.add_argument("report_dir", metavar="REPORT_DIR")
    e.add_argument(
        "--textfile", required=True, metavar="PATH.prom", help="e.g. /var/lib/node_exporter/lab.prom"
    )
    e.add_argument("--profile", default=None, help="re-evaluate with this profile (default: the report's)")
    e.set_defaults(func=run_export)

    u = msub.add_parser("push", help="push a report's gauges to a Prometheus Pushgateway")
    u.add_argument("report_dir", metavar="REPORT_DIR")
    u.add_argument("--gateway", required=True, metavar="URL", help="e.g. http://127.0.0.1:9091")
    u.add_argument("--job", default="lab_drill", help="Pushgateway job label (default: lab_drill)")
    u.add_argument("--profile", default=None, help="re-evaluate with this profile (default: the report's)")
    u.set_defaults(func=run_push)

    r = msub.add_parser("rules", help="write Prometheus alerting rules from a report's expectations")
    r.add_argument(
        "report_dir", metavar="REPORT_DIR", nargs="?", default=None, help="thresholds from this run"
    )
    r.add_argument("--profile", default=None, help="profile (alone: thresholds at its fail bounds)")
    r.add_argument("--out", required=True, metavar="PATH.yml", help="rules file to write (atomic)")
    r.add_argument("--stale-after-h", type=positive_float, default=26.0, help="drill staleness alert (hours)")
    r.set_defaults(func=run_rules)


def _profile(name: str | None):
    from lab.expectations import load_profile

    return load_profile(name) if name else None


def run_export(args: argparse.Namespace) -> int:
    from lab.metrics import export_textfile

    path = export_textfile(args.report_dir, args.textfile, _profile(args.profile))
    print(f"metrics written: {path}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from lab.metrics import push

    push(args.report_dir, args.gateway, args.job, _profile(args.profile))
    print(f"metrics pushed to {args.gateway} (job {args.job})")
    return 0


def run_rules(args: argparse.Namespace) -> int:
    from lab.metrics import rules_yaml
    from lab.results import atomic_write_text

    text = rules_yaml(args.report_dir, _profile(args.profile), stale_after_h=args.stale_after_h)
    path = atomic_write_text(args.out, text)
    print(f"rules written: {path}")
    return 0
