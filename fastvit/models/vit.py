"""The locality ViT: trains on a sampled subset of patches, at any resolution (multiple of the patch).

    m = create_model("vit_small_local", num_classes=1000)
    logits = m(images, keep_rate=0.5)     # or keep_idx=(B,K) tensor; images uint8 (B,3,H,W) or float

Forward, for an input with an (H/p) x (W/p) patch grid:
  1. which patches: keep_idx (B,K) given, or K = num_kept_patches(N, keep_rate) drawn per image with
     fastvit.kernels.sample_keep_indices; keep_rate None/1.0 -> all N patches (dense fast path).
  2. positional embedding: the learned (1, N0, D) parameter on the base grid, resampled bicubically to
     the input's grid inside forward -- the same nn.Parameter trains at every curriculum resolution.
  3. fastvit.kernels.embed_kept_patches: normalize + patchify + project only the kept patches + pos.
     `patch_size=q` (coarse-to-fine tokens) tokenizes with q x q patches: the master (D,3,p,p) weight
     resized to q (cfg.token_resize: PI-resize or pooled, fastvit.models.flexi) and the positional embedding
     resampled to the (H/q)x(W/q) grid.
  4. blocks: pre-norm attention + pre-norm MLP (locality MLP for `_local`, timm's GELU Mlp for `_plain`).
     Sampled tokens where the Triton kernels run (CUDA, or TRITON_INTERPRET=1): the locality conv
     works on the kept tokens through one neighbour table built here per forward
     (fastvit.kernels.sparse_local_dwconv); elsewhere local_dwconv's scatter -> conv -> gather.
  5. head: mean over the kept tokens + fc_norm + linear ("gap"), or norm + class token ("token").

Input convention: uint8 images are pixels in 0-255 and are normalized with cfg.mean/cfg.std (0-255
units). Floating-point images are taken to be in [0, 1] (uint8 / 255) and use mean/255, std/255, so
`m(u8)` and `m(u8.float() / 255)` give the same logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.layers.pos_embed import resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

from fastvit.kernels import build_neighbours, embed_kept_patches, sample_keep_indices, use_triton
from fastvit.stage import num_kept as num_kept_patches   # the one rounding rule (half up), shared with the planner

from .configs import ViTConfig
from .flexi import RESIZES
from .layers import Attention, LocalityMlp


class Block(nn.Module):
    """Pre-norm transformer block; parameter names follow timm's Block (norm1, attn, norm2, mlp)."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        dim = cfg.embed_dim
        self.local = cfg.local
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, qkv_bias=cfg.qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        if cfg.local:
            self.mlp = LocalityMlp(dim, cfg.mlp_hidden, impl=cfg.dwconv_impl)
        else:
            self.mlp = Mlp(dim, cfg.mlp_hidden, act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid_hw: tuple[int, int], keep_idx: torch.Tensor | None,
                num_prefix: int, nbr: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))                          # (B,T,D)
        h = self.norm2(x)
        h = self.mlp(h, grid_hw, keep_idx, num_prefix, nbr) if self.local else self.mlp(h)
        return x + self.drop_path2(h)


class KeptPatchEmbed(nn.Module):
    """Thin module over fastvit.kernels.embed_kept_patches. The nn.Conv2d holds the projection in
    timm's PatchEmbed layout (patch_embed.proj.weight (D,3,p,p)) and init; it is never run as a conv.
    At another patch size q (coarse-to-fine tokens) the one master weight is resized to (D,3,q,q) on
    the fly (`resize`: "pi" PI-resize or "pool" the same weights on the pooled patch, fastvit.models.flexi),
    so every patch size trains the same parameter and gives the same token layout."""

    def __init__(self, patch_size: int, embed_dim: int, resize: str = "pi"):
        super().__init__()
        self.patch_size = patch_size
        self.resize = resize
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images, keep_idx, pos_embed, mean, std, patch_size: int | None = None) -> torch.Tensor:
        weight = self.proj.weight if patch_size in (None, self.patch_size) else \
            RESIZES[self.resize](self.proj.weight, patch_size)
        return embed_kept_patches(images, keep_idx, weight, self.proj.bias, pos_embed, mean, std)


class LocalityViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        gh, gw = cfg.base_grid
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.patch_embed = KeptPatchEmbed(cfg.patch_size, D, cfg.token_resize)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw, D))              # (1,N0,D), base grid
        else:
            self.pos_embed = None
            # fixed; not saved (rebuilt from the config), resampled like the learned one
            self.register_buffer("pos_embed_fixed", build_sincos2d_pos_embed([gh, gw], D).unsqueeze(0),
                                 persistent=False)
        # stochastic depth: linear ramp 0 -> drop_path_rate over the blocks (plain floats: meta-device safe)
        dpr = [cfg.drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, dpr[i]) for i in range(cfg.depth)])
        # progressive growth (fastvit.models.grow): the blocks a forward runs, in order; None: all of them.
        # A plain attribute: torch.compile guards on it, so each block set is its own graph.
        self.active_blocks: tuple[int, ...] | None = None
        # timm naming: "token" head -> final norm then class token; "gap" head -> pool then fc_norm.
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.head == "token" else nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.head == "gap" else nn.Identity()
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ---------------------------------------------------------------- init / optimizer surface
    def init_weights(self) -> None:
        """timm's ViT init: trunc-normal(.02) linears and pos-embed, tiny class token, zero biases.
        Convolutions (patch projection, depthwise) keep PyTorch's default (fan-in) init."""
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    # ---------------------------------------------------------------- forward pieces
    def pos_embed_for_grid(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """(N,D) positional embedding for a gh x gw grid: the base-grid table resampled bicubically
        (antialiased when shrinking, timm's rule); on the base grid it is the parameter itself."""
        table = self.pos_embed if self.pos_embed is not None else self.pos_embed_fixed   # (1,N0,D)
        pos = resample_abs_pos_embed(table, new_size=list(grid_hw), old_size=list(self.cfg.base_grid),
                                     num_prefix_tokens=0)
        return pos[0]                                                                # (N,D)

    def norm_stats(self, images: torch.Tensor) -> tuple[tuple, tuple]:
        """mean/std in the units of `images`: 0-255 for uint8, 0-1 for floating point."""
        if images.dtype == torch.uint8:
            return self.cfg.mean, self.cfg.std
        return tuple(v / 255.0 for v in self.cfg.mean), tuple(v / 255.0 for v in self.cfg.std)

    def forward_features(self, images: torch.Tensor, keep_rate: float | None = None,
                         keep_idx: torch.Tensor | None = None,
                         generator: torch.Generator | None = None,
                         patch_size: int | None = None) -> torch.Tensor:
        """(B,3,H,W) -> (B,P+K,D) tokens after the blocks (and the final norm for the token head).
        patch_size: tokenize with this patch (the master weight resized by cfg.token_resize; None: cfg.patch_size)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B,3,H,W), got {tuple(images.shape)}")
        B, _, H, W = images.shape
        p = patch_size or self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image sides {H}x{W} must be multiples of the patch size {p}")
        grid_hw = (H // p, W // p)
        N = grid_hw[0] * grid_hw[1]
        if keep_idx is not None and keep_rate is not None:
            raise ValueError("pass keep_rate or keep_idx, not both")
        if keep_idx is None:
            K = num_kept_patches(N, keep_rate)
            if K < N:
                keep_idx = sample_keep_indices(B, N, K, images.device, generator=generator)  # (B,K)
        elif keep_idx.dim() != 2 or keep_idx.shape[0] != B:
            raise ValueError(f"keep_idx must be (B={B}, K), got {tuple(keep_idx.shape)}")
        # Dense fast path (keep_idx None inside the blocks): no scatter/gather around the convs. The
        # embedding still takes the identity index; results equal passing keep_idx = arange(N).
        embed_idx = keep_idx if keep_idx is not None else torch.arange(N, device=images.device).expand(B, N)
        mean, std = self.norm_stats(images)
        pos = self.pos_embed_for_grid(grid_hw)                                       # (N,D)
        x = self.patch_embed(images, embed_idx, pos, mean, std, patch_size=p)        # (B,K,D)
        # Residual stream in the parameters' dtype (fp32 under autocast, as in timm): the kernel
        # returns the autocast dtype, and 12 bf16 residual adds would cost accuracy.
        x = x.to(self.patch_embed.proj.weight.dtype)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)             # (B,1+K,D)
        # Sampled tokens on the Triton path: one neighbour table per forward, shared by every block's
        # sparse locality conv. keep_idx None (all patches): the dense conv, no table, no scatter/gather;
        # an explicit keep_idx of all N patches (any order) keeps the exact dense conv's arithmetic.
        nbr = None
        if (keep_idx is not None and keep_idx.shape[1] < N and self.cfg.local and self.cfg.sparse_locality
                and use_triton(images)):
            nbr = build_neighbours(keep_idx, grid_hw)                                 # (B,K,9)
        blocks = self.blocks if self.active_blocks is None else [self.blocks[i] for i in self.active_blocks]
        for blk in blocks:
            x = blk(x, grid_hw, keep_idx, self.num_prefix_tokens, nbr)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B,P+K,D) -> (B,num_classes): mean over kept patch tokens ("gap") or the class token."""
        if self.cfg.head == "token":
            x = x[:, 0]                                                              # (B,D)
        else:
            x = x[:, self.num_prefix_tokens:].mean(dim=1)                            # (B,D)
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor, keep_rate: float | None = None,
                keep_idx: torch.Tensor | None = None,
                generator: torch.Generator | None = None,
                patch_size: int | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(images, keep_rate, keep_idx, generator, patch_size))


def vit_forward_flops(cfg: ViTConfig, res: int | tuple[int, int], keep: int | None = None,
                      sparse_locality: bool = False) -> float:
    """Forward FLOPs per image (2 per multiply-add), for MFU. K kept patches (None: all), T = P + K.

        embed     2*K*(3*p*p)*D
        per block 2*T*D*3D (qkv) + 2*2*T*T*D (QK^T, AV) + 2*T*D*D (proj) + 2*2*T*D*C (fc1, fc2)
                  + locality: 2*9*C*N (the dense 3x3 dw-conv over the full zero-filled grid), or
                    2*9*C*K with `sparse_locality` (the Triton kernel over the kept tokens)
        head      2*D*classes
    A training step (fwd + bwd) is 3x this.
    """
    h, w = (res, res) if isinstance(res, int) else res
    N = (h // cfg.patch_size) * (w // cfg.patch_size)
    K = N if keep is None else keep
    T = cfg.num_prefix_tokens + K
    D, C = cfg.embed_dim, cfg.mlp_hidden
    block = 2 * T * D * 3 * D + 4 * T * T * D + 2 * T * D * D + 4 * T * D * C
    if cfg.local:
        block += 2 * 9 * C * (K if sparse_locality else N)
    return float(2 * K * 3 * cfg.patch_size ** 2 * D + cfg.depth * block + 2 * D * cfg.num_classes)


def train_flops(cfg: ViTConfig, res: int, keep: float | None = None, sparse_locality: bool = False) -> float:
    """Forward + backward FLOPs per image (3 x vit_forward_flops) at `res` and keep rate `keep`."""
    N = (res // cfg.patch_size) ** 2
    return 3.0 * vit_forward_flops(cfg, res, num_kept_patches(N, keep), sparse_locality=sparse_locality)


def train_flops_per_image(model: nn.Module, res: int, keep: float | None = None, *, gpu: bool = True,
                          patch_size: int | None = None, depth: int | None = None) -> float:
    """train_flops of a LocalityViT (on a GPU its locality conv runs over the kept tokens when
    cfg.sparse_locality; `patch_size`: tokenized with that patch, coarse-to-fine tokens; `depth`: the
    blocks a --growth stage runs, not the model's full depth), or of the timm ViT inside a TimmBaseline
    (class token, plain MLP, all patches)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and (patch_size not in (None, cfg.patch_size) or depth not in (None, cfg.depth)):
        import dataclasses

        cfg = dataclasses.replace(cfg, patch_size=patch_size or cfg.patch_size, depth=depth or cfg.depth)
    if cfg is None:                                   # TimmBaseline: read the timm model's shape
        m = model.model
        cfg = ViTConfig(embed_dim=m.embed_dim, depth=len(m.blocks), num_heads=m.blocks[0].attn.num_heads,
                        mlp_ratio=m.blocks[0].mlp.fc1.out_features / m.embed_dim,
                        patch_size=m.patch_embed.patch_size[0], img_size=res - res % m.patch_embed.patch_size[0],
                        num_classes=m.num_classes, local=False, class_token=True, head="token")
        keep = None
    return train_flops(cfg, res, keep, sparse_locality=gpu and cfg.sparse_locality)
