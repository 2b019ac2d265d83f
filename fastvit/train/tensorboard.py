"""TensorBoard event files of a run (RUN_DIR/tb), beside metrics.jsonl/.csv: `tensorboard --logdir runs/`.

Every number of every record MetricsWriter logs becomes a scalar `KIND/FIELD` at the record's step:
train/loss, train/lr, train/images_per_s, train/data_wait, train/keep, train/res, train/depth, ... per
logged step; val/top1, val/top5, val/ema_top1, ... per validation (the eval curves); profile/* with
--profile-steps. A resumed run purges what the earlier files hold after the checkpoint's step (TensorBoard's
purge_step), as metrics.jsonl is cut back there.

The event files are a view, never a reason to stop training: a writer that cannot be created or fails
later says so in one line and turns itself off; JSONL/CSV stay the record.
"""
from __future__ import annotations

import atexit
import sys
import weakref
from pathlib import Path

TB_DIR = "tb"
FLUSH_SECS = 10          # the background writer's interval; validations flush at once


def _say(msg: str) -> None:
    print(f"[fastvit-train] {msg}", file=sys.stderr, flush=True)


class TensorBoardWriter:
    """Scalars of the log records into RUN_DIR/tb. `on` False after a failure (or when tensorboard is
    missing); every method is then a no-op."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, say=_say):
        self.say = say
        self.log_dir = Path(run_dir) / TB_DIR
        self._w = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            self._off(f"not installed ({e}; pip install tensorboard)")
            return
        try:
            purge = None if resume_step is None else resume_step + 1
            self._w = SummaryWriter(str(self.log_dir), purge_step=purge, flush_secs=FLUSH_SECS)
        except Exception as e:  # noqa: BLE001 - an unwritable dir, a broken install: the run goes on
            self._off(e)
            return
        # a run that ends by an exception never reaches close(): flush what it logged at exit
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    @property
    def on(self) -> bool:
        return self._w is not None

    def _off(self, why) -> None:
        self.say(f"tensorboard: off ({str(why).splitlines()[0] if str(why) else type(why).__name__}); "
                 "metrics.jsonl/.csv hold the metrics")
        w, self._w = self._w, None
        if w is not None:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - already failing; nothing more to say
                pass

    def log(self, rec: dict) -> None:
        if self._w is None:
            return
        kind, step = rec.get("kind", "train"), int(rec.get("step", 0))
        try:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and v == v:          # numbers, not NaN
                    self._w.add_scalar(f"{kind}/{k}", float(v), step)
            if kind == "val":
                self._w.flush()
        except Exception as e:  # noqa: BLE001 - disk full, a closed writer: off, the run goes on
            self._off(e)

    def close(self) -> None:
        if self._w is None:
            return
        try:
            self._w.close()
        except Exception as e:  # noqa: BLE001
            self._off(e)
        self._w = None
