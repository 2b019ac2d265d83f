"""Training on several processes (torchrun / DDP, gloo on CPU, 2 processes): the ranks' shards of every
batch, 2 processes following 1 with the same global batch, one plan for every rank when it changes
mid-run (a re-plan, an out-of-memory halving), checkpoints from rank 0 resumed on 2 ranks, and a
worker killed mid-run that torchrun restarts and that resumes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastvit.data.order import BatchPlan
from fastvit.stage import Stage
from fastvit.train import checkpoint as C

# deterministic steps: all patches, no mixup / RandAugment / drop-path (the test preset), the
# gpu_resident loader (its crops are drawn per global batch, so 2 ranks crop as 1 process does)
TINY = ["--preset", "test", "--device", "cpu", "--backend", "gpu_resident", "--keep-min", "1", "--no-progress",
        "--workers", "1"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _train_rows(run: Path) -> list[dict]:
    rows = (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["kind"] == "train"]


def _torchrun(args, nproc=2, extra=(), timeout=240, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *extra,
           "-m", "fastvit.train", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, **kw)


# ------------------------------------------------------------------------------------------------------
# the order function's shards (pure)

@pytest.mark.parametrize("world", [2, 4])
def test_rank_shards_are_disjoint_and_cover_every_batch_and_epoch(world):
    stages = [Stage(res=32, batch_size=16, steps=7), Stage(res=64, batch_size=8, steps=9)]
    one = BatchPlan(60, stages, [3, 4])
    ranks = [BatchPlan(60, stages, [3, 4], rank=r, world=world) for r in range(world)]
    for g in range(one.total_steps):
        parts = [p.batch(g).indices for p in ranks]
        assert all(len(x) == one.batch(g).indices.size // world for x in parts)
        joined = np.concatenate(parts)
        assert len(set(joined.tolist())) == len(joined)                           # disjoint
        assert sorted(joined.tolist()) == sorted(one.batch(g).indices.tolist())     # the one-process batch
        assert {p.batch(g).epoch for p in ranks} == {one.batch(g).epoch}
    # a backend that batches a flat order itself (FFCV) gets the same rank batches
    for p in ranks:
        lb = p.local_batch_size(stages[0])
        flat = p.rank_epoch_order(0, 1)
        nb = p.batches_per_epoch(0)
        for b in range(nb):
            assert np.array_equal(flat[b * lb:(b + 1) * lb], p.batch(nb + b).indices)


def test_evaluation_shards_cover_the_split_once_without_empty_batches():
    stage = [Stage(res=32, batch_size=8, steps=1)]
    n = 21                                                        # 21 % 8 = 5: an uneven last batch
    seen = []
    for r in range(2):
        p = BatchPlan(n, stage, [0], endless=True, drop_last=False, shuffle="fixed", rank=r, world=2)
        batches = [p.batch(g).indices for g in range(p.batches_per_epoch(0))]
        assert all(0 < len(b) <= 4 for b in batches)
        seen += [i for b in batches for i in b.tolist()]
    assert sorted(seen) == list(range(n))


def test_a_global_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="does not split into 4"):
        BatchPlan(64, [Stage(res=32, batch_size=18, steps=2)], [0], rank=0, world=4)


@pytest.fixture(scope="module")
def true_labels(tiny_src):
    """Label of stored sample i per split (ImageFolder order = prep order)."""
    from torchvision.datasets import ImageFolder

    return {split: np.asarray(ImageFolder(str(tiny_src / split)).targets) for split in ("train", "val")}


@pytest.mark.parametrize("backend", ["dali", "gpu_resident", "torchvision", "ffcv"])
def test_every_backend_serves_its_rank_share_of_each_batch(tiny_prepped, backend, true_labels):
    from fastvit.data import make_loader, make_val_loader, open_dataset

    ds = open_dataset(tiny_prepped)
    kw = dict(device="cpu", workers=0 if backend == "torchvision" else 1, **({"ffcv_jit": False} if backend == "ffcv" else {}))
    one = BatchPlan(64, [Stage(res=32, batch_size=16, steps=8)], [5])        # the one-process order
    train_seen, val_seen = [[], []], []
    for r in range(2):
        it = make_loader(ds, "train", res=32, batch_size=16, backend=backend, seed=5, shard=(r, 2), **kw)
        for g in range(8):                                                   # two epochs of 4 batches
            images, labels = it.next_batch()
            assert images.shape == (8, 3, 32, 32)
            want = one.batch(g).indices[r::2]                                # every other sample of batch g
            assert labels.tolist() == true_labels["train"][want].tolist()
            train_seen[g // 4] += want.tolist()
        it.close()
        val = make_val_loader(ds, res=32, batch_size=10, backend=backend, shard=(r, 2), **kw)
        val_seen += [y for _, ys in val for y in ys.tolist()]
        val.close()
    assert all(sorted(e) == list(range(64)) for e in train_seen)            # disjoint, together the epoch
    assert sorted(val_seen) == sorted(true_labels["val"].tolist())          # every val image once


def test_without_torchrun_one_process_and_no_collective():
    from fastvit.train.dist import DistEnv, StepAgreement
    from fastvit.train.errors import TrainError

    d = DistEnv.from_environ({})
    assert (d.rank, d.world, d.enabled, d.is_main) == (0, 1, False, True)
    assert DistEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).shard == (1, 2)
    with pytest.raises(TrainError, match="outside"):
        DistEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2"})
    ag = StepAgreement(d, device=None)(loss=1.5, oom=False, term=True, ratio=0.9, now=3.0, ckpt=True)
    assert (ag.loss, ag.oom, ag.stop, ag.ratio, ag.now, ag.ckpt) == (1.5, False, True, 0.9, 3.0, True)


# ------------------------------------------------------------------------------------------------------
# whole runs under torchrun (subprocesses, --standalone rendezvous)

def test_two_processes_follow_one_with_the_same_global_batch_then_resume_on_two(tiny_prepped, tmp_path):
    from fastvit.train.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--data", str(tiny_prepped), "--epochs", "3", "--ckpt-every-steps", "4", "--evals", "1", *TINY]
    assert main(["--out", str(one), *common]) == 0
    proc = _torchrun(["--out", str(two), *common])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final top-1") == 1                  # rank 0 prints, logs and writes
    assert proc.stderr.count("plan: res") == 1
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert r2["images_per_s"] > 0 and r2["images_per_s_per_process"] == pytest.approx(r2["images_per_s"] / 2, rel=1e-3)
    assert r2["steps"] == r1["steps"] == 12 and r2["images_seen"] == r1["images_seen"]
    l1 = [r["loss"] for r in _train_rows(one)]
    l2 = [r["loss"] for r in _train_rows(two)]
    assert len(l2) == 12 and [r["step"] for r in _train_rows(two)] == list(range(1, 13))   # one writer
    np.testing.assert_allclose(l2, l1, rtol=2e-4, atol=2e-5)      # the same steps, gradients averaged
    assert r2["val_images"] == r1["val_images"] == 24             # sharded validation, counts summed
    assert r2["top1"] == pytest.approx(r1["top1"], abs=1e-6)

    # checkpoints from rank 0 only (the last two), resumed on 2 ranks: the newest one and the results
    # go, the run continues from step 8 and trains steps 9..12 as before
    ckpts = C.checkpoint_paths(two)
    assert [C.load_checkpoint(p)["step"] for p in ckpts] == [12, 8]
    assert C.load_checkpoint(ckpts[0])["world_size"] == 2
    ckpts[0].unlink()
    (two / "results.json").unlink()
    proc = _torchrun(["--out", str(two), "--resume", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from ckpt_00000008.pt: step 8" in proc.stderr
    rows = _train_rows(two)
    assert [r["step"] for r in rows] == list(range(1, 13))
    np.testing.assert_allclose([r["loss"] for r in rows], l1, rtol=2e-4, atol=2e-5)

    # the same checkpoint resumed by one process: one line says so, and the same batches follow
    ckpts = C.checkpoint_paths(two)
    ckpts[0].unlink()
    (two / "results.json").unlink()
    msgs = []
    from fastvit.train.loop import train
    from fastvit.train.config import TrainConfig

    os.environ.pop("TRITON_INTERPRET", None)
    cfg = TrainConfig.from_dict(C.load_checkpoint(ckpts[1])["config"])
    cfg.run.out = str(two)
    res = train(cfg, resume=True, log=msgs.append)
    assert any("resuming a run of 2 process(es) on 1" in m for m in msgs)
    assert res["steps"] == 12
    np.testing.assert_allclose([r["loss"] for r in _train_rows(two)], l1, rtol=2e-4, atol=2e-5)


def test_a_batch_that_does_not_split_over_the_processes_is_one_line(tiny_prepped, tmp_path):
    proc = _torchrun(["--data", str(tiny_prepped), "--out", str(tmp_path / "r"), "--epochs", "1",
                      "--batch-size", "14", *TINY], timeout=120)
    assert proc.returncode != 0                                  # torchrun reports its workers' exit code 2
    assert "exitcode  : 2" in proc.stderr
    assert "fastvit-train: error: --batch-size 14 is the global batch: it must be a multiple of 2 × 2 processes" \
        in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers_of(pid: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes (its children with RANK in their environment)."""
    out = {}
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(child)
    return out


def test_a_killed_worker_is_restarted_by_torchrun_and_resumes(tiny_prepped, tmp_path):
    run = tmp_path / "run"
    # the supervisor's one command line: --resume starts from the beginning when there is no checkpoint
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", "fastvit.train", "--data", str(tiny_prepped), "--out", str(run),
           "--resume", "--epochs", "40", "--ckpt-every-steps", "20", "--log-every", "1", *TINY]
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=f)
    try:
        t0 = time.time()
        while not C.checkpoint_paths(run) and time.time() - t0 < 150 and proc.poll() is None:
            time.sleep(0.05)
        assert C.checkpoint_paths(run), "no checkpoint before the run ended: " + err.read_text()[-2000:]
        workers = _workers_of(proc.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)                       # a worker dies mid-run, no clean-up
        rc = proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = err.read_text()
    assert rc == 0, log[-3000:]
    assert "resuming from ckpt_" in log                         # the restarted group read rank 0's checkpoint
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == res["planned_steps"] == 40 * 64 // 16 and res["world_size"] == 2
    steps = [r["step"] for r in _train_rows(run)]
    assert steps == list(range(1, res["steps"] + 1))             # no step lost or logged twice


# ------------------------------------------------------------------------------------------------------
# one plan for every rank: spawned ranks that report their own step counts

def _rank(rank: int, world: int, port: int, argv: list, fault: str, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    torch.set_num_threads(1)
    FAULTS[fault](rank)
    from fastvit.train import step as step_mod
    from fastvit.train.cli import build_parser, config_from_args
    from fastvit.train.errors import TrainError
    from fastvit.train.loop import train

    rows, call = [], step_mod.TrainStep.__call__

    def counted(self, images, *a, probe=False, **kw):          # the rows this rank trains on, per step
        if not probe:
            rows.append(int(images.shape[0]))
        return call(self, images, *a, probe=probe, **kw)
    step_mod.TrainStep.__call__ = counted
    try:
        res = train(config_from_args(build_parser().parse_args(argv)))
        out.put((rank, "ok", dict(res, rows=rows)))
    except TrainError as e:
        out.put((rank, "error", str(e)))


def _replan_on_rank0_at_step_6(rank: int) -> None:
    """Rank 0's clock sees the run at half the planned speed at step 6 (the others see nothing)."""
    from fastvit.train import planner

    orig = planner.DriftMonitor.check

    def check(self, now, plan, step, reserve_s=None):
        if rank == 0 and step == 6 and not plan.replans:
            return 0.5
        return orig(self, now, plan, step, reserve_s) if rank == 0 else None
    planner.DriftMonitor.check = check


def _oom_at_step(ranks, after: bool = False) -> callable:
    def patch(rank: int) -> None:
        """Step 3 runs out of memory on `ranks` (once): in the forward pass, or (`after`) past the
        gradients' all-reduce (where an optimizer allocating its state would)."""
        from fastvit.train import step as step_mod

        orig = step_mod.TrainStep.__call__
        state = {"n": 0}

        def call(self, *a, probe=False, **kw):
            hit = not probe and rank in ranks and state["n"] == 2
            state["n"] += 0 if probe else 1
            if hit and not after:
                raise RuntimeError("CUDA out of memory (simulated)")
            loss = orig(self, *a, probe=probe, **kw)
            if hit:
                raise RuntimeError("CUDA out of memory (simulated)")
            return loss
        step_mod.TrainStep.__call__ = call
    return patch


FAULTS = {"none": lambda rank: None, "replan": _replan_on_rank0_at_step_6,
          "oom_all": _oom_at_step({0, 1}), "oom_one": _oom_at_step({1}, after=True)}


def _spawn(argv: list, fault: str, world: int = 2, timeout: float = 150) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, argv, fault, out)) for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    try:
        t0 = time.time()
        while len(got) < world and time.time() - t0 < timeout:
            try:
                rank, kind, val = out.get(timeout=1)
                got[rank] = (kind, val)
            except Exception:  # noqa: BLE001 - queue.Empty: a rank still running
                if all(p.exitcode not in (None, 0) for p in procs):
                    break
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return got


def test_every_rank_steps_the_same_when_rank0_replans_mid_run(tiny_prepped, tmp_path):
    argv = ["--data", str(tiny_prepped), "--out", str(tmp_path / "r"), "--minutes", "0.2", *TINY]
    got = _spawn(argv, "replan")
    assert set(got) == {0, 1} and all(k == "ok" for k, _ in got.values()), got
    r0, r1 = got[0][1], got[1][1]
    assert r0["replans"] >= 1 and r1["replans"] == r0["replans"]   # rank 0's decision, applied by both
    assert r0["steps"] == r1["steps"] == r0["planned_steps"] == r1["planned_steps"]
    plan = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert plan["replans"][0]["step"] == 6 and plan["replans"][0]["speed_ratio"] == 0.5
    assert plan["total_steps"] == r0["steps"]
    assert r0["rows"] == r1["rows"] == [8] * r0["steps"]            # each rank half of the global batch 16


def test_an_out_of_memory_step_on_every_rank_halves_the_batch_everywhere(tiny_prepped, tmp_path):
    argv = ["--data", str(tiny_prepped), "--out", str(tmp_path / "r"), "--epochs", "2", *TINY]
    got = _spawn(argv, "oom_all")
    assert set(got) == {0, 1} and all(k == "ok" for k, _ in got.values()), got
    for _, res in got.values():
        assert [s["batch_size"] for s in res["stages"]] == [16, 8]     # halved (a multiple of 2 × 2 ranks)
        assert res["steps"] == res["planned_steps"]
    assert got[0][1]["steps"] == got[1][1]["steps"]
    assert got[0][1]["rows"] == got[1][1]["rows"] == [8, 8, 8] + [4] * (got[0][1]["steps"] - 2)   # (8: the step that ran out)


def test_an_out_of_memory_step_on_one_rank_only_stops_every_rank_with_one_line(tiny_prepped, tmp_path):
    """(past the gradients' all-reduce; one inside the forward or backward pass of one rank only would
    leave the others waiting in DDP's all-reduce: torchrun's timeout, not this, ends that)"""
    argv = ["--data", str(tiny_prepped), "--out", str(tmp_path / "r"), "--epochs", "2", *TINY]
    got = _spawn(argv, "oom_one")
    assert set(got) == {0, 1}, got
    for kind, msg in got.values():
        assert kind == "error" and "out of memory on 1 of 2 ranks only" in msg


# ------------------------------------------------------------------------------------------------------
# progressive growth under torchrun: rank 0's re-plan and choice on every rank, DDP over a changing depth

GROW = ["--depth", "4", "--curriculum", "32:0.5,64:0.5", "--final-res", "64", "--evals", "0"]


def test_manual_growth_on_two_processes_follows_one(tiny_prepped, tmp_path):
    from fastvit.train.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--data", str(tiny_prepped), "--epochs", "6", "--growth", "manual", *TINY, *GROW]
    assert main(["--out", str(one), *common]) == 0
    proc = _torchrun(["--out", str(two), *common])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("growth at step") == 1                # rank 0 says it once
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert [s["depth"] for s in r2["stages"]] == [s["depth"] for s in r1["stages"]] == [2, 4]
    assert r2["steps"] == r1["steps"]
    l1 = [r["loss"] for r in _train_rows(one)]
    l2 = [r["loss"] for r in _train_rows(two)]
    np.testing.assert_allclose(l2, l1, rtol=5e-4, atol=5e-5)      # MoGrow from the same EMA on every rank


def test_auto_growth_on_two_processes_takes_one_choice(tiny_prepped, tmp_path):
    run = tmp_path / "auto"
    proc = _torchrun(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "8", "--growth", "auto",
                      "--growth-window", "0.2", "--growth-score-images", "16", *TINY, *GROW])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("growth search at step") == 2        # the window opens and closes, said once
    assert proc.stderr.count(") -> depth") == 1
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == res["planned_steps"] and res["world_size"] == 2
    assert [e["kind"] for e in res["growth"]["events"]].count("choose") == 1


def test_model_auto_on_two_processes_takes_rank_0s_choice(tiny_prepped, tmp_path, monkeypatch):
    """--model auto under torchrun: the ranks probe the candidates together (DDP steps), choose from rank 0's
    speeds and cache, train the one shape; the cache is written once; a second run probes nothing."""
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path / "cache"))
    runs = []
    for name in ("first", "second"):
        run = tmp_path / name
        proc = _torchrun(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "2", "--evals", "0",
                          "--model", "auto", *TINY])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.count("model auto: ") >= 2 and proc.stderr.count("predicted top-1") == 2   # rank 0 says
        runs.append((run, proc.stderr))
    picks = []
    for run, err in runs:
        res = json.loads((run / "results.json").read_text())
        cfg = json.loads((run / "config.json").read_text())
        pick = res["model_auto"]["pick"]
        assert res["world_size"] == 2 and res["steps"] == res["planned_steps"]
        from fastvit.models.shapes import parse_shape
        assert cfg["model"]["depth"] == parse_shape(pick["shape"])["depth"]
        picks.append(pick["shape"])
    assert picks[0] == picks[1]
    assert len(list((tmp_path / "cache").glob("probe-*.json"))) == 1
    assert "cache 0 hit(s)" in runs[0][1] and "probe 0.0 s counted" in runs[1][1]
