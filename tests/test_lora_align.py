"""`model.adapter.align_rank` (ldm/models/lora_align.py): rank-4 adapters compute at rank 8 with zeros, which must
change nothing but the width of their matrix products: the U-Net's output, the adapters' gradients, parameters,
state dicts and merged weights are those of peft's own (unpadded) adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from ldm.models.adapters import AdapterError, LoRA, merged
from ldm.models.lora_align import PaddedDown, PaddedUp
from ldm.models.unet import build_unet

UNET = dict(sample_size=8, block_out_channels=[16, 32], norm_num_groups=8, attention_head_dim=4, cross_attention_dim=32,
            layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])  # fmt: skip


def adapted_pair(rank: int, **lora):
    """The same random U-Net twice, with the same random adapters: peft's as they are (align_rank=1) and aligned."""
    plain = LoRA(rank=rank, alpha=8, align_rank=1, **lora).attach_unet(build_unet(**UNET))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.2)  # lora_B starts at zero, which would hide the adapters' effect
    aligned = LoRA(rank=rank, alpha=8, **lora).attach_unet(build_unet(**UNET))
    aligned.load_state_dict(plain.state_dict())
    return plain, aligned


def forward_backward(unet):
    torch.manual_seed(2)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    out = unet(x, torch.tensor([10, 500]), text).sample
    (out * torch.randn_like(out)).sum().backward()
    return out.detach(), {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}


def test_aligned_adapters_give_peft_outputs_and_gradients():
    plain, aligned = adapted_pair(rank=4, conv_rank=2)
    down = aligned.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.lora_A["default"]
    widths = []
    down.register_forward_hook(lambda m, i, o: widths.append(o.shape[-1]))
    out_plain, grads_plain = forward_backward(plain)
    out_aligned, grads_aligned = forward_backward(aligned)
    assert widths == [8]  # the product ran 8 wide (rank 4 padded)
    # float32 rounding only: the threads' reductions differ between any two runs by ~1e-6 of the largest value
    torch.testing.assert_close(out_aligned, out_plain, atol=1e-5 * out_plain.abs().max().item(), rtol=0)
    assert grads_aligned.keys() == grads_plain.keys() and len(grads_plain) > 0
    for name, grad in grads_plain.items():
        assert grads_aligned[name].shape == grad.shape
        torch.testing.assert_close(grads_aligned[name], grad, atol=1e-5 * grad.abs().max().item(), rtol=0, msg=name)
    # parameters and state dicts as peft's; convolution adapters (LoCon) are left as they are
    assert {k: v.shape for k, v in aligned.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    conv = aligned.down_blocks[0].resnets[0].conv1
    assert type(conv.lora_A["default"]) is torch.nn.Conv2d and type(down) is PaddedDown
    assert type(aligned.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.lora_B["default"]) is PaddedUp
    # a copy (the EMA) keeps the padding; merging uses the parameters, not the forward
    assert type(copy.deepcopy(aligned).down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.lora_A["default"]) is PaddedDown
    for a, b in zip(merged(aligned).state_dict().values(), merged(plain).state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_aligned_ranks_are_left_alone():
    _, aligned = adapted_pair(rank=8)
    assert not any(isinstance(m, (PaddedDown, PaddedUp)) for m in aligned.modules())


def test_align_rank_must_be_a_positive_integer():
    with pytest.raises(AdapterError, match=r"^model.adapter.align_rank=0 must be a positive integer$"):
        LoRA(align_rank=0)
