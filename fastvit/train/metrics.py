"""Metrics: one record per log step / validation to JSONL and CSV and TensorBoard (RUN_DIR/tb, tensorboard.py);
the curves plot (loss, val top-1, lr, res, keep against counted time).

On resume the files are cut back to the checkpoint's step, so a crash never leaves duplicate rows.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections import deque
from pathlib import Path

from ..fileio import write_bytes_atomic

CSV_COLUMNS = ["kind", "step", "counted_s", "p", "stage", "res", "keep", "depth", "batch", "lr", "loss",
               "images_per_s", "mfu", "data_wait", "mix_prob", "drop_path", "nan_skipped",
               "top1", "top5", "ema_top1", "ema_top5", "val_s", "interval_s", "interval_wait_s",
               "interval_images", "interval_compute_s"]


class StepTimer:
    """Compute time of the training steps between two log records (the GPU-busy share's numerator).

    CUDA: a pair of timing events on the current stream around each step's compute (augment, forward,
    backward, clip, optimizer, EMA), read only at log time, so no step waits for them; the time is the
    GPU's from the step's first queued kernel to its last (gaps inside a step, e.g. at the loss sync,
    count as busy; the wait for the next batch, logging, checkpoints count as idle). CPU: the host
    clock around the same part (`now` is the budget clock's, the only clock the loop reads)."""

    def __init__(self, cuda: bool, now):
        self.cuda = cuda
        self._now = now
        self._start = None
        self._pairs: list = []
        self._host_s = 0.0

    def start(self) -> None:
        if self.cuda:
            import torch

            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = self._now()

    def stop(self) -> None:
        if self._start is None:
            return
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pairs.append((self._start, end))
        else:
            self._host_s += self._now() - self._start
        self._start = None

    def cancel(self) -> None:
        """A step that failed (out of memory): not counted."""
        self._start = None

    def take(self) -> float:
        """Seconds of compute since the last take()."""
        if self.cuda:
            if self._pairs:
                self._pairs[-1][1].synchronize()                                         # SYNC (log time only)
            s = sum(a.elapsed_time(b) for a, b in self._pairs) / 1000.0
            self._pairs.clear()
            return s
        s, self._host_s = self._host_s, 0.0
        return s


class StepMeter:
    """What the log records say about the steps since the last record: speed over a sliding window of
    steps (reset at a stage change), the loader's wait, compute time (StepTimer), a smoothed loss, MFU."""

    def __init__(self, timer: StepTimer, *, window: int, flops_per_image, peak_flops: float | None, now: float):
        self.timer, self.flops_per_image, self.peak = timer, flops_per_image, peak_flops
        self._window: deque = deque(maxlen=window)      # (counted_s, images) per step
        self._waits: deque = deque(maxlen=100)
        self._iv = {"t": now, "wait": 0.0, "images": 0}  # since the last record
        self.loss_ema: float | None = None

    def new_stage(self) -> None:
        self._window.clear()

    def step_done(self, now: float, images: int, loss: float | None, wait_s: float) -> None:
        self._window.append((now, images))
        self._waits.append(wait_s)
        self._iv["wait"] += wait_s
        self._iv["images"] += images
        if loss is not None:
            self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss

    def speed(self) -> float | None:
        """Images/s over the window (None before two steps of a stage)."""
        if len(self._window) < 2:
            return None
        dt = self._window[-1][0] - self._window[0][0]
        imgs = sum(b for _, b in list(self._window)[1:])
        return imgs / dt if dt > 0 else None

    def record(self, now: float, stage) -> dict:
        """The interval fields of a train record; starts the next interval."""
        ips = self.speed()
        mfu = None
        if ips and self.peak:
            mfu = round(self.flops_per_image(stage) * ips / self.peak, 4)
        rec = {"images_per_s": ips, "mfu": mfu, "data_wait": sum(self._waits) / max(1, len(self._waits)),
               "interval_s": round(now - self._iv["t"], 6), "interval_wait_s": round(self._iv["wait"], 6),
               "interval_images": self._iv["images"], "interval_compute_s": round(self.timer.take(), 6)}
        self._iv = {"t": now, "wait": 0.0, "images": 0}
        return rec


class MetricsWriter:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool | None = None):
        """tensorboard: write RUN_DIR/tb too (None: as the run's config.json says, run.tensorboard; on
        when it does not say)."""
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        rows = []
        if resume_step is not None and self.jsonl.exists():
            for line in self.jsonl.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:      # a line cut by the crash
                    continue
                if r.get("step", 0) <= resume_step:
                    rows.append(r)
        self._rows = rows
        # The history up to the resume step is rewritten atomically (a crash now loses nothing), then
        # both files are appended to.
        text = io.StringIO()
        header = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        header.writeheader()
        header.writerows(rows)
        write_bytes_atomic(self.csv, text.getvalue().encode())
        write_bytes_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows).encode())
        self._jf = open(self.jsonl, "a")
        self._cf = open(self.csv, "a", newline="")
        self._cw = csv.DictWriter(self._cf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if tensorboard is None:
            from .rundir import saved_config

            tensorboard = (saved_config(self.run_dir) or {}).get("run", {}).get("tensorboard", True)
        self._tb = None
        if tensorboard:
            from .tensorboard import TensorBoardWriter

            self._tb = TensorBoardWriter(self.run_dir, resume_step)

    def _write(self, rec: dict) -> None:
        self._jf.write(json.dumps(rec) + "\n")
        self._cw.writerow(rec)

    def _flush(self) -> None:
        self._jf.flush()
        self._cf.flush()

    def log(self, rec: dict) -> None:
        self._rows.append(rec)
        self._write(rec)
        self._flush()
        if self._tb is not None:
            self._tb.log(rec)

    @property
    def rows(self) -> list[dict]:
        return list(self._rows)

    def close(self) -> None:
        for f in (self._jf, self._cf):
            try:
                f.flush()
                os.fsync(f.fileno())
            except (OSError, ValueError):
                pass
            f.close()
        if self._tb is not None:
            self._tb.close()


def plot_curves(rows: list[dict], path: Path, title: str = "", log=None) -> bool:
    """curves.png: training loss, val top-1, lr, res (and depth, with --growth) and keep against counted
    seconds (Agg backend). matplotlib is optional: without it the plot is skipped with one line (`log`,
    default stderr) and False is returned; the metrics files hold the same curves."""
    try:
        import matplotlib
    except ImportError:
        import sys

        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"[fastvit-train] {Path(path).name} skipped: matplotlib is not installed (the curves are in "
            "metrics.jsonl / metrics.csv)")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [("loss", train, "train loss"), ("top1", val, "val top-1 (%)"), ("lr", train, "learning rate"),
              ("res", train, "resolution (px)"), ("keep", train, "keep rate"),
              ("images_per_s", train, "images / s")]
    for ax, (key, src, label) in zip(axes.flat, panels):
        xs = [r["counted_s"] for r in src if r.get(key) is not None]
        ys = [r[key] for r in src if r.get(key) is not None]
        if key == "top1":
            xe = [r["counted_s"] for r in src if r.get("ema_top1") is not None]
            ye = [r["ema_top1"] for r in src if r.get("ema_top1") is not None]
            if xe:
                ax.plot(xe, ye, "o--", label="EMA")
            ax.plot(xs, ys, "o-", label="raw")
            ax.legend()
        elif key in ("res", "keep"):
            ax.step(xs, ys, where="post")
            depth = [(r["counted_s"], r["depth"]) for r in src if r.get("depth") is not None]
            if key == "res" and depth:                       # progressive growth: depth per stage
                ax2 = ax.twinx()
                ax2.step([t for t, _ in depth], [d for _, d in depth], where="post", color="tab:red")
                ax2.set_ylabel("depth (blocks)", color="tab:red")
        else:
            ax.plot(xs, ys)
        ax.set_xlabel("counted seconds")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())
    return True
