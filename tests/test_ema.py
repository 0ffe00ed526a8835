"""The sync-free EMA against torch's own (AveragedModel + get_ema_multi_avg_fn), its warm-up against diffusers'
EMAModel, and the device-side skip."""

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ldm.training.ema import EMA


def _net(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)).to(device)


def _train_a_bit(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net(torch.randn(5, 4, device=next(net.parameters()).device))  # moves the BatchNorm buffers, integer count too


def test_ema_matches_torch_and_an_open_gate_is_the_plain_update():
    net = _net()
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ours = EMA(net, 0.9)
    for step in range(4):
        _train_a_bit(net)
        reference.update_parameters(net)  # its first update copies the weights, as ours must
        ours.update(net, keep=torch.tensor(1.0) if step % 2 else None)
    assert ours.state_dict().keys() == reference.state_dict().keys()  # checkpoints keep torch's layout
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
        if a.is_floating_point():
            assert a.dtype == b.dtype and torch.allclose(a, b, atol=1e-6), name
    assert torch.equal(ours.module[1].num_batches_tracked, net[1].num_batches_tracked)  # counts are copied
    assert int(ours.n_averaged) == 4


def test_warmup_matches_diffusers_ema_model_and_leaves_the_initial_weights_behind():
    from diffusers.training_utils import EMAModel

    net = _net()
    reference = EMAModel(net.parameters(), decay=0.999)  # its default decay schedule: min(decay, (1 + n) / (10 + n))
    ours, plain = EMA(net, 0.999, warmup=True), EMA(net, 0.999)
    initial = [p.clone() for p in net.parameters()]
    for step in range(40):
        _train_a_bit(net)
        reference.step(net.parameters())
        ours.update(net, keep=torch.tensor(1.0) if step % 3 else None)
        plain.update(net)
    for name, a, b in zip([n for n, _ in net.named_parameters()], reference.shadow_params, ours.module.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    # the first weights keep 0.999^39 = 96 % of the average without the warm-up, prod (n + 1) / (n + 10) = 5e-9 with it
    pull = [float(torch.linalg.vector_norm(e - i) / torch.linalg.vector_norm(p - i))
            for e, i, p in zip(ours.module.parameters(), initial, net.parameters())]  # fmt: skip
    pull_plain = [float(torch.linalg.vector_norm(e - i) / torch.linalg.vector_norm(p - i))
                  for e, i, p in zip(plain.module.parameters(), initial, net.parameters())]  # fmt: skip
    assert min(pull) > 0.5 > max(pull_plain)


def test_a_closed_gate_changes_nothing_not_even_the_count():
    net = _net()
    ours = EMA(net, 0.9)
    _train_a_bit(net)
    ours.update(net)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    _train_a_bit(net)
    ours.update(net, keep=torch.tensor(0))
    for name, value in ours.state_dict().items():
        if value.is_floating_point() or name == "n_averaged":
            assert torch.equal(value, before[name]), name


def test_the_first_update_skipped_leaves_the_next_one_a_copy():
    net = _net()
    ours = EMA(net, 0.5)
    _train_a_bit(net)
    ours.update(net, keep=torch.tensor(0.0))  # skipped: still nothing averaged
    _train_a_bit(net)
    ours.update(net)
    for (name, a), b in zip(net.state_dict().items(), ours.module.state_dict().values()):
        assert torch.equal(a, b), name  # integer counts included


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="ema decay"):
        EMA(_net(), 1.5)


@pytest.mark.gpu
def test_update_never_waits_for_the_gpu_unlike_torchs():
    net = _net("cuda")
    ours = EMA(net, 0.999)
    torchs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True).to("cuda")  # as Lightning moves it
    gates = (None, torch.tensor(1.0, device="cuda"), torch.tensor(0.0, device="cuda"))
    _train_a_bit(net)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for keep in gates:
            ours.update(net, keep=keep)
        with pytest.raises(RuntimeError, match="synchroniz"):  # the reason this class exists
            torchs.update_parameters(net)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(ours.n_averaged) == 2


def test_pairs_kept_between_updates_still_follow_swapped_weights_and_replaced_buffers():
    # the tensors are paired once (a module walk per step costs ms of Python); what a later update reads must still
    # be the model's current values: Parameter objects whose .data was swapped, buffers replaced by assignment
    net = _net()
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ours = EMA(net, 0.9)
    for step in range(3):
        _train_a_bit(net)
        if step == 1:
            net[0].weight.data = torch.randn(8, 4)  # a new storage behind the same Parameter
            net[1].running_mean = torch.full((8,), 3.0)  # a new buffer object
        reference.update_parameters(net)
        ours.update(net)
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-6), name
