"""nccl_moe.megatron.permute_by_experts / restore_by_experts (patch() puts them in place of
_DeepepManager.get_permuted_hidden_states_by_experts / get_restored_hidden_states_by_experts):
on the CPU, the same permuted rows in the same order, the same probabilities, the same restored
rows and the same gradients (hidden states and routing probabilities) as Megatron's own methods
(multi-hot map + argsort permute, then unpermute), bit for bit."""
import types

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

try:  # captured before any test runs patch() (collection imports every module first)
    from megatron.core.transformer.moe.token_dispatcher import _DeepepManager
    MEGATRON = (_DeepepManager._indices_to_multihot, _DeepepManager.get_permuted_hidden_states_by_experts,
                _DeepepManager.get_restored_hidden_states_by_experts)
except Exception:  # noqa: BLE001 (megatron-core needs Python 3.12 and its own dependencies)
    MEGATRON = None

pytestmark = pytest.mark.skipif(MEGATRON is None, reason="megatron-core is not importable")


def manager_for(rows, topk, local, hidden, seed, empty_rows=()):
    """A _DeepepManager's state after fused_dispatch: received ids (distinct per row, -1 for
    experts elsewhere), FP32 probs and BF16 rows with gradients, CPU tokens_per_expert."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(2 * local, generator=g)[:topk] for _ in range(rows)])
    ids = torch.where(ids < local, ids, torch.full_like(ids, -1))
    for r in empty_rows:
        ids[r] = -1
    probs = torch.rand((rows, topk), generator=g).requires_grad_()
    x = torch.randn((rows, hidden), generator=g).to(torch.bfloat16).requires_grad_()
    counts = torch.bincount(ids[ids >= 0], minlength=local).to(torch.int64)
    config = types.SimpleNamespace(moe_router_padding_for_quantization=False, use_transformer_engine_op_fuser=False,
                                   fp8=None, fp4=None)
    m = types.SimpleNamespace(dispatched_indices=ids, dispatched_probs=probs, tokens_per_expert=counts,
                              num_local_experts=local, permute_fusion=False, router_dtype="fp32",
                              config=config)
    return m, x


def run(manager, x, permute, restore, upstream):
    """Permute, scale each row by its probability (what the experts do), restore; backward."""
    permuted, probs = permute(manager, x)
    out = restore(manager, permuted * probs.unsqueeze(-1).to(permuted.dtype))
    (out.float() * upstream).sum().backward()
    return permuted.detach(), probs.detach(), out.detach()


@pytest.mark.parametrize("rows,topk,local,empty", [(64, 8, 32, (1, 7)), (33, 2, 4, ()), (17, 1, 3, (0,)),
                                                   (40, 4, 4, ())])
def test_equals_megatrons_permute_and_restore(rows, topk, local, empty):
    from nccl_moe.megatron import permute_by_experts, restore_by_experts
    import nccl_moe.megatron as nm

    multihot, permute_m, restore_m = MEGATRON
    hidden = 16
    mine, x = manager_for(rows, topk, local, hidden, seed=rows + topk, empty_rows=empty)
    ref, x_ref = manager_for(rows, topk, local, hidden, seed=rows + topk, empty_rows=empty)
    ref._indices_to_multihot = lambda i, p: multihot(ref, i, p)
    nm._megatron_permute, nm._megatron_restore = permute_m, restore_m  # the fallbacks (unused here)
    upstream = torch.randn((rows, hidden), generator=torch.Generator().manual_seed(5))
    probs, probs_ref = mine.dispatched_probs, ref.dispatched_probs  # Megatron's replaces its own
    got = run(mine, x, permute_by_experts, restore_by_experts, upstream)
    want = run(ref, x_ref, permute_m, restore_m, upstream)
    for a, b, what in zip(got, want, ("permuted rows", "permuted probs", "restored rows")):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(a, b), what
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(probs.grad, probs_ref.grad)
    assert int(got[0].shape[0]) == int(mine.tokens_per_expert.sum())


def test_megatrons_own_path_runs_when_its_fused_permute_is_configured():
    import nccl_moe.megatron as nm

    calls = []
    nm._megatron_permute = lambda m, x: calls.append("permute") or (x, None)
    nm._megatron_restore = lambda m, x: calls.append("restore") or x
    m, x = manager_for(8, 2, 4, 16, seed=3)
    m.permute_fusion = True
    nm.permute_by_experts(m, x)
    nm.restore_by_experts(m, x)
    m.permute_fusion, m.config.moe_router_padding_for_quantization = False, True
    nm.permute_by_experts(m, x)
    assert calls == ["permute", "restore", "permute"]
