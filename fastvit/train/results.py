"""results.json, a finished run's numbers: the one owner of its keys. The loop builds and writes it
(`Results.of_run`, `write`); fastvit-train's summary line, fastvit-sweep, the bench scripts and
gpu-check read it (`Results.read`, validated: a file without the keys every run writes is one line).

Keys (every run): top1, top5 (full validation split at eval_res, raw weights), ema_top1/ema_top5 (None
without EMA), eval_res, val_images, budget_s / budget_images (one is None), counted_s, validation_s,
steps, planned_steps, images_seen, replans, nan_skipped, compile_s, compile_s_by_shape, device_name,
backend, recipe, model, stages; world_size, images_per_s, images_per_s_per_process (dist.throughput);
growth (--growth); model_auto and predicted_top1 (--model auto)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

FILE = "results.json"


class ResultsError(ValueError):
    """results.json is missing, unreadable or incomplete (the message is one line)."""


class Results(Mapping):
    """A run's results.json as a read-only mapping (res["top1"], res.get("ema_top1"))."""

    REQUIRED = ("top1", "top5", "eval_res", "counted_s", "steps", "planned_steps", "images_seen",
                "device_name", "stages")

    def __init__(self, data: Mapping):
        self._d = dict(data)

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"Results({self._d!r})"

    def to_dict(self) -> dict:
        return dict(self._d)

    def best_top1(self) -> float:
        """The better of the raw and the EMA weights' top-1."""
        return max(v for v in (self._d["top1"], self._d.get("ema_top1")) if v is not None)

    # -- files ---------------------------------------------------------------------------------------
    @staticmethod
    def path(run_dir) -> Path:
        return Path(run_dir) / FILE

    @classmethod
    def exists(cls, run_dir) -> bool:
        """A finished run (the loop writes results.json last)."""
        return cls.path(run_dir).is_file()

    @classmethod
    def read(cls, run_dir) -> "Results":
        path = cls.path(run_dir)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ResultsError(f"{path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ResultsError(f"{path}: not JSON ({e})") from None
        missing = [k for k in cls.REQUIRED if not isinstance(data, dict) or k not in data]
        if missing:
            raise ResultsError(f"{path}: not a fastvit-train results.json (no {', '.join(missing)})")
        return cls(data)

    def write(self, run_dir) -> Path:
        from .rundir import write_json

        write_json(Path(run_dir), FILE, self._d)
        return self.path(run_dir)

    # -- the loop's ----------------------------------------------------------------------------------
    @classmethod
    def of_run(cls, cfg, env, st, step_fn, counted: float, final: dict) -> "Results":
        """The numbers of a finished run: its config, environment (setup.RunEnv), state (loop.RunState),
        training step (the NaN count, compile seconds), counted seconds and the final validation."""
        from .setup import device_name

        plan = st.plan
        return cls({
            "top1": final["top1"], "top5": final["top5"],
            "ema_top1": final.get("ema_top1"), "ema_top5": final.get("ema_top5"),
            "eval_res": env.final_res, "val_images": final["val_images"],
            "budget_s": cfg.budget_s, "budget_images": plan.budget_images,
            "counted_s": round(counted, 3), "validation_s": round(st.val_s, 3),
            "steps": st.step, "planned_steps": plan.total_steps, "images_seen": plan.images_until(st.step),
            "replans": len(plan.replans), "nan_skipped": step_fn.nan_total, "compile_s": round(st.compile_s, 3),
            "compile_s_by_shape": [{"res": sh[0], "keep": sh[1], "batch": sh[2], "first_step_s": round(t, 3)}
                                   for sh, t in step_fn.compile_s_by_shape.items()],
            "device_name": device_name(env), "backend": env.backend, "recipe": cfg.run.recipe,
            "model": cfg.model.name, "stages": [s.to_dict() for s in plan.stages],
        })

    def updated(self, **more) -> "Results":
        return Results({**self._d, **more})
