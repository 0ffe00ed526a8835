"""GatedEMA against torch's own EMA function, and the device-side skip."""

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ldm.lightning.ema import GatedEMA


def _models():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    return net, AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)


def test_gated_ema_matches_torch_and_a_zero_gate_changes_nothing():
    net, reference = _models()
    fn = GatedEMA(0.9)
    ours = AveragedModel(net, multi_avg_fn=fn, use_buffers=True)
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(5, 4))  # moves the BatchNorm buffers (use_buffers=True averages them too)
        reference.update_parameters(net)
        fn.keep = torch.tensor(1.0) if step % 2 else None  # an open gate is the plain update
        ours.update_parameters(net)
    for (name, a), b in zip(reference.module.state_dict().items(), ours.module.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    before = {k: v.clone() for k, v in ours.module.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    fn.keep = torch.tensor(0.0)
    ours.update_parameters(net)
    for name, value in ours.module.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, before[name]), name
