"""The run's small rules that several commands share, each written once:

    preset_for_device(device)          the preset a run gets when none is named (cpu on a CPU, else gpu)
    reserve_s(budget_s)                the seconds kept back from the training window for the final checkpoint
    final_resolution(cfg, resolutions) the last curriculum resolution, which is also the evaluation one
    budget_images(cfg, n_train)        an --epochs budget in images

fastvit-train, fastvit-search, fastvit-sweep and the planner read them here (they were written three
times: the reserve in the trainer, the search's window and its probe; the preset in each CLI)."""
from __future__ import annotations

from .errors import TrainError

RESERVE_SHARE, RESERVE_MAX_S = 0.005, 120.0     # the final checkpoint: ~0.02 s on the CPU preset, seconds on a GPU


def preset_for_device(device: str | None) -> str:
    """"cpu" when the run's device (None: this machine's default) is the CPU, else "gpu"."""
    if device is None:
        from fastvit.data.backends import default_device

        device = default_device()
    return "cpu" if str(device) == "cpu" else "gpu"


def reserve_s(budget_s: float) -> float:
    """Seconds of a time budget kept for the final checkpoint (the end of the counted time)."""
    return min(RESERVE_MAX_S, RESERVE_SHARE * budget_s)


def budget_images(cfg, n_train: int) -> int | None:
    """An --epochs budget in images (epochs × the train split); None for a time budget."""
    return None if cfg.budget.epochs is None else int(round(cfg.budget.epochs * n_train))


def final_resolution(cfg, resolutions) -> int:
    """The last curriculum (and the evaluation) resolution: --final-res, else the data's largest; the
    baseline trains and evaluates at --baseline-res when given. A multiple of the patch size."""
    res = cfg.data.final_res or max(resolutions)
    flag = "--final-res" if cfg.data.final_res else "the data's largest resolution"
    if cfg.run.recipe == "baseline" and cfg.data.baseline_res:
        res, flag = cfg.data.baseline_res, "--baseline-res"
    if res % cfg.model.patch_size:
        raise TrainError(f"final resolution {res} ({flag}) is not a multiple of the patch size "
                         f"{cfg.model.patch_size}", 2)
    return res
