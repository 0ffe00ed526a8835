"""Small helpers, the bottom layer: every other package may import them.

    cpu             how busy the other processes keep the CPU cores; threads for the free ones
    images          tensors to PIL images and captioned grids
    secrets         redaction of API keys and tokens in configs, files and the command line
    sweep_index     a sweep's index.json and the `${ldm.run_name:...}` config resolvers that name its jobs
    targets         Python objects as Hydra `_target_` strings (config checks key on code, not strings)
    metrics_file    a run's metrics.jsonl, read as plain JSON (reports read it without the training stack)
    rules           typed rules for config values (Int, Float, Choice, ...) and the walk that checks a config
    exit_watch      LDM_EXIT_STACKS: every thread's stack while a process outlives its work (slow exits)
    cli             how every command stops: one line, exit code, the traceback only on request; warnings to train.log

May import: nothing from ldm outside ldm.utils.
"""
