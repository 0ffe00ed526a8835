"""Building and loading the parts of a model, and writing them in the formats other tools load.

    unet            build_unet / load_unet: diffusers UNet2DConditionModel
    vae             build_vae / load_vae: diffusers AutoencoderKL (frozen when loaded for stage 2)
    text_encoders   frozen text encoders: transformers CLIP (SD 1.x) or an open_clip text tower (SD 2.x)
    sdxl            SDXL's text-encoder pair, its micro-conditioning (time_ids), SDXL-shaped models from scratch
    tokenizer       the real CLIP BPE tokenizer, written offline from open_clip's vocabulary
    clip            build, save and load open_clip CLIP models (stage 0)
    clip_convert    an open_clip text tower as a transformers CLIPTextModel (for export)
    adapters        LoRA (peft) on a frozen U-Net and text encoder: attach, read and set adapter weights, merge
    formats/        the files other tools load: diffusers and kohya LoRA files, original-layout single files
    export          a trained latent-diffusion stage in each of those formats, or as a StableDiffusionPipeline dir
    freeze          freeze(module): eval mode and no gradients, visibly

May import: ldm.data, ldm.diffusion, ldm.utils. Not ldm.training (a sibling), nor anything above.
"""
