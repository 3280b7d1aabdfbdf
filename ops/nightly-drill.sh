#!/usr/bin/env bash
# The playbook's CI guardrail ("Operational Tips"): every night, run the warm-up on GPU 0
# (CUDA_VISIBLE_DEVICES=0) through the drill, gate it against the capacity expectations and the
# last good night, and export the result for Prometheus. Used by the systemd timer, the cron example
# and the CI workflow beside this file. Exit: 0 pass; 3 gate violated; 1 a step failed; 2 usage.
#
# Settings (environment):
#   LAB            the lab CLI (default: .venv/bin/lab, else `lab` on PATH)
#   LAB_PROFILE    expectation profile (default: h100-llama8b)
#   LAB_STEPS      drill steps (default: health,warmup)
#   LAB_REPORTS    where nightly reports go (default: reports/nightly)
#   LAB_BASELINE   known-good report to compare with (default: the last passing night, if any)
#   LAB_TEXTFILE   node_exporter textfile to update, e.g. /var/lib/prometheus/node-exporter/lab.prom
#   LAB_DRILL_ARGS extra `lab drill` arguments (e.g. "-p iters 5")
set -uo pipefail
cd "${LAB_DIR:-$(dirname "$0")/..}" || exit 2
if [ -z "${LAB:-}" ]; then
  if [ -x .venv/bin/lab ]; then LAB=.venv/bin/lab; else LAB=lab; fi
fi
PROFILE="${LAB_PROFILE:-h100-llama8b}"
STEPS="${LAB_STEPS:-health,warmup}"
ROOT="${LAB_REPORTS:-reports/nightly}"
RUN_ID="nightly-$(date -u +%Y%m%dT%H%M%SZ)"
REPORT="$ROOT/$RUN_ID"

# Playbook step 2 for this job; `lab drill` applies the same to its kernels and records it.
unset NCCL_P2P_DISABLE NCCL_P2P_LEVEL
export CUDA_VISIBLE_DEVICES=0

rc=0
# shellcheck disable=SC2086 # LAB_DRILL_ARGS is a list of words on purpose
"$LAB" drill --profile "$PROFILE" --steps "$STEPS" --output-dir "$ROOT" --run-id "$RUN_ID" ${LAB_DRILL_ARGS:-} || rc=$?
if [ ! -d "$REPORT" ]; then
  echo "nightly: the drill wrote no report ($REPORT)" >&2
  exit $((rc == 0 ? 2 : rc))
fi

baseline="${LAB_BASELINE:-}"
if [ -z "$baseline" ] && [ -f "$ROOT/last-good" ]; then baseline="$(cat "$ROOT/last-good")"; fi
gate_args=("$REPORT" --profile "$PROFILE")
if [ -n "$baseline" ] && [ -d "$baseline" ]; then gate_args+=(--baseline "$baseline"); fi
"$LAB" gate "${gate_args[@]}"
gate_rc=$?
if [ -n "${LAB_TEXTFILE:-}" ]; then
  if ! "$LAB" metrics export "$REPORT" --textfile "$LAB_TEXTFILE" && [ "$rc" = 0 ]; then rc=1; fi
fi
if [ "$gate_rc" != 0 ]; then
  exit "$gate_rc"
fi
if [ "$rc" = 0 ]; then
  printf '%s\n' "$REPORT" > "$ROOT/.last-good.tmp" && mv "$ROOT/.last-good.tmp" "$ROOT/last-good"
fi
exit "$rc"
