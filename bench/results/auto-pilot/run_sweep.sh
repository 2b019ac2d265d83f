#!/bin/bash
# the pilot sweep of issue 22 item 6 (branch scaling); logs load every minute while it runs
cd /work/wt/scaling
export PYTHONPATH=$PWD
( while true; do uptime >> /tmp/scaling_pilot/load.txt; sleep 60; done ) &
LOGGER=$!
/work/main/.venv/bin/python -m fastvit.sweep.cli --data /tmp/scaling_pilot/imagenette --budgets 2m,4m \
  --variants fastvit --shapes d1-w192,d2-w192,d4-w192,d2-w128,d2-w256 --seeds 1 --jobs 4 --device cpu \
  --preset cpu --fit-scaling --out /tmp/scaling_pilot/sweep --no-progress > /tmp/scaling_pilot/sweep.log 2>&1
echo "rc=$?" >> /tmp/scaling_pilot/sweep.log
uptime >> /tmp/scaling_pilot/load.txt
kill $LOGGER
