"""Quality metrics: standard FID (torchmetrics over the FID Inception), cached reference statistics, CLIP score,
FID of a generator or between image sets (evaluation), a VAE's rFID and PSNR (reconstruction), and the shapes
prompt-following reader.

May import: ldm.models, ldm.data, ldm.diffusion, ldm.utils. Not ldm.stages (a sibling), nor anything above.
"""

from ldm.metrics.fid import make_fid, real_states, set_real_states, to_uint8
from ldm.metrics.inception import FIDInception, FIDInceptionV3, load_network, resize_bilinear_tf1
from ldm.metrics.reference import reference_key, reference_states

__all__ = ["FIDInception", "FIDInceptionV3", "load_network", "make_fid", "real_states", "reference_key",
           "reference_states", "resize_bilinear_tf1", "set_real_states", "to_uint8"]
