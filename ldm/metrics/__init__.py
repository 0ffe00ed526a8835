"""Quality metrics: FID, CLIP score, a VAE's rFID and PSNR, and the shapes prompt-following reader.

    fid              make_fid: torchmetrics' FID over the standard Inception, states in float64; to_uint8
    inception        FIDInception: the TF FID Inception-v3 (pool3 features) with TF1's bilinear resize
    reference        reference_states: real-data FID statistics from shards, cached on disk under a hash of their key
    clip_score       make_clip_score: torchmetrics' CLIPScore over a local HF CLIP or open_clip directory
    generated        update_generated / rank_share: generated images into the metrics, each rank its own share
    evaluation       evaluate_generator, fid_between: FID / CLIP score of a generator against shards, or of two sets
    reconstruction   reconstruction_quality: a VAE's rFID and PSNR on held-out images
    plot             plot_curves: a PNG of FID (and CLIP score) against images seen and training time
    shape_following  read_attributes: a shapes image read back into (colour, position, size, shape); agreement

May import: ldm.models, ldm.data, ldm.diffusion, ldm.utils. Not ldm.stages (a sibling), nor anything above.
"""

from ldm.metrics.fid import make_fid, real_states, set_real_states, to_uint8
from ldm.metrics.inception import FIDInception, FIDInceptionV3, load_network, resize_bilinear_tf1
from ldm.metrics.reference import reference_key, reference_states

__all__ = ["FIDInception", "FIDInceptionV3", "load_network", "make_fid", "real_states", "reference_key",
           "reference_states", "resize_bilinear_tf1", "set_real_states", "to_uint8"]
