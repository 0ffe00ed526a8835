"""The config schema (ldm/run/schema.py): every key of conf/ has an entry, every entry's names are the code's own,
every numeric key refuses a wrong type, a negative and an out-of-range value in one line naming the key, and the
command line says so in seconds, before torch is imported."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from tiny import CONF, TINY, TINY_UNET, make_tiny_root

from ldm.data.format import expand_urls
from ldm.run import schema
from ldm.run.overrides import quote_shard_patterns
from ldm.run.schema import KEYS, check_schema
from ldm.run.validate import validate_config
from ldm.utils.rules import Any, ConfigError, Float, Int, OneOf, Options, check_tree, rule_for
from ldm.utils.sweep_index import register_resolvers

REPO = Path(__file__).resolve().parents[1]
register_resolvers()


def conf_keys() -> dict[str, str]:
    """Every leaf key the files of conf/ set (hydra/ excepted: Hydra checks its own), with the file that sets it."""
    found = {}
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        if rel.parts[0] in ("hydra", "stage"):  # stage/: only a defaults list
            continue
        glob = "@package _global_" in path.read_text() or rel.name == "train.yaml"
        prefix = [] if glob else list(rel.parent.parts)

        def walk(node, parts):
            if isinstance(node, DictConfig):
                for key in node.keys():
                    if key != "defaults":
                        walk(node._get_node(key), [*parts, str(key)])
            elif parts and parts[0] != "hydra":
                found[".".join(parts)] = str(rel)

        walk(OmegaConf.load(path), prefix)
    return found


def covered(key: str) -> bool:
    """A rule for the key, or for a section above it that takes anything (an interpolated copy, library options)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        rule = rule_for(".".join(parts[:n]), KEYS)
        if rule is not None and (n == len(parts) or isinstance(rule, (Any, Options))):
            return True
    return False


def test_every_key_in_conf_has_a_schema_entry():
    keys = conf_keys()
    assert len(keys) > 150
    missing = [f"{key} ({where})" for key, where in keys.items() if not covered(key)]
    assert missing == [], "add a line to KEYS in ldm/run/schema.py for: " + ", ".join(missing)


def test_the_schema_names_what_the_code_has():
    from diffusers.optimization import SchedulerType
    from lightning_fabric.plugins.precision.precision import (
        _PRECISION_INPUT_INT,
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS,
    )

    from ldm.data.datamodule import ShardDataModule
    from ldm.diffusion.parameterization import TARGETS
    from ldm.diffusion.sampling import SCHEDULERS
    from ldm.diffusion.schedules import SCHEDULES
    from ldm.models.text_encoders import hf_clip_text_encoder, open_clip_text_encoder
    from ldm.models.unet import build_unet, load_unet
    from ldm.models.vae import build_vae, load_vae
    from ldm.stages.clip import CLIPModule
    from ldm.stages.latent_diffusion import LatentDiffusion
    from ldm.training.fsdp import ShardedUNetStrategy
    from ldm.training.loggers import wandb_logger
    from ldm.utils.targets import target_of
    from ldm.export import FORMATS
    from ldm.models.adapters import LoRA
    from ldm.models.sdxl import sdxl_text_encoders
    from ldm.models.export import EXPORTS

    assert sorted(FORMATS) == sorted(EXPORTS)
    assert sorted(schema.SAMPLERS) == sorted(SCHEDULERS)
    assert sorted(schema.NOISE_SCHEDULES) == sorted(SCHEDULES)
    assert sorted(schema.PREDICTION_TYPES) == sorted(TARGETS)
    assert sorted(schema.LR_SCHEDULES) == sorted(s.value for s in SchedulerType)
    lightning = get_args(_PRECISION_INPUT_STR) + get_args(_PRECISION_INPUT_INT) + get_args(_PRECISION_INPUT_STR_ALIAS)
    assert sorted(map(str, schema.PRECISIONS)) == sorted(map(str, lightning))
    for name, obj in [("LATENT_DIFFUSION", LatentDiffusion), ("CLIP_MODULE", CLIPModule), ("BUILD_UNET", build_unet),
                      ("LOAD_UNET", load_unet), ("BUILD_VAE", build_vae), ("LOAD_VAE", load_vae),
                      ("HF_CLIP_TEXT_ENCODER", hf_clip_text_encoder), ("OPEN_CLIP_TEXT_ENCODER", open_clip_text_encoder),
                      ("SHARDED_UNET_STRATEGY", ShardedUNetStrategy), ("WANDB_LOGGER", wandb_logger),
                      ("SHARD_DATA_MODULE", ShardDataModule), ("LORA", LoRA),
                      ("SDXL_TEXT_ENCODERS", sdxl_text_encoders)]:  # fmt: skip
        assert getattr(schema, name) == target_of(obj), name


def test_open_clip_configs_are_read_as_open_clip_reads_them(tmp_path):
    import open_clip

    from ldm.models.clip import build_open_clip, save_open_clip_dir
    from ldm.run.validate import open_clip_config

    for arch in ("ViT-B-32", "ViT-H-14", "RN50"):
        assert open_clip_config(arch) == open_clip.get_model_config(arch)
    save_open_clip_dir(*build_open_clip(embed_dim=8, vision_cfg=dict(image_size=16, patch_size=8, width=16, layers=1,
                       head_width=8), text_cfg=dict(context_length=8, width=16, heads=2, layers=1)), tmp_path / "c")
    assert open_clip_config(f"local-dir:{tmp_path / 'c'}") == open_clip.get_model_config(f"local-dir:{tmp_path / 'c'}")
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        open_clip_config("ViT-Q-99")


# --- every numeric key: a wrong type, a negative and an out-of-range value ------------------------------------
def _numeric(rule) -> list:
    rules = rule.rules if isinstance(rule, OneOf) else (rule,)
    return [r for r in rules if isinstance(r, (Int, Float))]


def _out_of_range(rule) -> float:
    if rule.max is not None:
        return rule.max + (1 if isinstance(rule, Int) else 0.5)
    if getattr(rule, "open_min", False):
        return rule.min
    return rule.min - (1 if isinstance(rule, Int) else 0.5)


NUMERIC = sorted(key for key, rule in KEYS.items() if _numeric(rule))


@pytest.fixture(scope="module")
def default_config(tmp_path_factory) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.output_dir={tmp_path_factory.mktemp('run')}"])
    return OmegaConf.to_container(cfg, resolve=True)


def _with(config: dict, key: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        part = "fid" if part == "*" else part
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node["x" if leaf == "*" else leaf] = value
    return config


@pytest.mark.parametrize("key", NUMERIC)
def test_every_numeric_key_refuses_a_wrong_type_a_negative_and_an_out_of_range_value(default_config, key):
    numeric = _numeric(KEYS[key])
    assert numeric and all(r.min is not None for r in numeric), f"{key}: give it a lower bound"
    bad = ["abc", -7, min(_out_of_range(r) for r in numeric)]
    wanted = re.escape(key.replace("*", "x")) + r"(\[\d+\])?="
    for value in bad:
        if isinstance(KEYS[key], OneOf) and KEYS[key].ok(value):
            continue  # -1 is a value of its own (e.g. trainer.devices=-1: every device)
        with pytest.raises(ConfigError) as caught:
            check_tree(_with(default_config, key, value), KEYS)
        message = str(caught.value)
        assert re.match(wanted, message) and "\n" not in message, f"{key}={value!r}: {message}"
        assert "expected" in message


def test_nan_and_inf_are_no_numbers(default_config):
    for value in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"^sampling\.guidance_scale=(nan|inf): expected a number >= 0$"):
            check_tree(_with(default_config, "sampling.guidance_scale", value), KEYS)


def test_list_items_are_checked_one_by_one(default_config):
    with pytest.raises(ConfigError, match=r"^model\.unet\.block_out_channels\[1\]=-8: expected an integer >= 1$"):
        check_tree(_with(default_config, "model.unet.block_out_channels", [8, -8]), KEYS)
    with pytest.raises(ConfigError, match=r"^optim\.optimizer\.betas=\[0\.9\]: expected a list of 2 items"):
        check_tree(_with(default_config, "optim.optimizer.betas", [0.9]), KEYS)


# --- unknown keys, keys added on purpose, interpolated copies ---------------------------------------------------
def _compose(*overrides) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=["paths.output_dir=/tmp/run", *overrides])


def test_a_key_no_entry_knows_is_one_line_with_a_suggestion(default_config):
    config = _with(default_config, "data.batchsize", 4)
    with pytest.raises(ConfigError, match=r"^data\.batchsize: no such config key; did you mean data\.batch_size\? "
                                          r"\(add a new key with \+data\.batchsize=\.\.\.\)$"):
        check_tree(config, KEYS)
    check_tree(config, KEYS, added=("data.batchsize",))  # added on purpose (+data.batchsize=4)
    check_tree(config, KEYS, strict=False)  # a config composed elsewhere: only known keys are checked


def test_keys_added_with_plus_and_components_of_ones_own_are_left_alone():
    cfg = _compose("+callbacks.record._target_=my.Callback", "+callbacks.record.path=x", "+my_api_key=abc",
                   "+trainer.benchmark=true")
    check_schema(cfg, added={"callbacks.record._target_", "callbacks.record.path", "my_api_key", "trainer.benchmark"})
    cfg = _compose("+callbacks.record._target_=my.Callback", "callbacks.fid.seed=-1")
    with pytest.raises(ConfigError, match=r"^callbacks\.fid\.seed=-1"):  # the rest of the section is still checked
        check_schema(cfg, added={"callbacks.record._target_"})


def test_a_bad_value_is_named_by_the_key_it_was_given_to_not_its_copies():
    with pytest.raises(ConfigError, match=r"^trainer\.max_steps=-5: expected an integer >= -1 \(-1: no limit\)$"):
        check_schema(_compose("trainer.max_steps=-5"))  # optim.lr_scheduler.num_training_steps copies it
    with pytest.raises(ConfigError, match=r"^optim\.lr=-1: expected a number >= 0$"):
        check_schema(_compose("optim.lr=-1"))


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=abc", r"^data\.batch_size='abc': expected an integer >= 1$"),
    ("data.batch_size=0", r"^data\.batch_size=0: expected an integer >= 1$"),
    ("data.resolution=abc", r"^data\.resolution='abc': expected an integer >= 8"),
    ("optim.lr=abc", r"^optim\.lr='abc': expected a number >= 0$"),
    ("diffusion.cfg_dropout=1.5", r"^diffusion\.cfg_dropout=1\.5: expected a number in \[0, 1\]$"),
    ("trainer.devices=0", r"^trainer\.devices=0: expected an integer >= 1, or one of auto, -1, or a list"),
    ("sampling.guidance_scale=-3", r"^sampling\.guidance_scale=-3: expected a number >= 0$"),
    ("sampling.sampler=heun2", r"^sampling\.sampler='heun2': expected one of ddim, ddpm, dpm\+\+"),
    ("trainer.precision=bf17", r"^trainer\.precision='bf17': expected one of"),
    ("ckpt_path=/nonexistent", r"^ckpt_path=/nonexistent: no such file$"),
    ("resume=autoo", r"^resume=autoo: no such file or directory \(expected auto, auto_or_new"),
    ("model/text_encoder=open_clip", r"^model\.text_encoder\.pretrained is required but not set \(\?\?\?\)"),
    ("diffusion.beta_start=0.02", r"^diffusion\.beta_start=0\.02 must be below diffusion\.beta_end=0\.012$"),
    ("sampling.guidance_interval=[3,1]", r"^sampling\.guidance_interval=\[3, 1\]: expected \[low, high\] noise levels with "
                                         r"low < high$"),
    ("sampling.guidance_interval=[3]", r"^sampling\.guidance_interval=\[3\]: expected a list of 2 items"),
    ("model.compile={backend:cudagraph}", r"^model\.compile\.backend='cudagraph': expected one of inductor, cudagraphs, "
                                          r"aot_eager, eager$"),
])  # fmt: skip
def test_the_mistakes_of_the_issue_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        validate_config(_compose(*override.split(" ")))
    assert "\n" not in str(caught.value)


# --- the command line: one line, in seconds, nothing heavy imported --------------------------------------------
def _cli(cwd: Path, *args, env_extra=None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None) if "HYDRA_FULL_ERROR" not in (env_extra or {}) else None
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "ldm.train", f"hydra.run.dir={cwd / 'run'}", *args], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    return out, time.monotonic() - start


@pytest.mark.parametrize("args,line", [
    (["sampling.sampler=heun2"], "error: sampling.sampler='heun2': expected one of ddim, ddpm, dpm++, dpm++_karras, "
                                 "dpm++_sde_karras, dpmsolver++, euler, euler_a, euler_karras, lms, pndm"),
    (["data.batch_size=-4"], "error: data.batch_size=-4: expected an integer >= 1"),
    (["data.batchsize=4"], "error: data.batchsize=4: no such config key; did you mean data.batch_size? (add a new key "
                           "with +data.batchsize=4)"),
    (["model/unet=tinyy"], "error: model/unet=tinyy: no such option; choose one of cifar, pretrained, sd15, shapes, tiny"),
    (["model.unet.path=/x"], "error: model.unet.path=/x: model.unet.path is not a key of the config as composed "
                             "(it is in model/unet=pretrained); or add it with +model.unet.path=/x"),
    (["ckpt_path=/nonexistent"], "error: ckpt_path=/nonexistent: no such file"),
    (["trainer.max_steps=abc"], "error: trainer.max_steps='abc': expected an integer >= -1 (-1: no limit)"),
    (["trainer.max_time=12min"], "error: trainer.max_time='12min': expected a string of the form DD:HH:MM:SS or null"),
])  # fmt: skip
def test_the_command_line_says_it_in_one_line_in_seconds(tmp_path, args, line):
    out, seconds = _cli(tmp_path, *args)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [line], out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    print(f"{args}: {seconds:.2f} s")
    assert seconds < 10  # 1.6-2.5 s measured on 2 busy cores (README: timing commands); generous for CI noise


def test_a_traceback_on_request(tmp_path):
    out, _ = _cli(tmp_path, "sampling.sampler=heun2", env_extra={"HYDRA_FULL_ERROR": "1"})
    assert out.returncode == 1 and "Traceback" in out.stderr and "ConfigError: sampling.sampler='heun2'" in out.stderr
    log = (tmp_path / "run" / "train.log").read_text()  # the stop is in the run's log, with its traceback
    assert "Traceback" in log and "sampling.sampler='heun2'" in log


def test_nothing_heavy_is_imported_before_the_config_is_checked(tmp_path):
    """The config checks import no torch: -X importtime lists every module the failing command imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "ldm.train", f"hydra.run.dir={tmp_path / 'run'}",
                          "sampling.sampler=heun2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "omegaconf" in imported and "ldm.run.validate" in imported
    heavy = {"torch", "pytorch_lightning", "lightning_fabric", "diffusers", "transformers", "open_clip", "webdataset",
             "numpy", "PIL"} & imported  # fmt: skip
    assert heavy == set()


# --- README's shard specs parse as written ----------------------------------------------------------------------
README_FORMS = [  # each as README shows it (shell quoting included), and what it stands for in the tiny shard set
    ("data.train_shards=data/mine", "{root}"),
    ("data.train_shards='data/mine/{000000..000099}.tar'", "{root}/{{000000..000002}}.tar"),
    ("data.train_shards='data/mine/*.tar'", "{root}/*.tar"),
    ("'data.train_shards=pipe:aws s3 cp s3://bucket/{000000..000099}.tar -'", "pipe:cat {root}/{{000000..000002}}.tar"),
]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("form,here", README_FORMS)
def test_every_shard_spec_form_the_readme_shows_parses_as_written(tiny_root, form, here):
    readme = (REPO / "README.md").read_text()
    assert form in readme, f"README no longer shows {form}: update README_FORMS"
    shards = tiny_root / "shapes" / "train"
    original = shlex.split(form)[0].partition("=")[2]  # what the shell hands over
    spec = here.format(root=shards)
    shell_form = shlex.split(form.replace(original, spec))  # the same quoting, with our shards
    argv = ["ldm.train", *shell_form]
    quote_shard_patterns(argv)
    cfg = _compose(*argv[1:])
    urls = expand_urls(cfg.data.train_shards)
    local = sorted(str(p) for p in shards.glob("*.tar"))
    assert urls == local or urls == [f"pipe:cat {u}" for u in local]


def test_a_brace_pattern_reaches_the_checks_through_the_real_command_line(tiny_root, tmp_path):
    shards = tiny_root / "shapes" / "train"
    out, _ = _cli(tmp_path, "experiment=shapes", f"paths.data_dir={tiny_root}", *TINY, *TINY_UNET,
                  f"data.train_shards={shards}/{{000000..000002}}.tar", "data.batch_size=1000")
    assert out.stderr.strip().splitlines() == [f"error: data.batch_size=1000 is larger than the 48 samples of "
                                               f"data.train_shards={shards}/{{000000..000002}}.tar"], out.stderr


# --- Hydra's own command line: options, unreadable overrides, multiruns -----------------------------------------
OPTIONS = ("--help/-h, --hydra-help, --version, --cfg/-c, --resolve, --package/-p, --run/-r, --multirun/-m, "
           "--shell-completion/-sc, --config-path/-cp, --config-name/-cn, --config-dir/-cd, --experimental-rerun, "
           "--info/-i, and key=value overrides")  # fmt: skip


@pytest.mark.parametrize("args,code,line", [
    (["--foo"], 2, f"error: --foo: no such option of python -m ldm.train; it takes {OPTIONS}"),
    (["--mutlirun", "optim.lr=1e-4,3e-4"], 2, f"error: --mutlirun: no such option of python -m ldm.train; did you "
                                              f"mean --multirun? it takes {OPTIONS}"),
    (["--cfg", "jobs"], 2, "error: argument --cfg/-c: invalid choice: 'jobs' (choose from 'job', 'hydra', 'all') "
                           "(python -m ldm.train --help lists the options)"),
    (["data.batch_size=[1"], 1, "error: data.batch_size=[1: Hydra cannot read this override (no viable alternative "
                                "at input '[1'); to give the value as text, quote it: \"data.batch_size='[1'\""),
    (["data.batch_size=4", "a=b=c"], 1, "error: a=b=c: Hydra cannot read this override (mismatched input '=' "
                                        "expecting <EOF>); to give the value as text, quote it: \"a='b=c'\""),
    (["data.batch_size"], 1, "error: data.batch_size: not an override (missing EQUAL at '<EOF>'); overrides are "
                             "key=value (+key=value adds a key, ~key deletes one)"),
    # a multirun: every job's config checked before any starts; -m anywhere on the line
    (["-m", "data.batch_size=abc"], 1, "error: data.batch_size='abc': expected an integer >= 1"),
    (["sampling.sampler=heun2", "-m"], 1, "error: sampling.sampler='heun2': expected one of ddim, ddpm, dpm++, "
                                          "dpm++_karras, dpm++_sde_karras, dpmsolver++, euler, euler_a, euler_karras, "
                                          "lms, pndm"),
])  # fmt: skip
def test_hydra_s_own_mistakes_are_one_line_naming_the_item(tmp_path, args, code, line):
    out, seconds = _cli(tmp_path, *args, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert (out.returncode, out.stderr.strip().splitlines()) == (code, [line]), out.stderr
    assert "Traceback" not in out.stdout + out.stderr and not (tmp_path / "sweep").exists()  # nothing written
    print(f"{args}: {seconds:.2f} s")
    assert seconds < 10


def test_a_sweep_checks_every_job_before_the_first_starts(tiny_root, tmp_path):
    """The second job's value is wrong: the sweep stops in one line naming it, before the first job trains."""
    out, seconds = _cli(tmp_path, "experiment=shapes", f"paths.data_dir={tiny_root}", *TINY, *TINY_UNET,
                        "data.batch_size=4,1000", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}")  # fmt: skip
    shards = tiny_root / "shapes" / "train"
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"error: data.batch_size=1000 is larger than the 48 samples of data.train_shards={shards} (job 1 of 2: "
        f"data.batch_size=1000)"], out.stderr  # fmt: skip
    assert not (tmp_path / "sweep").exists() and seconds < 10
