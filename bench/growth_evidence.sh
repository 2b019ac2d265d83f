#!/usr/bin/env bash
# Progressive growth on Imagenette (CPU): --growth none / manual (fresh AdamW) / manual (moments kept) /
# auto (and none_d2: a fixed depth-2 model, the control), one seed, run concurrently (OMP_NUM_THREADS=1
# each) so the variants share the machine's load.
#   bench/growth_evidence.sh DATA OUT SEED MINUTES
# Writes OUT/s<SEED>_<variant>/ (run dirs), OUT/s<SEED>_<variant>.log and appends `uptime` samples
# (before, every 30 s during, after) to OUT/load.txt. Summarize with bench/growth_table.py OUT.
set -u
DATA=$1; OUT=$2; SEED=$3; MIN=$4
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
declare -A ARGS=([none]="--growth none" [manual]="--growth manual" [manual_keep]="--growth manual --growth-opt keep"
                 [auto]="--growth auto" [none_d2]="--growth none --depth 2")
VARIANTS=${VARIANTS:-"none manual manual_keep auto"}
echo "# seed $SEED, $MIN min, variants $VARIANTS: before ($(date -u +%H:%M:%S))" >> "$OUT/load.txt"
uptime >> "$OUT/load.txt"
pids=()
for v in $VARIANTS; do
  cmd="$PY -m fastvit.train.cli --data $DATA --minutes $MIN --device cpu --seed $SEED --out $OUT/s${SEED}_$v --overwrite --no-progress ${ARGS[$v]}"
  echo "$cmd" >> "$OUT/command.txt"
  OMP_NUM_THREADS=1 $cmd > "$OUT/s${SEED}_$v.log" 2>&1 &
  pids+=($!)
done
echo "# during" >> "$OUT/load.txt"
while kill -0 "${pids[@]}" 2>/dev/null || jobs -r | grep -q .; do
  sleep 30
  running=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && running=$((running+1)); done
  [ "$running" -eq 0 ] && break
  echo "$(uptime) [$running running]" >> "$OUT/load.txt"
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done
echo "# after seed $SEED ($(date -u +%H:%M:%S)), rc $rc" >> "$OUT/load.txt"
uptime >> "$OUT/load.txt"
exit $rc
