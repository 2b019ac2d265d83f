"""`fastvit-train`: the command line over TrainConfig and the training loop.

    fastvit-train --data OUT --hours 24 [--model vit_small_local] [--out runs/x]
    fastvit-train --data demo_out --minutes 3 --device cpu --out runs/demo      # CPU preset applies
    fastvit-train --out runs/x --resume                                          # after a crash

Errors the user can fix are one line on stderr (exit 2 usage, 1 runtime), never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from .config import PRESETS, ConfigError, TrainConfig, make_config


def _pair(text: str) -> tuple[float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) != 2:
        raise argparse.ArgumentTypeError("give one value or 'start,end'")
    return (parts[0], parts[1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastvit-train",
        description="Train a ViT from scratch within a wall-clock budget (curriculum + patch sampling).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=None)
    a = p.add_argument
    a("--data", help="fastvit-prep output dir (holds manifest.json)")
    a("--out", help="run dir (plan, checkpoints, metrics, results.json, curves.png)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--hours", type=float, help="budget in hours")
    b.add_argument("--minutes", type=float, help="budget in minutes")
    b.add_argument("--epochs", type=float, help="budget in images: N × train images (comparisons by epochs)")
    a("--resume", action="store_true", default=False, help="continue the run in --out from its last good checkpoint")
    a("--overwrite", action="store_true", default=False, help="start over in an --out that holds a run (finished or not), replacing its files")
    a("--preset", choices=sorted(PRESETS), help="named settings (default: gpu on CUDA, cpu otherwise)")
    a("--config", help="YAML file of settings (keys as in TrainConfig)")
    a("--recipe", choices=["fastvit", "baseline"])
    a("--model", help="vit_{tiny,small,base}_{local,plain}")
    a("--depth", type=int, help="override the model depth (small CPU runs)")
    a("--embed-dim", type=int)
    a("--num-heads", type=int)
    a("--patch-size", type=int)
    a("--device", help="cpu or cuda (default: cuda when available)")
    a("--backend", choices=["ffcv", "dali", "torchvision", "gpu_resident"])
    a("--workers", type=int)
    a("--seed", type=int)
    a("--final-res", type=int, help="last curriculum resolution and the evaluation resolution")
    a("--curriculum", help="res:share,... e.g. 64:0.4,128:0.35,224:0.25")
    a("--curriculum-stages", type=int)
    a("--keep-schedule", choices=["fixed", "linear", "cyclic", "cosine"])
    a("--keep-min", type=float)
    a("--keep-full-from", type=float, help="progress from which all patches are used")
    a("--keep-cycles", type=int)
    a("--batch-size", type=int, help="batch at the final res with all patches")
    a("--const-tokens", action=argparse.BooleanOptionalAction, help="constant tokens per batch across stages")
    a("--max-batch", type=int)
    a("--lr", type=float)
    a("--lr-scaling", choices=["linear", "sqrt", "none"])
    a("--lr-decay", choices=["linear", "cosine"])
    a("--warmup", type=float, help="share of training")
    a("--weight-decay", type=float)
    a("--clip-grad", type=float)
    a("--label-smoothing", type=float)
    a("--mixup", type=float, help="mixup alpha")
    a("--cutmix", type=float, help="cutmix alpha")
    a("--mix-prob", type=_pair, help="mixup/cutmix probability, 'start,end'")
    a("--randaug", type=_pair, help="RandAugment magnitude 0-30, 'start,end' (0 = off)")
    a("--drop-path", type=_pair, help="drop path rate, 'start,end'")
    a("--ema", action=argparse.BooleanOptionalAction)
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on for cuda)")
    a("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on for cuda)")
    a("--ckpt-minutes", type=float)
    a("--ckpt-every-steps", type=int)
    a("--evals", type=int, help="periodic validations during training (not counted)")
    a("--log-every", type=int)
    a("--baseline-res", type=int, help="--recipe baseline: fixed resolution (default: final res)")
    a("--progress", action=argparse.BooleanOptionalAction, help="progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    known = TrainConfig.known_keys()
    overrides = {k: v for k, v in vars(args).items() if k in known}
    preset = args.preset
    if preset is None:
        import torch

        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        preset = "cpu" if dev == "cpu" else "gpu"
    return make_config(preset, overrides, args.config)


# flags that still count with --resume (everything else comes from the run's saved config)
RESUME_FLAGS = ("out", "resume", "progress")


def ignored_on_resume(args: argparse.Namespace) -> list[str]:
    """The flags the user gave beside --resume that the saved config overrides (argparse default None
    = not given; store_true flags default False)."""
    return [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
            if k not in RESUME_FLAGS and v is not None and v is not False]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .loop import TrainError, train

    try:
        if args.resume:
            if not args.out:
                raise ConfigError("--resume needs --out RUN_DIR")
            cfg = TrainConfig(out=args.out, progress=args.progress if args.progress is not None else True)
        else:
            cfg = config_from_args(args)
            if not args.out:
                cfg.out = f"runs/{cfg.recipe}"
        ignored = ignored_on_resume(args) if args.resume else []
        res = train(cfg, resume=args.resume, overwrite=args.overwrite, ignored_flags=ignored)
    except ConfigError as e:
        print(f"fastvit-train: error: {e}", file=sys.stderr)
        return 2
    except TrainError as e:
        print(f"fastvit-train: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("fastvit-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    ema = f", EMA {res['ema_top1']:.2f}%" if res.get("ema_top1") is not None else ""
    print(f"final top-1 {res['top1']:.2f}% (top-5 {res['top5']:.2f}%){ema} at {res['eval_res']} px on "
          f"{res['val_images']} val images; {res['steps']}/{res['planned_steps']} steps, "
          f"{res['counted_s']:.0f} counted s; {cfg.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
