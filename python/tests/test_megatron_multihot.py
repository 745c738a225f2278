"""nccl_moe.megatron.indices_to_multihot (patch() puts it in place of Megatron's
_DeepepManager._indices_to_multihot): the same multi-hot map, probabilities and gradients, on the
CPU. Against a per-entry reference always (where torch is installed), and against Megatron's own
method where megatron-core imports."""
import types

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

try:  # captured before any test runs patch() (collection imports every module first)
    from megatron.core.transformer.moe.token_dispatcher import _DeepepManager
    MEGATRON_MULTIHOT = _DeepepManager._indices_to_multihot
except Exception:  # noqa: BLE001 (megatron-core needs Python 3.12 and its own dependencies)
    MEGATRON_MULTIHOT = None

from nccl_moe.megatron import indices_to_multihot  # noqa: E402


def received(rows, topk, local, seed, empty_rows=()):
    """Top-k ids as a dispatch delivers them: distinct local ids per row, -1 for experts of other
    ranks; rows in `empty_rows` name no local expert at all. probs FP32 with a gradient."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty((0, topk), dtype=torch.int64)
    if rows > 0:
        ids = torch.stack([torch.randperm(2 * local, generator=g)[:topk] for _ in range(rows)])
    ids = torch.where(ids < local, ids, torch.full_like(ids, -1))  # the other half lives elsewhere
    for r in empty_rows:
        ids[r] = -1
    probs = torch.rand((rows, topk), generator=g, dtype=torch.float).requires_grad_()
    return ids, probs


def reference(indices, probs, local):
    """Entry by entry: map[r][e] = True and dense[r][e] = probs[r][k] where indices[r][k] = e."""
    rows, topk = indices.shape
    routing = torch.zeros((rows, local), dtype=torch.bool)
    dense = [[torch.zeros((), dtype=torch.float) for _ in range(local)] for _ in range(rows)]
    for r in range(rows):
        for k in range(topk):
            e = int(indices[r, k])
            if e >= 0:
                routing[r, e] = True
                dense[r][e] = probs[r, k]
    if rows == 0:
        return routing, torch.zeros((0, local), dtype=torch.float)
    return routing, torch.stack([torch.stack(row) for row in dense])


@pytest.mark.parametrize("rows,topk,local,empty", [(37, 8, 32, (0, 5)), (16, 2, 4, ()), (9, 1, 1, (3,)),
                                                   (0, 8, 32, ())])
def test_values_and_gradients_equal_the_reference(rows, topk, local, empty):
    manager = types.SimpleNamespace(num_local_experts=local)
    ids, probs = received(rows, topk, local, seed=rows * 131 + local, empty_rows=empty)
    probs_ref = probs.detach().clone().requires_grad_()
    routing, dense = indices_to_multihot(manager, ids, probs)
    routing_ref, dense_ref = reference(ids, probs_ref, local)
    assert routing.dtype == torch.bool and dense.dtype == torch.float
    assert routing.shape == (rows, local) and dense.shape == (rows, local)
    assert torch.equal(routing, routing_ref)
    assert torch.equal(dense, dense_ref.detach())
    if rows == 0:
        return
    upstream = torch.randn((rows, local), generator=torch.Generator().manual_seed(7))
    (dense * upstream).sum().backward()
    (dense_ref * upstream).sum().backward()
    assert torch.equal(probs.grad, probs_ref.grad)
    assert torch.all(probs.grad[ids == -1] == 0)


@pytest.mark.skipif(MEGATRON_MULTIHOT is None, reason="megatron-core is not importable")
def test_equals_megatrons_own_method():
    manager = types.SimpleNamespace(num_local_experts=32)
    ids, probs = received(64, 8, 32, seed=11, empty_rows=(2,))
    probs_m = probs.detach().clone().requires_grad_()
    routing, dense = indices_to_multihot(manager, ids, probs)
    routing_m, dense_m = MEGATRON_MULTIHOT(manager, ids, probs_m)
    assert torch.equal(routing, routing_m) and torch.equal(dense, dense_m)
    upstream = torch.randn((64, 32), generator=torch.Generator().manual_seed(3))
    (dense * upstream).sum().backward()
    (dense_m * upstream).sum().backward()
    assert torch.equal(probs.grad, probs_m.grad)
