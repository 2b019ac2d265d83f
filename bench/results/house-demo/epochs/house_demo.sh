#!/bin/bash
# issue 25: the demo before (f56a729, this session's start) and after (main HEAD: the ScheduleConfig split and
# the resolved DataSource), same data, same seeds, an IMAGE budget (--epochs 3) so that the load cannot change
# what each run trains: the top-1 should match to within run-to-run nondeterminism
set -e
cd /work/main
PY=/work/main/.venv/bin/python
[ -f /work/ev/demo/manifest.json ] || PYTHONPATH=/work/main $PY -m fastvit.data_prep.cli --demo --out /work/ev/demo --res 64,128,224 --no-progress
mkdir -p /work/ev/house
for s in 0 1; do
  for code in before main; do
    preset=cpu; [ $code = main ] && preset=cpu-d4   # the same settings: cpu-d4 is the cpu preset of f56a729
    dir=/work/wt/$code; [ $code = main ] && dir=/work/main
    (cd $dir && PYTHONPATH=$dir $PY -m fastvit.train.cli --data /work/ev/demo --epochs 3 --device cpu --preset $preset --seed $s \
       --out /work/ev/house/${code}_s$s --no-progress --overwrite > /work/ev/house/${code}_s$s.log 2>&1) &
  done
done
wait
for r in /work/ev/house/*_s?; do python3 -c "import json;d=json.load(open('$r/results.json'));print('$r',d['top1'],d.get('ema_top1'),d['steps'],d['images_seen'])"; done
