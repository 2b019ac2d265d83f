#!/usr/bin/env python
"""How prep, the loaders, ordering, DDP sharding, a curriculum switch, evaluation and a checkpoint scale
with n, on the ImageNet-shaped synthetic tree (1,000 classes; a fraction F of ImageNet's 1,281,167 train /
50,000 val images). One F per run; one JSON per run; `--table` turns the JSONs into the README's tables.

    python bench/scale.py --scale 0.01 --root /work/scale_data --json bench/results/scale/scale_0.01.json
    python bench/scale.py --table bench/results/scale/scale_*.json      # Markdown tables, cost vs n

Every measured step runs in a child process of its own (`--child NAME`), watched by this one: peak RSS
of the child ("parent") and of its worker processes (largest one and their sum), wall seconds, and CPU
seconds of the child and everything it waited for. One step at a time (the machine is shared). The
uptime load average is recorded before and after every step.

Steps:
  gen        the demo tree (skipped when its completion marker matches: reported as cached)
  prep       fastvit-prep --res RES on a fresh OUT, killed (SIGKILL to its process group) once the first
             train shard is recorded, then rerun to completion (resume), then rerun once more on the
             complete OUT (the "already complete and verified" check): images/s per CPU core over both
             working runs, peak RSS, output bytes, manifest bytes
  loader     per backend (ffcv, dali, torchvision, gpu_resident on CPU): open_dataset + make_loader +
             first batch (time to first batch), then BATCHES more batches (steady images/s)
  order      epoch_order uncached, a whole epoch of BatchPlan.batch, and DDP at world 8: every rank's
             epoch, checked disjoint, covering, and carrying every class's label
  switch     CurriculumLoader 32 -> 64 px (dali): build time of each span, data wait at the switch
  eval       fastvit.train.evaluate over the whole val split (vit_small_local, 1,000 classes, 64 px, ffcv)
  checkpoint save_checkpoint + load_checkpoint of vit_small_local (1,000 classes) with its AdamW state
  train      fastvit-train --minutes 2 --device cpu on OUT, SIGTERMed at 40 % (checkpoint, exit 143),
             then --resume to the end; its results.json (final evaluation over the whole val split)
  fork_copy  memory a forked worker copies when it reads the torchvision backend's n-sample table: a list
             of (Path, int) (the old storage) vs fastvit.data.backend_torchvision.pack_samples
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BACKENDS = ("ffcv", "dali", "torchvision", "gpu_resident")
STEPS = ("gen", "prep", "loader", "order", "switch", "eval", "checkpoint", "fork_copy", "train")
TRAIN_MINUTES = 2.0
RES = (32, 64)
BATCH = 256
BATCHES = 20        # steady-state batches after the first one
WORLD = 8
SHARD_SIZE = 5000   # fastvit-prep's default


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------------
# Watching a child process tree

class TreeWatch:
    """Peak RSS of a process and of its descendants, sampled every `every` seconds on a thread."""

    def __init__(self, pid: int, every: float = 0.1):
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.parent_peak = self.worker_peak = self.workers_sum_peak = 0
        self.parent_anon_peak = 0  # RSS minus file-backed/shared pages (mmapped shards, page cache)
        self.worker_uss_peak = 0   # a worker's own pages (not shared with the parent it was forked from)
        self.max_workers = 0
        self.cpu: dict[int, float] = {}  # pid -> its last seen user+system seconds (the killed ones too)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                mi = self.proc.memory_info()
                self.parent_peak = max(self.parent_peak, mi.rss)
                self.parent_anon_peak = max(self.parent_anon_peak, mi.rss - getattr(mi, "shared", 0))
                t = self.proc.cpu_times()
                self.cpu[self.proc.pid] = t.user + t.system
                rss = []
                for c in self.proc.children(recursive=True):
                    try:
                        rss.append(c.memory_info().rss)
                        self.worker_uss_peak = max(self.worker_uss_peak, c.memory_full_info().uss)
                        t = c.cpu_times()
                        self.cpu[c.pid] = t.user + t.system
                    except psutil.Error:
                        pass
                if rss:
                    self.worker_peak = max(self.worker_peak, max(rss))
                    self.workers_sum_peak = max(self.workers_sum_peak, sum(rss))
                    self.max_workers = max(self.max_workers, len(rss))
            except psutil.Error:
                return
            self._stop.wait(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        return {"parent_peak_rss_mb": round(self.parent_peak / 2**20, 1),
                "parent_peak_anon_mb": round(self.parent_anon_peak / 2**20, 1),
                "worker_peak_rss_mb": round(self.worker_peak / 2**20, 1),
                "worker_peak_uss_mb": round(self.worker_uss_peak / 2**20, 1),
                "workers_sum_peak_rss_mb": round(self.workers_sum_peak / 2**20, 1),
                "workers_seen": self.max_workers, "cpu_tree_s": round(sum(self.cpu.values()), 3)}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_watched(cmd: list[str], *, kill_when=None, term_when=None, env=None) -> dict:
    """Run cmd (its own process group); wall, CPU (cpu_s: it and all it waited for; cpu_tree_s: sampled
    per process every 0.1 s, which also counts workers killed with a SIGKILLed run), peak RSS, rc, its
    last stdout line as JSON (a child step's result) when it is one. kill_when(): SIGKILL the group once
    it is true."""
    load0, cpu0, t0 = load(), _children_cpu(), time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=env)
    w = TreeWatch(p.pid)
    killed = False
    if kill_when is not None or term_when is not None:
        while p.poll() is None:
            if kill_when is not None and kill_when():
                os.killpg(p.pid, signal.SIGKILL)
                killed = True
                break
            if term_when is not None and term_when():
                p.send_signal(signal.SIGTERM)  # the process itself: it checkpoints and exits 143
                killed = True
                break
            time.sleep(0.05)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    rec = {"wall_s": round(wall, 3), "cpu_s": round(_children_cpu() - cpu0, 3), "rc": p.returncode,
           "killed": killed, "load_before": load0, "load_after": load(), **w.stop()}
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if lines:
        rec["result"] = json.loads(lines[-1])
    if p.returncode != 0 and not killed:
        rec["stderr_tail"] = err.strip().splitlines()[-3:]
    return rec


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _py() -> list[str]:
    return [sys.executable]


def _self(*args) -> list[str]:
    return _py() + [str(Path(__file__).resolve()), *map(str, args)]


# ---------------------------------------------------------------------------------------------------
# Child steps (run in their own process: `--child NAME`); each prints one JSON line

def child_gen(a) -> dict:
    from fastvit.data_prep.demo import imagenet_demo_kwargs, make_demo_dataset

    kw = imagenet_demo_kwargs(a.scale)
    t0 = time.perf_counter()
    make_demo_dataset(a.src, workers=a.workers, progress=False, **kw)
    return {"train": sum(kw["train_per_class"]), "val": sum(kw["val_per_class"]), "s": time.perf_counter() - t0}


def _open(a):
    import logging

    from fastvit.data import open_dataset

    logging.getLogger("fastvit.data").setLevel(logging.WARNING)
    return open_dataset(a.out)


def child_loader(a) -> dict:
    import numpy as np

    from fastvit.data import make_loader

    t0 = time.perf_counter()
    ds = _open(a)
    t_open = time.perf_counter() - t0
    it = make_loader(ds, "train", res=64, batch_size=BATCH, backend=a.backend, device="cpu", seed=0,
                     workers=a.workers)
    t_built = time.perf_counter() - t0
    images, labels = it.next_batch()
    t_first = time.perf_counter() - t0
    seen = set(labels.tolist())
    n, t1 = 0, time.perf_counter()
    for _ in range(BATCHES):
        images, labels = it.next_batch()
        n += images.shape[0]
        seen.update(labels.tolist())
    dt = time.perf_counter() - t1
    it.close()
    assert images.dtype.__str__().endswith("uint8") and tuple(images.shape[1:]) == (3, 64, 64), images.shape
    return {"open_s": t_open, "build_s": t_built, "first_batch_s": t_first, "steady_img_s": n / dt,
            "labels_seen": len(seen), "max_label": int(max(seen)), "n": ds.count("train"),
            "classes": ds.num_classes, "batches_per_epoch": int(np.floor(ds.count("train") / BATCH))}


def _train_labels(ds):
    from fastvit.data.shards import WdsShard

    tars, idxs = ds.dali_shard("train", min(ds.resolutions))
    return WdsShard(tars, idxs).labels


def child_order(a) -> dict:
    import numpy as np

    from fastvit.data import BatchPlan, Stage, epoch_order
    from fastvit.data import order as order_mod

    ds = _open(a)
    n = ds.count("train")
    t0 = time.perf_counter()
    labels = np.asarray(_train_labels(ds))
    t_labels = time.perf_counter() - t0
    B = 1024 if n >= 8 * 1024 else 8 * max(1, n // 64)
    out = {"n": n, "batch": B, "labels_read_s": t_labels}
    perm = []
    for e in range(3):
        order_mod._permutation.cache_clear()
        t0 = time.perf_counter()
        epoch_order(n, 12345, e)
        perm.append(time.perf_counter() - t0)
    out["epoch_order_s"] = min(perm)
    plan = BatchPlan(n, [Stage(res=64, batch_size=B, steps=10**9)], [7])
    nb = plan.batches_per_epoch()
    order_mod._permutation.cache_clear()
    t0 = time.perf_counter()
    for g in range(nb):
        plan.batch(g)
    out["epoch_batches_s"] = time.perf_counter() - t0
    out["batches_per_epoch"] = nb
    # DDP at world 8: each rank's epoch 0; disjoint, covering every sample the one-process epoch uses,
    # and the union's labels are the one-process epoch's labels
    t0 = time.perf_counter()
    per_rank, rank_s = [], []
    for r in range(WORLD):
        tr = time.perf_counter()
        p = BatchPlan(n, [Stage(res=64, batch_size=B, steps=10**9)], [7], rank=r, world=WORLD)
        per_rank.append(np.concatenate([p.batch(g).indices for g in range(p.batches_per_epoch())]))
        rank_s.append(time.perf_counter() - tr)
    out["ddp8_all_ranks_s"] = time.perf_counter() - t0
    out["ddp8_rank_max_s"] = max(rank_s)
    union = np.concatenate(per_rank)
    one = np.concatenate([plan.batch(g).indices for g in range(nb)])
    out["ddp8_disjoint"] = bool(len(np.unique(union)) == len(union))
    out["ddp8_covers_one_process_epoch"] = bool(np.array_equal(np.sort(union), np.sort(one)))
    out["ddp8_rank_sizes_equal"] = len({len(x) for x in per_rank}) == 1
    out["ddp8_classes_in_union"] = int(len(np.unique(labels[union])))
    out["ddp8_label_hist_matches"] = bool(np.array_equal(np.bincount(labels[union], minlength=ds.num_classes),
                                                         np.bincount(labels[one], minlength=ds.num_classes)))
    out["classes"] = ds.num_classes
    out["order_bytes_per_epoch"] = int(n * 8)
    return out


def child_switch(a) -> dict:
    from fastvit.data import CurriculumLoader, Stage

    ds = _open(a)
    first, second = 8, 4
    stages = [Stage(32, BATCH, first), Stage(64, BATCH, second)]
    t0 = time.perf_counter()
    labels_max = 0
    with CurriculumLoader(ds, stages, backend=a.backend, device="cpu", seed=0, workers=a.workers) as cl:
        for images, labels, stage in cl:
            labels_max = max(labels_max, int(labels.max()))
        waits = list(cl.data_wait_s)
        switch = cl.switch_steps[1] - (cl.step - len(waits))
        builds = {str(k): v for k, v in cl.build_s.items()}
        in_time = {str(k): bool(v) for k, v in cl.prefilled_in_time.items()}
    return {"total_s": time.perf_counter() - t0, "build_s": builds, "switch_wait_s": waits[switch],
            "first_wait_s": waits[0], "prefilled_in_time": in_time, "steps": first + second,
            "max_label": labels_max, "n": ds.count("train")}


def child_eval(a) -> dict:
    import numpy as np
    import torch

    from fastvit.data import make_val_loader
    from fastvit.models import create_model
    from fastvit.train.evaluate import evaluate

    torch.manual_seed(0)
    ds = _open(a)
    model = create_model("vit_small_local", num_classes=ds.num_classes)
    t0 = time.perf_counter()
    it = make_val_loader(ds, res=64, batch_size=BATCH, backend=a.backend, device="cpu", workers=a.workers)
    hist = np.zeros(ds.num_classes, dtype=np.int64)

    def batches():
        for images, labels in it:
            np.add.at(hist, labels.numpy(), 1)
            yield images, labels

    r = evaluate({"raw": model}, batches(), device=torch.device("cpu"), amp=False)["raw"]
    dt = time.perf_counter() - t0
    it.close()
    return {"s": dt, "images": r["images"], "img_s": r["images"] / dt, "n_val": ds.count("val"),
            "classes_seen": int((hist > 0).sum()), "top1": r["top1"], "threads": torch.get_num_threads()}


def child_checkpoint(a) -> dict:
    import tempfile

    import torch

    from fastvit.models import create_model
    from fastvit.train.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = create_model("vit_small_local", num_classes=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)).float().logsumexp(1).mean().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}
    with tempfile.TemporaryDirectory(dir=a.root) as d:
        t0 = time.perf_counter()
        path = save_checkpoint(Path(d), 1, state)
        t_save = time.perf_counter() - t0
        size = path.stat().st_size
        t0 = time.perf_counter()
        back = load_checkpoint(path)
        t_load = time.perf_counter() - t0
    ok = all(torch.equal(back["model"][k], v) for k, v in state["model"].items())
    return {"save_s": t_save, "load_s": t_load, "bytes": size, "params": sum(p.numel() for p in model.parameters()),
            "roundtrip_equal": ok}


def child_fork_copy(a) -> dict:
    """What a forked DataLoader worker copies of the torchvision backend's sample table: a worker reads
    every sample once; its USS (pages it no longer shares) is measured for a list of (Path, int), the
    old SourceImages storage, and for the packed numpy arrays (fastvit.data.backend_torchvision.pack_samples)."""
    import gc

    import psutil

    from fastvit.data.backend_torchvision import pack_samples

    n = a.n or 1
    samples = [(Path(f"/data/imagenet/train/n{1440764 + 9973 * (i % 1000):08d}/n{i:08d}_{i}.JPEG"), i % 1000)
               for i in range(n)]
    packed = pack_samples(samples)
    out = {"n": n}
    for name in ("list", "packed"):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the "worker": read every sample, report its unshared memory
            os.close(r)
            gc.disable()
            base = psutil.Process().memory_full_info().uss
            if name == "list":
                k = sum(label for _, label in samples)
            else:
                buf, offs, labels = packed
                k = 0
                for i in range(n):
                    bytes(buf[offs[i]:offs[i + 1]])
                    k += int(labels[i])
            os.write(w, json.dumps([psutil.Process().memory_full_info().uss - base, k]).encode())
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
        os.waitpid(pid, 0)
        grown, _ = json.loads(data)
        out[f"{name}_worker_copied_mb"] = round(grown / 2**20, 1)
    return out


CHILDREN = {"fork_copy": child_fork_copy, "gen": child_gen, "loader": child_loader, "order": child_order, "switch": child_switch,
            "eval": child_eval, "checkpoint": child_checkpoint}


# ---------------------------------------------------------------------------------------------------
# The parent: one F

def step_prep(a, src: Path, out: Path, n_images: int) -> dict:
    import shutil

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = _py() + ["-m", "fastvit.data_prep.cli", "--src", str(src), "--out", str(out), "--res",
                   ",".join(map(str, RES)), "--workers", str(a.workers), "--no-progress", "--shard-size",
                   str(SHARD_SIZE)]
    work = out / ".work"
    killed = run_watched(cmd, kill_when=lambda: bool(glob.glob(str(work / "train_*.json"))))
    done_before = len(glob.glob(str(work / "train_*.json")))
    resumed = run_watched(cmd)
    again = run_watched(cmd)
    m = out / "manifest.json"
    man = json.loads(m.read_text()) if m.is_file() else {}
    cpu = killed["cpu_tree_s"] + resumed["cpu_tree_s"]
    return {"killed_run": killed, "shards_done_at_kill": done_before, "resume_run": resumed,
            "complete_rerun": again,
            "ok": resumed["rc"] == 0 and again["rc"] == 0 and man.get("splits", {}).get("train", {}).get("count") is not None,
            "images": n_images, "cpu_s": round(cpu, 2), "images_per_core_s": round(n_images / max(cpu, 1e-9), 1),
            "resume_images_per_core_s": round(n_images * (1 - done_before * SHARD_SIZE / n_images)
                                              / max(resumed["cpu_tree_s"], 1e-9), 1),
            "wall_s": round(killed["wall_s"] + resumed["wall_s"], 2),
            "peak_parent_rss_mb": max(killed["parent_peak_rss_mb"], resumed["parent_peak_rss_mb"]),
            "peak_worker_rss_mb": max(killed["worker_peak_rss_mb"], resumed["worker_peak_rss_mb"]),
            "peak_worker_uss_mb": max(killed["worker_peak_uss_mb"], resumed["worker_peak_uss_mb"]),
            "output_bytes": _du(out), "manifest_bytes": m.stat().st_size if m.is_file() else None,
            "counts": {s: e.get("count") for s, e in man.get("splits", {}).items()},
            "classes": len(man.get("classes", []))}


def step_train(a, out: Path) -> dict:
    """fastvit-train on the prepped tree for TRAIN_MINUTES on the CPU, SIGTERMed at 40 % of its budget (it
    checkpoints and exits 143), then --resume to the end: the run's results.json (top-1 over the whole
    val split, steps, stages)."""
    import shutil

    run = Path(a.root) / f"F{a.scale:g}" / "run"
    if run.exists():
        shutil.rmtree(run)
    cmd = _py() + ["-m", "fastvit.train", "--data", str(out), "--minutes", str(TRAIN_MINUTES), "--device", "cpu",
                   "--out", str(run)]
    t_term = time.perf_counter() + 0.4 * TRAIN_MINUTES * 60 + 30  # + start-up (imports, first compile)
    first = run_watched(cmd, term_when=lambda: time.perf_counter() > t_term)
    resumed = run_watched(cmd + ["--resume"])
    res_file = run / "results.json"
    r = json.loads(res_file.read_text()) if res_file.is_file() else {}
    keep = ("top1", "top5", "steps", "planned_steps", "images_seen", "budget_s", "counted_s", "stages", "val_images",
            "model", "backend", "eval_res")
    return {"first_run": first, "resumed_run": resumed, "results": {k: r.get(k) for k in keep if k in r},
            "ok": first["rc"] == 143 and resumed["rc"] == 0 and bool(r)}


def run_scale(a) -> dict:
    from fastvit.data_prep.demo import imagenet_demo_kwargs

    from bench.throughput import machine_info  # noqa: E402

    kw = imagenet_demo_kwargs(a.scale)
    n_train, n_val = sum(kw["train_per_class"]), sum(kw["val_per_class"])
    base = Path(a.root) / f"F{a.scale:g}"
    src, out = base / "src", base / "out"
    res: dict = {"scale": a.scale, "n_train": n_train, "n_val": n_val, "classes": kw["num_classes"],
                 "workers": a.workers, "res": list(RES), "batch": BATCH, "machine": machine_info(),
                 "command": " ".join([Path(sys.executable).name, "bench/scale.py"] + a.argv), "steps": {}}
    steps = [s for s in STEPS if s in a.steps]
    if a.json and Path(a.json).is_file():  # a rerun of some steps keeps the other steps' results
        old = json.loads(Path(a.json).read_text())
        if old.get("scale") == a.scale:
            res["steps"] = {k: v for k, v in old.get("steps", {}).items() if k not in steps}

    def save():
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(res, indent=1) + "\n")

    for step in steps:
        print(f"[scale F={a.scale:g}] {step} (load {load()})", file=sys.stderr, flush=True)
        common = ["--scale", a.scale, "--root", a.root, "--workers", a.workers]
        if step == "gen":
            cached = (src / ".demo-complete.json").is_file()
            r = run_watched(_self("--child", "gen", *common))
            r["cached"] = cached
            if not cached:
                r["images_per_core_s"] = round((n_train + n_val) / max(r["cpu_s"], 1e-9), 1)
            r["source_bytes"] = _du(src)
        elif step == "prep":
            r = step_prep(a, src, out, n_train + n_val)
        elif step == "loader":
            r = {b: run_watched(_self("--child", "loader", "--backend", b, *common)) for b in a.backends}
        elif step == "switch":
            r = run_watched(_self("--child", "switch", "--backend", "dali", *common))
        elif step == "train":
            r = step_train(a, out)
        elif step == "fork_copy":
            r = run_watched(_self("--child", "fork_copy", "--n", n_train, *common))
        elif step == "eval":
            r = run_watched(_self("--child", "eval", "--backend", "ffcv", *common))
        else:
            r = run_watched(_self("--child", step, *common))
        res["steps"][step] = r
        save()
        print(json.dumps({step: r})[:600], file=sys.stderr, flush=True)
    return res


# ---------------------------------------------------------------------------------------------------
# Tables

def _get(d, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def tables(paths: list[str]) -> str:
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["scale"])
    rows_of = {
        "gen (demo tree)": [("images/s per core", ("steps", "gen", "images_per_core_s")),
                            ("source bytes", ("steps", "gen", "source_bytes")),
                            ("load before", ("steps", "gen", "load_before"))],
        "prep (--res 32,64, killed after the first train shard, resumed)": [
            ("images/s per core", ("steps", "prep", "images_per_core_s")),
            ("wall s (both runs)", ("steps", "prep", "wall_s")),
            ("peak RSS main MB", ("steps", "prep", "peak_parent_rss_mb")),
            ("peak RSS worker MB", ("steps", "prep", "peak_worker_rss_mb")),
            ("  of which its own (USS) MB", ("steps", "prep", "peak_worker_uss_mb")),
            ("output bytes", ("steps", "prep", "output_bytes")),
            ("manifest bytes", ("steps", "prep", "manifest_bytes")),
            ("resume run s", ("steps", "prep", "resume_run", "wall_s")),
            ("rerun on complete OUT s (verify)", ("steps", "prep", "complete_rerun", "wall_s")),
            ("classes in manifest", ("steps", "prep", "classes")),
            ("load before", ("steps", "prep", "killed_run", "load_before"))],
    }
    for b in BACKENDS:
        rows_of[f"loader {b} (cpu, 64 px, batch {BATCH})"] = [
            ("time to first batch s", ("steps", "loader", b, "result", "first_batch_s")),
            ("  of which open_dataset s", ("steps", "loader", b, "result", "open_s")),
            ("  of which make_loader s", ("steps", "loader", b, "result", "build_s")),
            ("steady images/s", ("steps", "loader", b, "result", "steady_img_s")),
            ("peak RSS parent MB", ("steps", "loader", b, "parent_peak_rss_mb")),
            ("  of which not file-backed (RSS - shared) MB", ("steps", "loader", b, "parent_peak_anon_mb")),
            ("peak RSS largest worker MB", ("steps", "loader", b, "worker_peak_rss_mb")),
            ("peak RSS workers sum MB", ("steps", "loader", b, "workers_sum_peak_rss_mb")),
            ("labels seen (of 1000)", ("steps", "loader", b, "result", "labels_seen")),
            ("load before", ("steps", "loader", b, "load_before"))]
    rows_of["order (fastvit/data/order.py)"] = [
        ("epoch_order, uncached s", ("steps", "order", "result", "epoch_order_s")),
        ("one epoch of BatchPlan.batch s", ("steps", "order", "result", "epoch_batches_s")),
        ("batches per epoch", ("steps", "order", "result", "batches_per_epoch")),
        ("DDP world 8: all ranks' epoch s", ("steps", "order", "result", "ddp8_all_ranks_s")),
        ("DDP disjoint + covering", ("steps", "order", "result", "ddp8_covers_one_process_epoch")),
        ("DDP label histogram = 1-process", ("steps", "order", "result", "ddp8_label_hist_matches")),
        ("classes in DDP union", ("steps", "order", "result", "ddp8_classes_in_union")),
        ("peak RSS MB", ("steps", "order", "parent_peak_rss_mb"))]
    rows_of["curriculum switch 32 -> 64 px (dali cpu)"] = [
        ("build+prefill stage 0 s", ("steps", "switch", "result", "build_s", "0")),
        ("build+prefill stage 1 s", ("steps", "switch", "result", "build_s", "1")),
        ("data wait at the switch s", ("steps", "switch", "result", "switch_wait_s")),
        ("peak RSS parent MB", ("steps", "switch", "parent_peak_rss_mb"))]
    rows_of["evaluation, whole val split (vit_small_local, 64 px, ffcv cpu)"] = [
        ("images", ("steps", "eval", "result", "images")),
        ("seconds", ("steps", "eval", "result", "s")),
        ("images/s", ("steps", "eval", "result", "img_s")),
        ("classes seen", ("steps", "eval", "result", "classes_seen")),
        ("peak RSS parent MB", ("steps", "eval", "parent_peak_rss_mb")),
        ("load before", ("steps", "eval", "load_before"))]
    rows_of["checkpoint (vit_small_local, 1000 classes, + AdamW state)"] = [
        ("bytes", ("steps", "checkpoint", "result", "bytes")),
        ("save s", ("steps", "checkpoint", "result", "save_s")),
        ("load s", ("steps", "checkpoint", "result", "load_s"))]
    rows_of[f"training run (fastvit-train --minutes {TRAIN_MINUTES:g} --device cpu, SIGTERM at 40 %, --resume)"] = [
        ("first run exit (143 = checkpointed)", ("steps", "train", "first_run", "rc")),
        ("resumed run exit", ("steps", "train", "resumed_run", "rc")),
        ("steps / planned", ("steps", "train", "results", "steps")),
        ("images seen", ("steps", "train", "results", "images_seen")),
        ("final top-1 % (whole val split; chance 0.1)", ("steps", "train", "results", "top1")),
        ("val images evaluated", ("steps", "train", "results", "val_images")),
        ("peak RSS parent MB (resumed run)", ("steps", "train", "resumed_run", "parent_peak_rss_mb")),
        ("load before", ("steps", "train", "first_run", "load_before"))]
    rows_of["torchvision sample table copied by one forked worker (n = train)"] = [
        ("list of (Path, int) MB (before the fix)", ("steps", "fork_copy", "result", "list_worker_copied_mb")),
        ("packed numpy arrays MB (after)", ("steps", "fork_copy", "result", "packed_worker_copied_mb"))]
    head = "| | " + " | ".join(f"F={r['scale']:g} (train {r['n_train']:,}, val {r['n_val']:,})" for r in runs) + " |"
    sep = "|---|" + "---|" * len(runs)
    parts = []
    for title, rows in rows_of.items():
        lines = [f"### {title}", "", head, sep]
        for label, path in rows:
            lines.append(f"| {label} | " + " | ".join(_fmt(_get(r, *path)) for r in runs) + " |")
        parts.append("\n".join(lines))
    if len(runs) >= 2:
        parts.append(growth_table(runs[0], runs[-1]))
    return "\n\n".join(parts) + "\n"


GROWTH = [  # (component, path into a run's JSON); exponent k of cost ~ n^k between the smallest and largest F
    ("prep CPU seconds", ("steps", "prep", "cpu_s")),
    ("prep peak RSS, main process", ("steps", "prep", "peak_parent_rss_mb")),
    ("prep peak RSS, one worker", ("steps", "prep", "peak_worker_rss_mb")),
    ("prep peak USS (own pages), one worker", ("steps", "prep", "peak_worker_uss_mb")),
    ("prep output bytes", ("steps", "prep", "output_bytes")),
    ("manifest bytes", ("steps", "prep", "manifest_bytes")),
    ("prep rerun on a complete OUT (verify)", ("steps", "prep", "complete_rerun", "wall_s")),
    *[(f"loader {b}: time to first batch", ("steps", "loader", b, "result", "first_batch_s")) for b in BACKENDS],
    *[(f"loader {b}: peak RSS parent", ("steps", "loader", b, "parent_peak_rss_mb")) for b in BACKENDS],
    *[(f"loader {b}: peak RSS parent, not file-backed", ("steps", "loader", b, "parent_peak_anon_mb")) for b in BACKENDS],
    *[(f"loader {b}: peak RSS workers (sum)", ("steps", "loader", b, "workers_sum_peak_rss_mb")) for b in BACKENDS],
    ("epoch_order (one epoch's permutation)", ("steps", "order", "result", "epoch_order_s")),
    ("BatchPlan.batch over one epoch", ("steps", "order", "result", "epoch_batches_s")),
    ("DDP world 8, every rank's epoch", ("steps", "order", "result", "ddp8_all_ranks_s")),
    ("curriculum switch: next stage build", ("steps", "switch", "result", "build_s", "1")),
    ("evaluation seconds (val n)", ("steps", "eval", "result", "s")),
    ("checkpoint bytes", ("steps", "checkpoint", "result", "bytes")),
    ("torchvision table copied per worker, list", ("steps", "fork_copy", "result", "list_worker_copied_mb")),
    ("torchvision table copied per worker, packed", ("steps", "fork_copy", "result", "packed_worker_copied_mb")),
]


def growth_table(small: dict, large: dict) -> str:
    """cost ~ n^k: k = log(cost ratio) / log(n ratio) between two runs (n: train images; val images for
    evaluation). k <= 1: no faster than n; k ~ 0: flat (a fixed cost); k > 1 grows faster than n."""
    import math

    lines = [f"### growth between F={small['scale']:g} and F={large['scale']:g}: cost ~ n^k, and the straight line "
             f"through both extended to F=1 (n = 1,281,167 train / 50,000 val)", "",
             f"| component | F={small['scale']:g} | F={large['scale']:g} | k | slope per 1k images | F=1 (line) |",
             "|---|---|---|---|---|---|"]
    for name, path in GROWTH:
        a, b = _get(small, *path), _get(large, *path)
        evaluation = path[1] == "eval"
        n0, n1 = (small["n_val"], large["n_val"]) if evaluation else (small["n_train"], large["n_train"])
        full = 50_000 if evaluation else 1_281_167
        k = slope = at_full = None
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and n1 != n0:
            if a > 0 and b > 0:
                k = round(math.log(b / a) / math.log(n1 / n0), 2)
            slope = (b - a) / (n1 - n0)
            at_full = b + slope * (full - n1)
            slope = slope * 1000
        lines.append(f"| {name} | {_fmt(a)} | {_fmt(b)} | {_fmt(k)} | {_fmt(slope)} | {_fmt(at_full)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------

VIT_S_224_IMG_S = 8000.0  # published ViT-S/16 step rate at 224 px on one H100 (compiled, bf16): an assumption here


def decode_table(path: str, cores: int = 16, trainer_cores: int = 1) -> str:
    """The per-core decode table of a `bench/throughput.py --section decode` JSON, and what fastvit.data.feed
    makes of it for a `cores`-core machine training ViT-S at the published 224 px rate scaled by tokens
    ((224 / res)^2: an ASSUMED step rate, not a measurement)."""
    from fastvit.data.feed import feed_verdict, load_decode_table, resident_bytes

    data = json.loads(Path(path).read_text())
    table = load_decode_table(path)
    res = sorted({r for rates in table.values() for r in rates})
    lines = [f"machine: {_get(data, 'machine', 'cpu')}, {_get(data, 'machine', 'cores')} cores; one loader worker, "
             f"images per CPU second", "", "| backend | " + " | ".join(f"{r} px" for r in res) + " |",
             "|---|" + "---|" * len(res)]
    for b, rates in sorted(table.items()):
        lines.append(f"| {b} | " + " | ".join(_fmt(rates.get(r)) for r in res) + " |")
    lines += ["", f"feed_verdict on {cores} cores ({trainer_cores} kept by the trainer), step rate ASSUMED = "
              f"{VIT_S_224_IMG_S:,.0f} x (224/res)^2 img/s (ViT-S/16, H100, published 224 px rate scaled by tokens):", "",
              "| res | step img/s (assumed) | " + " | ".join(f"{b} feed img/s" for b in sorted(table)) +
              " | data-bound | raw uint8 resident, 1.28 M images |", "|---|---|" + "---|" * len(table) + "---|---|"]
    for r in res:
        step = VIT_S_224_IMG_S * (224 / r) ** 2
        vs = {b: feed_verdict(b, r, step, cores, table, trainer_cores) for b in sorted(table)}
        bound = ", ".join(b for b, v in vs.items() if v["data_bound"]) or "no"
        lines.append(f"| {r} | {step:,.0f} | " + " | ".join(f"{v['feed_img_s']:,.0f}" for v in vs.values()) +
                     f" | {bound} | {resident_bytes(1_281_167, r) / 1e9:.1f} GB |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=0.01, help="fraction F of ImageNet's size (default 0.01)")
    p.add_argument("--root", default="/tmp/fastvit-scale", help="where the trees go, outside the repository "
                   "(default /tmp/fastvit-scale; F=0.1 needs ~2.3 GB, F=1 ~22 GB)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--json", default=None)
    p.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print the Markdown tables of these runs")
    p.add_argument("--decode-table", default=None, metavar="JSON", help="print the per-core decode table of a "
                   "bench/throughput.py --section decode JSON and the feed verdicts it gives on 16 cores")
    p.add_argument("--child", choices=sorted(CHILDREN), default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if not 0 < a.scale <= 1:
        p.error(f"--scale must be in (0, 1], got {a.scale}")
    a.steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    bad = [s for s in a.steps if s not in STEPS] + [b for b in a.backends if b not in BACKENDS]
    if bad:
        p.error(f"unknown step or backend: {', '.join(bad)}")
    base = Path(a.root) / f"F{a.scale:g}"
    a.src, a.out = base / "src", base / "out"
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.table:
        print(tables(a.table), end="")
        return 0
    if a.decode_table:
        print(decode_table(a.decode_table), end="")
        return 0
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)), flush=True)
        return 0
    Path(a.root).mkdir(parents=True, exist_ok=True)
    run_scale(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
