"""Training on several processes under torchrun: PyTorch's own engine (torch.distributed, DDP).

    torchrun --standalone --nproc-per-node 8 -m fastvit.train --data OUT --hours 2 --out runs/x
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
             --rdzv-id RUN -m fastvit.train ...              # the same command on every node

`DistEnv.from_environ()` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); without torchrun it is
world 1 and nothing here runs a collective: a single process trains exactly as before.

One budget, one plan: rank 0 owns the clock and the planner. Every decision that changes how many
steps are left (the plan, a re-plan on drift, an out-of-memory halving, SIGTERM, a checkpoint being
due) is taken from rank 0's values in `StepAgreement`, one small all-reduce per step, so every rank
steps exactly the same number of times and never waits in a collective another rank has left.
Gradients are averaged by DistributedDataParallel (NCCL on GPUs, gloo on CPU); `--batch-size` is the
global batch, each rank trains on batch / world of it (fastvit.data.order: every world-th sample).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .errors import TrainError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls, environ=None) -> "DistEnv":
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (world 1 when absent)."""
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise TrainError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)", 2) from None
        if world < 1 or not 0 <= rank < world:
            raise TrainError(f"RANK {rank} is outside 0..WORLD_SIZE-1 ({world})", 2)
        return cls(rank=rank, world=world, local_rank=local)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world): the loaders' share of every batch (LoaderOptions.shard)."""
        return (self.rank, self.world)


SINGLE = DistEnv()


def init(denv: DistEnv, device: torch.device) -> None:
    """Join torchrun's process group: NCCL when training on CUDA, gloo on CPU."""
    if not denv.enabled or tdist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kw = {"device_id": device} if device.type == "cuda" else {}
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kw, **_attempt_store(denv))


def _attempt_store(denv: DistEnv) -> dict:
    """Under torchrun the workers share the agent's TCPStore across restarts (torch's rendezvous shares
    it by default), and the process group's keys carry no attempt number: after `--max-restarts`
    restarted the group, a rank could read a peer's address from the attempt before (a dead port) and
    time out in gloo's connect. Each attempt gets its own key prefix instead. Outside torchrun's agent
    store (MASTER_ADDR/PORT set by hand): init_process_group's own env:// store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    from datetime import timedelta

    base = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), denv.world,
                          is_master=False, timeout=timedelta(minutes=10))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": tdist.PrefixStore(f"fastvit/attempt_{attempt}/", base), "rank": denv.rank,
            "world_size": denv.world}


def destroy(denv: DistEnv) -> None:
    if denv.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


def local_device(denv: DistEnv, device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK under torchrun on GPUs."""
    if denv.enabled and device.type == "cuda":
        return torch.device("cuda", denv.local_rank)
    return device


def check_batch(denv: DistEnv, batch: int, what: str = "--batch-size") -> None:
    """The global batch splits into equal, even rank batches (mixup pairs), or one line (exit 2)."""
    if denv.enabled and batch % (2 * denv.world):
        raise TrainError(f"{what} {batch} is the global batch: it must be a multiple of 2 × {denv.world} "
                         f"processes (each rank trains on an even batch / {denv.world})", 2)


def broadcast_object(obj, denv: DistEnv, device: torch.device):
    """Rank 0's `obj` on every rank (a plan, a checkpoint's path)."""
    if not denv.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def all_sum(values, denv: DistEnv, device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a few numbers (float64: exact for counts and rank 0's clock)."""
    if not denv.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()                                                                    # SYNC


def wrap_model(model: torch.nn.Module, denv: DistEnv, device: torch.device,
               find_unused: bool = False) -> torch.nn.Module:
    """DistributedDataParallel over `model` (its parameters broadcast from rank 0 at construction).
    `find_unused`: a step may leave parameters out (progressive growth runs the first d blocks)."""
    if not denv.enabled:
        return model
    ids = [device] if device.type == "cuda" else None
    # gradient_as_bucket_view: the grads live in the all-reduce buckets (no copy). The depthwise conv
    # weight (C,1,3,3) gets its grad with another stride on the size-1 dim: the same memory layout, which
    # DDP's stride check reports anyway. The models hold no buffers (nothing to broadcast per forward).
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                                     find_unused_parameters=find_unused)


@dataclass
class Agreed:
    """What every rank does after a step, from rank 0's decisions and all ranks' events."""
    loss: float | None       # the global batch's mean loss (None: a NaN/inf step, skipped everywhere)
    oom: bool                # every rank ran out of memory: halve in the plan
    stop: bool               # a SIGTERM reached some rank: every rank stops after this step
    ratio: float | None      # rank 0's drift measurement: re-plan with it
    now: float               # rank 0's counted seconds (re-plans and halvings are computed from it)
    ckpt: bool               # rank 0's checkpoint schedule says one is due (rank 0 writes it)


class StepAgreement:
    """One all-reduce per step of [loss, oom, term, ratio, now, ckpt]; rank 0's own decisions are sent
    by rank 0 alone (the others send 0), events any rank saw are summed."""

    def __init__(self, denv: DistEnv, device: torch.device):
        self.denv, self.device = denv, device

    def __call__(self, *, loss: float | None, oom: bool, term: bool, ratio: float | None, now: float,
                 ckpt: bool) -> Agreed:
        d = self.denv
        if not d.enabled:
            return Agreed(loss=loss, oom=oom, stop=term, ratio=ratio, now=now, ckpt=ckpt)
        main = 1.0 if d.is_main else 0.0
        nan = loss is None and not oom
        s = all_sum([0.0 if loss is None else loss, 1.0 if nan else 0.0, 1.0 if oom else 0.0,
                     1.0 if term else 0.0, main * (ratio or 0.0), main * now, main * (1.0 if ckpt else 0.0)],
                    d, self.device)
        l_sum, nans, ooms, terms, r, t, c = s
        if 0 < ooms < d.world:
            raise TrainError(f"out of memory on {int(ooms)} of {d.world} ranks only: the ranks would diverge; "
                             "use a smaller --batch-size", 1)
        loss_mean = None if nans or ooms else l_sum / d.world
        return Agreed(loss=loss_mean, oom=ooms > 0, stop=terms > 0, ratio=r or None, now=t, ckpt=c > 0)


# ------------------------------------------------------------------------------------------------------
# who does what: rank 0 logs, locks and writes the run's files; every rank trains

def main_only(denv: DistEnv, say):
    """The run's one-line messages from rank 0 only."""
    return say if denv.is_main else (lambda msg: None)


class _NoLock:
    """The other ranks' stand-in for rundir.RunLock: rank 0 holds RUN_DIR/.lock for the group (a
    torchrun restart starts a new group after the old one died, and flock died with it)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def hold(self) -> None:
        pass


def run_lock(denv: DistEnv, run_dir):
    from .rundir import RunLock

    return RunLock(run_dir) if denv.is_main else _NoLock()


class NoMetrics:
    """The other ranks' stand-in for metrics.MetricsWriter (rank 0 writes metrics.jsonl / .csv)."""
    rows: list = []

    def log(self, rec: dict) -> None:
        pass

    def close(self) -> None:
        pass


def check_resume(denv: DistEnv, device: torch.device, ck, say) -> None:
    """Every rank resumes from the same checkpoint (the run dir is shared storage), and a run saved at
    another world size says so in one line: the data order is that of the global batches whatever the
    world size (fastvit.data.order), so it continues with the same batches split another way."""
    step = ck.step if ck else -1
    if denv.enabled:
        steps = all_sum([step, step * step], denv, device)
        if steps[0] * steps[0] != denv.world * steps[1]:          # not every rank read the same step
            raise TrainError("the ranks found different checkpoints in the run dir: --out must be on storage "
                             "every node reads (a shared file system)", 2)
    saved = ck.world_size if ck else None
    if saved is not None and saved != denv.world:
        say(f"resuming a run of {saved} process(es) on {denv.world}: the same global batches and plan, "
            f"split into {denv.world} rank batches")


def agreed_oom(fn, denv: DistEnv, device: torch.device, is_oom) -> None:
    """fn() (a probe step) on every rank; an out-of-memory error on any rank is raised on all of them,
    so the planner halves the batch everywhere at once."""
    if not denv.enabled:
        fn()
        return
    try:
        fn()
        oom = False
    except Exception as e:  # noqa: BLE001 - only out-of-memory is agreed on
        if not is_oom(e):
            raise
        oom = True
    n = all_sum([1.0 if oom else 0.0], denv, device)[0]
    if n:
        raise torch.OutOfMemoryError(f"out of memory on {int(n)} of {denv.world} ranks")


def seed_rank(denv: DistEnv, seed: int, step: int) -> None:
    """Under torchrun: the step's random draws (kept patches, mixup, RandAugment) of each rank its own,
    from (seed, rank, step); the model was initialised from the same seed on every rank (and DDP
    broadcast rank 0's weights). One process keeps its RNG as it was."""
    if not denv.enabled:
        return
    import random

    import numpy as np

    s = int(np.random.SeedSequence([seed, denv.rank, step]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def throughput(denv: DistEnv, images: int, seconds: float) -> dict:
    """results.json: the world size and the training loop's images/s, total and per process (rank 0's
    counted seconds of the loop, validation excluded, checkpoints included)."""
    total = images / seconds if seconds > 0 else 0.0
    return {"world_size": denv.world, "images_per_s": round(total, 2),
            "images_per_s_per_process": round(total / denv.world, 2)}
