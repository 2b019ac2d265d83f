"""fastvit.train: `fastvit-train`, a budgeted training run (see loop.py for the run top to bottom).

    from fastvit.train.config import make_config
    from fastvit.train.loop import train
    results = train(make_config("cpu", {"data": "demo_out", "minutes": 3}))

Modules: config (the nested run config, presets, YAML), cli (flags generated from the config),
loop (build → plan → loop → finish), setup (data, device, model, optimizer, EMA), step (one training
step), planner (stages, compile + probe, the budget plan, re-plans, the out-of-memory policy),
schedules (pure functions of progress), evaluate, rundir (new / --overwrite / --resume), checkpoint,
budget (the counted clock), metrics (logs, MFU, curves), augment (mixup/cutmix, RandAugment on uint8).
"""
