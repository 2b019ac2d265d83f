#!/usr/bin/env bash
# `make demo`: the whole journey on the built-in synthetic dataset, on whatever machine this is.
#   1. fastvit-prep --demo: generate the demo tree (demo_out/src) and prep it at 64,128,224 (FFCV + DALI)
#   2. fastvit-train: a short budgeted run (CPU: a few minutes), printing top-1
#   3. bench/throughput.py --quick: every stage next to its baseline
# Settings can be overridden: DEMO_OUT, DEMO_MINUTES, DEMO_TRAIN_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_OUT:-demo_out}
RUN=${DEMO_RUN:-runs/demo}
MINUTES=${DEMO_MINUTES:-3}
step() { printf '\n=== %s ===\n' "$*"; }
t0=$(date +%s)

step "1/3 fastvit-prep --demo --out $OUT --res 64,128,224"
.venv/bin/fastvit-prep --demo --out "$OUT" --res 64,128,224

step "2/3 fastvit-train --data $OUT --minutes $MINUTES"
# shellcheck disable=SC2086
.venv/bin/fastvit-train --data "$OUT" --minutes "$MINUTES" --out "$RUN" --overwrite ${DEMO_TRAIN_ARGS:-}

step "3/3 bench/throughput.py --quick"
"$PY" bench/throughput.py --quick --data "$OUT" --json "$RUN/bench_quick.json"

printf '\ndemo: done in %s s. Results: %s/results.json, curves: %s/curves.png, bench: %s/bench_quick.json\n' \
  "$(( $(date +%s) - t0 ))" "$RUN" "$RUN" "$RUN"
