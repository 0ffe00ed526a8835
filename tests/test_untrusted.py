"""Loading never executes what a file names: a checkpoint whose saved config names `shutil.copyfile`,
`builtins.open`, `torch.load`, `subprocess.run` or a module-level function of an installed package (`numpy.save`),
at any depth, is refused in one line by every command that reads checkpoints (ldm.sample, ldm.export,
ldm.evaluate, ldm.train with ckpt_path= or resume=), and nothing it names ran; a pipeline directory whose
model_index.json names another library is refused by ldm.evaluate."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tiny import CONF, TINY, TINY_UNET, compose_config, make_tiny_root

from ldm.stages.load import UntrustedConfigError, check_saved_config, load_module
from ldm.utils.sweep_index import register_resolvers

pytestmark = pytest.mark.faults
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
register_resolvers()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def saved_config(tiny_root, tmp_path_factory) -> dict:
    """The config a real tiny run saves in its checkpoints (resolved, as `ldm.run.fit.train` writes it)."""
    cfg = compose_config(tiny_root, tmp_path_factory.mktemp("run"), ["logger=none"])
    return OmegaConf.to_container(cfg, resolve=True)


class _Runs:
    def __reduce__(self):  # the payload of the pickle torch.load would read
        return (exec, ("open(__import__('os').environ['LDM_TEST_MARKER'], 'w').write('ran')",))


def _payloads(tmp: Path) -> dict[str, tuple[str, dict, Path]]:
    """name -> (key path in the model section, the section to put there, the file that appears if it ran)."""
    source = tmp / "source.txt"
    source.write_text("secret")
    pickled = tmp / "payload.pkl"
    pickled.write_bytes(pickle.dumps(_Runs()))
    return {
        "shutil.copyfile": ("lr_scheduler", {"_target_": "shutil.copyfile", "src": str(source), "dst": str(tmp / "copied")},
                            tmp / "copied"),
        "builtins.open": ("unet", {"_target_": "builtins.open", "file": str(tmp / "opened"), "mode": "w"},
                          tmp / "opened"),
        "torch.load": ("vae", {"_target_": "torch.load", "f": str(pickled), "weights_only": False}, tmp / "unpickled"),
        "subprocess.run": ("text_encoder", {"_target_": "subprocess.run", "args": ["touch", str(tmp / "touched")]},
                           tmp / "touched"),
        "numpy.save": ("optimizer", {"_target_": "numpy.save", "file": str(tmp / "saved.npy"), "arr": [1, 2]},
                       tmp / "saved.npy"),
        "in a list": ("unet", {"_target_": "ldm.models.unet.build_unet", "block_out_channels": [
            {"_target_": "shutil.copyfile", "src": str(source), "dst": str(tmp / "copied_from_list")}]},
            tmp / "copied_from_list"),
        "in _args_": ("lr_scheduler", {"_target_": "diffusers.optimization.get_scheduler", "_args_": [
            {"_target_": "shutil.copyfile", "src": str(source), "dst": str(tmp / "copied_from_args")}]},
            tmp / "copied_from_args"),
        "a stage lookalike": ("", {"_target_": "ldm.stages.latent_diffusion.os.system", "command": f"touch {tmp}/sh"},
                              tmp / "sh"),
    }  # fmt: skip


def _evil_checkpoint(config: dict, where: str, section: dict, path: Path) -> Path:
    config = json.loads(json.dumps(config))
    if where:
        config["model"][where] = section
    else:
        config["model"] = section
    torch.save({"state_dict": {}, "global_step": 1, "epoch": 0, "config": config}, path)
    return path


def _env(tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "LDM_TEST_MARKER": str(tmp / "unpickled")}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("WANDB_API_KEY", None)
    return env


@pytest.mark.parametrize("payload", ["shutil.copyfile", "builtins.open", "torch.load", "subprocess.run", "numpy.save",
                                     "in a list", "in _args_", "a stage lookalike"])  # fmt: skip
def test_load_module_refuses_what_is_not_a_builder_and_runs_nothing(saved_config, tmp_path, payload, monkeypatch):
    monkeypatch.setenv("LDM_TEST_MARKER", str(tmp_path / "unpickled"))
    where, section, marker = _payloads(tmp_path)[payload]
    path = _evil_checkpoint(saved_config, where, section, tmp_path / "evil.ckpt")
    with pytest.raises(UntrustedConfigError, match=r"^refusing to build .*evil\.ckpt: its saved config's model\S* is "
                                                   r"not one of ldm's builders") as caught:  # fmt: skip
        load_module(path)
    assert "\n" not in str(caught.value)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt", "payload.pkl", "source.txt"]


@pytest.mark.parametrize("where,value,message", [
    ("text_encoder", {"_target_": "ldm.models.text_encoders.open_clip_text_encoder", "arch": "ViT-B-32",
                      "pretrained": "x.bin", "weights_only": False}, r"weights_only=False would let a library run code"),
    ("unet", {"_target_": "ldm.models.unet.load_unet", "path": "x", "trust_remote_code": True}, r"trust_remote_code"),
    ("unet", {"_target_": "ldm.models.unet.load_unet", "path": "${oc.env:HOME}"}, r"model\.unet\.path=.* is an "
                                                                                   r"interpolation"),
])  # fmt: skip
def test_options_that_run_code_and_interpolations_are_refused(saved_config, tmp_path, where, value, message):
    path = _evil_checkpoint(saved_config, where, value, tmp_path / "evil.ckpt")
    with pytest.raises(UntrustedConfigError, match=message):
        load_module(path)


def test_every_builder_conf_names_is_accepted(tiny_root, tmp_path):
    """The model sections of the real configs (every stage and part option) pass the check, as saved."""
    options = [[], ["stage=vae", "model/discriminator=patch"], ["stage=clip"], ["model/unet=pretrained",
               "model.unet.path=x"], ["model/text_encoder=open_clip", "model.text_encoder.pretrained=x"],
               ["model/vae=scratch"], ["model/unet=sd15"]]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for overrides in options:
            cfg = compose(config_name="train", overrides=[f"paths.output_dir={tmp_path}", *overrides])
            check_saved_config(OmegaConf.to_container(cfg.model, resolve=True))


# --- through every command that reads checkpoints ---------------------------------------------------------------
def _commands(root: Path, tmp: Path, ckpt: Path) -> dict[str, list[str]]:
    train = [sys.executable, "-m", "ldm.train", "experiment=shapes", f"paths.data_dir={root}", *TINY, *TINY_UNET,
             "logger=none", "callbacks.fid=null", "callbacks.export=null"]  # fmt: skip
    return {
        "sample": [sys.executable, "-m", "ldm.sample", str(ckpt), "--prompt", "a red circle", "--out", str(tmp / "s.png")],
        "export": [sys.executable, "-m", "ldm.export", str(ckpt), str(tmp / "exported")],
        "evaluate": [sys.executable, "-m", "ldm.evaluate", "checkpoint", str(ckpt), "--shards",
                     str(root / "shapes" / "val"), "--n", "4", "--out", str(tmp / "m.json")],
        "train ckpt_path": [*train, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp / 'run1'}"],
        "train resume": [*train, f"resume={ckpt}", f"hydra.run.dir={tmp / 'run2'}"],
    }  # fmt: skip


@pytest.mark.parametrize("command", ["sample", "export", "evaluate", "train ckpt_path", "train resume"])
def test_every_command_that_reads_checkpoints_runs_nothing_they_name(tiny_root, saved_config, tmp_path, command):
    where, section, marker = _payloads(tmp_path)["shutil.copyfile"]
    ckpt = _evil_checkpoint(saved_config, where, section, tmp_path / "evil.ckpt")
    out = subprocess.run(_commands(tiny_root, tmp_path, ckpt)[command], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert not marker.exists()
    (line,) = out.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ") and "Traceback" not in out.stderr, out.stderr[-3000:]
    if command.startswith("train"):  # training builds its model from its own config; the checkpoint's is never built
        assert "evil.ckpt" in line and "state_dict" in line or "Missing key" in line, line
    else:
        assert "model.lr_scheduler._target_='shutil.copyfile' is not one of ldm's builders" in line, line
    assert not (tmp_path / "exported").exists() and not (tmp_path / "s.png").exists()


PAYLOADS = ["shutil.copyfile", "builtins.open", "torch.load", "subprocess.run", "numpy.save"]  # the five
COMMANDS = ["sample", "export", "evaluate", "train ckpt_path", "train resume"]


def _in_process(command: str, root: Path, tmp: Path, ckpt: Path) -> int:
    """A command's exit code, run in this process as its entry point runs it (`run_command` around its `main`, or
    for ldm.train around `train` of the config its command line composes)."""
    from ldm import evaluate, export, sample
    from ldm.run.fit import train
    from ldm.utils.cli import run_command

    if command.startswith("train"):
        key = "ckpt_path" if command == "train ckpt_path" else "resume"
        cfg = compose_config(root, tmp / "run", ["logger=none", "callbacks.fid=null", "callbacks.export=null",
                                                 f"{key}={ckpt}"])  # fmt: skip
        return run_command(train, cfg)
    argv = {
        "sample": [str(ckpt), "--prompt", "a red circle", "--out", str(tmp / "s.png")],
        "export": [str(ckpt), str(tmp / "exported")],
        "evaluate": ["checkpoint", str(ckpt), "--shards", str(root / "shapes" / "val"), "--n", "4", "--out",
                     str(tmp / "m.json")],
    }[command]  # fmt: skip
    return run_command({"sample": sample, "export": export, "evaluate": evaluate}[command].main, argv)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_every_payload_through_every_command_runs_nothing(tiny_root, saved_config, tmp_path, payload, command,
                                                          monkeypatch, capsys):  # fmt: skip
    """Each of the issue's payloads through each command that reads checkpoints, in this process (the subprocess test
    above runs the real command lines for one payload): refused in one line, nothing it names ran."""
    monkeypatch.setenv("LDM_TEST_MARKER", str(tmp_path / "unpickled"))
    where, section, marker = _payloads(tmp_path)[payload]
    ckpt = _evil_checkpoint(saved_config, where, section, tmp_path / "evil.ckpt")
    assert _in_process(command, tiny_root, tmp_path, ckpt) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    if command.startswith("train"):  # training builds its model from its own config; the checkpoint's is never built
        assert line.startswith("error: ") and "evil.ckpt" in line, line
    else:
        assert line.startswith("error: refusing to build ") and f"_target_='{payload}' is not one of ldm's builders" \
            in line, line  # fmt: skip
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "run") == ["evil.ckpt", "payload.pkl", "source.txt"]


def test_a_pipeline_whose_index_names_another_module_is_refused(tiny_root, tmp_path):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["antigravity", "UNet2DConditionModel"]}))
    out = subprocess.run([sys.executable, "-m", "ldm.evaluate", "pipeline", str(folder), "--shards",
                          str(tiny_root / "shapes" / "val"), "--n", "4", "--out", str(tmp_path / "m.json")],
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: {folder}/model_index.json: component 'unet' names "
                                               f"['antigravity', 'UNet2DConditionModel']; only diffusers' and "
                                               f"transformers' own classes are loaded"]  # fmt: skip
    assert "antigravity" not in sys.modules
