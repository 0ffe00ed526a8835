"""scripts/bench_unet.py runs each kind of U-Net and step variant it offers, and scripts/bench_step_tail.py each part of
the step's tail (CPU: a few steps of tiny U-Nets)."""

import importlib.util
from pathlib import Path

import pytest


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_unet():
    return _script("bench_unet")


@pytest.mark.parametrize("model", ["sd15", "cifar", "shapes"])
def test_every_variant_of_each_model_runs(model, capsys):
    variants = ["eager", "eager+fwdbwd", "eager+noclip+ema+b3"]
    _bench_unet().main(["--model", model, "--tiny", "--resolution", "32", "--batch-size", "2", "--steps", "1",
                        "--warmup", "1", "--variants", *variants, "--profile", "eager+fwdbwd"])  # fmt: skip
    out = capsys.readouterr().out
    assert "FAILED" not in out
    summary = out.split("# summary\n")[1].splitlines()
    assert [line.split()[0] for line in summary] == variants
    assert [int(line.split()[2]) for line in summary] == [2, 2, 3]  # the batch, b3 included
    assert "eager+fwdbwd: GPU time by kernel kind" in out  # the profile (CPU time here)


def test_an_unknown_variant_part_is_named():
    with pytest.raises(SystemExit, match="unknown variant part 'fast' in 'eager\\+fast'"):
        _bench_unet().parse_variant("eager+fast", 4)


def test_the_step_tail_bench_times_each_part(capsys):
    result = _script("bench_step_tail").main(["--model", "shapes", "--steps", "2"])
    assert len(result) == 8 and all(ms > 0 for ms in result.values())
    assert "parameter tensors" in capsys.readouterr().out
