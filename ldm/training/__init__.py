"""The training machinery the stages and the trainer use, below them all.

    checkpoint   atomic checkpoint writes (AtomicCheckpointIO), weights-only reads with one-line errors
    optim        the optimizer (fused on GPUs) and per-step LR schedule of a stage's parameters
    ema          an EMA of weights updated without host syncs
    fsdp         ShardedUNetStrategy: FSDP of the U-Net only (+trainer/strategy=fsdp)
    loggers      wandb_logger: W&B, offline by itself when it cannot reach a server
    compile      allow_recompiles: torch.compile keeps a graph per bucket shape (none falls back to eager)
    allocator    default_allocator_settings: the CUDA allocator's expandable segments unless the user set its own

May import: ldm.data, ldm.diffusion, ldm.utils. Not ldm.models (a sibling), nor anything above.
"""
