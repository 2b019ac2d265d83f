"""bench section 'kernel': the fused token-dropping patch embedding vs the usual way.

ViT-S/16 dimensions (D=384, p=16), bf16 autocast over fp32 parameters (how training runs), uint8
images as the loader delivers them, keep_idx from `sample_keep_indices`. Each timing is forward +
backward (grads for W, bias, pos_embed; none for the image) of:

  (a) fused      `embed_kept_patches`: one Triton kernel each way, straight from uint8 (needs CUDA)
  (b) timm       normalize to a float image, `timm.layers.PatchEmbed` conv on ALL patches, then gather
                 the kept tokens and add pos_embed[keep_idx] (gathering before the pos add makes this
                 baseline slightly cheaper than timm's own pos-add-then-PatchDropout order)
  (c) reference  `embed_kept_patches_reference` (plain PyTorch: normalize, conv all, gather, + pos)

Metrics, per setting `@{res},keep{rate}`:
  kernel/{fused,timm,reference}_ms      median milliseconds of one forward+backward
  kernel/fused_over_timm                timm_ms / fused_ms       (> 1: fused is faster)
  kernel/fused_over_reference           reference_ms / fused_ms  (> 1: fused is faster)
  kernel/reference_over_timm            timm_ms / reference_ms   (CPU runs, where (a) cannot run)
  kernel/fused_TFLOPs                   4*M*D*Kd / fused time; M = B*K kept tokens, Kd = 3*p*p:
                                        2*M*D*Kd for the forward GEMM + 2*M*D*Kd for dW (no dX GEMM)
  kernel/fused_GBps                     fused_bytes() / fused time: the bytes the two kernels must move
                                        (formula in `fused_bytes`); compare with the GPU's HBM peak
                                        (H100 SXM ~3.35 TB/s, ~990 dense bf16 TFLOP/s; the issue's
                                        round numbers are 3 TB/s and 790 TFLOP/s)

Without CUDA the fused metrics are skipped (the Triton interpreter is a correctness tool, not a
speed) and (b) vs (c) run at a small batch.

ctx.opts (bench/gpu_check.py): "batch", "resolutions" (default 224, 128), "keeps", "iters".
"""
from __future__ import annotations

import statistics

from fastvit.stage import num_kept

from . import SectionSkipped, timeit

D, PATCH = 384, 16
KEEPS = (0.25, 0.5, 0.75, 1.0)
MEAN_U8 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_U8 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def fused_bytes(B: int, K: int, N: int, *, image_bytes: int = 1, act_bytes: int = 2,
                param_bytes: int = 4, idx_bytes: int = 8) -> int:
    """Bytes the fused forward + backward read or write in HBM at minimum.

    M = B*K tokens, Kd = 3*p*p:
      forward : M*Kd*image_bytes (kept pixels) + M*idx_bytes + D*Kd*param_bytes (W)
                + M*D*param_bytes (pos_embed rows) + D*param_bytes (bias) + M*D*act_bytes (tokens out)
      backward: M*Kd*image_bytes (pixels again, recomputed patches) + M*idx_bytes + M*D*act_bytes (dY)
                + D*Kd*4 (dW, fp32) + N*D*4 (dPos, fp32; each row written once after the atomics
                resolve in L2) + D*Kd*param_bytes + N*D*param_bytes (grads cast to the params' dtype)
    """
    M, Kd = B * K, 3 * PATCH * PATCH
    fwd = M * Kd * image_bytes + M * idx_bytes + D * Kd * param_bytes + M * D * param_bytes \
        + D * param_bytes + M * D * act_bytes
    bwd = M * Kd * image_bytes + M * idx_bytes + M * D * act_bytes + D * Kd * 4 + N * D * 4 \
        + D * Kd * param_bytes + N * D * param_bytes
    return fwd + bwd


def _median_ms(fn, ctx, iters: int) -> float:
    """Median ms of one fn() call. CUDA: events around a run of calls (no per-call host sync)."""
    import torch

    if not ctx.cuda:
        return 1e3 * timeit(fn, warmup=1, iters=iters)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) / iters)
    return statistics.median(runs)


def run(ctx) -> dict[str, float]:
    try:
        import timm.layers
        import torch
    except ImportError as e:
        raise SectionSkipped(f"needs torch and timm ({e})")
    from fastvit.kernels import embed_kept_patches, embed_kept_patches_reference, sample_keep_indices

    dev = ctx.device
    if ctx.cuda:
        batch, keeps, iters = (64, KEEPS, 5) if ctx.quick else (256, KEEPS, 20)
    else:
        batch, keeps, iters = (4, (0.5, 1.0), 3) if ctx.quick else (16, KEEPS, 3)
    batch = ctx.opts.get("batch", batch)
    keeps = tuple(ctx.opts.get("keeps", keeps))
    iters = ctx.opts.get("iters", iters)
    gen = torch.Generator(device=dev).manual_seed(0)
    out: dict[str, float] = {}
    for res in ctx.opts.get("resolutions", (224, 128)):
        pe = timm.layers.PatchEmbed(img_size=res, patch_size=PATCH, in_chans=3, embed_dim=D).to(dev)
        N = pe.num_patches
        pos = torch.nn.Parameter(torch.randn(N, D, device=dev) * 0.02)
        params = [pe.proj.weight, pe.proj.bias, pos]
        images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=dev, generator=gen)
        mean_t = torch.tensor(MEAN_U8, device=dev).view(1, 3, 1, 1)
        std_t = torch.tensor(STD_U8, device=dev).view(1, 3, 1, 1)

        def timm_way(keep_idx):
            x = (images.float() - mean_t) / std_t                                  # (B,3,r,r) fp32
            tokens = pe(x)                                                         # (B,N,D) all patches
            kept = torch.gather(tokens, 1, keep_idx[..., None].expand(-1, -1, D))  # (B,K,D)
            return kept + pos[keep_idx]

        def fused(keep_idx):
            return embed_kept_patches(images, keep_idx, pe.proj.weight, pe.proj.bias, pos, MEAN_U8, STD_U8)

        def reference(keep_idx):
            return embed_kept_patches_reference(images, keep_idx, pe.proj.weight, pe.proj.bias, pos,
                                                MEAN_U8, STD_U8)

        for keep in keeps:
            K = num_kept(N, keep)
            keep_idx = sample_keep_indices(batch, N, K, dev, generator=gen)
            grad = torch.randn(batch, K, D, device=dev, dtype=torch.bfloat16, generator=gen)
            tag = f"@{res},keep{keep:g}"

            def step(impl):
                def fn():
                    for p in params:
                        p.grad = None
                    with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16):
                        y = impl(keep_idx)                                         # (B,K,D) bf16
                    y.backward(grad.to(y.dtype))
                return fn

            times = {"timm": _median_ms(step(timm_way), ctx, iters),
                     "reference": _median_ms(step(reference), ctx, iters)}
            if ctx.cuda:
                if keep == keeps[0]:
                    _check_fused(fused, reference, keep_idx, torch)
                times["fused"] = _median_ms(step(fused), ctx, iters)
                out[f"kernel/fused_over_timm{tag}"] = times["timm"] / times["fused"]
                out[f"kernel/fused_over_reference{tag}"] = times["reference"] / times["fused"]
                M = batch * K
                out[f"kernel/fused_TFLOPs{tag}"] = 4 * M * D * 3 * PATCH ** 2 / (times["fused"] * 1e-3) / 1e12
                out[f"kernel/fused_GBps{tag}"] = fused_bytes(batch, K, N) / (times["fused"] * 1e-3) / 1e9
            else:
                ctx.skip(f"kernel/fused_*{tag}", "the fused Triton kernel needs a CUDA GPU")
                out[f"kernel/reference_over_timm{tag}"] = times["timm"] / times["reference"]
            for name, t in times.items():
                out[f"kernel/{name}_ms{tag}"] = t
            ctx.save_partial(out)
    return out


def _check_fused(fused, reference, keep_idx, torch) -> None:
    """Refuse to time a fused kernel that disagrees with the reference."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = fused(keep_idx).float(), reference(keep_idx).float()
    err = (a - b).abs().max().item()
    if err > 0.05 * max(1.0, b.abs().max().item()):
        raise RuntimeError(f"fused output differs from the reference by {err:.3g}; not timing it")
