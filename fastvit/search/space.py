"""The search space: isotropic locality ViTs (fastvit.models.ViTConfig) by depth, width, heads, MLP
ratio, patch size and locality on/off, and As-ViT's growth proposals for one of them.

    cands = search_space(depths=(4, 6), widths=(192, 256), heads=(3, 4), mlp_ratios=(4,), patches=(16,),
                         locality=(True, False), res=96)
    grow_proposals(cands[0])          # +0/+1 block × width +0/5/10/15/20 % (not both +0)

All pure: a Candidate is a frozen value, its key names its result file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

WIDTH_STEPS = (0.05, 0.10, 0.15, 0.20)   # As-ViT's growth ratios of the width


@dataclass(frozen=True)
class Candidate:
    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    local: bool

    @property
    def key(self) -> str:
        """A file-name-safe name, e.g. d4-w192-h3-r4-p16-local."""
        return (f"d{self.depth}-w{self.embed_dim}-h{self.num_heads}-r{self.mlp_ratio:g}-p{self.patch_size}-"
                f"{'local' if self.local else 'plain'}")

    @property
    def model_name(self) -> str:
        """The registered variant whose overrides give this shape (tiny's; every size field overridden)."""
        return f"vit_tiny_{'local' if self.local else 'plain'}"

    def overrides(self) -> dict:
        """ViTConfig fields (and fastvit-train's model settings) besides the variant name."""
        return {"depth": self.depth, "embed_dim": self.embed_dim, "num_heads": self.num_heads,
                "mlp_ratio": float(self.mlp_ratio), "patch_size": self.patch_size}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        return cls(depth=int(d["depth"]), embed_dim=int(d["embed_dim"]), num_heads=int(d["num_heads"]),
                   mlp_ratio=float(d["mlp_ratio"]), patch_size=int(d["patch_size"]), local=bool(d["local"]))


def valid(c: Candidate, res: int) -> str | None:
    """Why `c` cannot train at final resolution `res` (None: it can)."""
    if c.depth < 1 or c.embed_dim < 1 or c.num_heads < 1 or c.mlp_ratio <= 0:
        return "non-positive size"
    if c.embed_dim % c.num_heads:
        return f"width {c.embed_dim} is not divisible by {c.num_heads} heads"
    if res % c.patch_size or 224 % c.patch_size:
        return f"patch {c.patch_size} does not divide the resolution {res} (and the base grid 224)"
    return None


def search_space(*, depths, widths, heads, mlp_ratios, patches, locality, res: int) -> list[Candidate]:
    """Every valid combination, in a fixed order (depth, width, heads, ratio, patch, locality)."""
    out = []
    for d in depths:
        for w in widths:
            for h in heads:
                for r in mlp_ratios:
                    for p in patches:
                        for loc in locality:
                            c = Candidate(int(d), int(w), int(h), float(r), int(p), bool(loc))
                            if valid(c, res) is None:
                                out.append(c)
    return out


def grown_width(width: int, ratio: float, heads: int) -> int:
    """round(width·(1 + ratio)) to the nearest multiple of 2·heads (even head dims), never below width."""
    step = 2 * heads
    return max(width, int(round(width * (1.0 + ratio) / step)) * step)


def grow_proposals(c: Candidate, steps=WIDTH_STEPS) -> list[Candidate]:
    """As-ViT's growth step for an isotropic net: its seed space adds one block in one of 4 stages ×
    width +5/10/15/20 %; ours has one stage, so the proposals are depth +0 or +1 × width +0 or a step,
    without the unchanged net (9 at most; duplicates after rounding the width removed, order kept)."""
    out: list[Candidate] = []
    for dd in (0, 1):
        for ratio in (0.0, *steps):
            w = grown_width(c.embed_dim, ratio, c.num_heads) if ratio else c.embed_dim
            g = Candidate(c.depth + dd, w, c.num_heads, c.mlp_ratio, c.patch_size, c.local)
            if g != c and g not in out:
                out.append(g)
    return out
