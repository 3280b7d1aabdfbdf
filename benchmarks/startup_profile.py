"""Where `lab serve`'s seconds before the first token go (issue 10, time to ready), phase by phase.

Two fresh processes, each starting the way `lab serve` starts:
1. the imports `lab serve` makes before its `imports` mark, under `python -X importtime`: the total and the
   slowest modules (cumulative microseconds, as Python reports them);
2. the build, timed with the GPU synchronised at every boundary: CUDA initialisation, the memory plan, the
   model built on the meta device, one block's storage allocated (as build_model does), random weights written, the KV cache and
   engine, and the engine's warm-up (CUDA-graph capture of the decode in the start mode). The build also
   runs under cProfile; the functions with the most cumulative time are kept, so a slow phase names its
   culprit.

    python benchmarks/startup_profile.py --out DIR          # on the GPU host; writes DIR/startup_profile.json
    python benchmarks/startup_profile.py --out DIR --device cpu --preset tiny   # checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

IMPORTS = (
    "import uvicorn; from lab.engine.server import create_app; from lab.engine.tokenizer import load_tokenizer; "
    "from lab.loadtest.session import build_engine"
)


def import_times(top: int) -> dict:
    """`python -X importtime` of serve's imports in a fresh interpreter: total wall and the slowest modules."""
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", IMPORTS], capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - t0
    rows = []
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), int(parts[0].split(":")[1]), parts[2].rstrip()))
    rows.sort(reverse=True)
    return {
        "process_wall_s": wall,
        "slowest_cumulative_us": [
            {"module": m.strip(), "cumulative_us": c, "self_us": s} for c, s, m in rows[:top]
        ],
        "largest_self_us": [
            {"module": m.strip(), "self_us": s} for c, s, m in sorted(rows, key=lambda x: -x[1])[:top]
        ],
    }


def build(args) -> dict:
    """In this process: time each phase of the build with the GPU synchronised, under cProfile."""
    import cProfile
    import io
    import pstats

    t0 = time.perf_counter()
    import torch

    phases: dict[str, float] = {"import_torch": time.perf_counter() - t0}
    t = time.perf_counter()

    cuda = args.device == "cuda"

    def lap(name: str) -> None:
        nonlocal t
        if cuda:
            torch.cuda.synchronize()
        phases[name] = time.perf_counter() - t
        t = time.perf_counter()

    exec(IMPORTS, {})
    phases["import_rest"] = time.perf_counter() - t
    t = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    if cuda:
        torch.cuda.init()
        torch.cuda.mem_get_info()
    lap("cuda_init")
    from lab.engine.batching import Engine, EngineConfig
    from lab.model import _empty_on, build_model, resolve_spec
    from lab.model.llama import Transformer, init_random_weights
    from lab.model.plan import check_fits, device_memory_gb, plan_memory

    dev, dtype = torch.device(args.device), torch.bfloat16 if cuda else torch.float32
    spec = resolve_spec(args.preset, None, dev)
    plan = plan_memory(
        spec.args, str(dtype)[6:], args.slots, args.max_seq_len, device_memory_gb(dev), str(dev)
    )
    check_fits(plan)
    lap("plan")
    with torch.device("meta"):
        probe = Transformer(spec.args).to(dtype)
    lap("meta_model")
    _empty_on(probe.layers[0], dev)
    lap("allocate_one_block")
    init_random_weights(probe.layers[0], 0, spec.args.n_layers)
    lap("init_one_block")
    del probe
    model = build_model(spec, dev, dtype, 0)
    lap("build_model")
    cfg = EngineConfig(
        max_batch_size=args.slots,
        max_seq_len=args.max_seq_len,
        mode="eager-cudagraphs" if cuda else "eager",  # serve's start mode on a GPU
        start_mode=None,
    )
    engine = Engine(model, cfg)
    lap("engine_built")
    with torch.inference_mode():
        engine.warmup()
    lap("engine_warmup")
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.top)
    return {"phases_s": phases, "cprofile_cumulative": s.getvalue().splitlines()[-(args.top + 3) :]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--slots", type=int, default=16, help="lab serve's default --max-batch-size")
    ap.add_argument("--max-seq-len", type=int, default=4096, help="lab serve's default --max-seq-len")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    o = ap.parse_args()
    if o.child:
        print(json.dumps(build(o)))
        return 0
    import torch

    if o.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible; run on the GPU host, or pass --device cpu --preset tiny")
    from lab.env import fingerprint

    res = {
        "benchmark": "startup_profile",
        "card": torch.cuda.get_device_name() if o.device == "cuda" else "cpu",
        "params": {k: v for k, v in vars(o).items() if k != "child"},
        "environment": fingerprint().model_dump(mode="json"),
        "imports": import_times(o.top),
    }
    cmd = [sys.executable, __file__, "--child", "--out", o.out, "--preset", o.preset, "--slots", str(o.slots)]
    cmd += ["--max-seq-len", str(o.max_seq_len), "--top", str(o.top), "--device", o.device]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if r.returncode:
        raise SystemExit(f"the build process failed: {r.stderr[-2000:]}")
    res["build"] = json.loads(r.stdout.strip().splitlines()[-1])
    Path(o.out).mkdir(parents=True, exist_ok=True)
    (Path(o.out) / "startup_profile.json").write_text(json.dumps(res, indent=1))
    print(f"{res['card']}: serve's imports {res['imports']['process_wall_s']:.2f} s in a fresh process")
    for m in res["imports"]["slowest_cumulative_us"][:8]:
        print(f"  {m['cumulative_us'] / 1e6:6.2f} s  {m['module']}")
    for k, v in res["build"]["phases_s"].items():
        print(f"{k:>20} {v:7.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
