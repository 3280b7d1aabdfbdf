"""torch.profiler traces for `--trace`: a Chrome-trace JSON that Perfetto (ui.perfetto.dev) and
chrome://tracing open, written atomically into the report. `nsys_command` gives the Nsight Systems
equivalent of the playbook's capture for hosts that have `nsys`.

Use `trace_region(path)` around a timed window in commands (`lab warmup --trace`, `lab loadtest
--trace`); `lab drill --trace` wraps whole notebooks with `NotebookTrace`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lab.errors import LabError

TRACE_SUFFIX = ".trace.json"


def _activities() -> list[Any]:
    import torch
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(ProfilerActivity.CUDA)
    return acts


def _export(prof: Any, path: Path) -> Path:
    """Export via a temp file in the same directory, then rename: never half a trace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        prof.export_chrome_trace(tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise LabError(f"cannot write trace {path}: {e.strerror or e}; choose a writable directory") from None
    return path


@contextmanager
def trace_region(path: str | os.PathLike[str] | None, record_shapes: bool = False) -> Iterator[Path | None]:
    """Profile the block (CPU, and CUDA kernels when a GPU is present) and write a Chrome trace to
    `path`. With `path=None` it does nothing, so callers can write `with trace_region(args.trace):`."""
    if path is None:
        yield None
        return
    import torch

    out = Path(path)
    with torch.profiler.profile(activities=_activities(), record_shapes=record_shapes) as prof:
        yield out
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    _export(prof, out)


class NotebookTrace:
    """Started by a cell `lab drill --trace` injects after the parameters; stopped by its last cell."""

    def __init__(self, path: Path):
        import torch

        self.path = path
        self._prof = torch.profiler.profile(activities=_activities())
        self._prof.__enter__()

    @classmethod
    def start(cls, output_dir: str, step: str) -> NotebookTrace:
        return cls(Path(output_dir) / "traces" / f"{step}{TRACE_SUFFIX}")

    def stop(self) -> Path:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        return _export(self._prof, self.path)


def nsys_command(argv: Sequence[str], output: str, duration_s: int = 15, delay_s: int = 5) -> list[str]:
    """The playbook's Nsight Systems capture around any command (e.g. `lab loadtest ...`)."""
    return [
        "nsys",
        "profile",
        "--force-overwrite",
        "true",
        f"--output={output}",
        f"--duration={duration_s}",
        f"--delay={delay_s}",
        "--sample=none",
        *argv,
    ]


PLAYBOOK_LOADTEST = [
    "torchrun",
    "--nproc_per_node=1",
    "-m",
    "lab",
    "loadtest",
    "--duration",
    "20",
    "--target-qps",
    "3",
    "--max-new-tokens",
    "4",
    "--prompt-len-min",
    "32",
    "--prompt-len-max",
    "64",
    "--allow-smaller-world",
]


def nsys_note() -> str:
    """What the manifest says about nsys: the equivalent command, and whether nsys is here."""
    cmd = shlex.join(nsys_command(PLAYBOOK_LOADTEST, "artifacts/single_gpu_fallback/nsys/serving_trace"))
    where = shutil.which("nsys")
    have = f"nsys found at {where}" if where else "nsys not found on this host"
    return f"{have}; the playbook's capture is: {cmd}"
