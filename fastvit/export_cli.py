"""`fastvit-export`: a run's model as a folder another person loads without fastvit's trainer.

    fastvit-export runs/x --out exported/x [--format safetensors|timm] [--ema|--raw] [--data OUT]

OUT/model.safetensors   the weights (the run's newest intact checkpoint; a grown run at its depth)
OUT/config.json         architecture, model config / timm model_args, class names (label_names), the
                        preprocessing (pretrained_cfg: input size, mean/std, center crop)
OUT/results.json        the run's results.json (and eval.json, when fastvit-eval wrote one)
OUT/README.md           a short model card: data, budget, machine, top-1, how to load it

--format safetensors (default): fastvit's LocalityViT, any variant:
    from fastvit.models.export import load_export; m = load_export("OUT")      # m(uint8 images)
--format timm: `_plain` variants as timm's VisionTransformer:
    timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg["model_args"]) +
    load_state_dict(safetensors.torch.load_file("OUT/model.safetensors")), or
    timm.create_model("local-dir:OUT", pretrained=True)
A locality model has no timm counterpart (its MLP holds a depthwise conv): one line, exit 2.
The writers live in fastvit.models.export (export_folder); the run is read by fastvit.eval.load_run.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from fastvit.train.errors import TrainError

PROG = "fastvit-export"
EXPORT_FILES = ("model.safetensors", "config.json", "results.json", "eval.json", "README.md")


def build_parser() -> argparse.ArgumentParser:
    from fastvit.models.export import FORMATS

    p = argparse.ArgumentParser(prog=PROG, description="Export a fastvit-train run as a self-contained folder "
                                "(weights, config, class names, preprocessing, results, model card).")
    a = p.add_argument
    a("run", metavar="RUN_DIR|CHECKPOINT", help="a run dir (its newest intact checkpoint) or a ckpt_*.pt file")
    a("--out", required=True, help="folder to write (created; must be empty unless --overwrite)")
    a("--format", choices=FORMATS, default="safetensors",
      help="safetensors: fastvit's model, any variant (default); timm: timm VisionTransformer weights (_plain variants)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--ema", dest="weights", action="store_const", const="ema", help="the EMA weights")
    w.add_argument("--raw", dest="weights", action="store_const", const="raw", help="the trained weights (default)")
    a("--data", help="the prepped data the run trained on, for its class names when the run's own path moved")
    a("--overwrite", action="store_true", help="replace the files of an earlier export in --out")
    return p


def export_run(args) -> Path:
    from fastvit.augspec import DEFAULT_AUG
    from fastvit.data import DataError, open_dataset
    from fastvit.eval import check_classes, load_run, run_data
    from fastvit.fileio import write_bytes_atomic
    from fastvit.models.export import export_folder

    rm = load_run(args.run, args.weights, "cpu", log=lambda s: print(f"[{PROG}] {s}", file=sys.stderr))
    if rm.cfg.run.recipe == "baseline":
        raise TrainError("the baseline recipe's model is timm's own VisionTransformer: its checkpoint's weights "
                         "(under model.*) load into timm directly; fastvit-export writes fastvit-recipe runs", 2)
    if args.format == "timm" and rm.model.cfg.local:
        raise TrainError(f"{rm.cfg.model.name} has locality layers (a depthwise conv inside each MLP) that timm's "
                         "VisionTransformer has no equivalent for: use --format safetensors (fastvit.models."
                         "export.load_export), or train a _plain variant", 2)
    ds = None
    if args.data:
        try:
            ds = open_dataset(args.data)
        except (DataError, OSError) as e:
            raise TrainError(f"--data {args.data}: {e}", 2) from None
        check_classes(rm, ds)
        classes = list(ds.classes)
    elif rm.classes is not None:
        classes = list(rm.classes)
    else:
        raise TrainError(f"the run's data ({rm.cfg.data.root}) is not readable here, so its class names are "
                         "unknown: pass --data OUT (the prepped data it trained on)", 2)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file", 2)
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise TrainError(f"--out {out} is not empty: pass --overwrite to replace an earlier export", 2)
        for name in EXPORT_FILES:
            (out / name).unlink(missing_ok=True)
    res = rm.run_res or rm.model.cfg.img_size
    config = export_folder(rm.model, out, fmt=args.format, res=res, crop_pct=DEFAULT_AUG.val_crop,
                           label_names=classes,
                           extra={"fastvit": {"checkpoint": str(rm.checkpoint), "step": rm.step, "weights": rm.weights,
                                              "model": rm.cfg.model.name, "depth": rm.depth}})
    if rm.results is not None:                                  # a run in progress has no results yet
        shutil.copyfile(rm.run_dir / "results.json", out / "results.json")
    if _this_checkpoint(rm, rm.run_dir / "eval.json"):          # fastvit-eval's grid of these weights
        shutil.copyfile(rm.run_dir / "eval.json", out / "eval.json")
    write_bytes_atomic(out / "README.md", model_card(rm, config, ds or run_data(rm.cfg), args.format).encode())
    return out


def _this_checkpoint(rm, path: Path) -> bool:
    from fastvit.eval import read_json

    got = read_json(path)
    return got is not None and Path(str(got.get("checkpoint"))).name == rm.checkpoint.name and \
        got.get("step") == rm.step and got.get("weights") == rm.weights


def _budget(cfg, results: dict | None) -> str:
    b = cfg.budget
    if b.hours is not None:
        s = f"{b.hours:g} h"
    elif b.minutes is not None:
        s = f"{b.minutes:g} min"
    elif b.epochs is not None:
        s = f"{b.epochs:g} epochs (an image budget)"
    else:
        s = "none recorded"
    if results:
        s += (f"; {results['counted_s']:.0f} counted s, {results['steps']} steps, "
              f"{results['images_seen']:,} images seen")
    return s


def model_card(rm, config: dict, ds, fmt: str) -> str:
    """README.md of the export: what the model is, its data, budget, machine and top-1, how to load it."""
    cfg, res, m = rm.cfg, rm.results, rm.model.cfg
    pre = config["pretrained_cfg"]
    side = pre["input_size"][-1]
    kind = "locality ViT (a 3x3 depthwise conv in each MLP)" if m.local else "plain ViT (timm's block)"
    data = f"`{cfg.data.root}`" + (f" ({ds.num_classes} classes, {ds.count('train'):,} train images)"
                                   if ds is not None and "train" in ds.splits else f" ({config['num_classes']} classes)")
    if res:
        mine, other = ("ema_", "") if rm.weights == "ema" else ("", "ema_")     # these weights' number first
        also = f"; {'EMA' if other else 'raw'} weights {res[other + 'top1']:.2f}%" \
            if res.get(other + "top1") is not None else ""
        top1 = (f"**{res[mine + 'top1']:.2f}%** (top-5 {res[mine + 'top5']:.2f}%) at {res['eval_res']} px on "
                f"{res['val_images']:,} val images{also}")
        machine = f"{res['device_name']}, backend {res['backend']}"
    else:
        top1 = f"not measured yet: the run was still training (step {rm.step}); `fastvit-eval` measures it"
        machine = "see the run's metrics"
    rows = [("model", f"`{cfg.model.name}`: {kind}, depth {rm.depth}, width {m.embed_dim}, patch {m.patch_size}, "
                      f"{rm.params_m:.2f} M parameters, trained from scratch by fastvit-train ({cfg.run.recipe} recipe)"),
            ("data", data), ("budget", _budget(cfg, res)), ("machine", machine), ("top-1", top1),
            ("weights", f"{rm.weights}, checkpoint step {rm.step} (`{rm.checkpoint.name}`)")]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if fmt == "timm":
        load = ("import json, timm\nfrom safetensors.torch import load_file\n\n"
                "cfg = json.load(open(\"config.json\"))\n"
                "model = timm.create_model(cfg[\"architecture\"], num_classes=cfg[\"num_classes\"], **cfg[\"model_args\"])\n"
                "model.load_state_dict(load_file(\"model.safetensors\"))\n"
                "# or: timm.create_model(\"local-dir:.\", pretrained=True)\n"
                "logits = model(normalized_images)   # float (B,3,H,W), (x/255 - mean) / std")
    else:
        load = ("from fastvit.models.export import load_export\n\n"
                "model = load_export(\".\").eval()     # fastvit.models (no trainer needed)\n"
                "logits = model(uint8_images)          # (B,3,H,W) 0-255; the model normalizes itself\n"
                "logits = model(uint8_images, keep_rate=0.5)   # half the patches (tokens): see eval.json for the cost")
    labels = ", ".join(config.get("label_names", [])[:5]) + (" ..." if len(config.get("label_names", [])) > 5 else "")
    return f"""# {cfg.model.name} ({Path(rm.run_dir).name})

{table}

## Preprocessing

RGB; resize the shorter side to {round(side / pre['crop_pct'])} px and center-crop {side}x{side} (crop_pct
{pre['crop_pct']:.3f}); any side that is a multiple of {m.patch_size} works. mean {_three(pre['mean'])}, std
{_three(pre['std'])} (0-1 units). Label i is `label_names[i]` in config.json ({labels}).

## Load ({fmt} format)

```python
{load}
```

Files: `model.safetensors` (weights), `config.json` (architecture, preprocessing, class names),
`results.json` (the run's own results){' and `eval.json` (fastvit-eval: top-1 and speed per res x keep)' if _this_checkpoint(rm, rm.run_dir / 'eval.json') else ''}.
"""


def _three(v) -> str:
    return "(" + ", ".join(f"{x:.3f}" for x in v) + ")"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_run(args)
    except TrainError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code
    except OSError as e:
        print(f"{PROG}: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 1
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {args.run} ({args.format}) to {out}: {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
