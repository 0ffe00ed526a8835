"""Which weights a frozen part holds, in a few hundred numbers: a checkpoint keeps its frozen VAE and text encoder
out (they are reloaded from their source), so it records their fingerprints and refuses a source that now holds
other weights (a relative path read from another working directory, a directory overwritten by a new stage-1 run).

    saved = fingerprint(vae)                  # {"structure": <hash of names, shapes>, "values": [floats]}
    problem = difference(saved, fingerprint(reloaded_vae))   # None, or what differs, in words

Values are sampled at fixed positions of each floating-point tensor and compared with a tolerance, so one part in
fp32, bf16 or fp16 gives the same fingerprint; two trainings of one architecture differ in nearly every weight.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

SAMPLES_PER_TENSOR = 4
RTOL, ATOL = 2e-2, 1e-3  # bf16 keeps 8 significant bits (0.4 %); retrained weights differ by far more


def fingerprint(module: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> dict:
    """{"structure": sha1 of the state dict's names and shapes, "values": SAMPLES_PER_TENSOR numbers of each
    floating-point tensor, evenly spaced}, leaving out the entries whose name `skip` accepts (adapters that train)."""
    structure = hashlib.sha1()
    picked = []
    for name, tensor in sorted(module.state_dict().items()):
        if skip(name):
            continue
        structure.update(f"{name}:{tuple(tensor.shape)};".encode())
        if tensor.is_floating_point() and tensor.numel():
            flat = tensor.detach().reshape(-1)
            last = flat.numel() - 1  # integer positions: a float linspace rounds past the end of large tensors
            index = torch.tensor([last * k // (SAMPLES_PER_TENSOR - 1) for k in range(SAMPLES_PER_TENSOR)])
            picked.append(flat[index.to(flat.device)].float())
    values = torch.cat(picked).cpu().tolist() if picked else []
    return {"structure": structure.hexdigest(), "values": values}


def difference(saved: dict, current: dict) -> str | None:
    """None when `current` is the part `saved` was taken from (up to dtype rounding); else what differs."""
    if saved["structure"] != current["structure"]:
        return "its tensors' names or shapes differ"
    a, b = torch.tensor(saved["values"]), torch.tensor(current["values"])
    close = torch.isclose(a, b, rtol=RTOL, atol=ATOL)
    if bool(close.all()):
        return None
    return f"{int((~close).sum())} of {close.numel()} sampled weights differ"
