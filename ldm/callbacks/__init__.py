"""Lightning callbacks, one per file, each configured by one YAML in conf/callbacks/ and listed per stage there.

    throughput     Throughput (images/s, images seen, lr), StepTimer (benchmark window)
    sample_grid    SampleGrid: fixed prompts every N steps
    export         ExportPipeline, ExportVAE, ExportOpenCLIP: what a stage writes at the end
    fid            FIDCallback: standard FID / CLIP score in training, right across ranks
    reconstruction ReconstructionQuality: the VAE stage's PSNR and rFID
    nonfinite      NonFiniteLoss: skip NaN/inf steps, stop after a streak
    step_seed      StepSeed: per-step seeds for exact resume
    preemption     Preemption: checkpoint and stop on SIGTERM/SIGUSR1
    metrics_log    MetricsLog: every run's metrics.jsonl (what sweeps read)
    data_health    DataHealthMonitor: the loader's skip counts
    bucket_counts  BucketCounts: images per aspect-ratio bucket (W&B table and chart), carried samples per epoch
    bucket_warmup  LargestBucketWarmup: one step at the largest bucket first (out of memory at once, not later)
    cpu_threads    CPUThreads: on CPU runs, torch's thread count follows the cores other processes leave free
    val_loss       ValidationLoss: val/loss, the stage's loss on fixed held-out batches, noise and timesteps
    clock          TrainingClock: trainer.max_time, optionally with in-training evaluations left out
    profile        StepProfile: torch.profiler over a few steps; GPU busy share, host syncs, loader waits

May import: ldm.stages, ldm.metrics and everything below them. Not the run or sweeps; not each other.
"""
