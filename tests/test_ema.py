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


@pytest.mark.parametrize("warmup", [False, True])
def test_an_update_every_k_steps_weighs_in_as_k_steps_towards_the_same_weights(warmup):
    # the closed form: k per-step updates towards a fixed w move the average by decay_1 * ... * decay_k of the gap;
    # EMA(every=k) does it in one update with the per-step decay taken at the steps the updates stand for
    net = _net()
    k, decay = 3, 0.9
    ours, stepwise = EMA(net, decay, warmup, every=k), EMA(net, decay, warmup)
    stepwise.update(net)  # both start from a copy
    ours.update(net)
    for n in range(1, 4):
        _train_a_bit(net)
        for _ in range(k):  # the per-step EMA at steps n*k .. n*k + k - 1 towards the same weights
            stepwise.update(net)
        ours.update(net)
        if warmup:  # per-step decays min(decay, (1 + s) / (10 + s)) at s = 1..k (stepwise) vs one decay at s = n*k
            continue  # the warm-up approximates within a step: checked below by the factor alone
        for a, b in zip(ours.module.parameters(), stepwise.module.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(ours.n_averaged) == 4
    if warmup:  # one update at n updates so far moves the gap by min(decay, (1 + nk) / (10 + nk)) ** k
        before = [p.clone() for p in ours.module.parameters()]
        _train_a_bit(net)
        ours.update(net)
        steps = 4 * k
        factor = min(decay, (1 + steps) / (10 + steps)) ** k
        for a, b0, w in zip(ours.module.parameters(), before, net.parameters()):
            torch.testing.assert_close(a, w + factor * (b0 - w), rtol=1e-5, atol=1e-6)


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match="interval"):
        EMA(_net(), 0.9, every=0)


def test_a_fit_updates_the_ema_on_every_kth_step(tmp_path):
    # a real Trainer run: 4 steps with model.ema_every_n_steps=2 average twice (steps 2 and 4)
    from tiny import compose_config, make_tiny_root

    from ldm.run.fit import train

    cfg = compose_config(make_tiny_root(tmp_path / "tiny"), tmp_path / "run",
                         ["model.ema_every_n_steps=2", "trainer.max_steps=4", "logger=none", "~callbacks.fid",
                          "~callbacks.export", "~callbacks.sample_grid"])  # fmt: skip
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and int(ckpt["state_dict"]["ema.n_averaged"]) == 2
