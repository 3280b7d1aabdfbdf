"""`lab drill`: the playbook's golden path as one run of notebooks 01-04 into reports/<run-id>/."""

from __future__ import annotations

import argparse

from lab.commands._common import nonneg_int, positive_float, positive_int

DRILL_HELP = """Runs notebooks/01_health_check, 02_warmup, 03_eager_vs_compiled and 04_load_test with papermill
into OUTPUT_DIR/<run-id>/ (run id: UTC timestamp and host): executed notebooks, one JSON artifact per
step, manifest.json and expectations.json. With no flags: the profile for this machine (cpu-tiny with
no GPU: the tiny preset, short steps), every step. Exit codes: 0 every step ok; 1 a step failed (the
manifest says which cell and why); 2 usage error. Judge the result with `lab gate REPORT_DIR`."""


def register(sub) -> None:
    p = sub.add_parser(
        "drill",
        help="run the fallback drill notebooks into reports/<run-id>/ and evaluate expectations",
        description=DRILL_HELP,
    )
    p.add_argument(
        "--profile",
        default=None,
        help="capacity-expectation profile: b200-gpt40b, h100-llama8b, cpu-tiny, or a YAML path "
        "(default: by the visible GPU; cpu-tiny without one). It also sets the drill's workload.",
    )
    m = p.add_mutually_exclusive_group()
    m.add_argument("--preset", default=None, help="model preset (default: the profile's)")
    m.add_argument("--model-path", default=None, help="checkpoint for the notebooks (default: $MODEL_PATH)")
    p.add_argument(
        "--device", default=None, help="auto, cpu, cuda, cuda:N (default: the profile's, else auto)"
    )
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16 (default: the profile's)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed passed to every notebook")
    p.add_argument(
        "--steps",
        default=None,
        help="comma-separated subset of health,warmup,compare,loadtest (default: all)",
    )
    p.add_argument(
        "--output-dir", default="reports", help="where the run directory is created (default: reports)"
    )
    p.add_argument(
        "--run-id", default=None, help="name of the run directory (default: UTC timestamp and host)"
    )
    p.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        default=[],
        help="notebook parameter for every notebook that declares NAME, or STEP.NAME for one step; "
        "checked against the notebooks' declared parameters and types before anything runs",
    )
    p.add_argument(
        "--notebooks-dir", default=None, help="where the notebooks are (default: the lab's notebooks/)"
    )
    p.add_argument(
        "--cell-timeout-s",
        type=positive_float,
        default=None,
        help="per-cell timeout (default: the profile's)",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="torch.profiler trace of the warmup and loadtest notebooks into REPORT/traces/ (Perfetto)",
    )
    p.add_argument(
        "--compare-tiers",
        type=positive_int,
        default=None,
        metavar="N",
        help="after the notebooks, run the same warm-up and load on the multi-GPU tier (TP=N under "
        "torchrun) and on one GPU into the report (tiers.json, lab compare-tiers), then judge expectations",
    )
    p.set_defaults(func=run)


def _check_model_flags(args: argparse.Namespace) -> None:
    """A preset or checkpoint every notebook would reject is a usage error before any kernel starts."""
    import os

    from lab.errors import LabError
    from lab.model.presets import get_preset

    if args.preset:
        get_preset(args.preset)
    if args.model_path and not os.path.exists(args.model_path):
        raise LabError(f"checkpoint '{args.model_path}' not found; check --model-path / MODEL_PATH")


def run(args: argparse.Namespace) -> int:
    from lab.drill import parse_steps, plan_drill, run_drill
    from lab.env import fingerprint
    from lab.expectations import load_profile, profile_for_environment, violations, warnings

    steps = parse_steps(args.steps)
    _check_model_flags(args)
    if args.profile:
        profile = load_profile(args.profile)
    else:
        gpus = [] if (args.device or "").startswith("cpu") else [g.name for g in fingerprint().gpus]
        profile = load_profile(profile_for_environment(gpus))
    plan = plan_drill(
        profile,
        steps=steps,
        preset=args.preset,
        model_path=args.model_path,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        output_root=args.output_dir,
        run_id=args.run_id,
        user_params=[tuple(p) for p in args.parameter],
        notebooks_dir=args.notebooks_dir,
        cell_timeout_s=args.cell_timeout_s,
        trace=args.trace,
    )
    hyg = plan.hygiene
    unset = ", ".join(hyg["unset"]) or "none set"
    print(
        f"drill {plan.run_id}: profile {profile.name}, steps {','.join(steps)}; child kernels get "
        f"CUDA_VISIBLE_DEVICES={hyg['set']['CUDA_VISIBLE_DEVICES']}, NCCL leftovers unset ({unset})",
        flush=True,
    )
    manifest = run_drill(plan, progress=lambda line: print(line, flush=True))
    tiers_failed = False
    if args.compare_tiers:
        from lab.commands.compare_tiers import compare_into_report, describe

        print(f"[tiers] compare-tiers: TP={args.compare_tiers} vs one GPU ...", flush=True)
        tiers = compare_into_report(plan.report_dir, args.compare_tiers, plan.params, profile)
        print(describe(tiers), flush=True)
        tiers_failed = tiers.status != "ok"
    ok = sum(s.status == "ok" for s in manifest.steps)
    failed = [s.step for s in manifest.steps if s.status == "failed"] + (["tiers"] if tiers_failed else [])
    took = (manifest.finished_at - manifest.started_at).total_seconds() if manifest.finished_at else 0.0
    print(f"drill: {'ok' if not failed else 'FAILED'} ({ok} ok, {len(failed)} failed) in {took:.0f} s")
    from lab.expectations import read_evaluation

    ev = read_evaluation(plan.report_dir)
    if ev is not None:
        note = " (provisional profile)" if ev.provisional else ""
        print(f"expectations {ev.profile}{note}: {ev.verdict}")
        for line in violations(ev) + warnings(ev):
            print(f"  {line}")
    print(f"report: {plan.report_dir}")
    print(f"gate it: lab gate {plan.report_dir}")
    print(f"dashboard: make dashboard  (or: lab dashboard --reports {args.output_dir})")
    return 1 if failed else 0
