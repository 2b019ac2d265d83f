"""bench section 'model': training-step throughput of the fastvit ViT vs timm's ViT, same batch.

One training step = forward + backward + AdamW on a fixed random uint8 batch already on the device
(the model's cost alone: no loader). fastvit models are torch.compile'd through compile_model (one
graph per shape, compiled before timing; its time is reported per shape). timm's vit_small_patch16_224
runs eager and compiled; it is fed the same uint8 batch and normalizes it in the step, as a training
loop must. timm always processes all patches, so it is timed once per resolution (`timm_*@{res},keep1.0`) and
the keep-0.5 ratio divides by that: it is what sampling buys.

GPU: ViT-S/16 (vit_small_local / vit_small_plain, timm vit_small_patch16_224), bf16 autocast, batch
256, settings (224, keep 1.0), (224, 0.5), (128, 1.0), (64, 1.0); metrics `model/...`, MFU against
peak_tflops() (explicit FLOP formula: fastvit.models.vit_forward_flops x 3 for fwd+bwd). The full GPU
run also times vit_small_local with dwconv_impl="taps" (`fastvit_taps_over_fastvit@...` > 1 says the
fusable taps beat cuDNN's depthwise conv and should become the default), and every GPU run times
vit_small_local with sparse_locality=False (`fastvit_sparse_over_scatter_step@...`: the sparse
locality kernel's gain on a whole step; 1.0 at keep 1, where both take the dense conv).
Locality MLP alone (`_locality`, fwd+bwd, ViT-S sizes on GPU, tiny on CPU through the reference):
`locality_mlp_{dense,sparse,scatter}_ms@...`, `locality_mlp_keep0.5_over_keep1.0` (target <= 0.6),
`sparse_over_scatter_locality@224,keep0.5` (target >= 2), and `locality_{sparse,scatter}_conv_MB` /
`_GBps_lower_bound` from `locality_bytes` (the bytes formula of both paths).
CPU: a tiny config (dim 64, 2 heads, depth 2) at (64, 1.0), (64, 0.5), (32, 1.0), fp32, batch 16,
one thread;
metrics `model_cpu_tiny/...`.
ctx.opts (bench/gpu_check.py): "batch", "settings" [(res, keep) or (res, keep, batch), ...], "variants"
(subset of local, plain, local_scatter, local_taps), "timm_compiled" (bool or a list of resolutions),
"compiled" (bool), "iters", "locality" (bool: the locality-MLP microbench), "compile_modes" ({"res",
"keep", "batch", "modes"}: one shape trained under each torch.compile mode, `compile_mode_img_s@...:MODE`
and `compile_mode_over_default@...:MODE`), "peak_tflops" (MFU base; default the H100/H200 table's).
Shapes are compiled one at a time, each right before it is timed, and the metrics so far -- every ratio
both sides of which are known included -- are saved after each (ctx.save_partial): a time box keeps
what was measured. The graphs are built by `fastvit_graph` / `timm_graph`, which bench/sections/
compile.py calls too: gpu_check compiles them ahead into the shared inductor cache.
--quick on CPU runs everything eager (inductor takes ~30-70 s a shape on
2 cores) and names the fastvit numbers `..._eager_...`; MFU is GPU-only.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fastvit.stage import num_kept
from fastvit.sysinfo import peak_flops

from . import SectionSkipped, timeit


def peak_tflops(dev) -> float | None:
    """MFU base of this GPU: FASTVIT_PEAK_TFLOPS (gpu_check sets it to its measured matmul peak), else
    fastvit.sysinfo's figure for the GPU's name (the H200's measured one, the spec sheet's otherwise)."""
    f = peak_flops(torch.cuda.get_device_name(dev)) if torch.cuda.is_available() else None
    return f / 1e12 if f else None
CPU_TINY = dict(embed_dim=64, num_heads=2, depth=2)


def _label(res: int, keep: float) -> str:
    return f"{res},keep{keep:.1f}"


def _train_step(model, opt, x, y, amp_dtype, call):
    """One fwd+bwd+AdamW step; `call(model, x)` gives logits."""
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(call(model, x).float(), y)
        loss.backward()
        opt.step()
    return step


def fastvit_graph(variant_kind: str, overrides: dict, dev, extra: dict | None = None):
    """The fastvit model a shape is compiled for (seeded: the same graph wherever it is built)."""
    from fastvit.models import create_model

    torch.manual_seed(0)
    return create_model(f"vit_small_{variant_kind}", num_classes=1000, **overrides, **(extra or {})).to(dev).train()


def timm_graph(overrides: dict, dev, compiled: bool, mode: str | None = None):
    """(timm vit_small_patch16_224, the runner a step calls, its config, mean, std): what `_timm` times."""
    import timm

    from fastvit.models import model_config

    timm_cfg = model_config("vit_small_plain", class_token=True, head="token", **overrides)
    mean = torch.tensor(timm_cfg.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(timm_cfg.std, device=dev).view(1, 3, 1, 1)
    torch.manual_seed(0)
    t = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000,
                          dynamic_img_size=True, **overrides).to(dev).train()
    runner = torch.compile(t, fullgraph=True, dynamic=False, mode=mode) if compiled else t
    return t, runner, timm_cfg, mean, std


def _fastvit_call(keep):
    kw = {} if keep >= 1.0 else {"keep_rate": keep}
    return lambda m, x: m(x, **kw)


def _timm_call(mean, std):
    def call(m, x):
        return m((x.float() - mean) / std)                   # uint8 -> normalized float, on device
    return call


def locality_bytes(B: int, K: int, N: int, C: int, *, act_bytes: int = 2, sparse: bool = True) -> int:
    """Bytes one locality conv (+ its Hardswish) moves in HBM, forward + backward, M = B*K kept tokens.

    sparse (the Triton kernels; neighbour rows re-read through L1/L2, counted once):
      table  B*N*4 (slot map) + M*9*4 (write), once per forward, shared by the blocks (counted here)
      fwd    M*C (x) + M*9*4 (nbr) + M*C (y, Hardswish fused)                    -> 2*M*C*a + 36*M
      bwd_w  M*C (x) + M*C (dy) + M*C (dz) + M*9*4 + 10*C*4 (dW, dBias)           -> 3*M*C*a + 36*M
      bwd_x  M*C (dz) + M*C (dx) + M*9*4                                          -> 2*M*C*a + 36*M
    scatter -> conv -> gather (today's path, eager):
      fwd    zero grid B*N*C + scatter M*C in + M*C out + conv grid in/out 2*B*N*C + gather 2*M*C
             + Hardswish 2*M*C                                                    -> 3*B*N*C*a + 6*M*C*a
      bwd    Hardswish' 3*M*C + gather' (zero grid B*N*C + 2*M*C) + conv dX 2*B*N*C + conv dW 2*B*N*C
             + scatter' 2*M*C                                                     -> 5*B*N*C*a + 7*M*C*a
    """
    M = B * K
    if sparse:
        return B * N * 4 + M * 36 + 7 * M * C * act_bytes + 3 * M * 36 + 10 * C * 4
    return 8 * B * N * C * act_bytes + 13 * M * C * act_bytes


def _locality(ctx, prefix: str, dev, amp, sync) -> dict[str, float]:
    """The locality MLP alone (fc1, Hardswish, conv, Hardswish, fc2), forward + backward, at keep 1
    (dense conv) and keep 0.5 through the sparse kernel and through scatter -> conv -> gather."""
    from fastvit.kernels import build_neighbours, sample_keep_indices
    from fastvit.models.layers import LocalityMlp

    if ctx.cuda:
        B, side, D = (128 if ctx.quick else 256), 14, 384             # ViT-S/16 at 224
    else:
        B, side, D = 8, 8, 64                                          # CPU: tiny, the reference path
        ctx.skip(f"{prefix}/locality_mlp_sparse_ms@*,locality_sparse_GBps_lower_bound@*",
                 "the sparse Triton kernel needs CUDA: on CPU its op runs the scatter->conv->gather "
                 "reference, timed as locality_mlp_sparse_reference_ms (CPU numbers, tiny sizes)")
    N, C = side * side, 4 * D
    torch.manual_seed(0)
    mlp = LocalityMlp(D, C).to(dev)
    out, times = {}, {}
    for keep in (1.0, 0.5):
        K = num_kept(N, keep)
        keep_idx = sample_keep_indices(B, N, K, dev) if K < N else None
        x = torch.randn(B, K, D, device=dev, requires_grad=True)
        for path in (("dense",) if keep_idx is None else ("sparse", "scatter")):
            def step(path=path, x=x, keep_idx=keep_idx):
                nbr = build_neighbours(keep_idx, (side, side)) if path == "sparse" else None
                with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                    y = mlp(x, (side, side), keep_idx, 0, nbr)
                y.float().sum().backward()
            if path == "sparse":
                _check_sparse(mlp, x, keep_idx, side, amp)
            n = ctx.opts.get("iters", 5 if ctx.quick else 20)
            times[(path, keep)] = timeit(step, warmup=min(2, n), iters=n, sync=sync) * 1e3
    res = 224 if ctx.cuda else 16 * side
    for (path, keep), ms in times.items():
        name = path if ctx.cuda or path != "sparse" else "sparse_reference"
        out[f"{prefix}/locality_mlp_{name}_ms@{_label(res, keep)}"] = ms
    out[f"{prefix}/locality_mlp_keep0.5_over_keep1.0"] = times[("sparse", 0.5)] / times[("dense", 1.0)]
    out[f"{prefix}/sparse_over_scatter_locality@{_label(res, 0.5)}"] = times[("scatter", 0.5)] / times[("sparse", 0.5)]
    K = round(0.5 * N)
    a = 2 if amp is not None else 4
    for path in ("sparse", "scatter"):
        nbytes = locality_bytes(B, K, N, C, act_bytes=a, sparse=path == "sparse")
        out[f"{prefix}/locality_{path}_conv_MB@{_label(res, 0.5)}"] = nbytes / 1e6
        if ctx.cuda or path != "sparse":
            # the MLP's time includes fc1/fc2: a lower bound on the conv's own bandwidth
            out[f"{prefix}/locality_{path}_GBps_lower_bound@{_label(res, 0.5)}"] = (
                nbytes / (times[(path, 0.5)] * 1e-3) / 1e9)
    return out


def _check_sparse(mlp, x, keep_idx, side, amp) -> None:
    """Refuse to time a sparse kernel that disagrees with the scatter -> conv -> gather path."""
    from fastvit.kernels import build_neighbours

    with torch.no_grad(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        a = mlp(x, (side, side), keep_idx, 0, build_neighbours(keep_idx, (side, side))).float()
        b = mlp(x, (side, side), keep_idx, 0, None).float()
    err = (a - b).abs().max().item()
    if err > 0.05 * max(1.0, b.abs().max().item()):
        raise RuntimeError(f"sparse locality differs from the scatter path by {err:.3g}; not timing it")


def run(ctx) -> dict[str, float]:
    """On CPU the section runs single-threaded: on a small shared machine OpenMP threads contending
    with other processes turn multi-threaded step times into noise (x10 swings seen on 2 cores)."""
    if ctx.cuda:
        return _run(ctx)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(ctx)
    finally:
        torch.set_num_threads(threads)


def _run(ctx) -> dict[str, float]:
    try:
        import timm  # noqa: F401 -- the section needs it: skipped without
        from fastvit.models import compile_model, train_flops
    except ImportError as e:  # pragma: no cover - the venv has both
        raise SectionSkipped(f"needs timm and fastvit.models: {e}")

    dev = torch.device(ctx.device)
    gpu = ctx.cuda
    if gpu:
        prefix, overrides, batch = "model", {}, (128 if ctx.quick else 256)
        settings = [(224, 1.0), (224, 0.5)] if ctx.quick else [(224, 1.0), (224, 0.5), (128, 1.0), (64, 1.0)]
        amp, warmup, iters = torch.bfloat16, 3, (5 if ctx.quick else 15)
        compiled = True
    else:
        prefix, overrides, batch = "model_cpu_tiny", CPU_TINY, 16
        settings = [(64, 1.0), (64, 0.5)] if ctx.quick else [(64, 1.0), (64, 0.5), (32, 1.0)]
        amp, warmup, iters = None, 2, 10
        compiled = not ctx.quick
        if not compiled:
            ctx.skip(f"{prefix}/fastvit_*,timm_compiled_*", "compiled runs skipped with --quick on CPU "
                     "(inductor takes ~30-70 s a shape on 2 cores); fastvit numbers are eager")
        ctx.skip(f"{prefix}/*_mfu", "MFU is against an H100 peak: GPU only")
    o = ctx.opts
    batch = o.get("batch", batch)
    settings = [tuple(x) if len(x) == 3 else (x[0], x[1], batch) for x in o.get("settings", settings)]
    iters, compiled = o.get("iters", iters), o.get("compiled", compiled)
    sync = (lambda: torch.cuda.synchronize(dev)) if gpu else None
    peak = o.get("peak_tflops") or (peak_tflops(dev) if gpu else None)
    out: dict[str, float] = _locality(ctx, prefix, dev, amp, sync) if o.get("locality", True) else {}
    ctx.save_partial(out)
    g = torch.Generator(device="cpu").manual_seed(0)

    def batch_for(res, b=batch):
        x = torch.randint(0, 256, (b, 3, res, res), dtype=torch.uint8, generator=g).to(dev)
        y = torch.randint(0, 1000, (b,), generator=g).to(dev)
        return x, y

    def record(name, label, img_s, cfg, res, keep):
        out[f"{prefix}/{name}_img_s@{label}"] = img_s
        tflops = img_s * train_flops(cfg, res, keep, sparse_locality=gpu and cfg.sparse_locality) / 1e12
        out[f"{prefix}/{name}_tflops@{label}"] = tflops
        if gpu and peak:
            out[f"{prefix}/{name}_mfu@{label}"] = tflops / peak
        _ratios(prefix, settings, compiled, out)          # every ratio both sides of which are known
        ctx.save_partial(out)

    # ---- fastvit: vit_small_local (the headline) and vit_small_plain
    # vit_small_local with the locality conv as fusable taps (impl choice for the GPU; full GPU run only)
    # vit_small_local with today's scatter -> conv -> gather locality (GPU: the sparse kernel's gain on a step)
    variants = [("local", "local", {}), ("plain", "plain", {})]
    if gpu:
        variants.append(("local_scatter", "local", {"sparse_locality": False}))
    if gpu and not ctx.quick:
        variants.append(("local_taps", "local", {"dwconv_impl": "taps"}))
    if "variants" in o:
        variants = [v for v in variants if v[0] in o["variants"]]
    timm_compiled = o.get("timm_compiled", compiled)
    timm_modes = ["eager"] + (["compiled"] if timm_compiled else [])
    if o.get("timm_first"):   # the baseline first: cheap, and a time box then cuts fastvit shapes, not it
        _timm(ctx, prefix, overrides, dev, gpu, amp, warmup, iters, sync, settings, timm_modes, batch_for, record,
              out, timm_compiled)
    for variant, kind, extra in variants:
        model = fastvit_graph(kind, overrides, dev, extra)
        cfg = model.cfg
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
        runner, tag = model, (f"fastvit_{variant}" if compiled else f"fastvit_{variant}_eager")
        for res, keep, b in settings:
            if compiled:   # this shape's graph now (one at a time: a time box keeps the shapes done)
                runner = compile_model(model, shapes=[(res, keep, b)], amp_dtype=amp)
                for (r, k, _, _), sec in runner.compile_seconds.items():
                    out[f"{prefix}/{tag}_compile_s@{_label(r, k)}"] = sec
            x, y = batch_for(res, b)
            dt = timeit(_train_step(runner, opt, x, y, amp, _fastvit_call(keep)), warmup=warmup, iters=iters, sync=sync)
            record(tag, _label(res, keep), b / dt, cfg, res, keep)
        del model, runner, opt
        if gpu:
            torch.cuda.empty_cache()
    if not o.get("timm_first"):
        _timm(ctx, prefix, overrides, dev, gpu, amp, warmup, iters, sync, settings, timm_modes, batch_for, record,
              out, timm_compiled)
    if o.get("compile_modes"):
        _compile_modes(ctx, prefix, overrides, dev, amp, warmup, iters, sync, batch_for, out, o["compile_modes"])
    _ratios(prefix, settings, compiled, out)
    return out


def _compile_modes(ctx, prefix, overrides, dev, amp, warmup, iters, sync, batch_for, out, spec) -> None:
    """One shape (the 64-px stage: the one most at risk of being host-bound) trained under each
    torch.compile mode, a fresh model each: default, max-autotune-no-cudagraphs (Triton/cuBLAS GEMM
    autotuning), reduce-overhead (CUDA graphs: one replay per step instead of hundreds of launches)."""
    from fastvit.models import compile_model

    res, keep, b = spec["res"], spec["keep"], spec["batch"]
    lab = _label(res, keep)
    for mode in spec.get("modes", ("default", "max-autotune-no-cudagraphs", "reduce-overhead")):
        model = fastvit_graph("local", overrides, dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ctx.cuda)
        runner = compile_model(model, shapes=[(res, keep, b)], amp_dtype=amp,
                               mode=None if mode == "default" else mode)
        out[f"{prefix}/compile_mode_compile_s@{lab}:{mode}"] = sum(runner.compile_seconds.values())
        x, y = batch_for(res, b)
        step = _train_step(runner, opt, x, y, amp, _fastvit_call(keep))
        if mode == "reduce-overhead":          # a new CUDA-graph tree step per training step
            inner = step

            def step():
                torch.compiler.cudagraph_mark_step_begin()
                inner()
        out[f"{prefix}/compile_mode_img_s@{lab}:{mode}"] = b / timeit(step, warmup=warmup, iters=iters, sync=sync)
        base = out.get(f"{prefix}/compile_mode_img_s@{lab}:default")
        if base:
            out[f"{prefix}/compile_mode_over_default@{lab}:{mode}"] = out[f"{prefix}/compile_mode_img_s@{lab}:{mode}"] / base
        ctx.save_partial(out)
        del model, runner, opt
        if ctx.cuda:
            torch.cuda.empty_cache()


def _timm(ctx, prefix, overrides, dev, gpu, amp, warmup, iters, sync, settings, timm_modes, batch_for, record, out,
          timm_compiled=True):
    """timm vit_small_patch16_224, eager (AMP) and compiled, all patches, at the batch of each resolution's
    first setting; compiled only at the resolutions `timm_compiled` lists (True: all)."""
    batches = {}
    for res, _, b in settings:
        batches.setdefault(res, b)
    for mode in timm_modes:
        t, runner, timm_cfg, mean, std = timm_graph(overrides, dev, compiled=mode == "compiled")
        opt = torch.optim.AdamW(t.parameters(), lr=1e-4, fused=gpu)
        for res, b in batches.items():     # all patches: once per resolution
            if mode == "compiled" and timm_compiled is not True and res not in timm_compiled:
                continue
            x, y = batch_for(res, b)
            step = _train_step(runner, opt, x, y, amp, _timm_call(mean, std))
            if mode == "compiled":
                t0 = time.perf_counter()
                step()
                if sync:
                    sync()
                out[f"{prefix}/timm_compiled_compile_s@{res}"] = time.perf_counter() - t0
            dt = timeit(step, warmup=warmup, iters=iters, sync=sync)
            record(f"timm_{mode}", _label(res, 1.0), x.shape[0] / dt, timm_cfg, res, 1.0)
        del t, runner, opt
        if gpu:
            torch.cuda.empty_cache()


def _ratios(prefix, settings, compiled, out) -> None:
    """fastvit = the compiled locality model (on CPU --quick, eager vs eager) over timm, per setting. A
    ratio is left out when a side was not measured (variants left out by ctx.opts)."""
    fv = "fastvit_local" if compiled else "fastvit_local_eager"
    fvp = "fastvit_plain" if compiled else "fastvit_plain_eager"
    head = "fastvit" if compiled else "fastvit_eager"

    def ratio(name, a, b):
        if a in out and b in out:
            out[name] = out[a] / out[b]

    for res, keep, *_ in settings:
        lab, full = _label(res, keep), _label(res, 1.0)
        base = f"{prefix}/timm_eager_img_s@{full}"                     # timm keeps every patch
        ratio(f"{prefix}/{head}_over_timm_eager@{lab}", f"{prefix}/{fv}_img_s@{lab}", base)
        ratio(f"{prefix}/{head}_plain_over_timm_eager@{lab}", f"{prefix}/{fvp}_img_s@{lab}", base)
        ratio(f"{prefix}/fastvit_sparse_over_scatter_step@{lab}", f"{prefix}/{fv}_img_s@{lab}",
              f"{prefix}/fastvit_local_scatter_img_s@{lab}")
        ratio(f"{prefix}/fastvit_taps_over_fastvit@{lab}", f"{prefix}/fastvit_local_taps_img_s@{lab}",
              f"{prefix}/{fv}_img_s@{lab}")
        if compiled:
            ratio(f"{prefix}/fastvit_over_timm_compiled@{lab}", f"{prefix}/{fv}_img_s@{lab}",
                  f"{prefix}/timm_compiled_img_s@{full}")
