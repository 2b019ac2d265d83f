"""`fastvit-train`: the command line over TrainConfig and the training loop.

    fastvit-train --data OUT --hours 24 [--model vit_small_local] [--out runs/x]
    fastvit-train --data demo_out --minutes 3 --device cpu --out runs/demo      # CPU preset applies
    fastvit-train --out runs/x --resume                                          # after a crash
    fastvit-train --data OUT --hours 24 --out runs/x --resume     # a supervisor's one command line
    torchrun --standalone --nproc-per-node 8 -m fastvit.train --data OUT --hours 24 --out runs/x
                                            # DDP, --batch-size global (fastvit/train/dist.py)

Errors the user can fix are one line on stderr (exit 2 usage, 1 runtime), never a traceback. A SIGTERM
writes a checkpoint and exits 143; Ctrl-C exits 130. --resume continues from the last checkpoint (the
saved config wins) or, when there is none, starts the run from the beginning with the flags given.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastvit.settings import add_dataclass_flags

from .config import PRESETS, ConfigError, TrainConfig, given_settings, preset_under
from .rules import preset_for_device


def build_parser() -> argparse.ArgumentParser:
    """The run flags are generated from TrainConfig's fields (fastvit.settings.add_dataclass_flags):
    --keep-min sets keep.keep_min, --data data.root, --model model.name, --order data.loader.order."""
    p = argparse.ArgumentParser(
        prog="fastvit-train",
        description="Train a ViT from scratch within a wall-clock budget (curriculum + patch sampling).",
        argument_default=None)
    a = p.add_argument
    a("--resume", action="store_true", default=False, help="continue the run in --out from its last good checkpoint")
    a("--overwrite", action="store_true", default=False, help="start over in an --out that holds a run (finished or not), replacing its files")
    a("--preset", choices=sorted(PRESETS), help="named settings (default: gpu on CUDA, cpu otherwise)")
    a("--config", help="YAML file of settings: nested sections (optim: {lr: ...}) or flat keys (lr: ...)")
    a("--dry-run", action="store_true", default=False, help="print the plan (stages, images, epochs, the loader's "
      "feed rate against the step rate; --model auto's choice) and exit: nothing is trained or written")
    a("--assume-speed", metavar="FILE", help="with --dry-run: plan for a machine you are not on, from a speed table "
      "or a bench/gpu-check JSON (fastvit.train.speeds)")
    a("--expect-from", metavar="SWEEP_DIR[:VARIANT]", help="print at start the top-1 a fastvit-sweep's BNSL fit "
      "expects at this budget (variant default: fastvit)")
    add_dataclass_flags(p, TrainConfig, exclusive=[("hours", "minutes", "epochs")])
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """preset → --config YAML → flags, each over the one before (config.given_settings: a budget flag
    replaces the file's budget in any unit). The default preset follows the device the flags or the YAML
    ask for (else the machine's); the run dir defaults to runs/<recipe> when neither sets it."""
    known = TrainConfig.leaf_keys()
    given = given_settings({k: v for k, v in vars(args).items() if k in known}, args.config)
    run = given.get("run", {})
    # the default preset is the device's: the one asked for, else (--assume-speed: a GPU machine's) this one's
    device = run.get("device") or ("cuda" if getattr(args, "assume_speed", None) else None)
    cfg = preset_under(args.preset or preset_for_device(device), given)
    if not run.get("out"):
        cfg.run.out = f"runs/{cfg.run.recipe}"
    return cfg


# flags that still count with --resume (everything else comes from the run's saved config)
RESUME_FLAGS = ("out", "resume", "progress")


def ignored_on_resume(args: argparse.Namespace) -> list[str]:
    """The flags the user gave beside --resume that the saved config overrides (argparse default None
    = not given; store_true flags default False)."""
    return [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
            if k not in RESUME_FLAGS and v is not None and v is not False]


def print_expected(spec: str, budget_s: float | None) -> None:
    """One line on stderr: the sweep's BNSL forecast of top-1 at this budget, or why there is none."""
    from fastvit.forecast import BNSLError, expected_top1

    sweep_dir, _, variant = spec.partition(":")
    try:
        if budget_s is None:
            raise BNSLError("the sweep's fit is against wall-clock budgets, this run has none")
        top1, how = expected_top1(sweep_dir, variant or "fastvit", budget_s)
        msg = f"expected final top-1 ≈ {top1:.1f}% ({how}, at {budget_s:.0f} s)"
    except (OSError, BNSLError, KeyError) as e:
        msg = f"no expected top-1 from {spec}: {e}"
    print(f"[fastvit-train] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import TrainError
    from .loop import train
    from .signals import Terminated

    try:
        if args.resume and not args.out:
            raise ConfigError("--resume needs --out RUN_DIR")
        if args.assume_speed and not args.dry_run:
            raise ConfigError("--assume-speed needs --dry-run (a plan for a machine you are not on)")
        if args.dry_run and args.resume:
            raise ConfigError("--dry-run plans a new run; it does not take --resume")
        cfg = config_from_args(args)          # with --resume: used when there is no checkpoint to continue
        if args.dry_run:
            from .dry_run import dry_run

            dry_run(cfg, args.assume_speed, say=print)
            return 0
        ignored = ignored_on_resume(args) if args.resume else []
        if args.expect_from and not args.resume:
            print_expected(args.expect_from, cfg.budget_s)
        res = train(cfg, resume=args.resume, overwrite=args.overwrite, ignored_flags=ignored)
    except ConfigError as e:
        print(f"fastvit-train: error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"fastvit-train: {e}", file=sys.stderr)
        return e.code
    except TrainError as e:
        print(f"fastvit-train: error: {e}", file=sys.stderr)
        return e.code
    except OSError as e:                       # a file the run writes (disk full, permissions): one line
        print(f"fastvit-train: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastvit-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    if res.get("world_size", 1) > 1 and os.environ.get("RANK", "0") != "0":
        return 0                               # torchrun: rank 0 prints the result
    ema = f", EMA {res['ema_top1']:.2f}%" if res.get("ema_top1") is not None else ""
    print(f"final top-1 {res['top1']:.2f}% (top-5 {res['top5']:.2f}%){ema} at {res['eval_res']} px on "
          f"{res['val_images']} val images; {res['steps']}/{res['planned_steps']} steps, "
          f"{res['counted_s']:.0f} counted s; {cfg.run.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
