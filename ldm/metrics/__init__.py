"""Quality metrics: standard FID (torchmetrics over the FID Inception), cached reference statistics, CLIP score."""

from ldm.metrics.fid import make_fid, real_states, set_real_states, to_uint8
from ldm.metrics.inception import FIDInception, FIDInceptionV3, load_network, resize_bilinear_tf1
from ldm.metrics.reference import reference_key, reference_states

__all__ = ["FIDInception", "FIDInceptionV3", "load_network", "make_fid", "real_states", "reference_key",
           "reference_states", "resize_bilinear_tf1", "set_real_states", "to_uint8"]
