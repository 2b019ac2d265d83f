#!/bin/bash
# after run_grid.sh's first pass: the runs that shared the cores with the two helpers' test runs are moved
# aside to /work/ev/grid/contended/ and run again by the same (resumable) sweep command on the otherwise
# idle machine: the 4-minute runs of d2-w192, d4-w128, d4-w192 and auto (05:53-06:03 UTC, 2-4x fewer images
# than clean) and the 8-minute runs of d1-w192 and d2-w128 (06:04-06:13, one test process for ~3 minutes)
while pgrep -f run_grid.sh > /dev/null; do sleep 20; done
cd /work/ev/grid/sweep/runs
for vb in fastvit_shape=d2-w192/4m fastvit_shape=d4-w128/4m fastvit_shape=d4-w192/4m fastvit_model=auto/4m \
          fastvit_shape=d1-w192/8m fastvit_shape=d2-w128/8m; do
  mkdir -p /work/ev/grid/contended/$(dirname $vb) && mv $vb /work/ev/grid/contended/$vb
done
mv /work/ev/grid/sweep.log /work/ev/grid/sweep-pass1.log
cd /work/ev && ./run_grid.sh
