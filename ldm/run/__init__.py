"""One training run, end to end: check its config, find what it resumes from, start its ranks, build and fit.

    fit        train(cfg) in this process; run(cfg): the same on the ranks it starts itself when needed
    schema     KEYS: one entry per config key (type, range, choices); check_schema
    validate   validate_config: one-line ConfigErrors in seconds, before anything heavy (schema, model configs, shards)
    overrides  the command line as Hydra reads it: keys added on purpose, shard patterns, Hydra's errors in one line
    resume     resolve_resume: resume=auto, a checkpoint file, or a run directory
    launch     ranks_to_launch / launch: DDP ranks as fresh processes (torchrun) running the resolved config
    rank       python -m ldm.run.rank CONFIG: what each launched rank runs
    class_images  ensure_class_images: DreamBooth class images generated with the base model before training
    data_check    check_buckets: a batch some bucket can fill (needs the image sizes; after the heavy imports)
    adapter_check check_adapter: the LoRA settings and init_from file tried on the model built on the meta device

schema, validate and overrides import nothing heavy (no torch): `ldm.train` checks a config with them first.
May import: ldm.callbacks, ldm.stages, ldm.metrics, ldm.models, ldm.training, ldm.data, ldm.diffusion, ldm.utils.
Not ldm.sweeps or the command-line entry points.
"""
