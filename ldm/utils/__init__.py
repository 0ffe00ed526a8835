"""Small helpers with no ldm imports above this package.

    cpu             how busy the other processes keep the CPU cores; threads for the free ones
    images          tensors to PIL images and captioned grids
    secrets         redaction of API keys and tokens in configs, files and the command line
    sweep_index     a sweep's index.json and the `${ldm.run_name:...}` config resolvers that name its jobs
    targets         Python objects as Hydra `_target_` strings (config checks key on code, not strings)

May import: nothing from ldm.
"""
