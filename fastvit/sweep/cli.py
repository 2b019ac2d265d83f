"""`fastvit-sweep` (ablation sweeps over budgets) and `fastvit-forecast` (BNSL forecast of a sweep).

    fastvit-sweep --data OUT --budgets 2m,4m,8m,16m --variants fastvit,baseline,no-locality,no-curriculum,no-pss \
                  --seeds 2 --out DIR [--forecast 24h]
    fastvit-sweep --list-variants
    fastvit-forecast DIR --at 24h

Errors the user can fix are one line on stderr, exit 2; a forecast refused (too far, or a break beyond
the data) is one line, exit 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastvit.train.config import ConfigError

from fastvit.forecast import bnsl

from . import report, runner, variants

DEFAULT_VARIANTS = "fastvit,baseline,no-locality,no-curriculum,no-pss"


def _data_resolutions(data: str) -> list[int]:
    from fastvit import manifest

    try:
        return list(manifest.read(data)["resolutions"])
    except (OSError, ValueError) as e:
        raise ConfigError(f"--data {data}: not a fastvit-prep output ({str(e).splitlines()[0]})") from None


def _default_preset(device: str | None) -> str:
    from fastvit.data.backends import default_device

    return "cpu" if (device or default_device()) == "cpu" else "gpu"


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvit-sweep", description="Run every (variant, budget, seed) as a complete "
                                "fastvit-train run; write sweep.csv, table.md, plots and a BNSL forecast.")
    a = p.add_argument
    a("--data", help="fastvit-prep output dir")
    a("--budgets", default="2m,4m,8m,16m", help="comma list: 30s, 2m, 1.5h (wall clock) or 3ep (epochs)")
    a("--variants", default=DEFAULT_VARIANTS, help="comma list of variant names (--list-variants), key=value "
      "overrides, NAME=FILE.yaml (a file's settings, e.g. fastvit-search's best.yaml), or these joined by '+' "
      "(no-pss+lr=3e-3)")
    a("--seeds", type=int, default=1, help="seeds 0..N-1 per (variant, budget)")
    a("--out", help="sweep dir (resumable: finished runs are never re-run)")
    a("--preset", help="fastvit-train preset (default: cpu on CPU, gpu on CUDA)")
    a("--device", help="cpu or cuda")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="a fastvit-train setting for every run")
    a("--schedule", choices=("independent", "wsd", "both"), default="independent", help="independent: one complete "
      "run per point; wsd: one constant-LR trunk per (variant, seed) with a decay branch per budget "
      "(warmup-stable-decay); both: the two, to compare them")
    a("--wsd-variants", help="with --schedule both: the variants that also get WSD points (default: all)")
    a("--wsd-decay", type=float, default=0.2, help="the WSD branch's share of its budget")
    a("--jobs", type=int, default=1, help="runs at once (default 1). CPU: the cores are shared out (threads "
      "and loader workers = cores // jobs each); CUDA: run k sees GPU k mod the visible GPUs. Runs at once share "
      "the machine, so a time budget buys each of them less: compare runs made with the same --jobs")
    a("--forecast", metavar="TIME", help="after the sweep: BNSL forecast at this budget, e.g. 24h")
    a("--max-factor", type=float, default=bnsl.DEFAULT_MAX_FACTOR, help="refuse forecasts further than this "
      "factor beyond the largest budget")
    a("--list-variants", action="store_true", help="print the named variants and exit")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def sweep_main(argv=None) -> int:
    args = sweep_parser().parse_args(argv)
    if args.list_variants:
        print(variants.listing())
        return 0
    try:
        if not args.data or not args.out:
            raise ConfigError("give --data OUT and --out DIR")
        if args.seeds < 1:
            raise ConfigError("--seeds must be >= 1")
        if args.jobs < 1:
            raise ConfigError("--jobs must be >= 1")
        if not 0 < args.wsd_decay < 1:
            raise ConfigError("--wsd-decay must be in (0, 1)")
        budgets = [runner.parse_budget(b) for b in args.budgets.split(",") if b.strip()]
        raw = [v.strip() for v in args.variants.split(",") if v.strip()]
        items: dict = {}                                    # label -> item
        for v in raw:
            lab = variants.label(v)
            if lab in items:
                raise ConfigError(f"variant {lab!r} is given twice")
            items[lab] = v
        names = list(items)
        if not budgets or not names:
            raise ConfigError("give at least one budget and one variant")
        if len({b.label for b in budgets}) < len(budgets):
            raise ConfigError("budgets must not repeat")
        if args.jobs > 1 and args.device and args.device.startswith("cuda:"):
            raise ConfigError(f"--device {args.device} with --jobs: give --device cuda (run k gets GPU k mod the "
                              "visible GPUs; CUDA_VISIBLE_DEVICES picks them)")
        target = runner.parse_seconds(args.forecast) if args.forecast else None
        preset = args.preset or _default_preset(args.device)
        common = variants.parse_overrides(args.set)
        res = _data_resolutions(args.data)
        per_variant = {v: {**common, **variants.check(items[v], preset, common, res)} for v in names}
        out = Path(args.out)
        wsd_names = names
        if args.wsd_variants:
            if args.schedule != "both":
                raise ConfigError("--wsd-variants goes with --schedule both")
            wsd_names = list(dict.fromkeys(variants.label(v.strip()) for v in args.wsd_variants.split(",") if v.strip()))
            if not wsd_names:
                raise ConfigError("--wsd-variants is empty")
            if not set(wsd_names) <= set(names):
                raise ConfigError(f"--wsd-variants {', '.join(sorted(set(wsd_names) - set(names)))}: not in --variants")
        independent = runner.plan_jobs(out, names, budgets, args.seeds)
        wsd = runner.plan_wsd_jobs(out, wsd_names, budgets, args.seeds, args.wsd_decay)
    except ConfigError as e:
        print(f"fastvit-sweep: error: {e}", file=sys.stderr)
        return 2
    # both: the WSD chains first, so their trunks are not the sweep's tail (with --jobs > 1 they run beside it)
    jobs = {"wsd": wsd, "independent": independent, "both": wsd + independent}[args.schedule]
    (out / "configs").mkdir(parents=True, exist_ok=True)
    import yaml

    for v, ov in per_variant.items():
        path = out / "configs" / f"{runner.slug(v)}.yaml"
        path.write_text(yaml.safe_dump(ov, sort_keys=True))
    (out / "sweep.json").write_text(json.dumps({"data": args.data, "preset": preset, "device": args.device,
                                                "budgets": [b.label for b in budgets], "variants": per_variant,
                                                "seeds": args.seeds}, indent=1))
    import signal

    def _term(signum, frame):           # SIGTERM: stop the runs like Ctrl-C (each is re-run whole next time)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        failed = runner.run_jobs(jobs, args.data, preset, args.device, progress=args.progress,
                                 say=lambda m: print(m, file=sys.stderr, flush=True), jobs_at_once=args.jobs,
                                 own_workers={v for v, ov in per_variant.items() if "workers" in ov})
    except KeyboardInterrupt:
        print("fastvit-sweep: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    rows = runner.collect(independent) + runner.collect(wsd)     # both kinds when both were run: compared
    report.write_all(rows, out)
    print(report.table(rows), end="")
    print(f"wrote {out}/sweep.csv, {out}/table.md, {out}/top1_vs_budget.png")
    if args.schedule != "independent":
        (out / "wsd.md").write_text(report.wsd_md(rows, runner.wsd_saving(wsd, args.wsd_decay), args.wsd_decay))
        print((out / "wsd.md").read_text(), end="")
    rc = 1 if failed else 0
    if target is not None and rows:
        rc = max(rc, _forecast(rows, out, target, args.forecast, args.max_factor))
    return rc


def _forecast(rows, out: Path, target_s: float, label: str, max_factor: float) -> int:
    fc = report.write_forecast(rows, out, target_s, label, max_factor=max_factor)
    print(report.forecast_md(fc, label), end="")
    print(f"wrote {out}/forecast.md, {out}/forecast.json, {out}/forecast.png")
    refused = [f"{v}: {a['refused']}" for v, f in fc.items()
               for a in ([f] if "refused" in f else [f["seconds"], f["images"]]) if "refused" in a]
    for line in refused:
        print(f"fastvit-forecast: {line}", file=sys.stderr)
    return 1 if refused else 0


def forecast_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvit-forecast", description="BNSL forecast of a fastvit-sweep's top-1 at "
                                "a bigger budget (fit: grid + Levenberg-Marquardt on log(error + 1)).")
    p.add_argument("dir", help="a fastvit-sweep --out dir (holds sweep.csv)")
    p.add_argument("--at", required=True, metavar="TIME", help="the budget to forecast, e.g. 24h")
    p.add_argument("--variant", action="append", help="only this variant (repeatable)")
    p.add_argument("--max-factor", type=float, default=bnsl.DEFAULT_MAX_FACTOR,
                   help="refuse forecasts further than this factor beyond the largest budget")
    return p


def forecast_main(argv=None) -> int:
    args = forecast_parser().parse_args(argv)
    try:
        target = runner.parse_seconds(args.at)
        path = Path(args.dir) / "sweep.csv"
        if not path.is_file():
            raise ConfigError(f"{path} not found: run fastvit-sweep --out {args.dir} first")
        rows = report.read_csv(path)
        if args.variant:
            unknown = sorted(set(args.variant) - {r["variant"] for r in rows})
            if unknown:
                raise ConfigError(f"no runs of variant(s) {', '.join(unknown)} in {path}")
            rows = [r for r in rows if r["variant"] in args.variant]
        if args.max_factor <= 1:
            raise ConfigError("--max-factor must be > 1")
    except ConfigError as e:
        print(f"fastvit-forecast: error: {e}", file=sys.stderr)
        return 2
    return _forecast(rows, Path(args.dir), target, args.at, args.max_factor)


if __name__ == "__main__":
    sys.exit(sweep_main())
