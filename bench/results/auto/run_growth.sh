#!/bin/bash
# issue 22, growth as a --model auto candidate: growth runs at the grid's budgets/seeds, with a same-batch d2-w128 control; code = snapshot of main 3588c7e
cd /work/ev
export PYTHONPATH=/work/ev/code2 FASTVIT_CACHE_DIR=/work/ev/growgrid/cache
( while true; do echo "$(date -u +%H:%M:%S) $(cat /proc/loadavg) other-busy=$(ps -eo ni,pcpu,args --no-headers | awk '$1>=0 && $2>5 && /python/' | wc -l)" >> /work/ev/growgrid/load.txt; sleep 60; done ) &
LOGGER=$!
nice -n -10 /work/main/.venv/bin/python -m fastvit.sweep.cli --data /work/ev/imagenette --budgets 4m,8m,16m \
  --variants fastvit+shape=d2-w128+growth=manual,fastvit+shape=d4-w128+growth=manual,fastvit+shape=d2-w128 \
  --seeds 2 --jobs 4 --device cpu --preset cpu --out /work/ev/growgrid/sweep --no-progress > /work/ev/growgrid/sweep.log 2>&1
echo "rc=$?" >> /work/ev/growgrid/sweep.log
echo "$(date -u +%H:%M:%S) $(cat /proc/loadavg)" >> /work/ev/growgrid/load.txt
kill $LOGGER
