"""As-ViT's two training-free measures of a network at initialisation (Chen et al., ICLR 2022).

    kappa = ntk_condition(model, images)            # one initialisation; lower is better
    L     = length_distortion(model, res, gen)      # one initialisation; higher is better
    m     = measure(make_model, images, inits=5)    # both, each the mean over `inits` fresh inits

As the authors' released code computes them (lib/procedures/ntk.py, teg.py in VITA-Group/AsViT):

- NTK condition number κ: the network in train mode with its LayerNorms; output z = the global-average
  pooled features before the final norm (not the logits); per image i, g_i = ∂(Σ z_i)/∂W over every
  parameter whose name contains `weight` (biases, positional embedding and class token excluded),
  flattened; K = G Gᵀ (n×n, n = 16 images); κ = λmax/λmin. A NaN, an infinite or a non-positive λmin
  (a rank-deficient kernel) counts as the worst value, +inf.
- Expected length distortion L: every LayerNorm replaced by the identity; the input is the unit circle
  x(θ) = U·[cos θ, sin θ] in a random 2-D plane of (normalised) pixel space, U = the 2 orthonormal
  columns of the SVD of a Gaussian (C·H·W, 2) matrix, at 10 values of θ = linspace(0, 2π); L =
  Σ_θ ‖∂z/∂θ‖₂, each ∂z/∂θ one forward-mode pass (torch.func.jvp, tangent U·[−sin θ, cos θ]).

The circle lives in the space the first layer sees (the authors feed it after their data
normalisation), so for L the fused uint8 patch embedding (which normalises inside, and has no
forward-mode derivative) is replaced by the same projection as a plain strided convolution on the
already-normalised input. Attention runs on SDPA's math backend there (the fused CPU kernel has no
forward-mode derivative either); the arithmetic is the same.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

THETAS = 10          # points on the circle (As-ViT's size_curve)
INITS = 5            # fresh initialisations per measure (As-ViT's --repeat)
NTK_IMAGES = 16      # images in the NTK (As-ViT's --batch_size)


@dataclass(frozen=True)
class Measures:
    kappa: float     # NTK condition number, mean over inits (inf: a bad kernel in some init)
    length: float    # expected length distortion, mean over inits
    params: int      # trainable parameters


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,D): the mean over the patch tokens after the last block, before any final norm
    (a LocalityViT; its `norm` is the identity for the 'gap' head and skipped for the 'token' head)."""
    norm = model.norm
    model.norm = nn.Identity()
    try:
        x = model.forward_features(images)                                          # (B,P+K,D)
    finally:
        model.norm = norm
    return x[:, model.num_prefix_tokens:].mean(dim=1)                               # (B,D)


def weight_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters As-ViT differentiates: names containing 'weight' (biases and embeddings out)."""
    return [(n, p) for n, p in model.named_parameters() if "weight" in n and p.requires_grad]


def per_sample_weight_grads(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(n, P): row i = ∂(Σ_d z_i,d)/∂W flattened over weight_params (zeros where W does not reach z).
    One forward of the batch, one backward per image (samples do not interact: LayerNorm, no BatchNorm)."""
    params = [p for _, p in weight_params(model)]
    z = pooled_features(model, images)                                              # (n,D)
    rows = []
    for i in range(z.shape[0]):
        gs = torch.autograd.grad(z[i].sum(), params, retain_graph=i + 1 < z.shape[0], allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(gs, params)]))
    return torch.stack(rows)                                                        # (n,P)


def condition_number(kernel: torch.Tensor) -> float:
    """λmax/λmin of a symmetric PSD matrix; +inf for NaN/inf entries or λmin <= 0 (the worst value)."""
    k = kernel.double()
    if not torch.isfinite(k).all():
        return math.inf
    ev = torch.linalg.eigvalsh(k)                                                   # ascending
    lo, hi = ev[0].item(), ev[-1].item()
    if not (lo > 0 and math.isfinite(hi)):
        return math.inf
    return hi / lo


def ntk_condition(model: nn.Module, images: torch.Tensor) -> float:
    """κ of one initialisation: the model is put in train mode (As-ViT's train_mode=True)."""
    model.train()
    g = per_sample_weight_grads(model, images).double()                              # (n,P)
    return condition_number(g @ g.T)                                                # (n,n)


class NormalizedPatchEmbed(nn.Module):
    """The patch projection on an input that is already normalised: conv(stride p) + positional
    embedding, in plain PyTorch (differentiable in the image, forward-mode included). Same call as
    KeptPatchEmbed; mean/std are ignored because the input is in the normalised space."""

    def __init__(self, proj: nn.Conv2d):
        super().__init__()
        self.proj = proj
        self.patch_size = proj.kernel_size[0]

    def forward(self, images, keep_idx, pos_embed, mean, std, patch_size: int | None = None) -> torch.Tensor:
        from fastvit.models.flexi import pi_resize

        q = patch_size or self.patch_size
        w = pi_resize(self.proj.weight, q)
        t = F.conv2d(images.to(w.dtype), w, self.proj.bias, stride=q)
        t = t.flatten(2).transpose(1, 2)                                            # (B,N,D)
        t = torch.gather(t, 1, keep_idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # (B,K,D)
        return t + pos_embed


def _strip_layernorms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.LayerNorm):
            setattr(module, name, nn.Identity())
        else:
            _strip_layernorms(child)


def for_length(model: nn.Module) -> nn.Module:
    """A copy of `model` as the length measure sees it: LayerNorms -> identity, plain patch projection."""
    m = copy.deepcopy(model)
    _strip_layernorms(m)
    m.patch_embed = NormalizedPatchEmbed(m.patch_embed.proj)
    return m.train()


def random_plane(res: int, generator: torch.Generator) -> torch.Tensor:
    """U (3·res·res, 2): orthonormal columns, the left singular vectors of a Gaussian matrix (fp64)."""
    u, _, _ = torch.linalg.svd(torch.randn(3 * res * res, 2, generator=generator, dtype=torch.float64),
                               full_matrices=False)
    return u


def circle_points(u: torch.Tensor, theta: torch.Tensor, res: int, dtype=torch.float32):
    """x(θ) = U·[cos θ, sin θ] and dx/dθ = U·[−sin θ, cos θ], each (T,3,res,res)."""
    theta = theta.to(torch.float64)
    x = (u @ torch.stack([theta.cos(), theta.sin()])).T                             # (T,CHW)
    dx = (u @ torch.stack([-theta.sin(), theta.cos()])).T                           # (T,CHW)
    shape = (theta.numel(), 3, res, res)
    return x.reshape(shape).to(dtype), dx.reshape(shape).to(dtype)


def circle(res: int, generator: torch.Generator, thetas: int = THETAS, dtype=torch.float32):
    """The unit circle in a random 2-D plane of (3,res,res) input space at `thetas` angles
    linspace(0, 2π). Returns (theta (T,), x (T,3,res,res), dx/dθ (T,3,res,res))."""
    theta = torch.linspace(0, 2 * math.pi, thetas, dtype=torch.float64)
    x, dx = circle_points(random_plane(res, generator), theta, res, dtype)
    return theta, x, dx


def length_distortion(model: nn.Module, res: int, generator: torch.Generator, thetas: int = THETAS) -> float:
    """L of one initialisation: Σ_θ ‖∂z/∂θ‖₂ over the circle (one jvp for all θ: samples are
    independent once the LayerNorms are gone)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = for_length(model)
    dtype = next(m.parameters()).dtype
    dev = next(m.parameters()).device
    _, x, dx = circle(res, generator, thetas, dtype)
    with sdpa_kernel([SDPBackend.MATH]):
        _, dz = torch.func.jvp(lambda inp: pooled_features(m, inp), (x.to(dev),), (dx.to(dev),))   # (T,D)
    return float(dz.detach().double().norm(dim=1).sum())


def measure(make_model: Callable[[int], nn.Module], images: torch.Tensor, res: int, *, inits: int = INITS,
            seed: int = 0, thetas: int = THETAS) -> Measures:
    """κ and L of an architecture, each the mean over `inits` fresh initialisations (make_model(seed)
    builds one, on the images' device); L draws a new plane per initialisation."""
    kappas, lengths, params = [], [], 0
    gen = torch.Generator().manual_seed(seed)
    for i in range(inits):
        model = make_model(seed + i)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kappas.append(ntk_condition(model, images))
        lengths.append(length_distortion(model, res, gen, thetas))
        del model
    kappa = math.inf if any(not math.isfinite(k) for k in kappas) else sum(kappas) / len(kappas)
    return Measures(kappa=kappa, length=sum(lengths) / len(lengths), params=params)
