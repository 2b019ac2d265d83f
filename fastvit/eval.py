"""`fastvit-eval`: a run's model at many operating points (resolution × keep rate) on any prepped data.

    fastvit-eval runs/x --data OUT [--split val] [--res 96,128,224] [--keep 1,0.75,0.5] [--ema|--raw]
                 [--json FILE] [--device D] [--batch-size N] [--backend B] [--max-images N]

One model, many operating points (PSS): the locality ViT runs at any resolution that is a multiple of
its patch and on any share of its patches, so each (res, keep) point is a top-1/top-5 and an inference
speed. RUN_DIR is a run dir (its newest checkpoint that reads back intact; a run still training is fine:
its lock is never taken, checkpoints are renamed into place whole) or one checkpoint file. The data is
any fastvit-prep output whose classes are the run's (else one line, exit 2), read by any backend, on
CPU or GPU. The model is rebuilt from the checkpoint's config the way the trainer builds it, at the
depth the run is at (--growth), and evaluated by the trainer's own Evaluator (fastvit.train.evaluate)
over fastvit.data's val loader: at the run's final resolution and keep 1 the numbers are the run's
results.json. Keep < 1 draws the kept patches from a generator seeded by --seed (the same draw every call).

Prints the table, writes it as JSON (RUN_DIR/eval.json, or --json). images/s: the model's forward
alone (the first batch, a warm-up, not counted; synchronized on a GPU) and the whole pass with the loader.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fastvit.train.errors import TrainError

PROG = "fastvit-eval"
RAW, EMA = "raw", "ema"


# ------------------------------------------------------------------------------------------------------
# a run's model, from its checkpoint (shared with fastvit-export)

@dataclass
class RunModel:
    model: nn.Module            # eval mode, the chosen weights, at the run's depth
    cfg: object                 # fastvit.train.config.TrainConfig (the checkpoint's)
    weights: str                # "raw" | "ema"
    checkpoint: Path
    run_dir: Path
    step: int
    counted_s: float
    results: dict | None        # the run's results.json when it belongs to this checkpoint (a finished run)
    classes: tuple | None       # the run's class names (its data's manifest); None when that data is gone
    run_res: int | None         # the run's evaluation (final) resolution, when known

    @property
    def num_classes(self) -> int:
        return int(_head(self.model).out_features)

    @property
    def depth(self) -> int:
        from fastvit.models.grow import active_depth

        inner = getattr(self.model, "model", self.model)          # TimmBaseline wraps timm's ViT
        return active_depth(inner) if hasattr(inner, "blocks") else 0

    @property
    def params_m(self) -> float:
        from fastvit.models.grow import compact

        return sum(p.numel() for p in compact(self.model).parameters()) / 1e6     # the blocks it runs

    def describe(self) -> str:
        state = "finished run" if self.results else "run in progress or stopped"
        return (f"{self.checkpoint}: step {self.step} ({state}, {self.counted_s:.0f} counted s), {self.weights} "
                f"weights, {self.cfg.model.name} (depth {self.depth}, {self.params_m:.2f} M params)")


def _head(model: nn.Module) -> nn.Linear:
    return getattr(model, "model", model).head


def read_checkpoint(path, log):
    """(Checkpoint, its path): the newest intact checkpoint of a run dir (Checkpoint.latest), or the
    checkpoint file itself. One-line TrainError (exit 2) when there is none."""
    from fastvit.train.checkpoint import Checkpoint, CorruptCheckpoint

    path = Path(path)
    if not path.exists():
        raise TrainError(f"{path} does not exist (give a run dir or a ckpt_*.pt file)", 2)
    got = None
    for _ in range(3):     # a training run deletes an older checkpoint after writing a newer one: look again
        try:
            got = Checkpoint.latest(path, log) if path.is_dir() else (Checkpoint.read(path), path)
            break
        except FileNotFoundError:
            continue
        except CorruptCheckpoint as e:
            raise TrainError(f"{path}: {e}", 2) from None
        except OSError as e:
            raise TrainError(f"{path}: {e.strerror or e}", 2) from None
    if got is None:
        raise TrainError(f"{path}: no readable checkpoint (ckpt_*.pt); a run writes its first one after "
                         "a few minutes", 2)
    return got


def build_model(cfg, state: dict) -> nn.Module:
    """The run's model as fastvit.train.setup.build_parts creates it (create_model(name, num_classes,
    **cfg.model.overrides()), or timm's ViT for the baseline recipe), the class count from the head."""
    from fastvit.models import create_baseline, create_model

    over = cfg.model.overrides()
    try:
        if cfg.run.recipe == "baseline":
            prefix = 1 if over.get("class_token", True) else 0
            grid = math.isqrt(state["model.pos_embed"].shape[1] - prefix)
            # dynamic_img_size: timm resamples its pos-embed at other resolutions (the same logits at its own)
            return create_baseline(cfg.model.name, num_classes=state["model.head.weight"].shape[0],
                                   img_size=grid * cfg.model.patch_size, dynamic_img_size=True, **over)
        return create_model(cfg.model.name, num_classes=state["head.weight"].shape[0], **over)
    except (KeyError, ValueError, TypeError) as e:
        raise TrainError(f"cannot rebuild {cfg.model.name} from the checkpoint's config: {e}", 2) from None


def load_run(path, weights: str | None = None, device="cpu", log=None) -> RunModel:
    """A run's model from its newest intact checkpoint (or a checkpoint file): `weights` "raw" (default)
    or "ema", eval mode on `device`, running the blocks the run runs (--growth: its depth so far)."""
    from fastvit.models.grow import set_depth
    from fastvit.train.config import TrainConfig

    log = log or (lambda s: print(f"[{PROG}] {s}", file=sys.stderr))
    ck, src = read_checkpoint(path, log)
    try:
        cfg = TrainConfig.from_dict(ck.config)
    except ValueError as e:                              # ConfigError: a config this version does not know
        raise TrainError(f"{src}: its config does not load ({e})", 2) from None
    weights = weights or RAW
    state = ck.model if weights == RAW else ck.ema
    if state is None:
        raise TrainError(f"{src}: the run kept no EMA of its weights (--no-ema); use --raw", 2)
    model = build_model(cfg, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise TrainError(f"{src}: the weights do not fit {cfg.model.name} ({str(e).splitlines()[0]})", 2) from None
    growth = ck.growth or {}
    if growth.get("depth"):                # the blocks a grown run runs now (its supernet inside auto's window)
        set_depth(model, (growth.get("window") or {}).get("top") or growth["depth"])
    model.to(device).eval()
    run_dir = src.parent
    results = _results(run_dir, ck.step)
    ds = run_data(cfg)
    run_res = (results or {}).get("eval_res")
    if run_res is None and ds is not None:
        from fastvit.train.rules import final_resolution

        run_res = final_resolution(cfg, ds.resolutions)
    return RunModel(model=model, cfg=cfg, weights=weights, checkpoint=src, run_dir=run_dir, step=int(ck.step),
                    counted_s=float(ck.counted_s), results=results,
                    classes=ds.classes if ds is not None else None, run_res=run_res)


def run_data(cfg):
    """The prepped data the run trained on, when it is still where the config says (else None)."""
    from fastvit.data import DataError, open_dataset

    try:
        return open_dataset(cfg.data.root) if cfg.data.root else None
    except (DataError, OSError):
        return None


def _results(run_dir: Path, step: int) -> dict | None:
    """The run's results.json when it is of this checkpoint (a finished run's last), else None."""
    from fastvit.train.results import Results, ResultsError

    try:
        res = Results.read(run_dir).to_dict()
    except ResultsError:
        return None
    return res if res.get("steps") == step else None


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_classes(rm: RunModel, ds, flag: str = "--data") -> str | None:
    """TrainError (exit 2, one line) when `ds` holds other classes than the run; a note when the run's
    class names are unknown (its data moved) and only the count could be compared."""
    if rm.classes is not None:
        if tuple(ds.classes) != tuple(rm.classes):
            diff = next((i for i, (a, b) in enumerate(zip(ds.classes, rm.classes)) if a != b),
                        min(len(ds.classes), len(rm.classes)))
            raise TrainError(f"{flag} {ds.root} has other classes than the run: label {diff} is "
                             f"{_at(ds.classes, diff)} here, {_at(rm.classes, diff)} in the run ({ds.num_classes} "
                             f"classes here, {len(rm.classes)} in the run)", 2)
        return None
    if ds.num_classes != rm.num_classes:
        raise TrainError(f"{flag} {ds.root} has {ds.num_classes} classes, the model {rm.num_classes}", 2)
    return (f"the run's data ({rm.cfg.data.root}) is not readable here: only the class count "
            f"({rm.num_classes}) was checked, not the names")


def _at(classes, i: int) -> str:
    return classes[i] if i < len(classes) else "(none)"


# ------------------------------------------------------------------------------------------------------
# the grid

class OperatingPoint(nn.Module):
    """The model at one keep rate as the Evaluator calls it (`m(images)`): the kept patches drawn from a
    seeded generator; times each forward (synchronized on a GPU) and advances the progress bar."""

    def __init__(self, model: nn.Module, keep: float, seed: int, bar=None):
        super().__init__()
        self.model, self.keep, self.seed, self.bar = model, keep, seed, bar
        self.times: list[tuple[float, int]] = []           # (seconds, images) per forward
        self._gen = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dev = images.device
        kw = {}
        if self.keep < 1:
            if self._gen is None:
                self._gen = torch.Generator(device=dev).manual_seed(self.seed)
            kw = {"keep_rate": self.keep, "generator": self._gen}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = self.model(images, **kw)                                                  # (B,C)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)                                                 # SYNC (timing)
        self.times.append((time.perf_counter() - t0, images.shape[0]))
        if self.bar is not None:
            self.bar.update(images.shape[0])
        return out

    def images_per_s(self) -> float | None:
        t = self.times[1:] if len(self.times) > 1 else self.times      # the first forward warms up
        s = sum(dt for dt, _ in t)
        return sum(n for _, n in t) / s if s > 0 else None


def evaluate_grid(rm: RunModel, source, *, split: str, resolutions, keeps, amp: bool, batch_size: int,
                  workers: int | None = None, max_images: int | None = None,
                  seed: int = 0, progress: bool = True) -> list[dict]:
    """One row per (res, keep): top-1/top-5 (%), the images read, images/s. fastvit.train.evaluate's
    Evaluator over make_val_loader (one loader per resolution, reused across the keep rates) of `source`
    (a fastvit.data.DataSource resolved for every resolution: choose_backend)."""
    from tqdm import tqdm

    from fastvit.stage import num_kept
    from fastvit.train.evaluate import Evaluator
    from fastvit.train.setup import RunEnv

    patch = rm.cfg.model.patch_size
    total = source.ds.count(split) if not max_images else min(source.ds.count(split), max_images)
    rows = []
    for res in resolutions:
        env = RunEnv(source=source, final_res=res, amp=amp, compile=False)
        ev = Evaluator(env, batch_size=batch_size, workers=workers, loader_kwargs={"split": split})
        try:
            for keep in keeps:
                with tqdm(total=total, desc=f"res {res} keep {keep:g}", unit="img", disable=not progress,
                          leave=False, file=sys.stderr, dynamic_ncols=True) as bar:
                    point = OperatingPoint(rm.model, keep, seed, bar).eval()    # Evaluator restores this mode
                    t0 = time.perf_counter()
                    r = ev(point, None, max_images)
                    wall = time.perf_counter() - t0
                ips = point.images_per_s()
                rows.append({"res": res, "keep": keep, "patches": num_kept((res // patch) ** 2, keep),
                             "top1": r["top1"], "top1_err": 100.0 - r["top1"], "top5": r["top5"],
                             "top5_err": 100.0 - r["top5"], "images": r["val_images"],
                             "images_per_s": round(ips, 1) if ips else None,
                             "wall_images_per_s": round(r["val_images"] / wall, 1) if wall > 0 else None})
        finally:
            ev.close()
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'res':>5} {'keep':>5} {'patches':>7} {'top-1':>7} {'top-5':>7} {'img/s model':>12} {'img/s wall':>11}"
    lines = [head]
    for r in rows:
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        wall = "-" if r["wall_images_per_s"] is None else f"{r['wall_images_per_s']:.1f}"
        lines.append(f"{r['res']:>5} {r['keep']:>5.2f} {r['patches']:>7} {r['top1']:>7.2f} {r['top5']:>7.2f} "
                     f"{ips:>12} {wall:>11}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# the command

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate a fastvit-train run (or checkpoint) at several "
                                "resolutions x keep rates: top-1/top-5 and inference images/s.")
    a = p.add_argument
    a("run", metavar="RUN_DIR|CHECKPOINT", help="a run dir (its newest intact checkpoint; a run still training "
      "is fine) or a ckpt_*.pt file")
    a("--data", help="fastvit-prep output with the run's classes (default: the run's own data)")
    a("--split", default="val", help="split to evaluate (default: val)")
    a("--res", help="resolutions, e.g. 96,128,224 (multiples of the patch; default: the run's final res)")
    a("--keep", help="keep rates in (0, 1], e.g. 1,0.75,0.5 (default: 1,0.75,0.5; the baseline: 1)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--ema", dest="weights", action="store_const", const=EMA, help="the EMA weights")
    w.add_argument("--raw", dest="weights", action="store_const", const=RAW,
                   help="the trained weights (default; the run's headline top-1)")
    a("--json", help="write the table here (default: RUN_DIR/eval.json)")
    a("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    a("--backend", help="loader backend: auto, dali, ffcv, torchvision, gpu_resident (default: the run's when it "
      "can read the data, else auto)")
    a("--batch-size", type=int, help="images per batch (default: the trainer's evaluation batch)")
    a("--workers", type=int, help="loader workers (default: the CPUs this process may use)")
    a("--max-images", type=int, help="evaluate only the first N images of the split's fixed order")
    a("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for cuda)")
    a("--seed", type=int, default=0, help="seed of the kept-patch draw at keep < 1 (default: 0)")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar (default: on)")
    return p


def parse_list(text: str, cast, flag: str) -> list:
    try:
        vals = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals:
        raise TrainError(f"{flag} {text!r}: give comma-separated numbers, e.g. {'96,128' if cast is int else '1,0.5'}", 2)
    return list(dict.fromkeys(vals))


def choose_backend(want: str | None, ds, device: torch.device, reads, run_backend: str | None) -> tuple:
    """--backend as given (checked), or the run's backend when it can read these (split, res), else
    fastvit.data's auto order: (the fastvit.data.DataSource the loaders take as it is, one line saying why)."""
    from fastvit.data import DataError, DataSource
    from fastvit.data.backends import AUTO

    try:
        source = DataSource.resolve(ds, want or AUTO, device, reads, prefer=run_backend)
    except DataError as e:
        raise TrainError(f"--backend: {e}", 2) from None
    if want and want != AUTO:
        return source, f"backend {want}"
    return source, f"backend {source.backend} (the run's)" if source.backend == run_backend else source.why


def run_eval(args) -> dict:
    from fastvit.data import DataError, open_dataset
    from fastvit.fileio import write_json_atomic
    from fastvit.train.setup import RunEnv, device_name, resolve_device

    device = resolve_device(args.device)
    for flag, v in (("--batch-size", args.batch_size), ("--workers", args.workers), ("--max-images", args.max_images)):
        if v is not None and v < 1:
            raise TrainError(f"{flag} must be >= 1", 2)
    rm = load_run(args.run, args.weights, device)
    cfg = rm.cfg
    data = args.data or cfg.data.root
    if not data:
        raise TrainError("--data is required: the run's config names no data", 2)
    try:
        ds = open_dataset(data)
    except (DataError, OSError) as e:
        raise TrainError(f"--data {data}: {e}", 2) from None
    note = check_classes(rm, ds)
    if args.split not in ds.splits:
        raise TrainError(f"--split {args.split}: {ds.root} has {', '.join(sorted(ds.splits))}", 2)
    patch = cfg.model.patch_size
    baseline = cfg.run.recipe == "baseline"
    if args.res:
        resolutions = parse_list(args.res, int, "--res")
    else:
        from fastvit.train.rules import final_resolution

        resolutions = [rm.run_res or final_resolution(cfg, ds.resolutions)]
    bad = [r for r in resolutions if r <= 0 or r % patch]
    if bad:
        raise TrainError(f"--res {bad[0]}: resolutions must be positive multiples of the patch size {patch}", 2)
    keeps = parse_list(args.keep, float, "--keep") if args.keep else ([1.0] if baseline else [1.0, 0.75, 0.5])
    if any(not 0 < k <= 1 for k in keeps):
        raise TrainError("--keep: keep rates must be in (0, 1]", 2)
    if baseline and keeps != [1.0]:
        raise TrainError("--keep: the baseline recipe (timm's ViT) runs all patches; use --keep 1", 2)
    source, why = choose_backend(args.backend, ds, device, [(args.split, r) for r in resolutions],
                                 (rm.results or {}).get("backend") or cfg.data.backend)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    batch = args.batch_size or max(16, min(256, cfg.schedule.batch_size))   # the trainer's evaluation batch
    say = lambda s: print(f"[{PROG}] {s}", file=sys.stderr, flush=True)    # noqa: E731
    if note:
        say(note)
    print(rm.describe())
    env = RunEnv(source=source, final_res=resolutions[0], amp=amp, compile=False)
    print(f"data: {ds.root} {args.split} ({ds.count(args.split)} images, {ds.num_classes} classes); {why}; "
          f"{device_name(env)}, {'bf16' if amp else 'fp32'}, batch {batch}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = evaluate_grid(rm, source, split=args.split, resolutions=resolutions, keeps=keeps, amp=amp,
                         batch_size=batch, workers=args.workers, max_images=args.max_images,
                         seed=args.seed, progress=args.progress)
    print(format_table(rows))
    res = rm.results
    if res and args.split == "val" and Path(ds.root).resolve() == Path(cfg.data.root).resolve():
        key = "ema_top1" if rm.weights == EMA else "top1"
        if res.get(key) is not None:
            print(f"the run's own final top-1 ({rm.weights}, results.json): {res[key]:.2f}% at {res['eval_res']} px, keep 1")
    out = {"checkpoint": str(rm.checkpoint), "step": rm.step, "counted_s": rm.counted_s,
           "finished": rm.results is not None, "weights": rm.weights, "model": cfg.model.name, "recipe": cfg.run.recipe,
           "depth": rm.depth, "params_m": round(rm.params_m, 3), "data": str(ds.root), "split": args.split,
           "classes": ds.num_classes, "backend": source.backend, "device": device_name(env), "amp": amp,
           "batch_size": batch, "seed": args.seed, "grid": rows}
    path = Path(args.json) if args.json else rm.run_dir / "eval.json"
    write_json_atomic(path, out)
    print(f"wrote {path}")
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_eval(args)
    except TrainError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code
    except OSError as e:                          # eval.json not writable, a data file gone mid-pass
        print(f"{PROG}: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
