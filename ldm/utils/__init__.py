"""Small helpers with no ldm imports above this package.

    images          tensors to PIL images and captioned grids
    secrets         redaction of API keys and tokens in configs, files and the command line
    sweep_index     a sweep's index.json and the `${ldm.run_name:...}` config resolvers that name its jobs
    targets         Python objects as Hydra `_target_` strings (config checks key on code, not strings)
    metrics_file    a run's metrics.jsonl, read as plain JSON (reports read it without the training stack)

May import: nothing from ldm.
"""
