"""`lab notebooks`: JupyterLab on notebooks/, bound to 127.0.0.1, for planners exploring by hand."""

from __future__ import annotations

import argparse

from lab.commands._common import nonneg_int


def register(sub) -> None:
    p = sub.add_parser(
        "notebooks",
        help="open JupyterLab on the drill notebooks (127.0.0.1)",
        description="Starts JupyterLab with notebooks/ as its root, bound to 127.0.0.1 (use an SSH tunnel "
        "to reach it from elsewhere). Every notebook runs top to bottom with its defaults. Ctrl-C stops it.",
    )
    p.add_argument("--notebooks-dir", default=None, help="directory to serve (default: the lab's notebooks/)")
    p.add_argument("--port", type=nonneg_int, default=8888, help="port (default 8888; 0 picks a free one)")
    p.add_argument("--ip", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.set_defaults(func=run)


def lab_command(notebooks_dir: str, ip: str, port: int, no_browser: bool) -> list[str]:
    import os
    import sys

    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={notebooks_dir}",
        f"--ServerApp.ip={ip}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
    ]
    if no_browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers often run as root; JupyterLab refuses it otherwise
    return cmd


def run(args: argparse.Namespace) -> int:
    import os
    import sys
    from pathlib import Path

    from lab.drill import NOTEBOOKS_DIR
    from lab.env import REPO_ROOT
    from lab.errors import LabError

    nb_dir = Path(args.notebooks_dir) if args.notebooks_dir else NOTEBOOKS_DIR
    if not nb_dir.is_dir():
        raise LabError(f"notebooks directory {nb_dir} does not exist; pass --notebooks-dir")
    if args.ip not in ("127.0.0.1", "localhost", "::1"):
        print(f"lab notebooks: warning: binding {args.ip} exposes JupyterLab beyond this machine", flush=True)
    env = dict(os.environ)
    # Kernels started from JupyterLab import this same lab, installed or not.
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print(
        f"JupyterLab on {nb_dir.resolve()} at http://{args.ip}:{args.port}/lab (Ctrl-C stops it)", flush=True
    )
    sys.stderr.flush()
    # Become JupyterLab (no wrapper process): signals and exit status are its own.
    cmd = lab_command(str(nb_dir.resolve()), args.ip, args.port, args.no_browser)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached
