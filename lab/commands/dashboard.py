"""`lab dashboard`: start the Streamlit dashboard over drill reports, bound to 127.0.0.1 by default."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from lab.commands._common import positive_int
from lab.env import REPO_ROOT
from lab.errors import LabError

APP = REPO_ROOT / "dashboard" / "app.py"
ENV_VAR = "LAB_DASHBOARD_REPORTS"  # read by dashboard/data.py


def register(sub) -> None:
    p = sub.add_parser(
        "dashboard",
        help="open the drill dashboard (Streamlit) on 127.0.0.1",
        description="Start the Streamlit dashboard over drill reports. Reads reports/ and reports/examples/ "
        "by default; new reports appear without a restart.",
    )
    p.add_argument(
        "--reports",
        action="append",
        metavar="DIR",
        default=None,
        help="a reports directory (holding <run-id>/ folders) or one run's folder; repeat for several "
        "(default: reports/ and reports/examples/)",
    )
    p.add_argument("--port", type=positive_int, default=8501, help="TCP port (default 8501)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; anything else exposes the dashboard to the network)",
    )
    p.set_defaults(func=run)


def build_command(host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]


def check_args(reports: list[str] | None, host: str, port: int) -> list[Path]:
    if port > 65535:
        raise LabError(f"--port {port} is not a TCP port; choose 1-65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise LabError(f"--host {host!r} is not an IP address; use 127.0.0.1 (the default)") from None
    dirs = [Path(d).expanduser() for d in reports or []]
    for d in dirs:
        if not d.is_dir():
            raise LabError(
                f"--reports {d}: no such directory; run a drill first (`lab drill`) or pass another DIR"
            )
    if not APP.is_file():
        raise LabError(f"{APP} is missing: the dashboard runs from a checkout of the lab repository")
    return dirs


def run(args) -> int:
    dirs = check_args(args.reports, args.host, args.port)
    env = dict(os.environ)
    if dirs:
        env[ENV_VAR] = os.pathsep.join(str(d.resolve()) for d in dirs)
    else:
        env.pop(ENV_VAR, None)
    # the dashboard imports `lab` and `dashboard` from this checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    shown = "reports/ and reports/examples/" if not dirs else ", ".join(map(str, dirs))
    print(f"lab dashboard: http://{args.host}:{args.port}  (reading {shown}; Ctrl-C stops it)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lab dashboard: note: bound to {args.host}, reachable from the network", file=sys.stderr)
    sys.stderr.flush()
    # Become the Streamlit server (exec, not a child): Ctrl-C, SIGTERM from a service manager or a test
    # reach it directly, and no server is left behind when this process is stopped.
    os.chdir(REPO_ROOT)
    cmd = build_command(args.host, args.port)
    try:
        os.execve(cmd[0], cmd, env)
    except OSError as e:
        raise LabError(f"cannot start streamlit ({e.strerror or e}); reinstall with `make setup`") from None
    return 0  # not reached
