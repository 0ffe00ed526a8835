"""The files other tools load, written (and read back) in their own layouts; the models themselves live one level up.

    lora            LoraModule (down, up, alpha), the parts of a LoRA file and the module names it uses
    lora_file       read_lora(path): a diffusers or kohya file, whichever it is, checked against the model
    diffusers_lora  pytorch_lora_weights.safetensors through diffusers' `save_lora_weights` (`load_lora_weights`)
    kohya           kohya sd-scripts LoRA: lora_unet_* / lora_te_* keys, lora_down / lora_up / alpha, ss_* metadata
                    (what ComfyUI and Automatic1111 load)
    single_file     an original-layout Stable Diffusion checkpoint (model.diffusion_model.*, first_stage_model.*,
                    cond_stage_model.*; SDXL's conditioner.embedders.*) as one safetensors file
                    (`from_single_file`, ComfyUI, Automatic1111)

May import: ldm.data, ldm.diffusion, ldm.utils (as ldm.models). Imports nothing of ldm.models above it.
"""
