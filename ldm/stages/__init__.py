"""The training stages, one LightningModule each: what a step computes, what is logged, what is checkpointed.

    latent_diffusion   LatentDiffusion: the U-Net on a frozen VAE's latents and a frozen text encoder (stage 2)
    autoencoder        AutoencoderModule: the VAE, reconstruction + KL (+ patch GAN) (stage 1)
    clip               CLIPModule: an open_clip CLIP, contrastive loss (stage 0)
    hard_negatives     CaptionSwaps: the clip stage's hard-negative captions (one attribute phrase swapped)
    base               Stage: what they share (run config in checkpoints, images seen, the skip verdict)
    load               load_module: a trained stage back from its checkpoint, building only ldm's own builders

May import: ldm.models, ldm.training, ldm.data, ldm.diffusion, ldm.utils. Not the callbacks, the run or sweeps.
"""
