"""The one CLI: `lab COMMAND ...` and `python -m lab COMMAND ...` are the same.

Each command lives in its own module under lab/commands/ with `register(subparsers)`; this file only
discovers them and turns user errors (LabError, bad flags) into exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from lab.errors import LabError

EPILOG = """exit codes: 0 success; 1 a step or check could not run; 2 usage error (the message says what
to change); 3 fallback recommended (lab health) or gate violated (lab gate)."""


class Parser(argparse.ArgumentParser):
    """argparse that raises LabError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise LabError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> Parser:
    import lab.commands as pkg

    parser = Parser(
        prog="lab",
        description="Single-GPU serving fallback drill lab.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from lab import __version__

    parser.add_argument("--version", action="version", version=f"lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"lab.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        rc = args.func(args)
        return int(rc or 0)
    except LabError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from lab.faults import is_oom, oom_plan, oom_reason

        if not is_oom(e):
            raise
        # A command without an artifact of its own (generate, compare's model load, serve): one line, exit 1.
        step = getattr(e, "lab_step", None) or "this command"
        knobs = "the batch size, prompt length or new tokens (or free the card)"
        print(f"lab: error: {oom_reason(step, e, oom_plan(e), knobs)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
