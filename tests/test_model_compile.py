"""torch.compile(fullgraph=True) of vit_tiny_local at two resolutions with keep 0.5, through
compile_model (ahead-of-time compile of given shapes; the trainer compiles the same way, at each
shape's first call in its probe): no graph breaks, one graph per shape, same numbers as
eager. Inductor on CPU is slow to compile (~30 s a shape on 2 cores), so the model is vit_tiny_local
shrunk by overrides (depth 1, dim 32, 2 heads) at 32 and 64 px; the graph is the same code."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvit.models import compile_model, create_model


def _grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def test_compile_fullgraph_two_resolutions_keep_half_one_graph_per_shape():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters of graphs other tests compiled
    torch.manual_seed(0)
    m = create_model("vit_tiny_local", num_classes=5, depth=1, embed_dim=32, num_heads=2).train()
    shapes = [(32, 0.5, 2), (64, 0.5, 2)]
    # fallback_random: the in-graph patch sampling draws from the same RNG stream as eager, so the
    # compiled and eager runs keep the same patches and their numbers can be compared
    with torch._inductor.config.patch(fallback_random=True):
        cm = compile_model(m, shapes=shapes)         # fullgraph=True: a graph break would raise here
        assert set(cm.compile_seconds) == {(32, 0.5, 2, "train"), (64, 0.5, 2, "train")}
        assert all(p.grad is None for p in m.parameters()) and m.training
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(shapes)   # one per shape

        for res in (32, 64):
            x = torch.randint(0, 256, (2, 3, res, res), dtype=torch.uint8)
            y = torch.tensor([1, 4])
            outs, grads = [], []
            for model in (cm, m):
                torch.manual_seed(7)
                out = model(x, keep_rate=0.5)
                F.cross_entropy(out, y).backward()
                outs.append(out.detach())
                grads.append(_grads(m))
                m.zero_grad(set_to_none=True)
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
            for n in grads[1]:
                torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-5,
                                           msg=lambda s, n=n: f"{n}: {s}")
    # the warmed-up shapes ran again without compiling anything new
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(shapes)


@pytest.mark.cuda
def test_compile_vit_small_local_bf16_on_gpu_matches_eager():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()   # reset() keeps the counters: earlier tests' graphs would count
    torch.manual_seed(0)
    m = create_model("vit_small_local", num_classes=10).cuda().train()
    shapes = [(224, 0.5, 8), (128, 1.0, 8)]
    with torch._inductor.config.patch(fallback_random=True):
        cm = compile_model(m, shapes=shapes, amp_dtype=torch.bfloat16)
        for res, keep, B in shapes:
            x = torch.randint(0, 256, (B, 3, res, res), dtype=torch.uint8, device="cuda")
            kw = {"keep_rate": keep} if keep < 1.0 else {}
            outs = []
            for model in (cm, m):
                torch.manual_seed(3)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    outs.append(model(x, **kw).float().detach())
                m.zero_grad(set_to_none=True)
            torch.testing.assert_close(outs[0], outs[1], rtol=5e-2, atol=5e-2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(shapes)
