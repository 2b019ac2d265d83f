"""sweep.csv, the one file a fastvit-sweep writes per run row: its columns, writer and reader (the sweep's
report writes it; `fastvit.forecast.expected_top1` reads it for fastvit-train --expect-from)."""
from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ["variant", "budget", "budget_s", "seed", "top1", "ema_top1", "top5", "images_seen", "counted_s",
           "steps", "recipe", "model", "run_dir"]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})


def read_csv(path: Path) -> list[dict]:
    def num(v):
        if v in ("", "None", None):
            return None
        try:
            return float(v)
        except ValueError:
            return v
    with open(path, newline="") as f:
        return [{k: (num(v) if k not in ("variant", "budget", "recipe", "model", "run_dir") else v)
                 for k, v in r.items()} for r in csv.DictReader(f)]
