"""nccl_moe.megatron.patch() rebinds megatron-core's DeepEP entry points (skipped where
megatron-core 0.19.x, which needs torch and Python 3.12, cannot be imported)."""
import pytest

pytest.importorskip("torch", reason="torch is not installed")
token_dispatcher = pytest.importorskip("megatron.core.transformer.moe.token_dispatcher",
                                       reason="megatron-core is not importable")


def test_patch_rebinds_the_deepep_names():
    from megatron.core.transformer.moe import fused_a2a

    from nccl_moe import megatron
    megatron.patch()
    for module in (fused_a2a, token_dispatcher):
        assert module.fused_dispatch is megatron.fused_dispatch
        assert module.fused_combine is megatron.fused_combine
        assert module.set_deepep_num_sms is megatron.set_deepep_num_sms
    assert fused_a2a.HAVE_DEEP_EP
    assert token_dispatcher._DeepepManager._indices_to_multihot is megatron.indices_to_multihot


def test_num_sms_setting_reaches_the_buffer():
    from nccl_moe import megatron
    from nccl_moe.torch import Buffer
    megatron.patch()
    token_dispatcher.set_deepep_num_sms(24)
    assert Buffer.num_sms == 24


def test_multihot_can_be_put_back_for_ab_timing():
    from nccl_moe import megatron
    megatron.patch(sync_free_multihot=False)
    original = token_dispatcher._DeepepManager._indices_to_multihot
    assert original is not megatron.indices_to_multihot
    megatron.patch()
    assert token_dispatcher._DeepepManager._indices_to_multihot is megatron.indices_to_multihot
    megatron.patch(sync_free_multihot=False)
    assert token_dispatcher._DeepepManager._indices_to_multihot is original
    megatron.patch()
